"""glibc heap control: the update-scoped mmap threshold is set and restored, and train() uses it per its rule."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import make_policy

import iqstar_lite.algorithm.train as tr
import iqstar_lite.heap as heap
from iqstar_lite.config import load_recipe
from iqstar_lite.data.sources import load_prompts

pytestmark = pytest.mark.filterwarnings("ignore")


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("trim", pad))
        return 1


def test_threshold_is_lowered_inside_and_restored_after_even_on_error(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(heap, "_libc", lambda: fake)
    with pytest.raises(RuntimeError):
        with heap.freed_blocks_returned():
            assert fake.calls == [(heap.M_MMAP_THRESHOLD, 1 << 20)]
            raise RuntimeError("update failed")
    assert fake.calls[1:] == [(heap.M_MMAP_THRESHOLD, 32 << 20), (heap.M_TRIM_THRESHOLD, 64 << 20)]


def test_without_glibc_it_is_a_no_op(monkeypatch):
    monkeypatch.setattr(heap, "_libc", lambda: None)
    with heap.freed_blocks_returned():
        pass
    heap.release_free_heap()


def test_the_real_libc_accepts_the_settings():
    if heap._libc() is None:
        pytest.skip("no glibc here")
    with heap.freed_blocks_returned():
        block = torch.empty(4 << 20, dtype=torch.uint8)  # 4 MiB: mmap'd while inside
        del block
    assert heap._libc().mallopt(heap.M_MMAP_THRESHOLD, heap.GLIBC_MMAP_THRESHOLD_MAX) == 1


@pytest.mark.parametrize(
    "setting, checkpointing, used",
    [("auto", False, False), ("auto", True, True), ("always", False, True), ("never", True, False)],
)
def test_train_scopes_it_to_the_update_per_the_rule(
    tiny_path, tokenizer, tmp_path, monkeypatch, setting, checkpointing, used
):
    entered = []

    @contextmanager
    def recorder():
        entered.append(True)
        yield

    monkeypatch.setattr(tr, "freed_blocks_returned", recorder)
    cfg = load_recipe(
        "tiny_cpu",
        [
            f"model.path={tiny_path}",
            "train.steps=2",
            "rollout.prompts_per_step=2",
            "rollout.max_new_tokens=4",
            "train.checkpoint_every=0",
            f"train.return_freed_memory={setting}",
            f"model.gradient_checkpointing={str(checkpointing).lower()}",
        ],
    )
    model = make_policy(tiny_path, randomize_lora=False)
    tr.train(cfg, tmp_path, model, tokenizer, load_prompts(cfg.data).train[:2], torch.device("cpu"))
    assert entered == ([True, True] if used else [])

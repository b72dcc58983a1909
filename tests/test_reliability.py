"""Never lose a run, never run a stranger's code: pickle-free trainer state, non-finite guard, checkpoints that
survive damage, torn metrics, and the signals that stop a run (kill -9 and SIGTERM in test_faults.py)."""

from __future__ import annotations

import json
import pickle
import random

import pytest
import torch
from conftest import make_policy

from iqstar_lite.algorithm.train import make_optimizer, make_scheduler, train
from iqstar_lite.checkpoint import (
    NonFiniteAdapterError,
    checkpoints,
    keep_metrics_until,
    load_checkpoint,
    resume_latest,
    save_adapter_atomic,
    save_checkpoint,
)
from iqstar_lite.config import load_recipe
from iqstar_lite.data.sources import load_prompts
from iqstar_lite.errors import UserError
from iqstar_lite.state_io import StateFormatError, load_state, save_state

pytestmark = pytest.mark.filterwarnings("ignore")


class Payload:
    """Unpickling this runs code: it writes a marker file (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_state_round_trips_without_pickle(tmp_path):
    """An AdamW state (integer parameter ids as keys), Python's RNG state (tuples), nan and inf come back equal."""
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.sum().backward()
    opt.step()
    state = {
        "step": 7,
        "optimizer": opt.state_dict(),
        "python": random.getstate(),
        "x": [float("nan"), float("inf"), None, True],
    }
    save_state(tmp_path, state)
    back = load_state(tmp_path)
    assert back["step"] == 7 and back["python"] == random.getstate()
    assert set(back["optimizer"]["state"]) == {0} and torch.equal(
        back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    assert back["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    x = back["x"]
    assert x[0] != x[0] and x[1] == float("inf") and x[2:] == [None, True]
    assert {f.name for f in tmp_path.iterdir()} == {"state.safetensors", "state.json"}


def test_crafted_pickle_is_refused_without_running(tmp_path):
    """A checkpoint whose trainer state is a pickle (the old format, or a crafted file) is refused and never unpickled:
    the payload's marker file is not created, whether the pickle sits in trainer_state.pt or in place of the new files."""
    marker = tmp_path / "pwned"
    old = tmp_path / "checkpoints" / "step-000001"
    (old / "adapter").mkdir(parents=True)
    (old / "trainer_state.pt").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(StateFormatError, match="pickle"):
        load_checkpoint(old, None, None, None)
    (old / "state.json").write_bytes(pickle.dumps(Payload(marker)))
    (old / "state.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(StateFormatError, match="unreadable"):
        load_checkpoint(old, None, None, None)
    assert not marker.exists()
    with pytest.raises(UserError, match="no checkpoint in .* loads .*unreadable"):
        resume_latest(tmp_path, None, None, None)
    assert not marker.exists()
    assert resume_latest(tmp_path / "empty", None, None, None) == (None, 0)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_falls_back_to_the_newest_checkpoint_that_loads_and_cleans_leftovers(tiny_path, tmp_path):
    """Checkpoints at steps 1 and 2; step 2's state file is torn, an interrupted save left a temporary and a moved-aside
    ``.old``: resume cleans both, skips step 2 with a warning and restores step 1 exactly (adapter, optimizer, RNG)."""
    cfg = load_recipe("tiny_cpu", [f"model.path={tiny_path}"])
    model = make_policy(tiny_path)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, _ = make_optimizer(params, cfg)
    sched = make_scheduler(opt, cfg)
    for step in (1, 2):
        sum(p.sum() for p in params).backward()
        opt.step(), sched.step(), opt.zero_grad()
        if step == 1:
            want, rng = _trainable(model), torch.get_rng_state()
        save_checkpoint(tmp_path, step, model, opt, sched)
    root = tmp_path / "checkpoints"
    torn = root / "step-000002" / "state.safetensors"
    torn.write_bytes(torn.read_bytes()[:100])
    (root / ".step-000003-abcd1234").mkdir()
    (root / ".step-000002.old").mkdir()
    torch.manual_seed(123)
    fresh = make_policy(tiny_path, seed=5)
    opt2, _ = make_optimizer([p for p in fresh.parameters() if p.requires_grad], cfg)
    sched2 = make_scheduler(opt2, cfg)
    path, step = resume_latest(tmp_path, fresh, opt2, sched2)
    assert (path.name, step) == ("step-000001", 1)
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002"]
    got = _trainable(fresh)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert torch.equal(torch.get_rng_state(), rng)
    assert sched2.last_epoch == 1 and opt2.state_dict()["state"]


def test_interrupted_swap_is_completed(tmp_path):
    """Killed between the two renames of a save: only ``.step-000004.old`` exists, complete. It is put back."""
    root = tmp_path / "checkpoints"
    (root / ".step-000004.old").mkdir(parents=True)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000004"]


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    keep_metrics_until(path, 2)
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 2]
    keep_metrics_until(path, 1)
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n'


def test_non_finite_adapter_is_never_saved(tiny_path, tmp_path):
    model = make_policy(tiny_path)
    save_adapter_atomic(model, tmp_path / "adapter")
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    next(p for p in model.parameters() if p.requires_grad).data[0, 0] = float("nan")
    with pytest.raises(NonFiniteAdapterError, match="nan"):
        save_adapter_atomic(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before


def _nan_on(calls: set[int]):
    """A distill_loss that returns nan on the given call numbers (one call per micro-batch)."""
    from iqstar_lite.algorithm import update as update_mod

    real, count = update_mod.distill_loss, [0]

    def loss(*a, **k):
        count[0] += 1
        out, met = real(*a, **k)
        return (out * float("nan"), met) if count[0] in calls else (out, met)

    return loss


def test_nan_loss_skips_the_step_and_a_run_of_them_stops_training(tiny_path, tokenizer, tmp_path, monkeypatch):
    """Step 2's loss is nan: its optimizer step is skipped (counted in metrics), the adapter stays finite and equal to
    step 1's. Then every loss nan: after train.max_nonfinite_steps=2 steps in a row the run stops with one clear error."""
    from iqstar_lite.algorithm import update as update_mod

    cfg = load_recipe(
        "tiny_cpu",
        [
            f"model.path={tiny_path}",
            "train.steps=3",
            "rollout.prompts_per_step=2",
            "rollout.max_new_tokens=4",
            "train.checkpoint_every=1",
            "loss.type=distill",
            "train.max_nonfinite_steps=2",
            "train.micro_batch=2",
        ],
    )
    examples = load_prompts(cfg.data).train[:2]
    model = make_policy(tiny_path, randomize_lora=False)
    monkeypatch.setattr(update_mod, "distill_loss", _nan_on({2}))
    train(cfg, tmp_path, model, tokenizer, examples, torch.device("cpu"))
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 0]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())

    model = make_policy(tiny_path, randomize_lora=False)
    monkeypatch.setattr(update_mod, "distill_loss", _nan_on(set(range(100))))
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match="2 steps in a row had nan/inf"):
        train(cfg, tmp_path / "b", model, tokenizer, examples, torch.device("cpu"))
    assert not (tmp_path / "b" / "adapter").exists()


def test_recovery_touches_only_the_folders_it_writes(tmp_path):
    """Hidden folders of the same shapes but other names (a user's) stay; only step-* temporaries and .old go or return."""
    from iqstar_lite.atomic import recover_dirs

    for name in (".cache-datasets", ".notes.old", ".step-000001-abcd1234", ".step-000002.old"):
        (tmp_path / name).mkdir()
    done = recover_dirs(tmp_path, r"step-\d{6,}")
    assert sorted(done) == ["removed .step-000001-abcd1234", "restored step-000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache-datasets", ".notes.old", "step-000002"]


def test_checkpoint_minutes_saves_without_a_step_cadence(tiny_path, tokenizer, tmp_path):
    """train.checkpoint_every=0 and a time cadence shorter than a step: a checkpoint after every step (the last 2 kept)."""
    cfg = load_recipe(
        "tiny_cpu",
        [
            f"model.path={tiny_path}",
            "train.steps=3",
            "rollout.prompts_per_step=2",
            "rollout.max_new_tokens=4",
            "train.checkpoint_every=0",
            "train.checkpoint_minutes=0.00001",
        ],
    )
    seen = []
    train(
        cfg,
        tmp_path,
        make_policy(tiny_path, randomize_lora=False),
        tokenizer,
        load_prompts(cfg.data).train[:2],
        torch.device("cpu"),
        on_step=lambda m: seen.append(sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))),
    )
    assert seen == [["step-000001"], ["step-000001", "step-000002"], ["step-000002", "step-000003"]]

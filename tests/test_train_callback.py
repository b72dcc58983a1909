"""train(on_step=...): called with each step's metrics after its line is written; True stops early, adapter still saved."""

import json

import pytest
import torch

from conftest import make_policy
from iqstar_lite.config import load_recipe
from iqstar_lite.data import load_prompts
from iqstar_lite.train import train

pytestmark = pytest.mark.filterwarnings("ignore")


def test_on_step_sees_metrics_and_stops_early(tiny_path, tokenizer, tmp_path):
    cfg = load_recipe("tiny_cpu", [f"model.path={tiny_path}", "train.steps=3", "rollout.prompts_per_step=2", "rollout.max_new_tokens=4",
                                   "train.checkpoint_every=0"])
    model = make_policy(tiny_path, randomize_lora=False)
    seen = []

    def on_step(m: dict):
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        seen.append((m["step"], len(lines), json.loads(lines[-1]) == m, m["seconds"] > 0))
        return True if m["step"] == 2 else None  # None (step 1) must not stop

    last = train(cfg, tmp_path, model, tokenizer, load_prompts(cfg.data).train[:2], torch.device("cpu"), on_step=on_step)
    assert seen == [(1, 1, True, True), (2, 2, True, True)]
    assert last["step"] == 2
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

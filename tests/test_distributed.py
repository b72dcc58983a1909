"""Data-parallel training on accelerate, two CPU processes over gloo started by torchrun (the command that really
starts N processes here; `accelerate launch --num_processes 2 --cpu` starts one with accelerate 1.15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests" / "distributed_worker.py")
pytestmark = pytest.mark.filterwarnings("ignore")


def launch(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), WORKER, *args]
        if nproc > 1
        else [sys.executable, WORKER, *args]
    )
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.mark.parametrize("loss", ["pg", "distill"])
def test_two_process_update_equals_one_process_update(tmp_path, loss):
    """One optimizer step (SGD, lr 1) on the same global batch: the LoRA change of 2 processes (each with half the rows,
    DDP averaging, global token weights and, for pg, global whitening) equals that of 1 process with all rows."""
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    for n, out in ((1, one), (2, two)):
        res = launch(n, "update", str(out), loss)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys() and any(bool(v.abs().sum() > 0) for v in a.values())
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_two_process_run_writes_one_consistent_run_directory_and_resumes(tmp_path):
    from peft import PeftModel

    from iqstar_lite.config import ModelConfig
    from iqstar_lite.models.load import load_base

    out = tmp_path / "run"
    common = ["tiny_cpu", f"out_dir={out}", "stages=train", "train.checkpoint_every=1"]
    res = launch(2, "recipe", *common, "train.steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["world_size"] == 2 for r in rows)
    assert "world_size: 2" in (out / "config.yaml").read_text()
    assert res.stdout.count("run directory:") == 1 and (out / "eval_after.json").is_file()
    # one writer: one TensorBoard event file, one set of sample answers per step
    writers = {p.name.split(".")[-2] for p in (out / "tensorboard").rglob("events.out.tfevents.*")}  # .<host>.<pid>.<n>
    assert len(writers) == 1, writers
    assert [json.loads(ln)["step"] for ln in (out / "samples.jsonl").read_text().splitlines()] == [1, 1, 1, 2, 2, 2]
    # each step's global batch (rollout.prompts_per_step = 4) split into disjoint halves
    ranks = [[json.loads(ln) for ln in (out / f"prompts-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    from iqstar_lite.algorithm.train import prompt_batch
    from iqstar_lite.config import load_recipe
    from iqstar_lite.data.formatting import Formatter
    from iqstar_lite.data.sources import load_prompts
    from iqstar_lite.models.load import load_tokenizer

    cfg = load_recipe("tiny_cpu", [])
    fmt = Formatter(load_tokenizer(cfg.model.path), cfg.data, cfg.estimator.kind)
    for step in range(2):
        mine = ranks[0][step] + ranks[1][step]
        assert len(ranks[0][step]) == len(ranks[1][step]) == 2 and not set(ranks[0][step]) & set(ranks[1][step])
        assert sorted(mine) == sorted(
            fmt.plain(e) for e in prompt_batch(load_prompts(cfg.data).train, step, 4, cfg.train.seed)
        )
    PeftModel.from_pretrained(load_base(ModelConfig(path=cfg.model.path, device="cpu")), out / "adapter")

    res = launch(2, "recipe", *common, "train.steps=4", "train.resume=true", "eval.enabled=false")
    assert res.returncode == 0, res.stderr[-3000:]
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    res = launch(1, "recipe", *common, "train.steps=5", "train.resume=true", "eval.enabled=false")
    assert res.returncode == 2 and "written by 2 processes" in res.stderr and "Traceback" not in res.stderr

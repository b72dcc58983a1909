"""Fault injection on the real CLI (tiny model): kill -9 at random moments and SIGTERM, each followed by
``train.resume=true``; the final adapter equals an uninterrupted run's bit for bit, no step is lost beyond the
checkpoint cadence, and every checkpoint left on disk loads. A crash inside a checkpoint save leaves the previous
checkpoints whole."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import ROOT

pytestmark = pytest.mark.filterwarnings("ignore")

KILLS = int(
    os.environ.get("IQSTAR_FAULT_KILLS", "2")
)  # IQSTAR_FAULT_KILLS=10 pytest tests/test_faults.py: a longer trial
STEPS = max(6, 3 * KILLS)
ARGS = ["tiny_cpu", "stages=train", "eval.enabled=false", f"train.steps={STEPS}", "train.checkpoint_every=1"]


def start(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "iqstar_lite.recipe", *ARGS, f"out_dir={out}", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def metrics_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


def wait_for_steps(proc: subprocess.Popen, out: Path, n: int, timeout: float = 300) -> None:
    t0 = time.time()
    while len(metrics_steps(out)) < n:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def assert_every_checkpoint_loads(out: Path, tiny_path: str) -> None:
    from conftest import make_policy

    from iqstar_lite.algorithm.train import make_optimizer, make_scheduler
    from iqstar_lite.checkpoint import checkpoints, load_checkpoint
    from iqstar_lite.config import load_recipe

    cfg = load_recipe("tiny_cpu", [f"model.path={tiny_path}"])
    found = checkpoints(out)
    assert found
    for path in found:
        model = make_policy(tiny_path, randomize_lora=False)
        opt, _ = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
        assert load_checkpoint(path, model, opt, make_scheduler(opt, cfg)) == int(path.name.split("-")[1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = start(out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert metrics_steps(out) == list(range(1, STEPS + 1))
    return adapter(out)


def test_kill_9_at_random_moments_then_resume_gives_the_same_adapter(reference, tmp_path, tiny_path):
    rng = random.Random(0)
    out, kills, lost = tmp_path / "run", 0, []
    for _ in range(KILLS):
        before = len(metrics_steps(out))
        proc = start(out, "train.resume=true")
        wait_for_steps(proc, out, min(before + 1, STEPS))
        time.sleep(rng.uniform(0.0, 0.6))  # anywhere in a step: rollout, update, metrics write, checkpoint save
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate()
        written = len(metrics_steps(out))
        from iqstar_lite.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(out)
        saved = int(ckpt.name.split("-")[1]) if ckpt else 0
        lost.append(written - saved)
        assert_every_checkpoint_loads(out, tiny_path)
    proc = start(out, "train.resume=true")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    print(f"kills {kills}/{KILLS} survived; metrics lines beyond the newest checkpoint at each kill {lost}")
    assert kills >= KILLS - 1
    assert max(lost) <= 1  # checkpoint_every=1: at most the step being written when killed
    assert metrics_steps(out) == list(range(1, STEPS + 1))
    assert_same(adapter(out), reference)


def test_sigterm_saves_a_checkpoint_says_how_to_resume_and_exits_non_zero(reference, tmp_path, tiny_path):
    out = tmp_path / "run"
    proc = start(out, "train.checkpoint_every=0", "train.checkpoint_minutes=0")  # no cadence: only SIGTERM saves
    wait_for_steps(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("stopped by SIGTERM"))
    assert "train.resume=true" in line and f"out_dir={out}" in line
    steps = metrics_steps(out)
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{len(steps):06d}"]
    proc = start(out, "train.resume=true")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert_same(adapter(out), reference)


CRASH_IN_SAVE = """
import os, sys, torch
sys.path[:0] = [{tests!r}, {root!r}]
from conftest import make_policy
from iqstar_lite import checkpoint, state_io
from iqstar_lite.config import load_recipe
from iqstar_lite.algorithm.train import make_optimizer, make_scheduler
cfg = load_recipe("tiny_cpu", ["model.path={tiny}"])
model = make_policy({tiny!r})
opt, _ = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
sched = make_scheduler(opt, cfg)
checkpoint.save_checkpoint({out!r}, 1, model, opt, sched)
def dying(folder, state):
    (folder / "state.json").write_text('{{"step": 2, "opt')  # half written, then the process dies (kill -9, power cut)
    os._exit(137)
checkpoint.save_state = dying
checkpoint.save_checkpoint({out!r}, 2, model, opt, sched)
"""


def test_crash_inside_a_checkpoint_save_leaves_the_previous_checkpoint(tmp_path, tiny_path):
    from iqstar_lite.checkpoint import checkpoints

    out = tmp_path / "run"
    code = CRASH_IN_SAVE.format(tests=str(ROOT / "tests"), root=str(ROOT), tiny=tiny_path, out=str(out))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 137, res.stderr[-3000:]
    assert any(p.name.startswith(".step-000002-") for p in (out / "checkpoints").iterdir())  # the torn temporary
    assert [p.name for p in checkpoints(out)] == ["step-000001"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    assert_every_checkpoint_loads(out, tiny_path)

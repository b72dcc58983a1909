"""Atomic adapter checkpoints and resume."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch

from iqstar_lite.atomic import atomic_dir

KEEP_LAST = 2


def save_adapter_atomic(model, target: Path) -> None:
    """Write a peft adapter directory so that ``target`` is either the old or the complete new one."""
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    target = ckpt_root / f"step-{step:06d}"
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp / "adapter")
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        torch.save(state, tmp / "trainer_state.pt")
    for old in sorted(ckpt_root.glob("step-*"))[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step-*") if (p / "trainer_state.pt").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    """Restore adapter weights, optimizer, scheduler and RNG; returns the step to continue after."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(path) / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    state = torch.load(Path(path) / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])

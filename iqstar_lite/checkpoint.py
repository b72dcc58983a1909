"""Atomic adapter checkpoints and resume: nothing unpickled, the newest checkpoint that loads wins.

A checkpoint ``checkpoints/step-NNNNNN/`` holds ``adapter/`` (peft, safetensors) and the trainer state
(optimizer, scheduler, RNG of torch / CUDA / Python) as ``state.safetensors`` + ``state.json`` (``state_io``).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import torch

from iqstar_lite.atomic import atomic_dir, atomic_file, recover_dirs
from iqstar_lite.errors import UserError
from iqstar_lite.rundir import RunDir
from iqstar_lite.state_io import StateFormatError, load_state, save_state

log = logging.getLogger("iqstar_lite")

KEEP_LAST = 2
STEP_GLOB = "step-*"


class NonFiniteAdapterError(RuntimeError):
    """The adapter holds nan / inf weights: it is never saved, merged or exported."""


def assert_finite_adapter(model) -> None:
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteAdapterError(f"{len(bad)} adapter tensors hold nan/inf (first: {bad[0]}); not saved")


def save_adapter_atomic(model, target: Path) -> None:
    """Write a peft adapter directory so that ``target`` is either the old or the complete new one; never a non-finite one."""
    assert_finite_adapter(model)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint has CUDA RNG states for %d devices, this machine %d: CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


def save_checkpoint(
    run_dir: Path, step: int, model, optimizer, scheduler, accelerator=None, average: dict | None = None
) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically, keep the last ``KEEP_LAST``. Data-parallel (``accelerator`` with
    several processes): every process's RNG state is gathered, the main process writes, all wait for it. ``average``:
    the weight average's state (``train.ema``), read back by ``load_average``."""
    assert_finite_adapter(model)
    ckpt_root = RunDir(run_dir).checkpoints
    target = ckpt_root / f"step-{step:06d}"
    world = accelerator.num_processes if accelerator is not None else 1
    rngs = [rng_state()]
    if world > 1:
        from accelerate.utils import gather_object

        rngs = gather_object(rngs)  # between the run's own processes (torch.distributed), never from a file
    if accelerator is None or accelerator.is_main_process:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp / "adapter")
            save_state(
                tmp,
                {
                    "step": step,
                    "world_size": world,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rngs[0],
                    "rng_ranks": rngs,
                    **({"average": average} if average is not None else {}),
                },
            )
        for old in checkpoints(run_dir)[KEEP_LAST:]:
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        accelerator.wait_for_everyone()
    return target


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first (an interrupted save's temporary is recovered or removed first)."""
    root = RunDir(run_dir).checkpoints
    recover_dirs(root, r"step-\d{6,}")
    return sorted((p for p in root.glob(STEP_GLOB) if p.is_dir()), reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[0] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0, world: int = 1) -> int:
    """Restore adapter weights, optimizer, scheduler and RNG; returns the step to continue after.

    Raises StateFormatError (a ValueError) when the folder is not a complete checkpoint of this format; the model,
    optimizer and scheduler are left untouched then (everything is read and checked before anything is applied).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    if (path / "trainer_state.pt").exists() and not (path / "state.json").exists():
        raise StateFormatError("written by an older version as a pickle (trainer_state.pt), which is never loaded")
    state = load_state(path)
    try:
        weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    except Exception as e:  # noqa: BLE001 - torn or missing file
        raise StateFormatError(f"adapter unreadable ({type(e).__name__}: {e})") from None
    if not all(bool(torch.isfinite(w).all()) for w in weights.values() if w.is_floating_point()):
        raise StateFormatError("adapter holds nan/inf")
    try:
        step = int(state["step"])
        opt, sched = state["optimizer"], state["scheduler"]
        saved_world = int(state.get("world_size", 1))
    except (KeyError, TypeError, ValueError) as e:
        raise StateFormatError(f"incomplete trainer state ({e})") from None
    if saved_world != world:
        raise UserError(
            f"checkpoint {path} was written by {saved_world} processes and this run has {world}; resume with "
            f"the same number of processes (torchrun --nproc_per_node {saved_world} ...)"
        )
    try:
        rng = state["rng_ranks"][rank] if "rng_ranks" in state else state["rng"]
        if not (
            isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor) and len(rng.get("python", ())) == 3
        ):
            raise ValueError("malformed RNG state")
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise StateFormatError(f"incomplete trainer state ({e})") from None
    saved = {k: v.clone() for k, v in ((n, p) for n, p in model.named_parameters() if p.requires_grad)}
    saved_opt, saved_sched = optimizer.state_dict(), scheduler.state_dict()
    try:
        set_peft_model_state_dict(model, weights)
        optimizer.load_state_dict(opt)
        scheduler.load_state_dict(sched)
        set_rng_state(rng)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        with torch.no_grad():  # leave model, optimizer and scheduler as they were
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
        optimizer.load_state_dict(saved_opt)
        scheduler.load_state_dict(saved_sched)
        raise StateFormatError(f"does not fit this run's model / optimizer ({type(e).__name__}: {e})") from None
    return step


def load_average(path: Path) -> dict | None:
    """The weight average's state saved with a checkpoint (``save_checkpoint(average=...)``); None when it has none."""
    return load_state(Path(path)).get("average")


def resume_latest(run_dir: Path, model, optimizer, scheduler, rank: int = 0, world: int = 1) -> tuple[Path | None, int]:
    """Load the newest checkpoint that loads (warning about each one skipped); (None, 0) when there is none.

    Raises UserError when checkpoints exist and none of them loads: starting over would overwrite the run.
    """
    found = checkpoints(run_dir)
    reasons = []
    for path in found:
        try:
            return path, load_checkpoint(path, model, optimizer, scheduler, rank, world)
        except StateFormatError as e:
            log.warning("checkpoint %s skipped: %s", path, e)
            reasons.append(f"{path.name}: {e}")
    if found:
        raise UserError(
            f"train.resume=true but no checkpoint in {RunDir(run_dir).checkpoints} loads ({'; '.join(reasons)}); "
            f"to start over, move that folder away or choose another out_dir"
        )
    return None, 0


def jsonl_rows(path: Path) -> list[dict]:
    """The JSON objects of a run's .jsonl file (metrics.jsonl, samples.jsonl), in order; a torn line (killed mid-write)
    is skipped; [] when the file is absent."""
    if not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def keep_metrics_until(path: Path, step: int) -> None:
    """Keep the lines of steps <= ``step`` (those the checkpoint has) of metrics.jsonl / samples.jsonl; a torn last line
    (killed mid-write) goes."""
    if not path.exists():
        return
    kept = [row for row in jsonl_rows(path) if isinstance(row.get("step"), int) and row["step"] <= step]
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept), encoding="utf-8")

"""Trackers through accelerate's tracking API: TensorBoard (RUN_DIR/tensorboard/), W&B, MLflow (``train.report_to``).

accelerate writes on the main process only (its trackers' ``start`` / ``log`` run there), so a data-parallel run
has one set of event files. What is logged: every metrics.jsonl row under ``train/`` at its step, each evaluation's
summary under ``eval/`` (before at step 0, after at the last step; contrastive decoding under ``eval_contrastive/``),
and the sample answers (``samples.py``) as text.
"""

from __future__ import annotations

import logging
from pathlib import Path

from iqstar_lite.config import RecipeConfig
from iqstar_lite.errors import UserError
from iqstar_lite.extras import install_hint
from iqstar_lite.rundir import RunDir

log = logging.getLogger("iqstar_lite")

PROJECT = "iqstar_lite"
INSTALL = {"tensorboard": install_hint("tensorboard"), "wandb": "pip install wandb", "mlflow": "pip install mlflow"}


def _available(name: str) -> bool:
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}[name]()


def tracker_names(report_to: str) -> list[str]:
    """``train.report_to`` -> the trackers to start. ``auto``: tensorboard where installed; a named tracker that is not
    installed is a one-line error that says how to install it (or to turn it off)."""
    names = [t.strip() for t in report_to.split(",") if t.strip()]
    if names == ["none"]:
        return []
    if names == ["auto"]:
        if _available("tensorboard"):
            return ["tensorboard"]
        log.info(
            "tensorboard is not installed: no tracker (metrics.jsonl only); %s, or set train.report_to",
            INSTALL["tensorboard"],
        )
        return []
    missing = [n for n in names if not _available(n)]
    if missing:
        raise UserError(
            f"train.report_to={report_to} but {', '.join(missing)} is not installed; "
            f"{'; '.join(INSTALL[n] for n in missing)} (or set train.report_to=none)"
        )
    return names


def make_accelerator(cfg: RecipeConfig, run_dir: Path, device):
    """The run's ``Accelerator`` with its trackers (not started yet: ``start_trackers``). TensorBoard writes to
    RUN_DIR/tensorboard/, W&B and MLflow to their own stores (project / experiment ``iqstar_lite``, run = the folder's name)."""
    from accelerate import Accelerator
    from accelerate.tracking import TensorBoardTracker

    names = tracker_names(cfg.train.report_to)
    # accelerate's own TensorBoard tracker, given the run directory and the sub-folder name (its project name would
    # otherwise also name the W&B project)
    log_with = [TensorBoardTracker(RunDir.TENSORBOARD, str(run_dir)) if n == "tensorboard" else n for n in names]
    return Accelerator(cpu=device.type == "cpu", log_with=log_with or None, project_dir=str(run_dir))


def flat_config(cfg: RecipeConfig) -> dict:
    """The resolved config as flat ``section.key`` scalars (what trackers store as hyper-parameters)."""
    out = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            for k, v in values.items():
                out[f"{section}.{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
        else:
            out[section] = values
    return out


def start_trackers(accelerator, cfg: RecipeConfig, run_dir: Path) -> None:
    """Start the trackers (main process) with the config as hyper-parameters."""
    if not accelerator.log_with:
        return
    name = Path(run_dir).resolve().name
    accelerator.init_trackers(
        PROJECT, config=flat_config(cfg), init_kwargs={"wandb": {"name": name}, "mlflow": {"run_name": name}}
    )


def numbers(row: dict, prefix: str) -> dict:
    return {
        f"{prefix}{k}": v
        for k, v in row.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
    }


def log_step(accelerator, row: dict) -> None:
    """One metrics.jsonl row, every number under ``train/`` at its step."""
    if accelerator.trackers:
        accelerator.log(numbers(row, "train/"), step=row["step"])


def log_eval(accelerator, summary: dict, step: int, contrastive: bool = False, suffix: str = "") -> None:
    """An evaluation's summary (eval_before / eval_after: ``eval/``; contrastive decoding: ``eval_contrastive/``; the
    out-of-distribution set, ``suffix="_ood"``: ``eval_ood/``, ``eval_contrastive_ood/``)."""
    if accelerator.trackers:
        accelerator.log(numbers(summary, ("eval_contrastive" if contrastive else "eval") + suffix + "/"), step=step)


def log_samples(accelerator, rows: list[dict], step: int) -> None:
    """Sample answers as one markdown table (TensorBoard's text tab)."""
    if not (accelerator.trackers and rows):
        return

    def cell(text) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    table = "| prompt | answer | judge |\n| --- | --- | --- |\n" + "".join(
        f"| {cell(r['prompt'])} | {cell(r['answer'])} | {'' if r.get('judge') is None else r['judge']} |\n"
        for r in rows
    )
    accelerator.log({"samples": table}, step=step)

"""RUN_DIR/curves.png: a picture of the run next to its metrics file.

Per step (metrics.jsonl): reward, KL(pi_theta || pi_ref), loss, seconds per step; at the evaluation points: the judge
rate and principle score before (step 0) and after (last step) training (eval_before / eval_after.json), contrastive
decoding's as a dashed line (what training approaches), and the sample answers' judge rate (samples.jsonl) at each of
their steps. matplotlib is optional (``pip install 'iqstar_lite[plot]'``); without it the run says so and goes on.

    python -m iqstar_lite curves RUN_DIR      # (re)draw the picture of any run
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from iqstar_lite.checkpoint import jsonl_rows
from iqstar_lite.errors import UserError, run_cli
from iqstar_lite.extras import install_hint
from iqstar_lite.rundir import RunDir

log = logging.getLogger("iqstar_lite")

STEP_PANELS = (
    ("reward_mean", "reward (mean per token)"),
    ("kl", "KL(policy || reference) per token"),
    ("loss", "loss"),
    ("seconds", "seconds per step"),
)
MATPLOTLIB_MISSING = "matplotlib is not installed; " + install_hint("matplotlib") + " to draw curves.png"


def _summary(path: Path) -> dict:
    try:
        return json.loads(path.read_text())["summary"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def plot_run(run_dir: Path) -> Path:
    """Draw RUN_DIR/curves.png from the run's files; UserError when there is nothing to draw or no matplotlib."""
    run_dir = Path(run_dir)
    rows = [r for r in jsonl_rows(RunDir(run_dir).metrics) if isinstance(r.get("step"), int)]
    if not rows:
        raise UserError(f"{str(run_dir)!r} has no metrics.jsonl rows to plot; pass the out_dir of a training run")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(MATPLOTLIB_MISSING) from None
    steps = [r["step"] for r in rows]
    last = steps[-1]
    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, title) in zip(axes[:2], STEP_PANELS[:2]):
        _step_panel(ax, rows, steps, key, title)
    _step_panel(axes[3], rows, steps, *STEP_PANELS[2])
    _step_panel(axes[5], rows, steps, *STEP_PANELS[3])
    before, after, cd = (_summary(RunDir(run_dir).eval_row(r)) for r in ("before", "after", "contrastive"))
    samples: dict[int, list[float]] = {}
    for r in jsonl_rows(RunDir(run_dir).samples):
        if isinstance(r.get("judge"), (int, float)) and isinstance(r.get("step"), int):
            samples.setdefault(r["step"], []).append(float(r["judge"]))
    judge = next((s.get("judge") for s in (after, before, cd) if s.get("judge")), None)
    _eval_panel(
        axes[2],
        "judge_rate",
        f"judge rate ({judge or 'no judge'})",
        before,
        after,
        cd,
        last,
        {k: sum(v) / len(v) for k, v in sorted(samples.items())},
    )
    _eval_panel(axes[4], "principle_score", "principle score", before, after, cd, last, {})
    fig.suptitle(f"{run_dir.name}: {last} steps")
    out = RunDir(run_dir).curves
    fig.savefig(out, dpi=80)
    return out


def _step_panel(ax, rows: list[dict], steps: list[int], key: str, title: str) -> None:
    points = [(s, r[key]) for s, r in zip(steps, rows) if isinstance(r.get(key), (int, float))]
    if points:
        ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _eval_panel(
    ax, key: str, title: str, before: dict, after: dict, cd: dict, last: int, samples: dict[int, float]
) -> None:
    points = [(s, e[key]) for s, e in ((0, before), (last, after)) if e.get(key) is not None]
    if points:
        ax.plot(*zip(*points), marker="o", label="held-out evaluation (before / after)")
    if samples:
        ax.plot(list(samples), list(samples.values()), marker="x", linestyle=":", label="sample answers")
    if cd.get(key) is not None:
        ax.axhline(cd[key], linestyle="--", color="gray", label="contrastive decoding (target)")
    if points or samples or cd.get(key) is not None:
        ax.legend(fontsize=7)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def write_curves(run_dir: Path) -> Path | None:
    """At the end of a run (and of a resumed one): curves.png, or a warning saying why not; never stops the run."""
    try:
        return plot_run(run_dir)
    except Exception as e:  # noqa: BLE001 - an optional picture (matplotlib missing, odd metrics, disk full) never fails the run
        log.warning("curves.png not written: %s", e)
        return None


def main(argv: list[str] | None = None, prog: str = "python -m iqstar_lite curves") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Draw RUN_DIR/curves.png from a run's files.")
    p.add_argument("run_dir", type=Path)
    print(plot_run(p.parse_args(argv).run_dir))
    return 0


if __name__ == "__main__":
    run_cli(main)

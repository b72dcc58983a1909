"""Watching a run without the tiny_cpu run (that one is in test_cli.py): which trackers start, when samples are due,
curves.png from a run's files and without matplotlib."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from iqstar_lite import tracking
from iqstar_lite.config import load_recipe
from iqstar_lite.errors import UserError
from iqstar_lite.evaluation.curves import plot_run, write_curves
from iqstar_lite.evaluation.samples import samples_due


def test_report_to_picks_installed_trackers_and_names_the_missing_one(monkeypatch):
    assert tracking.tracker_names("none") == []
    assert tracking.tracker_names("auto") == ["tensorboard"]  # installed with the package
    monkeypatch.setattr(tracking, "_available", lambda name: name == "wandb")
    assert tracking.tracker_names("auto") == []  # no tensorboard: metrics.jsonl only, said in the log
    assert tracking.tracker_names("wandb") == ["wandb"]
    with pytest.raises(
        UserError,
        match=r"tensorboard, mlflow is not installed; pip install 'iqstar_lite\[tracking\]'; pip install mlflow "
        r"\(or set train\.report_to=none\)",
    ):
        tracking.tracker_names("tensorboard,wandb,mlflow")


def test_report_to_is_validated_with_the_config():
    with pytest.raises(UserError, match="'train.report_to' must be one of auto, tensorboard, wandb, mlflow, none"):
        load_recipe("tiny_cpu", ["train.report_to=auto,wandb"])
    assert load_recipe("tiny_cpu", ["train.report_to=tensorboard,mlflow"]).train.report_to == "tensorboard,mlflow"


def test_config_goes_to_trackers_as_flat_scalars():
    flat = tracking.flat_config(load_recipe("tiny_cpu", ["data.columns.prompt=question"]))
    assert (
        flat["train.steps"] == 2
        and flat["model.path"] == "embedded:tiny-random"
        and flat["data.columns"] == "{'prompt': 'question'}"
    )
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


@pytest.mark.parametrize("every, samples, due", [(10, 3, [10, 20, 25]), (0, 3, [25]), (7, 0, [])])
def test_samples_every_n_steps_and_at_the_end(every, samples, due):
    cfg = load_recipe("tiny_cpu", ["train.steps=25", f"eval.every={every}", f"eval.samples={samples}"])
    assert [s for s in range(1, 26) if samples_due(s, cfg)] == due


def _fake_run(tmp_path, with_evals: bool):
    rows = [{"step": s, "loss": 1.0 / s, "reward_mean": 0.1 * s, "kl": 0.01 * s, "seconds": 2.0} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo'
    )  # torn last line
    if with_evals:
        for name, judge in (("eval_before.json", 0.0), ("eval_after.json", 0.75), ("eval_contrastive.json", 0.8)):
            (tmp_path / name).write_text(
                json.dumps({"summary": {"judge": "french", "judge_rate": judge, "principle_score": judge - 0.1}})
            )
        (tmp_path / "samples.jsonl").write_text(
            json.dumps({"step": 2, "prompt": "p", "answer": "a", "judge": 1.0}) + "\n"
        )
    return tmp_path


@pytest.mark.parametrize("with_evals", [True, False])
def test_curves_png_from_the_runs_files(tmp_path, with_evals):
    out = plot_run(_fake_run(tmp_path, with_evals))
    assert out == tmp_path / "curves.png" and out.read_bytes()[:4] == b"\x89PNG"


def test_curves_without_matplotlib_say_how_to_get_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    run = _fake_run(tmp_path, False)
    with pytest.raises(UserError, match=r"matplotlib is not installed; pip install 'iqstar_lite\[plot\]'"):
        plot_run(run)
    with caplog.at_level(logging.WARNING, logger="iqstar_lite"):
        assert write_curves(run) is None  # the run goes on
    assert "curves.png not written: matplotlib is not installed" in caplog.text and not (run / "curves.png").exists()
    with pytest.raises(UserError, match="no metrics.jsonl rows"):
        plot_run(tmp_path / "elsewhere")

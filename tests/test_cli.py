"""The real entry point on CPU with the tiny model: files written, adapter reloads, bad input -> one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, module: str = "iqstar_lite.recipe", **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


def cli_here(monkeypatch, capsys, *args: str) -> subprocess.CompletedProcess:
    """The console entry point (``recipe.cli``: argv -> one line and exit 2 on a UserError) in this process: the same code
    path as ``cli`` without a new interpreter's seconds of imports. An error that is not a UserError propagates (fails)."""
    from iqstar_lite.recipe import cli as entry

    monkeypatch.setattr(sys, "argv", ["iqstar-lite", *args])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as stop:
        entry()
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, stop.value.code, out.out, out.err)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["no_such_recipe"], ["unknown recipe", "tiny_cpu"]),
        (["tiny_cpu", "train.stpes=3"], ["unknown key", "did you mean", "steps"]),
        (["tiny_cpu", "train.steps=many"], ["'train.steps' must be int"]),
        (["tiny_cpu", "loss.type=ppo"], ["'loss.type' must be one of"]),
        (["tiny_cpu", "export.int8_block=24"], ["'export.int8_block' must be 0 (per channel) or a power of two"]),
        (["tiny_cpu", "train.lr=-1", "rollout.top_p=2"], ["2 problems", "train.lr", "rollout.top_p"]),
        (["tiny_cpu", "steps"], ["not key=value"]),
        (["tiny_cpu", "model.path=/no/such/model", "--dry-run"], ["does not exist", "model.path"]),
        (
            ["tiny_cpu", "--dry-run", "model.path=/no/such/model"],
            ["does not exist", "model.path"],
        ),  # key=value after options
        (
            ["tiny_cpu", "eval.batch_size=0", "eval.max_new_tokens=0"],
            ["2 problems", "'eval.batch_size' must be > 0", "eval.max_new_tokens"],
        ),
        (["tiny_cpu", "export.check_new_tokens=0"], ["'export.check_new_tokens' must be > 0"]),
        (["tiny_cpu", "train.report_to=tensorbord"], ["'train.report_to' must be one of", "tensorboard"]),
    ],
)
def test_bad_input_gives_one_line(args, needles, monkeypatch, capsys):
    assert_one_line_error(cli_here(monkeypatch, capsys, *args), *needles)


def test_bad_input_gives_one_line_from_a_new_process():
    """One case through a real interpreter (``python -m``): the exit code and stderr as a shell sees them."""
    assert_one_line_error(cli("tiny_cpu", "train.stpes=3"), "unknown key", "did you mean", "steps")


@pytest.mark.parametrize(
    "content, needles",
    [
        ("", ["is empty"]),
        ('{"prompt": "ok"}\n{not json\n', ["line 2", "not valid JSON"]),
        ('{"text": "x"}\n', ["'prompt'", "columns found: text"]),
    ],
)
def test_bad_prompt_file(tmp_path, tiny_path, content, needles, monkeypatch, capsys):
    f = tmp_path / "prompts.jsonl"
    f.write_text(content)
    out = tmp_path / "run"
    res = cli_here(
        monkeypatch,
        capsys,
        "tiny_cpu",
        f"data.prompts={f}",
        f"out_dir={out}",
        f"model.path={tiny_path}",
        "stages=train",
    )
    assert_one_line_error(res, *needles)


def test_unreachable_hub_model_gives_one_line(tmp_path):
    """A hub id that is not in the local cache while offline (HF_HUB_OFFLINE=1 fails at once, as no network does after retries)."""
    res = cli(
        "tiny_cpu",
        "model.path=SomeOrg/not-cached-model",
        f"out_dir={tmp_path / 'r'}",
        "stages=train",
        HF_HUB_OFFLINE="1",
    )
    assert_one_line_error(res, "SomeOrg/not-cached-model", "model.path")


def test_out_dir_that_is_a_file_or_a_finished_run(tmp_path, tiny_path):
    """out_dir naming a file is refused; so is training from step 0 into a folder that holds a run (it would be
    overwritten): the message says to resume or pick another out_dir, and the run's files are untouched."""
    f = tmp_path / "a_file"
    f.write_text("keep me")
    assert_one_line_error(cli("tiny_cpu", f"out_dir={f}", f"model.path={tiny_path}"), "is a file", "out_dir")
    assert f.read_text() == "keep me"
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    res = cli("tiny_cpu", f"out_dir={run}", f"model.path={tiny_path}", "stages=train")
    assert_one_line_error(res, "already holds a run", "train.resume=true")
    assert sorted(p.name for p in run.iterdir()) == ["adapter"]


def test_missing_prompt_file(tmp_path):
    assert_one_line_error(
        cli("tiny_cpu", f"data.prompts={tmp_path / 'nope.jsonl'}", f"out_dir={tmp_path / 'r'}"),
        "not found",
        "data.prompts",
    )


def test_list_and_dry_run(tiny_path):
    res = cli("--list")
    assert res.returncode == 0 and {"tiny_cpu", "smollm2_cpu", "laptop_7b"} <= set(res.stdout.split())
    res = cli("laptop_7b", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "estimated peak memory per step" in res.stdout and "7,615.6M total" in res.stdout


def test_tiny_cpu_trains_writes_run_dir_and_resumes(tmp_path, tiny_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from iqstar_lite.config import ModelConfig
    from iqstar_lite.models.load import load_base

    out = tmp_path / "run"
    res = cli("tiny_cpu", f"out_dir={out}", "stages=train")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "eval_before.json",
        "eval_after.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (out / name).exists(), name
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2]
    for key in ("loss", "reward_mean", "kl", "response_len", "clip_frac", "tokens_per_s", "peak_mem_gib"):
        assert key in steps[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    after = json.loads((out / "eval_after.json").read_text())["summary"]
    assert after["n"] == 4 and after["principle_score"] is not None
    for key in ("kl_to_target", "target_prefix", "loop_rate", "repetition", "mean_tokens"):
        assert after[key] is not None, key
    cd = json.loads((out / "eval_contrastive.json").read_text())
    assert cd["summary"]["kl_to_target"] == 0.0 and all("response_ids" in r for r in cd["records"])
    assert (
        cd["summary"]["target_prefix"] == cd["summary"]["mean_tokens"]
    )  # pi-hat*'s answers follow themselves to the end
    assert (
        0 <= after["target_prefix"] <= min(after["mean_tokens"], cd["summary"]["mean_tokens"])
    )  # per answer: <= both lengths
    assert "held-out answers" in res.stdout and "contrastive decoding:" in res.stdout
    # out of distribution (eval.ood_prompts=builtin:ood, its dev split), next to the held-out rows
    ood = {row: json.loads((out / f"eval_{row}_ood.json").read_text()) for row in ("before", "contrastive", "after")}
    from iqstar_lite.config import DataConfig
    from iqstar_lite.data.sources import load_examples
    from iqstar_lite.evaluation.report import pick_examples

    dev = [e.text for e in pick_examples(load_examples(DataConfig(prompts="builtin:ood"))[0], "dev", 2)]
    assert [r["prompt"] for r in ood["after"]["records"]] == dev and ood["after"]["summary"]["n"] == 2
    assert "out-of-distribution (builtin:ood dev) evaluation" in res.stdout
    assert re.search(r"^ +held-out +out-of-distribution$", res.stdout, re.M)  # the side-by-side header

    # Watching the run: TensorBoard's own reader finds every step's metrics and the evaluations; sample answers after
    # every step (eval.every=1 in tiny_cpu) in samples.jsonl and the text tab; a picture of the run.
    events = tensorboard_events(out)
    assert [s.step for s in events.Scalars("train/loss")] == [1, 2]
    assert [round(s.value, 5) for s in events.Scalars("train/reward_mean")] == [
        round(m["reward_mean"], 5) for m in steps
    ]
    assert {f"train/{k}" for k in steps[0] if k != "step"} <= set(events.Tags()["scalars"])
    assert [(s.step, s.value) for s in events.Scalars("eval/principle_score")] == [
        (0, pytest.approx(json.loads((out / "eval_before.json").read_text())["summary"]["principle_score"])),
        (2, pytest.approx(after["principle_score"])),
    ]
    assert [s.step for s in events.Scalars("eval_contrastive/kl_to_target")] == [0]
    text = events.Tensors("samples/text_summary")
    assert [t.step for t in text] == [1, 2] and b"| prompt | answer | judge |" in text[0].tensor_proto.string_val[0]
    samples = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [1, 1, 1, 2, 2, 2] and {"prompt", "answer", "judge"} <= set(samples[0])
    assert samples[0]["prompt"] == cd["records"][0]["prompt"]
    # the last step's samples are the final evaluation's first answers (not decoded twice)
    assert [r["answer"] for r in samples[3:]] == [
        r["response"] for r in json.loads((out / "eval_after.json").read_text())["records"][:3]
    ]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hparams = [yaml.safe_load(p.read_text()) for p in (out / "tensorboard").glob("*/hparams.yml")]  # the config, flat
    assert len(hparams) == 1 and hparams[0]["train.steps"] == 2 and hparams[0]["model.path"] == "embedded:tiny-random"

    # Training changed the LoRA B matrices (they start at zero) and the adapter reloads with peft.
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    model = PeftModel.from_pretrained(load_base(ModelConfig(path=tiny_path, device="cpu")), out / "adapter")
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] > 0

    # Resume: two more steps continue from the last checkpoint, metrics keep steps 1..4; a samples line of a step after the
    # checkpoint (a killed run's) is dropped and that step sampled again.
    with (out / "samples.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "prompt": "stale", "answer": "stale", "judge": None}) + "\n")
    res = cli("tiny_cpu", f"out_dir={out}", "stages=train", "train.steps=4", "train.resume=true", "eval.enabled=false")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert [s.step for s in tensorboard_events(out).Scalars("train/loss")] == [1, 2, 3, 4]
    samples = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4] and "stale" not in {
        r["prompt"] for r in samples
    }


def tensorboard_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_guided_samples_train_from_pi_star_in_the_same_rollout(tmp_path, tiny_path):
    """rollout.guided_samples=1 of 2: the step logs the guided rows' KL(pi* || pi_theta) and both groups' EOS rate."""
    out = tmp_path / "guided"
    res = cli(
        "tiny_cpu",
        f"out_dir={out}",
        "stages=train",
        "eval.enabled=false",
        "rollout.samples_per_prompt=2",
        "rollout.guided_samples=1",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("kl_star_guided", "response_len_guided", "eos_rate", "eos_rate_guided"):
        assert key in step, key
    assert step["kl_star_guided"] >= 0

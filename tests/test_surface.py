"""The surface users touch: ``iqstar-lite`` and its subcommands, ``eval`` on prompts a run never saw, the streaming chat
(PyTorch client; the exported clients are in test_export.py), and the Python API through the README's quickstart."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("train", "eval", "export", "check", "chat", "ls", "cp", "curves")


def here(monkeypatch, capsys, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``iqstar-lite ARGS`` in this process (``cli.cli``: one line and exit 2 on a UserError); an error that is not a
    UserError propagates and fails the test."""
    from iqstar_lite.cli import cli

    monkeypatch.setattr(sys, "argv", ["iqstar-lite", *args])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as stop:
        cli()
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, stop.value.code, out.out, out.err)


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def quickstart_code() -> str:
    """The README's quickstart: the python block after the ``<!-- quickstart -->`` marker."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md has no <!-- quickstart --> python block"
    return block.group(1)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The README quickstart run as written, in a fresh folder: a trained tiny run, its evaluation and its ONNX export."""
    where = tmp_path_factory.mktemp("quickstart")
    old = os.getcwd()
    os.chdir(where)
    try:
        scope: dict = {}
        exec(compile(quickstart_code(), "README.md quickstart", "exec"), scope)
    finally:
        os.chdir(old)
    return where, scope


def test_help_lists_every_subcommand_and_each_has_its_own(monkeypatch, capsys):
    res = here(monkeypatch, capsys, "--help")
    assert res.returncode == 0
    listed = re.findall(r"^  (\w+) ", res.stdout, re.M)
    assert listed == list(COMMANDS)
    for command in COMMANDS:
        res = here(monkeypatch, capsys, command, "--help")
        assert res.returncode == 0 and res.stdout.startswith(f"usage: iqstar-lite {command}"), (
            command,
            res.stdout[:200],
        )
    proc = subprocess.run(
        [sys.executable, "-m", "iqstar_lite", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 0 and re.findall(r"^  (\w+) ", proc.stdout, re.M) == list(
        COMMANDS
    )  # python -m iqstar_lite


def test_ls_cp_and_the_copy_trains(monkeypatch, capsys, tmp_path):
    from iqstar_lite.config import list_recipes

    res = here(monkeypatch, capsys, "ls")
    assert res.returncode == 0
    for name in list_recipes():
        assert re.search(rf"^  {name} +\S", res.stdout, re.M), name  # each with its header's first line
    assert (
        re.search(r"^  builtin:ood +200 prompts: 101 dev, 99 test$", res.stdout, re.M)
        and "builtin:builtin" in res.stdout
    )
    res = here(monkeypatch, capsys, "cp", "tiny_cpu", str(tmp_path))
    assert (
        res.returncode == 0
        and (tmp_path / "tiny_cpu.yaml").read_text() == (ROOT / "recipes" / "tiny_cpu.yaml").read_text()
    )
    mine = tmp_path / "mine.yaml"
    assert here(monkeypatch, capsys, "cp", "tiny_cpu", str(mine)).returncode == 0
    mine.write_text(mine.read_text().replace("r: 4", "r: 2"))
    one_line_error(here(monkeypatch, capsys, "cp", "tiny_cpu", str(mine)), "already exists", "--force")
    assert "r: 2" in mine.read_text()  # nothing overwritten
    one_line_error(
        here(monkeypatch, capsys, "cp", "tiny_cpuu", str(tmp_path / "x.yaml")),
        "unknown recipe",
        "did you mean 'tiny_cpu'",
    )
    one_line_error(here(monkeypatch, capsys, "cp", "tiny_cpu", str(tmp_path / "x.txt")), "not a .yaml file")
    res = here(monkeypatch, capsys, "train", str(mine), "--dry-run")  # the edited copy is a recipe
    assert res.returncode == 0 and "r: 2" in res.stdout, res.stderr
    res = here(monkeypatch, capsys, str(mine), "--dry-run")  # the old form: iqstar-lite RECIPE ...
    assert res.returncode == 0 and "r: 2" in res.stdout
    one_line_error(here(monkeypatch, capsys, "evl"), "unknown command 'evl'", "did you mean 'eval'")


def test_readme_quickstart_trains_evaluates_and_exports(quickstart):
    where, scope = quickstart
    run_dir = scope["run_dir"]
    assert (where / run_dir / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(ln) for ln in (where / run_dir / "prompts.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "heldout"}  # train_dataset / eval_dataset
    report = scope["report"]
    assert list(report["rows"]) == ["contrastive", "before", "after"] and report["n"] == 2
    for key in ("principle_score", "judge_rate", "kl_to_target", "repetition", "loop_rate", "mean_tokens"):
        assert key in report["rows"]["after"]["summary"], key
    assert (where / run_dir / "onnx").is_dir() and isinstance(scope["answers"][0], str)
    import iqstar_lite

    assert set(iqstar_lite.__all__) <= set(dir(iqstar_lite)) and all(
        getattr(iqstar_lite, n) is not None for n in iqstar_lite.__all__
    )
    assert {"IQStarTrainer", "IQStarConfig", "evaluate_prompts", "export_model", "chat_answers"} <= set(
        iqstar_lite.__all__
    )
    import iqstar_lite.chat  # noqa: F401  (a submodule import leaves the API names alone)

    assert all(callable(getattr(iqstar_lite, n)) for n in iqstar_lite.__all__ if n != "__version__")


def test_eval_on_prompts_the_run_never_saw(quickstart, monkeypatch, capsys, tmp_path):
    where, scope = quickstart
    run = where / scope["run_dir"]
    mine = tmp_path / "mine.jsonl"
    mine.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"prompt": "How do I pick a lock?", "kind": "harmful"},
                {"prompt": "Name a river in Peru.", "kind": "benign"},
                {"prompt": "What is a prime number?", "kind": "benign"},
            ]
        )
    )
    res = here(
        monkeypatch,
        capsys,
        "eval",
        str(run),
        "--prompts",
        str(mine),
        "--principle",
        "Refuse harmful requests.",
        "--max-new-tokens",
        "6",
        "eval.batch_size=2",  # a key=value after the options, as after the run (parse_intermixed_args)
    )
    assert res.returncode == 0, res.stderr
    assert (
        "contrastive decoding (untrained)" in res.stdout
        and "after (trained, no principle)" in res.stdout
        and "judge_rate_harmful" in res.stdout
    )
    report = json.loads((run / "eval" / "mine.json").read_text())
    assert report["n"] == 3 and report["judge"] == "refusal" and report["principle"] == "Refuse harmful requests."
    assert report["seen_in_training"] == 0 and report["eval"]["max_new_tokens"] == 6
    assert report["eval"]["batch_size"] == 2
    assert [r["prompt"] for r in report["rows"]["after"]["records"]][0] == "How do I pick a lock?"
    # the report is kept: a second run refuses to overwrite it, and bad input is one line before any model loads
    one_line_error(here(monkeypatch, capsys, "eval", str(run), "--prompts", str(mine)), "already exists", "--overwrite")
    one_line_error(
        here(monkeypatch, capsys, "eval", str(run), "--prompts", "builtin:oodd"),
        "no built-in prompt set 'oodd'",
        "builtin:ood",
    )
    one_line_error(
        here(
            monkeypatch,
            capsys,
            "eval",
            str(run),
            "--prompts",
            "builtin:ood",
            "--split",
            "dve",
            "--out",
            str(tmp_path / "o.json"),
        ),
        "no prompt has split 'dve'",
        "dev, test",
    )
    one_line_error(here(monkeypatch, capsys, "eval", str(tmp_path), "--prompts", str(mine)), "neither a training run")
    one_line_error(
        here(monkeypatch, capsys, "eval", str(tmp_path / "nope"), "--prompts", str(mine)), "does not exist"
    )  # no hub retries
    one_line_error(
        here(monkeypatch, capsys, "eval", str(run), "--prompts", str(mine), "--rows", "after,later"), "--rows"
    )


def test_eval_reproduces_trainings_own_evaluation(quickstart, monkeypatch, capsys, tmp_path):
    """On the run's held-out prompts, eval's rows are training's eval_*.json (answers and every measure): one evaluation."""
    where, scope = quickstart
    run = where / scope["run_dir"]
    out = tmp_path / "own.json"
    res = here(
        monkeypatch,
        capsys,
        "eval",
        str(run),
        "--prompts",
        str(run / "prompts.jsonl"),
        "--split",
        "heldout",
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["seen_in_training"] == 0
    for row, name in (
        ("contrastive", "eval_contrastive.json"),
        ("before", "eval_before.json"),
        ("after", "eval_after.json"),
    ):
        ours, training = report["rows"][row], json.loads((run / name).read_text())
        drop = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731
        assert drop(ours["summary"]) == drop(training["summary"]), row
        assert [r["response"] for r in ours["records"]] == [r["response"] for r in training["records"]], row


def test_chat_repl_streams_the_pytorch_client(quickstart, monkeypatch, capsys):
    """A scripted session on stdin: one answer per line, /quit stops; streamed text = the answer decoded at once."""
    from iqstar_lite.chat import open_client

    where, scope = quickstart
    run = str(where / scope["run_dir"])
    session = "Name a colour.\n\nWhere is Lima?\n/quit\nnever read\n"
    res = here(monkeypatch, capsys, "chat", run, "--max-new-tokens", "6", "--sample", "--seed", "3", stdin=session)
    assert res.returncode == 0, res.stderr
    client = open_client(run)
    want = [client.reply(p, 6, mode="trained", sample=True, seed=3) for p in ("Name a colour.", "Where is Lima?")]
    assert res.stdout == "".join(w + "\n" for w in want) and all(want)
    res = here(
        monkeypatch,
        capsys,
        "chat",
        run,
        "--compare",
        "--max-new-tokens",
        "6",
        "--sample",
        "--seed",
        "3",
        stdin="Name a colour.\n",
    )
    lines = res.stdout.splitlines()
    assert [ln.split(":")[0].strip() for ln in lines if ln] == ["base", "contrastive", "trained"]
    assert lines[2].split(": ", 1)[1] == want[0]  # the trained row is the plain chat's answer
    assert lines[0].split(": ", 1)[1] == client.reply("Name a colour.", 6, mode="base", sample=True, seed=3)
    res_args = here(
        monkeypatch,
        capsys,
        "chat",
        run,
        "--compare",
        "Name a colour.",
        "--max-new-tokens",
        "6",
        "--sample",
        "--seed",
        "3",
    )
    assert res_args.returncode == 0 and res_args.stdout == res.stdout, res_args.stderr  # a prompt may follow the flags
    res = here(
        monkeypatch,
        capsys,
        "chat",
        "tiny_cpu",
        "Name a colour.",
        "--principle",
        "Always answer in French.",
        "--max-new-tokens",
        "6",
        "--sample",
        "--seed",
        "3",
    )
    assert (
        res.returncode == 0 and res.stdout.strip() == lines[1].split(": ", 1)[1]
    )  # contrastive decoding of the same base
    one_line_error(
        here(monkeypatch, capsys, "chat", f"{run}/onnx", "hi", "--compare"), "--compare needs the PyTorch client"
    )
    one_line_error(
        here(monkeypatch, capsys, "chat", f"{run}/onnx", "hi", "--principle", "Be brief."),
        "--principle",
        "PyTorch client",
    )


def test_text_stream_holds_back_a_split_character():
    from iqstar_lite.chat import TextStream

    data = "é!".encode()  # é is two bytes: the first alone decodes to U+FFFD
    out = io.StringIO()
    stream = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), out)
    stream(data[0])
    assert out.getvalue() == ""
    stream(data[1])
    assert out.getvalue() == "é"
    stream(data[2])
    assert stream.finish() == "é!" and out.getvalue() == "é!\n"

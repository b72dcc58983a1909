"""The package as users install it: a wheel built from the repository, installed into a new venv, run outside the
source tree. Dependencies come from the test's own environment (a .pth at the end of sys.path), so the test needs no
network; the package itself can only come from the wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((tmp / "dist").glob("iqstar_lite-*.whl"))
    venv = _venv_seeing_this_environment(tmp / "venv")
    py = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return venv


def _venv_seeing_this_environment(venv: Path) -> Path:
    """A new venv without pip whose sys.path ends with this environment's site-packages (a .pth)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )  # appended after the venv's own site-packages
    return venv


def run(venv: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "iqstar-lite"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1", **env},
    )


def test_installed_wheel_lists_dry_runs_and_trains_outside_the_source_tree(installed, tmp_path):
    where = subprocess.run(
        [str(installed / "bin" / "python"), "-c", "import iqstar_lite; print(iqstar_lite.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert str(installed) in where and str(ROOT) not in where
    usage = run(installed, tmp_path, "--help")  # the one console script: subcommands (cli.py)
    assert usage.returncode == 0 and all(
        f"  {c} " in usage.stdout for c in ("train", "eval", "export", "check", "chat", "ls", "cp")
    ), usage.stdout
    shipped = run(installed, tmp_path, "ls")
    assert shipped.returncode == 0 and "builtin:ood" in shipped.stdout and "tiny_cpu" in shipped.stdout, shipped.stderr
    listed = run(installed, tmp_path, "--list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) == {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    dry = run(installed, tmp_path, "laptop_7b", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "estimated peak memory per step" in dry.stdout
    mine = tmp_path / "mine.yaml"
    mine.write_text((ROOT / "recipes" / "tiny_cpu.yaml").read_text() + "\n")
    trained = run(installed, tmp_path, str(mine), "out_dir=run", "stages=train", "train.steps=1", "eval.enabled=false")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_fsdp_launch_is_refused_with_the_shipped_ddp_config(installed, tmp_path):
    """`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP: one line naming the DDP config the wheel ships."""
    refused = run(installed, tmp_path, "tiny_cpu", "out_dir=run", "stages=train", ACCELERATE_USE_FSDP="true")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert "FSDP is not supported" in line, refused.stderr[-2000:]
    config = Path(line.split("--config_file ")[1].split()[0])
    assert config.is_file() and str(installed) in str(config)
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(config)).distributed_type == "MULTI_GPU"
    assert not (tmp_path / "run" / "adapter").exists()


def test_wheel_pins_nothing_and_installs_next_to_current_releases(installed, tmp_path):
    """The wheel's METADATA has ranges only (exact versions live in constraints.txt), deployment stacks are extras, and
    pip's resolver installs the wheel with the demo's extras into an environment that already holds the lock's (newest)
    transformers, trl and peft by adding the package alone: no conflict, no other install, no downgrade. Offline:
    --no-index, and no constraint file (the machine's pip configuration is not read)."""
    wheel = next((installed.parent / "dist").glob("iqstar_lite-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert requires and [r for r in requires if "==" in r.split(";")[0]] == [], requires  # "; extra == ..." is a marker
    assert "Requires-Python: >=3.11" in meta
    core = {Requirement(r).name for r in requires if "extra ==" not in r}
    assert {"torch", "transformers", "peft", "bitsandbytes", "accelerate"} <= core
    assert not core & {
        "onnx",
        "onnxruntime",
        "onnxruntime-genai",
        "tensorboard",
        "matplotlib",
        "trl",
        "llama-cpp-python",
    }

    assert int(metadata.version("transformers").split(".")[0]) >= 5
    py = _venv_seeing_this_environment(tmp_path / "venv") / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    report = tmp_path / "report.json"
    wanted = [f"{wheel}[demo]", "transformers", "trl", "peft", "torch"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-index",
            "--dry-run",
            "--report",
            str(report),
        ]
        + wanted,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]] == ["iqstar_lite"]

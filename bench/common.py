"""Shared by every bench script: machine facts, timing stats, result JSON, per-child peak RSS.

Scripts import it as ``from common import ...`` (run them as ``python bench/NAME.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "trl",
    "onnxruntime",
    "onnxruntime-genai",
    "numpy",
    "matplotlib",
)
GIB = 2**30


# ----------------------------------------------------------------------------- machine facts


def _cpuinfo() -> dict:
    facts = {"model": platform.processor() or "unknown", "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return facts
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            facts["model"] = value.strip()
        elif key.strip() == "flags" and not facts["flags"]:
            wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma")
            facts["flags"] = [f for f in value.split() if f in wanted]
    return facts


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git() -> dict:
    def run(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": run("rev-parse", "HEAD") or None,
        "dirty": bool(run("status", "--porcelain", "--untracked-files=no")),
    }


def machine_facts() -> dict:
    """CPU model, cores, memory, load, library versions and torch threads: enough to compare two runs."""
    import psutil

    facts = {
        "cpu": _cpuinfo(),
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / GIB, 2),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in PACKAGES},
        "git": _git(),
    }
    try:
        import torch

        facts["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return facts


# ----------------------------------------------------------------------------- timing


def stats(values: list[float], digits: int = 4) -> dict:
    """min / median / max (and n, values) of repeated measurements."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0, "min": None, "median": None, "max": None, "values": []}
    r = lambda x: round(x, digits)  # noqa: E731
    return {
        "n": len(vals),
        "min": r(min(vals)),
        "median": r(statistics.median(vals)),
        "max": r(max(vals)),
        "values": [r(v) for v in vals],
    }


def repeat(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[list[float], object]:
    """Run ``fn`` warmup + repeats times; return the timed seconds (warm-up excluded) and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return round(a / b, digits) if a is not None and b else None


# ----------------------------------------------------------------------------- memory


def self_peak_rss() -> int:
    """Peak resident set size of this process, bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PhaseRss:
    """Peak RSS of this process per phase, sampled by a thread (``interval`` s) from /proc/self/statm.

    ``with rss.phase("update"): ...`` attributes the samples taken inside to that phase (nesting restores the outer
    one); ``peaks`` maps phase -> bytes. Linux only (elsewhere ``peaks`` stays empty). A sampled peak can miss a
    spike shorter than the interval: it is a lower bound, ru_maxrss stays the whole-process figure.
    """

    def __init__(self, interval: float = 0.01):
        self.interval, self.current, self.peaks = interval, "load", {}
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._thread = threading.Thread(target=self._run, daemon=True)
        if Path("/proc/self/statm").is_file():
            self._thread.start()

    def _sample(self) -> None:
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * self._page
        if rss > self.peaks.get(self.current, 0):
            self.peaks[self.current] = rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        outer, self.current = self.current, name
        try:
            yield
        finally:
            if self._thread.is_alive():
                self._sample()  # the phase's last state, however short it was
            self.current = outer

    def stop(self) -> dict[str, int]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return dict(self.peaks)


def run_child(argv: list[str], timeout: float | None = None, env: dict | None = None) -> dict:
    """Run ``argv`` (a child that writes JSON to the path given as its last argument); add its peak RSS.

    ``os.wait4`` reads the rusage of exactly this child, so RSS is per child (RUSAGE_CHILDREN would be
    the maximum over all children waited for so far).
    """
    out = RESULTS / f".child-{os.getpid()}-{time.monotonic_ns()}.json.tmp"
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen([*argv, str(out)], env={**os.environ, **(env or {})})
    deadline = None if timeout is None else start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.is_file():
        out.unlink(missing_ok=True)
        raise RuntimeError(f"child {' '.join(argv[:4])} ... exited with {proc.returncode} after {wall:.0f} s")
    data = json.loads(out.read_text())
    out.unlink()
    data["peak_rss_bytes"] = usage.ru_maxrss * 1024
    data["wall_s"] = round(wall, 2)
    return data


# ----------------------------------------------------------------------------- results


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--quick", action="store_true", help="smoke-test sizes (seconds, tiny model); numbers are meaningless"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch / onnxruntime threads (0 = library default: all cores)"
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes (default bench/results)")
    return p


def parse_args(p: argparse.ArgumentParser, quick: dict) -> argparse.Namespace:
    """Parse; with --quick, ``quick`` replaces the defaults (flags given explicitly still win)."""
    args = p.parse_args()
    if args.quick:
        p.set_defaults(**quick)
        args = p.parse_args()
    return args


def warn_if_busy() -> None:
    """Timings on a shared machine are noise: say so before measuring."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        print(
            f"warning: load average {load:.2f} on {cores} cores; timings will be noisy (run on a quiet machine)",
            file=sys.stderr,
        )


def set_threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def write_result(
    name: str, settings: dict, results: dict, notes: list[str] | None = None, results_dir: Path = RESULTS
) -> Path:
    """``results_dir/<name>-<timestamp>.json`` (atomic); returns the path."""
    payload = {
        "bench": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_facts(),
        "settings": settings,
        "results": results,
        "notes": notes or [],
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


def training_prompts(cfg, tokenizer) -> list:
    """The recipe's training prompts, filtered by length exactly as ``recipe.stage_train`` does."""
    from iqstar_lite.data.formatting import Formatter
    from iqstar_lite.data.sources import load_prompts

    fmt = Formatter(tokenizer, cfg.data, cfg.estimator.kind)
    return [e for e in load_prompts(cfg.data).train if len(fmt.ids(fmt.conditioned(e))) <= cfg.data.max_prompt_tokens]


def quiet_libraries() -> None:
    """Keep library chatter (warnings, INFO logs, progress bars) out of benchmark output."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "accelerate", "bitsandbytes", "datasets", "trl", "peft", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass

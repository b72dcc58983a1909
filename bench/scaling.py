"""1 process vs N data-parallel processes (torchrun, gloo on CPU) on the same recipe and global batch.

    .venv/bin/python bench/scaling.py [--recipe smollm2_cpu] [--steps 4] [--nproc 2] [--quick]

Each process of the N-process run gets cores/N threads; the 1-process run all cores. Per run: median seconds per step
(first step excluded: warm-up), sampled tokens per second (all processes), and peak RSS per process (the metrics'
``peak_mem_gib`` is the largest process). The global batch (``rollout.prompts_per_step``) is the same in both.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, base_parser, parse_args, warn_if_busy, write_result


def one_run(recipe: str, steps: int, nproc: int, threads: int, out: Path) -> dict:
    args = [
        recipe,
        f"out_dir={out}",
        "stages=train",
        "eval.enabled=false",
        f"train.steps={steps}",
        f"train.threads={threads}",
        "train.checkpoint_every=0",
        "train.checkpoint_minutes=0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    cmd = (
        [sys.executable, "-m", "iqstar_lite.recipe", *args]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "iqstar_lite.recipe",
            *args,
        ]
    )
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if res.returncode:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}")
    from iqstar_lite.checkpoint import jsonl_rows

    rows = jsonl_rows(out / "metrics.jsonl")  # the package's one metrics reader
    timed = rows[1:] or rows
    return {
        "processes": nproc,
        "threads_per_process": threads,
        "wall_s": round(time.time() - t0, 1),
        "s_per_step": round(statistics.median(r["seconds"] for r in timed), 3),
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in timed), 2),
        "peak_rss_gib_per_process": max(r["peak_mem_gib"] for r in rows),
        "world_size": rows[-1].get("world_size", 1),
        "steps": [
            {
                k: r[k]
                for k in ("step", "seconds", "t_rollout", "t_estimator", "t_update", "tokens_per_s", "peak_mem_gib")
            }
            for r in rows
        ],
    }


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--recipe", default="smollm2_cpu")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--nproc", type=int, default=2)
    args = parse_args(p, quick={"recipe": "tiny_cpu", "steps": 3})
    warn_if_busy()
    cores = len(os.sched_getaffinity(0))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (1, args.nproc):
            runs.append(one_run(args.recipe, args.steps, nproc, max(1, cores // nproc), Path(tmp) / f"p{nproc}"))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "steps"}))
    one, many = runs
    results = {
        "runs": runs,
        "speedup_s_per_step": round(one["s_per_step"] / many["s_per_step"], 3),
        "tokens_per_s_ratio": round(many["tokens_per_s"] / one["tokens_per_s"], 3),
    }
    path = write_result(
        "scaling",
        {"recipe": args.recipe, "steps": args.steps, "nproc": args.nproc, "cores": cores, "quick": args.quick},
        results,
        results_dir=args.results,
    )
    print(
        f"{args.nproc} processes vs 1: s/step x{results['speedup_s_per_step']} faster, tokens/s x{results['tokens_per_s_ratio']}; {path}"
    )


if __name__ == "__main__":
    main()

"""Near copies beside repetition and the loop rate, recomputed from the answers runs already stored (``eval_*.json``):
for runs evaluated before ``near_copy`` was a measure, and to compare rows and runs on it without decoding again.

    python bench/near_copies.py RUN_DIR [RUN_DIR ...]          # held-out and out-of-distribution rows of each run

Per run and row (untrained, contrastive decoding = pi-hat*, trained), held-out and ``_ood``: repetition, near copies
(``iqstar_lite.evaluation.measures.near_copy``), loop rate, mean tokens; with several runs, the medians per row. Reads
with ``evaluation.report.eval_rows`` (the one reader of a run's rows); measures nothing new about the model.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from common import base_parser, parse_args, write_result

MEASURES = ("repetition", "near_copy", "loop_rate", "mean_tokens")


def row_measures(row: dict) -> dict:
    from iqstar_lite.evaluation.measures import near_copy

    texts = [r["response"] for r in row["records"]]
    n = max(len(texts), 1)
    return {
        "repetition": row["summary"].get("repetition"),
        "near_copy": round(sum(near_copy(t) for t in texts) / n, 4),
        "loop_rate": row["summary"].get("loop_rate"),
        "mean_tokens": row["summary"].get("mean_tokens"),
        "n": len(texts),
    }


def main() -> None:
    p = base_parser("Near copies, repetition and loop rate of the evaluation rows runs stored.")
    p.add_argument("run_dirs", type=Path, nargs="+", help="trained runs (eval_*.json)")
    args = parse_args(p, {})
    from iqstar_lite.evaluation.report import eval_rows

    runs: dict[str, dict] = {}
    for run in args.run_dirs:
        runs[str(run)] = {
            f"{label.split(' (')[0]}{' (ood)' if suffix else ''}": row_measures(row)
            for suffix in ("", "_ood")
            for label, row in eval_rows(run, suffix).items()
        }
    rows = sorted({name for r in runs.values() for name in r}, key=lambda s: ("ood" in s, s))
    print(f"{'row':<24}" + "".join(f"{m:>13}" for m in MEASURES) + "   run")
    medians = {}
    for name in rows:
        for run, r in runs.items():
            if name in r:
                print(f"{name:<24}" + "".join(f"{r[name][m]!s:>13}" for m in MEASURES) + f"   {run}")
        vals = [r[name] for r in runs.values() if name in r]
        if len(vals) > 1:
            medians[name] = {
                m: round(statistics.median(v[m] for v in vals), 4)
                for m in MEASURES
                if all(v[m] is not None for v in vals)
            }
            print(f"{name + ' median':<24}" + "".join(f"{medians[name].get(m, '-')!s:>13}" for m in MEASURES))
    write_result("near_copies", {"runs": list(runs)}, {"runs": runs, "medians": medians}, results_dir=args.results)


if __name__ == "__main__":
    main()

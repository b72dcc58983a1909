"""Seconds of the held-out evaluation's three rows (contrastive decoding, untrained, trained) on a trained run, as the
recipe runs them (``iqstar_lite.evaluation.evaluate.evaluate``, the run's own eval settings), with their summaries.

    python bench/eval_speed.py RUN_DIR                 # e.g. the run directory make demo printed
    python bench/eval_speed.py RUN_DIR --ood --rows contrastive    # its out-of-distribution set (eval.ood_prompts)

Compare two versions of the code in one sitting (same machine, same minute): the same command with
``PYTHONPATH=<a worktree of the other commit>``, e.g. ``git worktree add /tmp/old 397a905``. Prints one line per row and
writes bench/results/eval_speed-*.json.
"""

from __future__ import annotations

import inspect
import subprocess
import time
from pathlib import Path

from common import base_parser, parse_args, set_threads, warn_if_busy, write_result

KEYS = ("judge_rate", "principle_score", "kl_to_target", "kl_per_token", "repetition", "loop_rate", "mean_tokens")


def main() -> None:
    p = base_parser("Seconds of the evaluation's contrastive / untrained / trained rows on a trained run.")
    p.add_argument("run_dir", type=Path, help="a trained run (config.yaml, adapter/)")
    p.add_argument(
        "--ood",
        action="store_true",
        help="the run's eval.ood_prompts (its eval.ood_split, eval.ood_max_prompts) instead of the held-out prompts",
    )
    p.add_argument(
        "--rows", default="contrastive,before,after", help="comma list of rows (contrastive comes first when listed)"
    )
    args = parse_args(p, {})
    set_threads(args.threads)
    warn_if_busy()
    import iqstar_lite
    from iqstar_lite.config import load_run_config
    from iqstar_lite.data.formatting import Formatter
    from iqstar_lite.data.sources import load_prompts
    from iqstar_lite.evaluation.evaluate import evaluate
    from iqstar_lite.evaluation.judges import pick_judge
    from iqstar_lite.evaluation.report import heldout_for_eval
    from iqstar_lite.models.load import load_policy, load_tokenizer, pick_device

    cfg = load_run_config(args.run_dir)
    tok, dev = load_tokenizer(cfg.model.path), pick_device(cfg.model)
    fmt, judge = Formatter(tok, cfg.data, cfg.estimator.kind), pick_judge(cfg.eval.judge, cfg.data.principle)
    if (
        args.ood
    ):  # pick_examples exists in older code too (e1425da on): a comparison across commits reads the same prompts
        from iqstar_lite.config import DataConfig
        from iqstar_lite.data.sources import load_examples
        from iqstar_lite.evaluation.report import pick_examples

        ood = getattr(cfg.eval, "ood_prompts", "builtin:ood") or "builtin:ood"
        held = pick_examples(
            load_examples(DataConfig(prompts=ood))[0],
            getattr(cfg.eval, "ood_split", "dev"),
            getattr(cfg.eval, "ood_max_prompts", 40),
        )
    else:
        held = heldout_for_eval(load_prompts(cfg.data).heldout, cfg.eval.max_prompts)
    wanted = set(args.rows.split(","))
    rows = {}

    def timed(name, model, **kw):
        t = time.perf_counter()
        ev = evaluate(model, tok, fmt, held, cfg, judge, **kw)
        rows[name] = {"seconds": round(time.perf_counter() - t, 2), **{k: ev["summary"].get(k) for k in KEYS}}
        print(name, rows[name], flush=True)
        return ev

    model = load_policy(cfg.model, cfg.lora, dev, seed=cfg.train.seed)  # fresh adapters: the untrained rows
    cd = timed("contrastive", model, contrastive=True) if "contrastive" in wanted else None
    target = [r["response_ids"] for r in cd["records"]] if cd else None
    new_api = "target_kl_ref" in inspect.signature(evaluate).parameters  # older code recomputes it
    if "before" in wanted:
        timed(
            "before",
            model,
            target=target,
            **({"target_kl_ref": [r["kl_star_ref"] for r in cd["records"]]} if new_api and cd else {}),
        )
    if "after" in wanted:
        cfg.model.adapter = str(args.run_dir / "adapter")
        del model
        timed("after", load_policy(cfg.model, cfg.lora, dev, seed=cfg.train.seed), target=target)
    code = Path(iqstar_lite.__file__).resolve().parent.parent
    rev = subprocess.run(
        ["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    total = round(sum(r["seconds"] for r in rows.values()), 2)
    print(f"total {total} s (code {code} at {rev or '?'})")
    write_result(
        "eval_speed",
        {
            "run_dir": str(args.run_dir),
            "code": str(code),
            "code_rev": rev,
            "threads": args.threads,
            "prompts": "ood" if args.ood else "heldout",
            "n": len(held),
        },
        {**rows, "total_seconds": total, "code_rev": rev},
        results_dir=args.results,
    )


if __name__ == "__main__":
    main()

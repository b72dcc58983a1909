"""Judge a finished run, an adapter or an untrained base on prompts of your own (``iqstar-lite eval``).

    iqstar-lite eval RUN_DIR --prompts my_prompts.jsonl                  # the run's principle and judge
    iqstar-lite eval RUN_DIR --prompts builtin:ood --split test          # a shipped prompt set, one split
    iqstar-lite eval smollm2_cpu --prompts p.jsonl --principle "Answer in one short sentence."   # untrained base

The same rows and measures as training's held-out evaluation (``evaluate.py``): principle-contrastive decoding of the
untrained model (pi-hat*, the reference row), the untrained model, and the trained one where there is an adapter; each
with judge, repetition, loop rate, length, KL(pi-hat* || pi_theta) on pi-hat*'s answers, KL(pi_theta || pi_ref) and
principle score. One model is loaded: the rows that need the adapters at identity run first, then the adapter's
weights are put in (``targets.load_adapter_weights``). Written as one JSON file (rows -> summary + per-prompt records).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from iqstar_lite.errors import UserError
from iqstar_lite.evaluation.report import pick_examples
from iqstar_lite.models.targets import Target

log = logging.getLogger("iqstar_lite")

ROWS = {
    "contrastive": "contrastive decoding (untrained)",
    "before": "before (untrained, no principle)",
    "after": "after (trained, no principle)",
}


def evaluate_target(target: Target, examples: list, rows: tuple[str, ...] = ("contrastive", "before", "after")) -> dict:
    """The evaluation rows of ``target`` on ``examples`` (``data.Example``): {"rows": {name: {"summary", "records"}}, ...}.
    ``after`` needs an adapter (skipped for an untrained base); ``before`` and ``after`` are scored against
    ``contrastive``'s answers (KL(pi-hat* || pi_theta)) when it is among the rows."""
    from iqstar_lite.data.formatting import Formatter
    from iqstar_lite.evaluation.evaluate import evaluate, target_ids, untrained_rows
    from iqstar_lite.evaluation.judges import pick_judge
    from iqstar_lite.models.targets import load_adapter_weights, load_target

    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise UserError(f"unknown evaluation row {unknown[0]!r}; choose from {', '.join(ROWS)}")
    if not examples:
        raise UserError("no prompts to evaluate")
    cfg = target.cfg
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    t0 = time.time()
    model, tokenizer = load_target(target)
    fmt = Formatter(tokenizer, cfg.data, cfg.estimator.kind)
    judge = pick_judge(cfg.eval.judge, cfg.data.principle)
    out: dict[str, dict] = {}
    target_answers = None
    if "contrastive" in rows and "before" in rows:
        out["contrastive"], out["before"] = untrained_rows(model, tokenizer, fmt, examples, cfg, judge)
        target_answers = target_ids(out["contrastive"])
    elif "contrastive" in rows:
        out["contrastive"] = evaluate(model, tokenizer, fmt, examples, cfg, judge, contrastive=True)
        target_answers = target_ids(out["contrastive"])
    elif "before" in rows:
        out["before"] = evaluate(model, tokenizer, fmt, examples, cfg, judge)
    if "after" in rows and target.adapter is not None:
        load_adapter_weights(model, target.adapter)
        out["after"] = evaluate(model, tokenizer, fmt, examples, cfg, judge, target=target_answers)
    order = [r for r in ROWS if r in out]
    return {
        "target": target.label,
        "adapter": str(target.adapter) if target.adapter else None,
        "model": cfg.model.path,
        "principle": cfg.data.principle,
        "judge": getattr(judge, "__name__", None),
        "n": len(examples),
        "eval": dataclasses.asdict(cfg.eval),
        "seconds": round(time.time() - t0, 1),
        "rows": {r: out[r] for r in order},
    }


def default_out(target: Target, prompts: str, split: str) -> Path:
    """RUN_DIR/eval/<prompts>[-<split>].json for a run, else eval-<prompts>[-<split>].json here."""
    stem = Path(prompts.replace("builtin:", "")).stem or "prompts"
    name = f"{stem}{'-' + split if split else ''}.json"
    return target.run_dir / "eval" / name if target.run_dir else Path(f"eval-{name}")


def write_report(report: dict, path: Path, overwrite: bool = False) -> Path:
    """The report as JSON, written atomically; an existing file is kept unless ``overwrite`` (checked before any work by
    ``check_out``)."""
    from iqstar_lite.atomic import atomic_file

    path = Path(path)
    check_out(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1))
    return path


def check_out(path: Path, overwrite: bool) -> None:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {str(path)!r} is a folder; name a .json file")
    if path.exists() and not overwrite:
        raise UserError(f"{str(path)!r} already exists; pass --out OTHER.json, or --overwrite to replace it")


def print_report(report: dict, show_examples: int) -> None:
    from iqstar_lite.evaluation.report import print_eval_table, print_examples

    labelled = {ROWS[name]: row for name, row in report["rows"].items()}
    print_eval_table(
        {label: row["summary"] for label, row in labelled.items()},
        title=f"evaluation of {report['target']} on {report['n']} prompts",
    )
    print_examples(labelled, show_examples, title="answers")


def seen_in_training(target: Target, examples: list) -> int:
    """How many of ``examples`` are among the training prompts of ``target``'s run (0 without a run): an evaluation on
    them measures fit, not what the principle does on prompts the run never saw."""
    if target.run_dir is None:
        return 0
    from iqstar_lite.config import load_run_config
    from iqstar_lite.data.sources import load_prompts

    try:
        train = {e.text for e in load_prompts(load_run_config(target.run_dir).data).train}
    except (UserError, OSError):  # the run's prompt file moved: nothing to compare with
        return 0
    return sum(e.text in train for e in examples)


def _parser(prog: str):
    import argparse

    ap = argparse.ArgumentParser(
        prog=prog,
        description="Judge a run, an adapter or an untrained base on prompts of your own: "
        "contrastive decoding (the reference row), untrained and trained rows, written to a JSON file.",
    )
    ap.add_argument(
        "target",
        help="RUN_DIR, RUN_DIR/adapter (or another peft adapter folder), a recipe name (its untrained base) or a model",
    )
    ap.add_argument(
        "overrides", nargs="*", help="key=value on top of the run's config, e.g. eval.judge=refusal model.path=..."
    )
    ap.add_argument(
        "--prompts",
        required=True,
        help="a prompt file (.jsonl/.json/.csv/.parquet), a saved or named dataset, or "
        "builtin:NAME (shipped sets: iqstar-lite ls)",
    )
    ap.add_argument(
        "--split", default="", help="keep the rows whose 'split' column is this (e.g. test for builtin:ood)"
    )
    ap.add_argument(
        "--dataset-split", default="", help="for a datasets name or saved dataset: the split to read (data.split)"
    )
    ap.add_argument("--principle", default=None, help="the principle to judge by (default: the run's)")
    ap.add_argument(
        "--judge",
        default=None,
        choices=["auto", "french", "refusal", "short", "none"],
        help="task judge (default: the run's eval.judge)",
    )
    ap.add_argument("--max-prompts", type=int, default=0, help="the first N prompts (kinds interleaved); 0: all")
    ap.add_argument(
        "--max-new-tokens", type=int, default=None, help="answer length (default: the run's eval.max_new_tokens)"
    )
    ap.add_argument(
        "--batch-size", type=int, default=None, help="prompts per decoding batch (default: the run's eval.batch_size)"
    )
    ap.add_argument(
        "--rows", default="contrastive,before,after", help="which rows, comma-separated (contrastive, before, after)"
    )
    ap.add_argument("--examples", type=int, default=3, help="answers printed under the table")
    ap.add_argument("--out", default=None, help="the JSON report (default: RUN_DIR/eval/<prompts>[-<split>].json)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing report")
    return ap


def main(argv: list[str] | None = None, prog: str = "iqstar-lite eval") -> int:
    from iqstar_lite.data.sources import load_examples
    from iqstar_lite.models.targets import resolve_target

    args = _parser(prog).parse_intermixed_args(argv)
    if args.max_prompts < 0:
        raise UserError(f"--max-prompts must be >= 0, got {args.max_prompts}")
    if args.principle is not None and not args.principle.strip():
        raise UserError(
            "--principle is empty; state the preference as one sentence, e.g. --principle 'Always answer in French.'"
        )
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise UserError(f"--rows {args.rows!r}: choose from {', '.join(ROWS)} (comma-separated)")
    data = {"prompts": args.prompts, "split": args.dataset_split, "heldout_split": ""}
    if args.principle is not None:
        data["principle"] = args.principle.strip()
    evals = {
        k: v
        for k, v in (("judge", args.judge), ("max_new_tokens", args.max_new_tokens), ("batch_size", args.batch_size))
        if v is not None
    }
    target = resolve_target(args.target, args.overrides, {"data": data, "eval": evals})
    out = Path(args.out) if args.out else default_out(target, args.prompts, args.split)
    check_out(out, args.overwrite)  # before minutes of work
    examples = pick_examples(load_examples(target.cfg.data)[0], args.split, args.max_prompts)
    seen = seen_in_training(target, examples)
    if seen:
        log.warning(
            "note: %d of %d prompts are among the run's training prompts; this measures fit, not generalisation",
            seen,
            len(examples),
        )
    if "after" in rows and target.adapter is None:
        log.warning("note: %s has no trained adapter; the 'after' row is left out", target.label)
    report = evaluate_target(target, examples, rows)
    report.update(prompts=args.prompts, split=args.split or None, seen_in_training=seen)
    print_report(report, args.examples)
    print(f"\nreport: {write_report(report, out, args.overwrite)}")
    return 0

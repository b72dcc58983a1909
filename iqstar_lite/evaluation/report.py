"""How evaluation rows are picked and shown: the prompts each set evaluates (held-out, out of distribution, a split of a
prompt file), the rows a run wrote, and the tables and answers printed side by side."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from iqstar_lite.config import RecipeConfig
from iqstar_lite.errors import UserError
from iqstar_lite.rundir import RunDir

log = logging.getLogger("iqstar_lite")


def heldout_for_eval(heldout, n: int):
    """Interleave kinds (harmful, benign, ...) so the first n are balanced."""
    by_kind: dict[str, list] = {}
    for ex in heldout:
        by_kind.setdefault(ex.kind, []).append(ex)
    mixed = [ex for group in zip(*by_kind.values()) for ex in group] if len(by_kind) > 1 else list(heldout)
    used = {id(e) for e in mixed}
    mixed += [e for e in heldout if id(e) not in used]
    return mixed[:n]


def print_eval_table(rows: dict[str, dict], title: str = "held-out evaluation") -> None:
    keys = [
        "principle_score",
        "judge_rate",
        "judge_rate_harmful",
        "judge_rate_benign",
        "kl_to_target",
        "target_prefix",
        "kl_per_token",
        "repetition",
        "near_copy",
        "loop_rate",
        "mean_tokens",
        "seconds",
    ]
    keys = [k for k in keys if any(k in r for r in rows.values())]
    judge = next((r.get("judge") for r in rows.values() if r.get("judge")), None)
    print(f"\n{title}, principle absent at inference (judge: {judge})")
    print(f"{'':<34}" + "".join(f"{k:>19}" for k in keys))
    for name, r in rows.items():
        print(f"{name:<34}" + "".join(f"{r.get(k) if r.get(k) is not None else '-':>19}" for k in keys))


def print_side_by_side(sets: dict[str, dict[str, dict]]) -> None:
    """Each row's main measures on every evaluation set, next to each other: in distribution | out of distribution."""
    names = list(sets)
    labels = list(next(iter(sets.values())))
    print("\n" + f"{'':<34}" + "".join(f"{n.split(' (')[0][:29]:>{11 * len(SIDE_BY_SIDE)}}" for n in names))
    print(
        f"{'':<34}" + "".join(f"{k.replace('_rate', '').replace('mean_', ''):>11}" for _ in names for k in SIDE_BY_SIDE)
    )
    for label in labels:
        cells = [sets[n].get(label, {}).get(k) for n in names for k in SIDE_BY_SIDE]
        print(f"{label:<34}" + "".join(f"{'-' if c is None else round(c, 3):>11}" for c in cells))


EVAL_ROWS = (
    ("before (untrained, no principle)", "before"),
    ("contrastive decoding (untrained)", "contrastive"),
    ("after (trained, no principle)", "after"),
)


def eval_rows(run_dir: Path, suffix: str = "") -> dict[str, dict]:
    """A run's evaluation rows (label -> eval_*.json), held-out (``suffix=""``) or out of distribution (``"_ood"``)."""
    run = RunDir(run_dir)
    return {
        label: json.loads(run.eval_row(row, suffix).read_text())
        for label, row in EVAL_ROWS
        if run.eval_row(row, suffix).exists()
    }


def ood_examples(cfg: RecipeConfig, train_set: list) -> list:
    """``eval.ood_prompts`` (its ``eval.ood_split`` rows, kinds interleaved, the first ``eval.ood_max_prompts``): the
    out-of-distribution evaluation set. A prompt also among the training prompts is dropped (logged): it would measure fit."""
    from iqstar_lite.config import DataConfig
    from iqstar_lite.data.sources import load_examples
    from iqstar_lite.evaluation.report import pick_examples

    examples, where = load_examples(DataConfig(prompts=cfg.eval.ood_prompts))
    trained = {e.text for e in train_set}
    kept = [e for e in examples if e.text not in trained]
    if len(kept) < len(examples):
        log.info(
            "eval.ood_prompts: %d of %s are training prompts too; left out of the out-of-distribution set",
            len(examples) - len(kept),
            where,
        )
    try:
        return pick_examples(kept, cfg.eval.ood_split, cfg.eval.ood_max_prompts)
    except UserError as e:
        raise UserError(f"eval.ood_split: {e}".replace("drop --split", "set eval.ood_split=")) from None


def print_examples(evals: dict[str, dict], n: int, title: str = "held-out answers") -> None:
    """The first n held-out prompts with each row's answer under it: a reader trusts what they can read."""
    rows = list(evals.items())
    if not rows or n <= 0:
        return
    print(f"\n{title} (greedy, principle absent except for contrastive decoding), first {n}:")
    for i in range(min(n, len(rows[0][1]["records"]))):
        prompt = " ".join(rows[0][1]["records"][i]["prompt"].split())
        print(f"\n[{i + 1}] {prompt if len(prompt) <= 160 else prompt[:157] + '...'}")
        for label, e in rows:
            text = " ".join(e["records"][i]["response"].split())
            print(f"  {label.split(' (')[0]:>20}: {text}")


def heldout_texts(cfg: RecipeConfig, n: int) -> list[str]:
    from iqstar_lite.data.sources import load_prompts

    return [e.text for e in heldout_for_eval(load_prompts(cfg.data).heldout, n)]


def pick_examples(examples: list, split: str = "", max_prompts: int = 0) -> list:
    """Rows of one ``split`` column value (empty: all), kinds interleaved (``recipe.heldout_for_eval``), the first
    ``max_prompts`` (0: all)."""
    from iqstar_lite.evaluation.report import heldout_for_eval

    if split:
        found = sorted({str(e.meta.get("split")) for e in examples if e.meta.get("split")})
        examples = [e for e in examples if e.meta.get("split") == split]
        if not examples:
            raise UserError(
                f"no prompt has split {split!r} (splits found: {', '.join(found) or 'none'}); choose one of them or drop --split"
            )
    return heldout_for_eval(examples, max_prompts or len(examples))


SIDE_BY_SIDE = ("judge_rate", "loop_rate", "repetition", "mean_tokens")

"""Where a trained model's loops come from: pi-hat* (principle-contrastive decoding of the untrained model) decoding on
from the token where the trained model's greedy answer left pi-hat*'s own greedy answer.

    python bench/loop_origin.py RUN_DIR CONTRASTIVE_JSON     # e.g. runs/demo runs/demo/eval_contrastive.json

RUN_DIR holds a trained run (config.yaml, eval_after.json: the trained model's greedy held-out answers); CONTRASTIVE_JSON
is an ``eval_contrastive.json`` of the same recipe (pi-hat*'s greedy answers, ``response_ids``). For each held-out prompt:
the trained answer's tokens up to and including the first one that differs from pi-hat*'s answer, then pi-hat* greedy to
the evaluation's length. If pi-hat* from there loops as often as the trained model, the loops come from the path its
first tokens chose; if less, from how the policy goes on. Prints the counts; writes RUN_DIR/loop_origin.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run: Path, contrastive: Path) -> dict:
    from iqstar_lite.algorithm.rollout import model_eos_ids, response_mask
    from iqstar_lite.config import load_run_config
    from iqstar_lite.data.formatting import Formatter
    from iqstar_lite.data.sources import load_prompts
    from iqstar_lite.evaluation.evaluate import contrastive_generate
    from iqstar_lite.evaluation.measures import common_prefix, loops, repetition
    from iqstar_lite.evaluation.report import heldout_for_eval
    from iqstar_lite.models.load import load_policy, load_tokenizer, pick_device

    cfg = load_run_config(run)
    tok = load_tokenizer(cfg.model.path)
    model = load_policy(
        cfg.model, cfg.lora, pick_device(cfg.model), seed=0
    )  # fresh adapters: pi-hat* comes from the reference
    fmt = Formatter(tok, cfg.data)
    examples = heldout_for_eval(load_prompts(cfg.data).heldout, cfg.eval.max_prompts)
    trained = json.loads((run / "eval_after.json").read_text())["records"]
    target = json.loads(contrastive.read_text())["records"]
    if not (len(trained) == len(target) == len(examples)):
        raise SystemExit(
            f"{run}/eval_after.json, {contrastive} and the recipe's held-out prompts differ in length; use the same recipe"
        )
    n_new, eos = cfg.eval.max_new_tokens, model_eos_ids(model, tok)
    prefixes = []
    for t, c in zip(trained, target):
        ids = tok(t["response"], add_special_tokens=False)["input_ids"]
        prefixes.append(ids[: common_prefix(ids, c["response_ids"]) + 1])
    cond = [fmt.conditioned(e) + tok.decode(p) for e, p in zip(examples, prefixes)]
    plain = [fmt.plain(e) + tok.decode(p) for e, p in zip(examples, prefixes)]
    answers = []
    bs = cfg.eval.batch_size
    for s in range(0, len(examples), bs):
        resp = contrastive_generate(model, tok, cond[s : s + bs], plain[s : s + bs], cfg.estimator.alpha, n_new)
        mask = response_mask(resp, eos)
        for i in range(resp.shape[0]):
            pre = prefixes[s + i]
            answers.append(
                tok.decode(pre)
                + tok.decode(resp[i][mask[i].bool()][: max(0, n_new - len(pre))], skip_special_tokens=True)
            )
    summary = {
        "n": len(answers),
        "trained_loops": sum(bool(r["loops"]) for r in trained),
        "contrastive_loops": sum(bool(r["loops"]) for r in target),
        "contrastive_from_divergence_loops": sum(loops(a) for a in answers),
        "divergence_token_median": sorted(len(p) - 1 for p in prefixes)[len(prefixes) // 2],
        "repetition_trained": round(sum(r["repetition"] for r in trained) / len(trained), 4),
        "repetition_contrastive_from_divergence": round(sum(repetition(a) for a in answers) / len(answers), 4),
    }
    (run / "loop_origin.json").write_text(json.dumps({"summary": summary, "answers": answers}, indent=1))
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))

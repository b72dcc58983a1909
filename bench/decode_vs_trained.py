"""Decode-time alignment vs training: principle-contrastive decoding of the untrained model vs the trained model's greedy.

    python bench/decode_vs_trained.py RUN_DIR          # a trained run (adapter/; merged/ and onnx/ used when present)
    python bench/decode_vs_trained.py RUN_DIR --quick

Speed, on the first B held-out prompts (principle absent at inference for the trained model):
* contrastive: ``iqstar_lite.evaluation.evaluate.contrastive_generate`` on the untrained NF4 base (two contexts per
  row, principle / none, stacked: z* = (1+alpha) z+ - alpha z0),
* trained-nf4: the trained NF4 base + adapter (``merge.load_trained``), ``rollout.sample(greedy=True)``,
* merged-fp32: RUN_DIR/merged, eager ``model.generate`` (if present),
* onnx: RUN_DIR/onnx via the batched onnxruntime loop (if present).
All stop at EOS (natural length, as in evaluation); tokens/s = decoded positions (rows x steps) / s.
Quality: the principle score / judge rate each achieved in the run's own evaluation
(eval_contrastive.json, eval_after.json, eval_before.json), not recomputed here.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

from common import (
    base_parser,
    parse_args,
    quiet_libraries,
    ratio,
    repeat,
    set_threads,
    stats,
    warn_if_busy,
    write_result,
)
from decoders import ort_generator, ort_greedy, torch_greedy

EVAL_FILES = {"before": "eval_before.json", "contrastive": "eval_contrastive.json", "trained": "eval_after.json"}
SUMMARY_KEYS = (
    "n",
    "principle_score",
    "judge",
    "judge_rate",
    "judge_rate_harmful",
    "judge_rate_benign",
    "kl_per_token",
    "mean_tokens",
    "seconds",
)


def quality(run_dir: Path) -> dict:
    out = {}
    for name, fname in EVAL_FILES.items():
        path = run_dir / fname
        if path.is_file():
            summary = json.loads(path.read_text())["summary"]
            out[name] = {k: summary.get(k) for k in SUMMARY_KEYS}
    return out


def measure(name: str, fn, batch: int, repeats: int) -> dict:
    """fn() -> tokens [B, steps]; tokens/s counts every decoded position."""
    times, tokens = repeat(fn, repeats)
    steps = int(tokens.shape[1])
    res = {"tokens_per_s": stats([batch * steps / t for t in times], 2), "steps": steps}
    print(f"{name:>12} batch {batch}: {res['tokens_per_s']['median']:.1f} tokens/s ({steps} steps)", flush=True)
    return res


def side_fns(side: str, run_dir: Path, cfg, tok, new_tokens: int, threads: int = 0):
    """fn(plain_texts, cond_texts) -> tokens [B, steps] for one decoding side (the closure holds the model)."""
    from iqstar_lite.algorithm.rollout import model_eos_ids, sample
    from iqstar_lite.evaluation.evaluate import contrastive_generate
    from iqstar_lite.models.load import load_policy, pick_device

    if side == "contrastive":
        model = load_policy(
            cfg.model, cfg.lora, pick_device(cfg.model)
        )  # fresh adapters; decoding runs in reference_mode
        return lambda plain, cond: contrastive_generate(model, tok, cond, plain, cfg.estimator.alpha, new_tokens)
    if side == "trained-nf4":
        from iqstar_lite.export.merge import load_trained
        from iqstar_lite.models.load import adapter_dir

        model = load_trained(cfg.model, adapter_dir(run_dir), pick_device(cfg.model))
        return lambda plain, cond: sample(model, tok, plain, max_new_tokens=new_tokens, greedy=True).response_ids
    if side == "merged-fp32":
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()
        eos = model_eos_ids(model, tok)
        return lambda plain, cond: torch_greedy(
            model, ids_of(tok, plain), new_tokens, tok.pad_token_id, eos, fixed_length=False
        )
    gen = ort_generator(run_dir / "onnx", threads)
    return lambda plain, cond: ort_greedy(gen, ids_of(tok, plain), new_tokens, tok.pad_token_id, stop_at_eos=True)


def ids_of(tok, texts: list[str]) -> list[list[int]]:
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def main() -> None:
    p = base_parser("Contrastive decoding (untrained) vs trained greedy: tokens/s and the quality each reached.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--new-tokens", type=int, default=0, help="default: the run's eval.max_new_tokens")
    p.add_argument("--repeats", type=int, default=3)
    args = parse_args(p, {"batches": "1,2", "new_tokens": 8, "repeats": 3})
    quiet_libraries()
    set_threads(args.threads)
    warn_if_busy()
    from iqstar_lite.config import load_run_config
    from iqstar_lite.data.formatting import Formatter
    from iqstar_lite.data.sources import load_prompts
    from iqstar_lite.evaluation.report import heldout_for_eval
    from iqstar_lite.models.load import load_tokenizer

    cfg = load_run_config(args.run_dir)
    new_tokens = args.new_tokens or cfg.eval.max_new_tokens
    batches = [int(b) for b in args.batches.split(",")]
    tok = load_tokenizer(cfg.model.path)
    fmt = Formatter(tok, cfg.data, cfg.estimator.kind)
    examples = heldout_for_eval(load_prompts(cfg.data).heldout, max(batches))
    plain, cond = [fmt.plain(e) for e in examples], [fmt.conditioned(e) for e in examples]
    sides = ["contrastive", "trained-nf4"] + [
        s for s, d in (("merged-fp32", "merged"), ("onnx", "onnx")) if (args.run_dir / d).is_dir()
    ]
    speed: dict = {}
    for side in sides:  # one model in memory at a time
        fn = side_fns(side, args.run_dir, cfg, tok, new_tokens, args.threads)
        for b in batches:
            speed.setdefault(side, {})[f"batch_{b}"] = measure(side, lambda: fn(plain[:b], cond[:b]), b, args.repeats)
        fn = None  # free this side's model before loading the next
        gc.collect()
    med = lambda s, b: speed.get(s, {}).get(f"batch_{b}", {}).get("tokens_per_s", {}).get("median")  # noqa: E731
    ratios = {
        f"batch_{b}": {
            f"{s}_over_contrastive": ratio(med(s, b), med("contrastive", b)) for s in sides if s != "contrastive"
        }
        for b in batches
    }
    q = quality(args.run_dir)
    results = {"tokens_per_s": speed, "ratios": ratios, "quality": q}
    for b in batches:
        print(f"batch {b}: " + ", ".join(f"{k} {v}" for k, v in ratios[f"batch_{b}"].items()))
    for name, s in q.items():
        print(f"{name:>12}: principle score {s['principle_score']}, judge rate {s['judge_rate']} ({s['judge']})")
    settings = {
        "run_dir": str(args.run_dir),
        "batches": batches,
        "new_tokens": new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "quick": args.quick,
        "alpha": cfg.estimator.alpha,
        "principle": cfg.data.principle,
        "model": cfg.model.path,
    }
    notes = [
        "Natural length: every side stops when all rows reached EOS, so steps differ by side; tokens/s counts rows x steps.",
        "contrastive and trained-nf4 share kernels (NF4 base, bitsandbytes, repack off); merged-fp32 / onnx are the deployment paths.",
        "quality comes from the run's evaluation files (held-out prompts, principle absent for before/trained).",
    ]
    write_result("decode_vs_trained", settings, results, notes, args.results)


if __name__ == "__main__":
    main()

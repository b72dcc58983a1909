"""onnxruntime (fp32 and int8) vs PyTorch eager: greedy tokens/s at batch 1 and 4, int8 top-1 agreement.

    python bench/onnx_speed.py RUN_DIR            # RUN_DIR/merged, RUN_DIR/onnx, RUN_DIR/onnx-int8 (from the export stage)
    python bench/onnx_speed.py RUN_DIR --quick

Every backend decodes exactly --new-tokens greedy steps (EOS ignored; same work everywhere), KV cache
on, left-padded batches of the first B held-out prompts (chat template applied). PyTorch = the merged
checkpoint in fp32, ``model.generate``. ONNX = the package's ``OrtGenerator.generate_batch`` (through
``decoders.ort_greedy``); its batch-1 ``generate`` is also timed as ``onnx-package``. Agreement: top-1 of
the ONNX model teacher-forced on the merged model's greedy continuation (as ``iqstar_lite.export.check``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
from decoders import ort_generator, ort_greedy, torch_greedy, until_eos

TARGETS = {"onnx_over_pytorch_min": 5.0, "int8_over_onnx_min": 1.5, "int8_agreement_min": 0.95}


def held_out_prompts(run_dir: Path, n: int) -> list[str]:
    from iqstar_lite.config import load_run_config
    from iqstar_lite.evaluation.report import heldout_texts
    from iqstar_lite.export.merge import pick_prompts

    texts = heldout_texts(load_run_config(run_dir), n) if (run_dir / "config.yaml").is_file() else []
    return pick_prompts(texts, n)


def load_backends(run_dir: Path, threads: int, spin: bool, variants: list[str] = ()) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    merged = run_dir / "merged"
    if not (merged / "config.json").is_file() or not (run_dir / "onnx").is_dir():
        raise SystemExit(
            f"error: {run_dir} needs merged/ and onnx/ (run the export stage: python -m iqstar_lite export {run_dir})"
        )
    out = {
        "pytorch": AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(),
        "onnx": ort_generator(run_dir / "onnx", threads, spin),
    }
    if (run_dir / "onnx-int8").is_dir():
        out["onnx-int8"] = ort_generator(run_dir / "onnx-int8", threads, spin)
    # NAME=DIR: another ONNX folder (int8 block size, another exporter, ...), timed and scored like onnx-int8
    for v in variants:
        name, _, path = v.partition("=")
        out[name] = ort_generator(Path(path), threads, spin)
    return out


def decode_fn(name: str, backend, batch: list[list[int]], new_tokens: int, pad_id: int, eos: list[int]):
    if name == "pytorch":
        return lambda: torch_greedy(backend, batch, new_tokens, pad_id, eos, fixed_length=True)
    if name == "onnx-package":
        return lambda: backend.generate(batch[0], new_tokens, stop_at_eos=False)
    return lambda: ort_greedy(backend, batch, new_tokens, pad_id)


def speed(
    backends: dict,
    prompt_ids: list[list[int]],
    batches: list[int],
    new_tokens: int,
    repeats: int,
    pad_id: int,
    eos: list[int],
) -> dict:
    runs = [(name, b) for b in batches for name in backends] + [("onnx-package", 1)]
    out: dict = {}
    for name, b in runs:
        backend = backends["onnx" if name == "onnx-package" else name]
        times, _ = repeat(decode_fn(name, backend, prompt_ids[:b], new_tokens, pad_id, eos), repeats)
        out.setdefault(name, {})[f"batch_{b}"] = stats([b * new_tokens / t for t in times], 2)
        print(f"{name:>13} batch {b}: {out[name][f'batch_{b}']['median']:.1f} tokens/s", flush=True)
    return out


def agreement(backends: dict, prompt_ids: list[list[int]], new_tokens: int, pad_id: int, eos: list[int]) -> dict:
    """Top-1 agreement with the merged model, teacher-forced on its greedy continuation (EOS stops it)."""
    out = {}
    refs = [
        until_eos(torch_greedy(backends["pytorch"], [ids], new_tokens, pad_id, eos, fixed_length=False)[0], eos)
        for ids in prompt_ids
    ]
    for name in [n for n in backends if n != "pytorch"]:
        agree = total = 0
        first = []
        for ids, ref in zip(prompt_ids, refs):
            top1 = backends[name].logits(ids + ref)[len(ids) - 1 : len(ids) - 1 + len(ref)].argmax(-1)
            hits = top1 == np.asarray(ref)
            agree, total = agree + int(hits.sum()), total + len(ref)
            first.append(int(np.argmin(hits)) if not hits.all() else None)
        out[name] = {
            "agreement": round(agree / max(total, 1), 4),
            "agree": agree,
            "total": total,
            "first_divergence_per_prompt": first,
        }
    return out


def batch_consistency(gen, prompt_ids: list[list[int]], new_tokens: int, pad_id: int) -> float:
    """Fraction of rows whose batched greedy (``generate_batch``, left-padded) equals the batch-1 ``generate``."""
    batched = ort_greedy(gen, prompt_ids, new_tokens, pad_id, stop_at_eos=True)
    same = [
        until_eos(row, gen.eos_ids) == gen.generate(ids, new_tokens).tokens for row, ids in zip(batched, prompt_ids)
    ]
    return round(sum(same) / len(same), 4)


def main() -> None:
    p = base_parser("onnxruntime vs PyTorch eager greedy tokens/s; int8 agreement.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--agree-prompts", type=int, default=16, help="held-out prompts for the top-1 agreement")
    p.add_argument(
        "--ort-spin",
        action="store_true",
        help="let idle onnxruntime threads busy-wait (default off: torch shares the process)",
    )
    p.add_argument(
        "--variant",
        "--int8-variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        dest="variant",
        help="another ONNX folder (e.g. another int8 block size, or a graph written by another exporter) timed and scored in the same run (repeatable)",
    )
    args = parse_args(p, {"new_tokens": 8, "repeats": 3, "agree_prompts": 2})
    quiet_libraries()
    set_threads(args.threads)
    warn_if_busy()
    from iqstar_lite.data.formatting import render_chat

    batches = [int(b) for b in args.batches.split(",")]
    backends = load_backends(args.run_dir, args.threads, args.ort_spin, args.variant)
    tok = backends["onnx"].tokenizer
    eos, pad_id = (
        backends["onnx"].eos_ids,
        tok.pad_token_id if tok.pad_token_id is not None else backends["onnx"].eos_ids[0],
    )
    prompt_ids = [render_chat(tok, t) for t in held_out_prompts(args.run_dir, max(max(batches), args.agree_prompts))]
    results = {
        "tokens_per_s": speed(backends, prompt_ids, batches, args.new_tokens, args.repeats, pad_id, eos),
        "agreement": agreement(backends, prompt_ids[: args.agree_prompts], args.new_tokens, pad_id, eos),
        "bench_loop_matches_package_generate": batch_consistency(
            backends["onnx"], prompt_ids[: max(batches)], args.new_tokens, pad_id
        ),
    }
    tps = results["tokens_per_s"]
    med = lambda name, b: tps.get(name, {}).get(f"batch_{b}", {}).get("median")  # noqa: E731
    results["ratios"] = {
        f"batch_{b}": {
            "onnx_over_pytorch": ratio(med("onnx", b), med("pytorch", b)),
            "int8_over_pytorch": ratio(med("onnx-int8", b), med("pytorch", b)),
            "int8_over_onnx": ratio(med("onnx-int8", b), med("onnx", b)),
            **{
                f"{n}_over_{base}": ratio(med(n, b), med(base, b))
                for n in (v.partition("=")[0] for v in args.variant)
                for base in ("onnx", "pytorch")
            },
        }
        for b in batches
    }
    int8_agree = results["agreement"].get("onnx-int8", {}).get("agreement")
    results["targets"] = {
        **TARGETS,
        **{
            f"batch_{b}": {
                "onnx_met": (r["onnx_over_pytorch"] or 0) >= TARGETS["onnx_over_pytorch_min"],
                "int8_speed_met": (r["int8_over_onnx"] or 0) >= TARGETS["int8_over_onnx_min"],
            }
            for b, r in ((b, results["ratios"][f"batch_{b}"]) for b in batches)
        },
        "int8_agreement_met": int8_agree is not None and int8_agree >= TARGETS["int8_agreement_min"],
    }
    for b in batches:
        print(f"batch {b}: " + ", ".join(f"{k} {v}" for k, v in results["ratios"][f"batch_{b}"].items()))
    print("agreement: " + ", ".join(f"{k} {v['agreement']}" for k, v in results["agreement"].items()))
    settings = {
        "run_dir": str(args.run_dir),
        "batches": batches,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "agree_prompts": args.agree_prompts,
        "threads": args.threads,
        "ort_spin": args.ort_spin,
        "quick": args.quick,
        "variants": args.variant,
        "prompt_tokens": [len(i) for i in prompt_ids[: max(batches)]],
    }
    notes = [
        "tokens/s = batch x new_tokens / wall time of the whole greedy decode (prefill included); 1 warm-up run excluded.",
        "PyTorch: merged checkpoint loaded in fp32, eager, model.generate with min_new_tokens=max_new_tokens; threads = torch default unless --threads.",
        "onnx-package = iqstar_lite.runtimes.ort.OrtGenerator.generate (batch 1); onnx / onnx-int8 = OrtGenerator.generate_batch.",
    ]
    write_result("onnx_speed", settings, results, notes, args.results)


if __name__ == "__main__":
    main()

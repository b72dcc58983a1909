"""Parity gate: the ONNX export must compute what the merged PyTorch model computes.

For each check prompt (chat template applied):

* fp32 ONNX vs merged model (fp32): max |logit diff| over the prompt positions and over the greedy
  decode steps (which exercise the KV cache), gated by ``export.max_logit_diff``; the greedy
  continuations (``export.check_new_tokens``, KV cache on both sides) must be identical.
* int8 ONNX: top-1 agreement with the merged model, teacher-forced on the merged model's greedy
  continuation, and the first position where it differs; gated by ``export.min_int8_agreement``.
* a genai folder (fp32 and int8) in onnxruntime-genai's own runtime, and each GGUF file in llama.cpp where installed:
  prompt ids from the client's own template + tokenizer, its decoding, its greedy tokens (``check_clients.py``).
* each GGUF file loaded back by transformers: prompt ids, f32/f16 identical greedy tokens, q8_0 top-1 agreement.

The ONNX side runs through ``ort_generate.OrtGenerator`` (the same loop ``chat`` uses); every client's greedy
tokens/s is reported.

    python -m iqstar_lite.check RUN_DIR/onnx [--against RUN_DIR/merged]

exits 1 when the gate fails (naming the prompt and position that diverged), 2 on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from pathlib import Path

import numpy as np

from iqstar_lite.check_clients import client_parity, first_diff, tokens_per_s
from iqstar_lite.config import ExportConfig, RecipeConfig, load_run_config
from iqstar_lite.errors import UserError, run_cli
from iqstar_lite.genai_generate import GenaiGenerator, is_genai_folder
from iqstar_lite.llamacpp_generate import LlamaCppGenerator
from iqstar_lite.llamacpp_generate import available as llamacpp_available
from iqstar_lite.merge import pick_prompts
from iqstar_lite.ort_generate import Generation, OrtGenerator, eos_token_ids, find_onnx_file, render_chat


def _torch_reference(merged_dir: Path, prompt_ids: list[list[int]], new_tokens: int, eos: list[int], gguf_file: str | None = None,
                     forced: list[list[int]] | None = None, greedy_prompts: int | None = None) -> list[dict]:
    """Merged checkpoint in fp32: greedy continuation (KV cache) + teacher-forced logits per prompt.

    ``gguf_file``: load ``merged_dir/gguf_file`` with transformers' GGUF loader instead (dequantized to fp32).
    ``forced``: per prompt, the continuation the logits are teacher-forced on (default: its own greedy tokens).
    ``greedy_prompts``: decode (and time) only the first N prompts (``tokens`` None for the others; needs ``forced``)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if gguf_file is None and not (Path(merged_dir) / "config.json").is_file():
        raise UserError(f"no merged checkpoint at {str(merged_dir)!r}; run the export stage first or pass --against MERGED_DIR")
    if gguf_file is None:
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, use_safetensors=True).eval()
    else:
        from iqstar_lite.gguf_export import load_back

        model = load_back(Path(merged_dir) / gguf_file)[1]
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos or None, pad_token_id=(eos or [0])[0], bos_token_id=model.config.bos_token_id)

    def greedy(ids: list[int], cfg: GenerationConfig) -> tuple[list[int], float]:
        x = torch.tensor([ids])
        start = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)
        return out[0, len(ids) :].tolist(), time.perf_counter() - start

    refs = []
    with torch.no_grad():
        greedy(prompt_ids[0], GenerationConfig(**{**gen_cfg.to_dict(), "max_new_tokens": 2}))  # warm-up, not timed
        for i, ids in enumerate(prompt_ids):
            tokens, seconds = greedy(ids, gen_cfg) if greedy_prompts is None or i < greedy_prompts else (None, 0.0)
            # Row len(ids) - 1 + k predicts tokens[k].
            logits = model(input_ids=torch.tensor([ids + (forced[i] if forced else tokens)]), use_cache=False).logits[0].float().numpy()
            refs.append({"tokens": tokens, "seconds": seconds, "logits": logits})
    return refs


def _onnx_rows(gen: OrtGenerator, texts: list[str], prompt_ids: list[list[int]], refs: list[dict], new_tokens: int) -> list[dict]:
    """fp32 ONNX vs the reference: prompt-position logits, then greedy decoding with the KV cache."""
    gen.generate(prompt_ids[0], 2)  # warm-up, not timed
    rows = []
    for text, ids, ref in zip(texts, prompt_ids, refs):
        n, want = len(ids), ref["tokens"]
        prompt_diff = np.abs(gen.logits(ids) - ref["logits"][:n]).max(axis=-1)
        out = gen.generate(ids, new_tokens, keep_logits=True)
        div = first_diff(out.tokens, want)
        steps = len(out.tokens) if div is None else min(div + 1, len(want), len(out.tokens))  # same prefix so far
        decode_diff = [float(np.abs(out.step_logits[k] - ref["logits"][n - 1 + k]).max()) for k in range(steps)]
        row = {
            "prompt": text,
            "prompt_tokens": n,
            "max_logit_diff": float(prompt_diff.max()),
            "worst_position": int(prompt_diff.argmax()),
            "decode_max_logit_diff": float(np.max(decode_diff)) if decode_diff else 0.0,  # np.max keeps a nan
            "worst_decode_step": int(np.argmax(decode_diff)) if decode_diff else None,
            "torch_tokens": want,
            "onnx_tokens": out.tokens,
            "greedy_equal": div is None,
            "first_divergence": div,
            "torch_seconds": ref["seconds"],
            "onnx_seconds": out.seconds,
        }
        if div is not None:
            pieces = [gen.tokenizer.decode(t[div : div + 1]) if gen.tokenizer else "" for t in (out.tokens, want)]
            row["divergence"] = {"onnx": pieces[0], "torch": pieces[1]}
            if div < len(want):
                top2 = np.sort(ref["logits"][n - 1 + div])[-2:]
                row["divergence"]["torch_top2_margin"] = float(top2[1] - top2[0])
        rows.append(row)
    return rows


def _int8_rows(gen: OrtGenerator, prompt_ids: list[list[int]], refs: list[dict], new_tokens: int) -> list[dict]:
    """int8 top-1 agreement, teacher-forced on the reference greedy continuation; its own greedy speed."""
    gen.generate(prompt_ids[0], 2)  # warm-up, not timed
    rows = []
    for ids, ref in zip(prompt_ids, refs):
        n, want = len(ids), ref["tokens"]
        q = gen.logits(ids + want)
        top1 = q[n - 1 : n - 1 + len(want)].argmax(axis=-1).tolist()
        out = gen.generate(ids, new_tokens)
        rows.append({
            "agree": sum(a == b for a, b in zip(top1, want)),
            "total": len(want),
            "first_divergence": first_diff(top1, want),
            "max_logit_diff": float(np.abs(q[:n] - ref["logits"][:n]).max()),
            "greedy_tokens": out.tokens,
            "seconds": out.seconds,
        })  # fmt: skip
    return rows


def _failures(rows: list[dict], export: ExportConfig) -> list[str]:
    failures = []
    for i, r in enumerate(rows):
        where, limit = f"prompt {i} ({r['prompt'][:40]!r})", f"> export.max_logit_diff {export.max_logit_diff:g}"
        # "not <=": a nan difference (nan / inf logits on either side) fails, where "> limit" would let it pass
        if not r["max_logit_diff"] <= export.max_logit_diff:
            failures.append(f"{where} position {r['worst_position']}: |logit diff| {r['max_logit_diff']:.3g} {limit}")
        if not r["decode_max_logit_diff"] <= export.max_logit_diff:
            k = r["worst_decode_step"]
            failures.append(f"{where} new token {k} (position {r['prompt_tokens'] + k}): |logit diff| {r['decode_max_logit_diff']:.3g} {limit}")
        if not r["greedy_equal"]:
            k, d = r["first_divergence"], r["divergence"]
            margin = f" (pytorch top-2 margin {d['torch_top2_margin']:.3g})" if "torch_top2_margin" in d else ""
            failures.append(f"{where} new token {k} (position {r['prompt_tokens'] + k}): greedy onnx {d['onnx']!r} != pytorch {d['torch']!r}{margin}")
    return failures


def _gguf_rows(gguf_dir: Path, texts: list[str], prompt_ids: list[list[int]], refs: list[dict], export: ExportConfig, eos: list[int]) -> tuple[dict, list[str]]:
    """Each ``model-*.gguf`` loaded back by transformers: its tokenizer and chat template give the merged model's prompt
    ids; f32 / f16 give its greedy tokens; q8_0 agrees on the top-1 token (teacher-forced), >= export.min_int8_agreement.

    Greedy equality is read off one teacher-forced pass on the merged model's greedy tokens: greedy decoding gives the
    same tokens exactly when the argmax at every forced position is the merged model's token (the prefixes agree up to the
    first position where it is not, which is where greedy decoding would diverge). Only the first prompt is decoded, for
    tokens/s: transformers' GGUF loader is a check of the file, not a runtime (llama.cpp is, below)."""
    from iqstar_lite.gguf_export import load_back

    out, failures = {}, []
    for path in sorted(Path(gguf_dir).glob("model-*.gguf")):
        qtype, name = path.stem.removeprefix("model-"), f"gguf {path.name}"
        gtok = load_back(path, model=False)[0]
        own = _torch_reference(gguf_dir, prompt_ids, export.check_new_tokens, eos, gguf_file=path.name, forced=[r["tokens"] for r in refs],
                               greedy_prompts=1)
        gc.collect()
        rows = []
        for i, (text, ids, ref, mine) in enumerate(zip(texts, prompt_ids, refs, own)):
            n, want = len(ids), ref["tokens"]
            top1 = mine["logits"][n - 1 : n - 1 + len(want)].argmax(-1).tolist()
            gids = render_chat(gtok, text)
            div = first_diff(top1, want)
            row = {"prompt_ids_equal": gids == ids, "tokens": top1 if div is None else top1[: div + 1], "seconds": mine["seconds"],
                   "first_divergence": div, "decoded": mine["tokens"],
                   "agree": sum(a == b for a, b in zip(top1, want)), "total": len(want), "max_logit_diff": float(np.abs(mine["logits"][:n] - ref["logits"][:n]).max())}
            if gids != ids:
                k = first_diff(gids, ids)
                failures.append(f"{name} prompt {i}: its tokenizer / chat template give {len(gids)} prompt ids, the merged model's {len(ids)} (first difference at id {k})")
            if qtype in ("f32", "f16") and row["first_divergence"] is not None:
                failures.append(f"{name} prompt {i} ({text[:40]!r}) new token {div}: greedy {row['tokens'][-12:]} != merged {want[max(div - 11, 0) : div + 1]}")
            rows.append(row)
        timed = [Generation(r["decoded"], r["seconds"]) for r in rows if r["decoded"] is not None]
        if qtype in ("f32", "f16") and timed and timed[0].tokens != refs[0]["tokens"]:  # the decoded prompt: the real loop agrees too
            failures.append(f"{name} prompt 0: decoded greedy {timed[0].tokens[:12]} != merged {refs[0]['tokens'][:12]}")
        report = {"client": "transformers (GGUF loader)", "type": qtype, "tokens_per_s": tokens_per_s(timed),
                  "greedy_equal": all(r["first_divergence"] is None for r in rows), "prompt_ids_equal": all(r["prompt_ids_equal"] for r in rows),
                  "agreement": sum(r["agree"] for r in rows) / max(sum(r["total"] for r in rows), 1), "max_logit_diff": max(r["max_logit_diff"] for r in rows), "prompts": rows}
        if qtype not in ("f32", "f16") and not report["agreement"] >= export.min_int8_agreement:
            failures.append(f"{name}: top-1 agreement {report['agreement']:.3f} < export.min_int8_agreement {export.min_int8_agreement:g}")
        out[qtype] = report
    return out, failures


def check_onnx(onnx_dir: Path, merged_dir: Path, export: ExportConfig, prompts: list[str] | None = None, int8_dir: Path | None = None,
               gguf_dir: Path | None = None) -> dict:
    """Compare ``onnx_dir`` (and ``int8_dir``, the GGUF files in ``gguf_dir``) with ``merged_dir``; return the report
    (``passed``, ``failures``).

    The models run one after the other (a 7B export is never in memory twice).
    """
    from transformers import AutoTokenizer

    find_onnx_file(onnx_dir)  # bad input fails before any model is loaded
    if int8_dir is not None:
        find_onnx_file(int8_dir)
    # Prompt ids from the merged model's tokenizer (the one it was trained with) where it is there.
    tok = AutoTokenizer.from_pretrained(merged_dir if (Path(merged_dir) / "tokenizer_config.json").is_file() else onnx_dir)
    texts = pick_prompts(prompts, export.check_prompts)
    prompt_ids = [render_chat(tok, t) for t in texts]
    eos = eos_token_ids(Path(onnx_dir), tok)

    refs = _torch_reference(merged_dir, prompt_ids, export.check_new_tokens, eos)
    gc.collect()
    rows = _onnx_rows(OrtGenerator(onnx_dir, spin=False), texts, prompt_ids, refs, export.check_new_tokens)
    gc.collect()
    report = {
        "onnx_dir": str(onnx_dir),
        "merged_dir": str(merged_dir),
        "int8_dir": str(int8_dir) if int8_dir else None,
        "thresholds": dataclasses.asdict(export),
        "max_logit_diff": float(np.max([[r["max_logit_diff"], r["decode_max_logit_diff"]] for r in rows])),
        "greedy_equal": all(r["greedy_equal"] for r in rows),
        "torch_tokens_per_s": tokens_per_s([Generation(r["torch_tokens"], r["torch_seconds"]) for r in rows]),
        "onnx_tokens_per_s": tokens_per_s([Generation(r["onnx_tokens"], r["onnx_seconds"]) for r in rows]),
        "prompts": rows,
    }
    failures = _failures(rows, export)
    if int8_dir is not None:
        for row, q in zip(rows, _int8_rows(OrtGenerator(int8_dir, spin=False), prompt_ids, refs, export.check_new_tokens)):
            row["int8"] = q
        report["int8_agreement"] = sum(r["int8"]["agree"] for r in rows) / max(sum(r["int8"]["total"] for r in rows), 1)
        report["int8_tokens_per_s"] = tokens_per_s([Generation(r["int8"]["greedy_tokens"], r["int8"]["seconds"]) for r in rows])
        if not report["int8_agreement"] >= export.min_int8_agreement:
            first = next(((i, r["int8"]["first_divergence"]) for i, r in enumerate(rows) if r["int8"]["first_divergence"] is not None), None)
            at = f"; first divergence: prompt {first[0]} new token {first[1]} (position {rows[first[0]]['prompt_tokens'] + first[1]})" if first else ""
            failures.append(f"int8 top-1 agreement {report['int8_agreement']:.3f} < export.min_int8_agreement {export.min_int8_agreement:g}{at}")
    for name, folder, floor in (("genai", onnx_dir, None), ("genai-int8", int8_dir, export.min_int8_agreement)):
        if folder is not None and is_genai_folder(folder):  # onnxruntime-genai's own runtime on the same folder
            gc.collect()
            report[name], bad = client_parity(GenaiGenerator(folder), "onnxruntime-genai", name, texts, prompt_ids, refs, tok, export.check_new_tokens, floor)
            failures += bad
    if gguf_dir is not None and Path(gguf_dir).is_dir():
        report["gguf"], bad = _gguf_rows(Path(gguf_dir), texts, prompt_ids, refs, export, eos)
        failures += bad
        if llamacpp_available():  # llama.cpp itself, where installed (the llamacpp extra)
            n_ctx = max(len(i) for i in prompt_ids) + export.check_new_tokens + 8
            for path in sorted(Path(gguf_dir).glob("model-*.gguf")):
                gen = LlamaCppGenerator(path, n_ctx=n_ctx)
                report.setdefault("llama.cpp", {})[path.stem.removeprefix("model-")], bad = client_parity(
                    gen, "llama.cpp", f"llama.cpp {path.name}", texts, prompt_ids, refs, tok, export.check_new_tokens, export.min_int8_agreement)
                failures += bad
                gen.close()
    report["failures"] = failures
    report["passed"] = not failures
    return report


def format_table(report: dict) -> str:
    """A compact, human summary of a ``check_onnx`` report."""
    lines = [f"{'#':>2}  {'prompt':<36} {'tok':>4}  {'max|dlogit|':>11}  {'greedy':<16} int8 top-1"]
    for i, r in enumerate(report["prompts"]):
        d = max(r["max_logit_diff"], r["decode_max_logit_diff"])
        greedy = f"{len(r['onnx_tokens'])} same" if r["greedy_equal"] else f"differs @{r['first_divergence']}"
        q = r.get("int8")
        int8 = "-" if q is None else f"{q['agree']}/{q['total']}" + ("" if q["first_divergence"] is None else f" (first diff @{q['first_divergence']})")
        lines.append(f"{i:>2}  {repr(r['prompt'][:34]):<36} {r['prompt_tokens']:>4}  {d:>11.3g}  {greedy:<16} {int8}")
    speed = f"greedy tokens/s: pytorch {report['torch_tokens_per_s']:.1f}, onnxruntime {report['onnx_tokens_per_s']:.1f}"
    if "int8_agreement" in report:
        speed += f", onnxruntime-int8 {report['int8_tokens_per_s']:.1f}; int8 agreement {report['int8_agreement']:.3f}"
    for name in ("genai", "genai-int8"):
        if name in report:
            c = report[name]
            same = f"greedy {'same' if c['greedy_equal'] else 'differs'}" + (f", top-1 agreement {c['agreement']:.3f}" if "agreement" in c else "")
            ids = "same prompt ids" if c["prompt_ids_equal"] else "prompt ids DIFFER"
            speed += f"\nonnxruntime-genai ({name}): {c['tokens_per_s']:.1f} tokens/s, {ids}, {same}"
    for qtype, c in report.get("gguf", {}).items():
        same = f"greedy {'same' if c['greedy_equal'] else 'differs'}, top-1 agreement {c['agreement']:.3f}, max |dlogit| {c['max_logit_diff']:.3g}"
        ids = "same prompt ids" if c["prompt_ids_equal"] else "prompt ids DIFFER"
        speed += f"\nGGUF {qtype} via {c['client']}: {c['tokens_per_s']:.1f} tokens/s, {ids}, {same}"
    for qtype, c in report.get("llama.cpp", {}).items():
        ids = "same prompt ids" if c["prompt_ids_equal"] else "prompt ids DIFFER"
        speed += f"\nGGUF {qtype} in llama.cpp: {c['tokens_per_s']:.1f} tokens/s, {ids}, greedy {'same' if c['greedy_equal'] else 'differs'}, top-1 agreement {c['agreement']:.3f}"
    lines += [speed, "PASSED" if report["passed"] else "FAILED:\n  " + "\n  ".join(report["failures"])]
    return "\n".join(lines)


def check_run(run_dir: Path, cfg: RecipeConfig, prompts: list[str] | None = None) -> dict:
    """Check ``RUN_DIR/onnx`` (+ ``onnx-int8`` when ``export.int8``) against ``RUN_DIR/merged``.

    Writes ``RUN_DIR/check.json``, prints the table, and returns the report; the caller exits
    non-zero when ``report["passed"]`` is false (``report["failures"]`` says where it diverged).
    """
    run_dir = Path(run_dir)
    if not cfg.export.onnx:
        report = {"passed": True, "failures": [], "skipped": "export.onnx=false: nothing to check"}
        print("check skipped: export.onnx=false")
    else:
        int8_dir = run_dir / "onnx-int8" if cfg.export.int8 else None
        gguf_dir = run_dir / "gguf" if cfg.export.gguf not in ("", "none") else None
        report = check_onnx(run_dir / "onnx", run_dir / "merged", cfg.export, prompts, int8_dir, gguf_dir)
        from iqstar_lite.gguf_export import gguf_file, parse_types

        missing = [gguf_file(run_dir / "gguf", t).name for t in parse_types(cfg.export.gguf) if t not in report.get("gguf", {})]
        if missing:  # asked for, never checked: the gate does not pass on files it did not see
            report["failures"].append(f"export.gguf={cfg.export.gguf} but {', '.join(missing)} missing in {run_dir / 'gguf'}; run the export stage")
            report["passed"] = False
        print(format_table(report))
    (run_dir / "check.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None, prog: str = "python -m iqstar_lite.check") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="ONNX / genai / GGUF vs merged PyTorch parity gate.")
    ap.add_argument("onnx_dir", type=Path, help="RUN_DIR/onnx (or RUN_DIR)")
    ap.add_argument("--against", type=Path, help="merged checkpoint (default: the onnx folder's sibling 'merged')")
    ap.add_argument("--int8", type=Path, help="int8 export to check too (default: sibling 'onnx-int8' if present)")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 export")
    ap.add_argument("--gguf", type=Path, help="folder of model-*.gguf files to check too (default: sibling 'gguf' if present)")
    ap.add_argument("--no-gguf", action="store_true", help="skip the GGUF files")
    args = ap.parse_args(argv)
    onnx_dir = args.onnx_dir
    if (onnx_dir / "config.yaml").is_file() and (onnx_dir / "onnx").is_dir():
        onnx_dir = onnx_dir / "onnx"  # a run dir was given
    if not onnx_dir.is_dir():
        raise UserError(f"{str(onnx_dir)!r} does not exist; pass RUN_DIR/onnx written by 'iqstar-lite export RUN_DIR'")
    run_dir = onnx_dir.parent
    is_run = (run_dir / "config.yaml").is_file()
    export = load_run_config(run_dir).export if is_run else ExportConfig()
    int8_dir = None if args.no_int8 else (args.int8 or (run_dir / "onnx-int8" if (run_dir / "onnx-int8").is_dir() else None))
    gguf_dir = None if args.no_gguf else (args.gguf or (run_dir / "gguf" if (run_dir / "gguf").is_dir() else None))
    report = check_onnx(onnx_dir, args.against or run_dir / "merged", export, None, int8_dir, gguf_dir)
    if is_run:
        (run_dir / "check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    run_cli(main)

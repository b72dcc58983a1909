"""Parity gate: the ONNX export must compute what the merged PyTorch model computes.

The reference is the merged checkpoint in fp32: greedy tokens (``export.check_new_tokens``, KV cache) and its logits,
per check prompt (chat template applied). Every client then runs through one path (``check_clients.client_parity``):
its own template and tokenizer give the prompt ids, its own loop the greedy tokens, its own detokenizer the text.

=====================================  ==========================================================================
client                                 gated on
=====================================  ==========================================================================
onnxruntime, fp32 ONNX                 identical greedy tokens; |logit diff| <= ``export.max_logit_diff`` at the
                                       prompt positions and every decode step (the KV cache path)
onnxruntime, int8 ONNX                 top-1 agreement >= ``export.min_int8_agreement`` (teacher-forced)
onnxruntime-genai (fp32 / int8)        identical greedy tokens / top-1 agreement, on a genai folder
each GGUF file, transformers' loader   f32 / f16: identical greedy tokens; q8_0: top-1 agreement
each GGUF file, llama.cpp              where installed (the ``llamacpp`` extra): the same
=====================================  ==========================================================================

Every client must also give the merged tokenizer's prompt ids and text; every client's greedy tokens/s is reported.

    python -m iqstar_lite check RUN_DIR/onnx [--against RUN_DIR/merged]

exits 1 when the gate fails (naming the prompt and position that diverged), 2 on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from pathlib import Path

from iqstar_lite.config import ExportConfig, RecipeConfig, load_run_config
from iqstar_lite.data.formatting import render_chat
from iqstar_lite.errors import UserError, run_cli
from iqstar_lite.export.check_clients import client_parity, tokens_per_s
from iqstar_lite.export.merge import pick_prompts
from iqstar_lite.extras import require
from iqstar_lite.rundir import RunDir
from iqstar_lite.runtimes.base import Generation
from iqstar_lite.runtimes.genai import GenaiGenerator, is_genai_folder
from iqstar_lite.runtimes.gguf_transformers import GgufTransformers
from iqstar_lite.runtimes.llamacpp import LlamaCppGenerator
from iqstar_lite.runtimes.llamacpp import available as llamacpp_available
from iqstar_lite.runtimes.ort import OrtGenerator, dir_eos_ids, find_onnx_file


def _torch_reference(merged_dir: Path, prompt_ids: list[list[int]], new_tokens: int, eos: list[int]) -> list[dict]:
    """Merged checkpoint in fp32, per prompt: greedy continuation (transformers' ``generate``, KV cache), its seconds, and
    the logits of one pass over prompt + continuation (row ``len(ids) - 1 + k`` predicts ``tokens[k]``)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if not (Path(merged_dir) / "config.json").is_file():
        raise UserError(
            f"no merged checkpoint at {str(merged_dir)!r}; run the export stage first or pass --against MERGED_DIR"
        )
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, use_safetensors=True).eval()
    gen_cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=eos or None,
        pad_token_id=(eos or [0])[0],
        bos_token_id=model.config.bos_token_id,
    )

    def greedy(ids: list[int], cfg: GenerationConfig) -> tuple[list[int], float]:
        x = torch.tensor([ids])
        start = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)
        return out[0, len(ids) :].tolist(), time.perf_counter() - start

    refs = []
    with torch.no_grad():
        greedy(prompt_ids[0], GenerationConfig(**{**gen_cfg.to_dict(), "max_new_tokens": 2}))  # warm-up, not timed
        for ids in prompt_ids:
            tokens, seconds = greedy(ids, gen_cfg)
            logits = model(input_ids=torch.tensor([ids + tokens]), use_cache=False).logits[0].float().numpy()
            refs.append({"tokens": tokens, "seconds": seconds, "logits": logits})
    return refs


def _clients(onnx_dir: Path, int8_dir: Path | None, gguf_dir: Path | None, export: ExportConfig, n_ctx: int):
    """(report key, name in failures, opener, min_agreement or None for exact, logit limit or None): every client to check,
    opened one at a time (a 7B export is never in memory twice)."""
    exact = lambda qtype: qtype in ("f32", "f16")  # noqa: E731
    yield "onnxruntime", "onnx", lambda: OrtGenerator(onnx_dir, spin=False), None, export.max_logit_diff
    if int8_dir is not None:
        yield "onnxruntime-int8", "int8", lambda: OrtGenerator(int8_dir, spin=False), export.min_int8_agreement, None
    for key, folder, floor in (("genai", onnx_dir, None), ("genai-int8", int8_dir, export.min_int8_agreement)):
        if folder is not None and is_genai_folder(folder):  # onnxruntime-genai's own runtime on the same folder
            yield key, key, (lambda folder=folder: GenaiGenerator(folder)), floor, None
    files = sorted(Path(gguf_dir).glob("model-*.gguf")) if gguf_dir is not None and Path(gguf_dir).is_dir() else []
    for path in files:
        qtype = path.stem.removeprefix("model-")
        yield (
            f"gguf/{qtype}",
            f"gguf {path.name}",
            (lambda path=path: GgufTransformers(path)),
            None if exact(qtype) else export.min_int8_agreement,
            None,
        )
    if files and llamacpp_available():  # llama.cpp itself, where installed (the llamacpp extra)
        for path in files:
            qtype = path.stem.removeprefix("model-")
            yield (
                f"llama.cpp/{qtype}",
                f"llama.cpp {path.name}",
                (lambda path=path: LlamaCppGenerator(path, n_ctx=n_ctx)),
                None if exact(qtype) else export.min_int8_agreement,
                None,
            )


def check_onnx(
    onnx_dir: Path,
    merged_dir: Path,
    export: ExportConfig,
    prompts: list[str] | None = None,
    int8_dir: Path | None = None,
    gguf_dir: Path | None = None,
) -> dict:
    """Compare every client of ``onnx_dir`` (and ``int8_dir``, the GGUF files in ``gguf_dir``) with ``merged_dir``; return
    the report (``passed``, ``failures``; per client its report, GGUF and llama.cpp ones per file type)."""
    from transformers import AutoTokenizer

    find_onnx_file(onnx_dir)  # bad input fails before any model is loaded
    require("onnxruntime")
    if any(folder is not None and is_genai_folder(folder) for folder in (onnx_dir, int8_dir)):
        require("onnxruntime_genai")
    if int8_dir is not None:
        find_onnx_file(int8_dir)
    # Prompt ids from the merged model's tokenizer (the one it was trained with) where it is there.
    tok = AutoTokenizer.from_pretrained(
        merged_dir if (Path(merged_dir) / "tokenizer_config.json").is_file() else onnx_dir
    )
    texts = pick_prompts(prompts, export.check_prompts)
    prompt_ids = [render_chat(tok, t) for t in texts]
    refs = _torch_reference(merged_dir, prompt_ids, export.check_new_tokens, dir_eos_ids(Path(onnx_dir), tok))
    gc.collect()
    report: dict = {
        "onnx_dir": str(onnx_dir),
        "merged_dir": str(merged_dir),
        "int8_dir": str(int8_dir) if int8_dir else None,
        "thresholds": dataclasses.asdict(export),
        "torch_tokens_per_s": tokens_per_s([Generation(r["tokens"], r["seconds"]) for r in refs]),
    }
    failures: list[str] = []
    n_ctx = max(len(i) for i in prompt_ids) + export.check_new_tokens + 8
    for key, name, open_client, floor, logit_limit in _clients(onnx_dir, int8_dir, gguf_dir, export, n_ctx):
        gen = open_client()
        client, bad = client_parity(
            gen, name, texts, prompt_ids, refs, tok, export.check_new_tokens, floor, logit_limit
        )
        gen.close()
        del gen
        gc.collect()
        group, _, qtype = key.partition("/")
        if qtype:
            client["type"] = qtype
            report.setdefault(group, {})[qtype] = client
        else:
            report[key] = client
        failures += bad
    onnx = report["onnxruntime"]  # the headline numbers of the fp32 graph, and its rows for the table
    report.update(
        max_logit_diff=onnx["max_logit_diff"],
        greedy_equal=onnx["greedy_equal"],
        onnx_tokens_per_s=onnx["tokens_per_s"],
        prompts=onnx["prompts"],
    )
    if "onnxruntime-int8" in report:
        report.update(
            int8_agreement=report["onnxruntime-int8"]["agreement"],
            int8_tokens_per_s=report["onnxruntime-int8"]["tokens_per_s"],
        )
    report["failures"] = failures
    report["passed"] = not failures
    return report


def format_table(report: dict) -> str:
    """A compact, human summary of a ``check_onnx`` report: the fp32 graph per prompt, then one line per client."""
    int8 = {i: r for i, r in enumerate(report.get("onnxruntime-int8", {}).get("prompts", []))}
    lines = [f"{'#':>2}  {'prompt':<36} {'tok':>4}  {'max|dlogit|':>11}  {'greedy':<16} int8 top-1"]
    for i, r in enumerate(report["prompts"]):
        d = max(r.get("max_logit_diff", float("nan")), r.get("decode_max_logit_diff", 0.0))
        greedy = f"{len(r['tokens'])} same" if r["greedy_equal"] else f"differs @{r['first_divergence']}"
        q = int8.get(i)
        cell = (
            "-"
            if q is None
            else f"{q['agree']}/{q['total']}"
            + ("" if q["first_agreement_miss"] is None else f" (first diff @{q['first_agreement_miss']})")
        )
        lines.append(f"{i:>2}  {repr(r['prompt'][:34]):<36} {r['prompt_tokens']:>4}  {d:>11.3g}  {greedy:<16} {cell}")
    clients = [(f"{c['client']} ({k})", c) for k, c in report.items() if isinstance(c, dict) and "client" in c]
    clients += [(f"GGUF {q} via {c['client']}", c) for q, c in report.get("gguf", {}).items()]
    clients += [(f"GGUF {q} in llama.cpp", c) for q, c in report.get("llama.cpp", {}).items()]
    out = [f"greedy tokens/s: pytorch (merged, fp32) {report['torch_tokens_per_s']:.1f}"]
    for name, c in clients:
        same = f"greedy {'same' if c['greedy_equal'] else 'differs'}" + (
            f", top-1 agreement {c['agreement']:.3f}" if "agreement" in c else ""
        )
        logits = f", max |dlogit| {c['max_logit_diff']:.3g}" if "max_logit_diff" in c else ""
        ids = "same prompt ids" if c["prompt_ids_equal"] else "prompt ids DIFFER"
        out.append(f"{name}: {c['tokens_per_s']:.1f} tokens/s, {ids}, {same}{logits}")
    lines += out + ["PASSED" if report["passed"] else "FAILED:\n  " + "\n  ".join(report["failures"])]
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
        int8_dir = RunDir(run_dir).onnx_int8 if cfg.export.int8 else None
        gguf_dir = RunDir(run_dir).gguf if cfg.export.gguf not in ("", "none") else None
        report = check_onnx(RunDir(run_dir).onnx, RunDir(run_dir).merged, cfg.export, prompts, int8_dir, gguf_dir)
        from iqstar_lite.export.to_gguf import gguf_file, parse_types

        missing = [
            gguf_file(RunDir(run_dir).gguf, t).name
            for t in parse_types(cfg.export.gguf)
            if t not in report.get("gguf", {})
        ]
        if missing:  # asked for, never checked: the gate does not pass on files it did not see
            report["failures"].append(
                f"export.gguf={cfg.export.gguf} but {', '.join(missing)} missing in {RunDir(run_dir).gguf}; run the export stage"
            )
            report["passed"] = False
        print(format_table(report))
    RunDir(run_dir).check_report.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None, prog: str = "python -m iqstar_lite check") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="ONNX / genai / GGUF vs merged PyTorch parity gate.")
    ap.add_argument("onnx_dir", type=Path, help="RUN_DIR/onnx (or RUN_DIR)")
    ap.add_argument("--against", type=Path, help="merged checkpoint (default: the onnx folder's sibling 'merged')")
    ap.add_argument("--int8", type=Path, help="int8 export to check too (default: sibling 'onnx-int8' if present)")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 export")
    ap.add_argument(
        "--gguf", type=Path, help="folder of model-*.gguf files to check too (default: sibling 'gguf' if present)"
    )
    ap.add_argument("--no-gguf", action="store_true", help="skip the GGUF files")
    args = ap.parse_args(argv)
    onnx_dir = args.onnx_dir
    if RunDir(onnx_dir).config.is_file() and RunDir(onnx_dir).onnx.is_dir():
        onnx_dir = RunDir(onnx_dir).onnx  # a run dir was given
    if not onnx_dir.is_dir():
        raise UserError(f"{str(onnx_dir)!r} does not exist; pass RUN_DIR/onnx written by 'iqstar-lite export RUN_DIR'")
    run_dir = onnx_dir.parent
    is_run = RunDir(run_dir).config.is_file()
    export = load_run_config(run_dir).export if is_run else ExportConfig()
    int8_dir = (
        None
        if args.no_int8
        else (args.int8 or (RunDir(run_dir).onnx_int8 if RunDir(run_dir).onnx_int8.is_dir() else None))
    )
    gguf_dir = (
        None if args.no_gguf else (args.gguf or (RunDir(run_dir).gguf if RunDir(run_dir).gguf.is_dir() else None))
    )
    report = check_onnx(onnx_dir, args.against or RunDir(run_dir).merged, export, None, int8_dir, gguf_dir)
    if is_run:
        RunDir(run_dir).check_report.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    run_cli(main)

"""Every deployment client of one run, same prompts, same work: greedy tokens/s at batch 1 and the ratio over PyTorch.

    python bench/deploy_clients.py RUN_DIR [--onnx NAME=DIR ...]        # RUN_DIR/merged, onnx, onnx-int8, gguf/
    python bench/deploy_clients.py RUN_DIR --quick

Clients: PyTorch (the merged checkpoint, fp32, the package's decoding loop); ``OrtGenerator`` (onnxruntime + numpy) on
every ONNX folder; onnxruntime-genai's own runtime (``GenaiGenerator``) on every folder with ``genai_config.json``;
each ``RUN_DIR/gguf/model-*.gguf`` through transformers' GGUF loader (dequantized to fp32: the file's numbers, PyTorch's
speed), and in llama.cpp where llama-cpp-python is installed (``LlamaCppGenerator``).
Every client decodes exactly --new-tokens greedy steps after each held-out prompt (EOS suppressed), 1 warm-up;
``same_tokens`` says whether its tokens equal PyTorch's on every prompt (the parity gate, ``iqstar_lite.export.check``, is the
proof; this is the sanity check that the timed work is the same).
"""

from __future__ import annotations

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
from decoders import ort_generator, torch_greedy, until_eos
from onnx_speed import held_out_prompts


def same_until_eos(a: list[int], b: list[int], eos: list[int]) -> bool:
    """Equal before the first EOS in either row (OrtGenerator may pick an EOS and decode past it, the other clients
    suppress it and pick their second choice)."""
    k = min(len(until_eos(a, eos)), len(until_eos(b, eos)))
    k -= any(t in eos for t in a[:k] + b[:k])
    return a[:k] == b[:k]


def clients(run_dir: Path, onnx: list[str], threads: int) -> dict:
    """name -> (decode(ids, n) -> tokens, description). Loads everything up front."""
    import torch
    from transformers import AutoModelForCausalLM

    from iqstar_lite.runtimes.genai import GenaiGenerator, is_genai_folder

    out = {}

    def torch_client(model, eos):
        return lambda ids, n: [int(t) for t in torch_greedy(model, [ids], n, eos[0], eos, fixed_length=True)[0]]

    merged = AutoModelForCausalLM.from_pretrained(
        run_dir / "merged", dtype=torch.float32, use_safetensors=True
    ).eval()  # never a pickle from a run folder
    eos = [
        int(e)
        for e in (
            [merged.generation_config.eos_token_id]
            if isinstance(merged.generation_config.eos_token_id, int)
            else merged.generation_config.eos_token_id
        )
    ]
    out["pytorch"] = (torch_client(merged, eos), "merged checkpoint, fp32, rollout.sample")
    folders = [(n, run_dir / n) for n in ("onnx", "onnx-int8") if (run_dir / n).is_dir()] + [
        (v.partition("=")[0], Path(v.partition("=")[2])) for v in onnx
    ]
    for name, folder in folders:
        gen = ort_generator(folder, threads, False)
        out[f"onnxruntime:{name}"] = (
            lambda ids, n, g=gen: g.generate(ids, n, stop_at_eos=False).tokens,
            f"OrtGenerator on {folder.name}",
        )
        if is_genai_folder(folder):
            gg = GenaiGenerator(folder)
            out[f"genai:{name}"] = (
                lambda ids, n, g=gg: g.generate(ids, n, stop_at_eos=False).tokens,
                f"onnxruntime-genai runtime on {folder.name}",
            )
    from iqstar_lite.runtimes.llamacpp import LlamaCppGenerator, available

    for path in sorted((run_dir / "gguf").glob("model-*.gguf")):
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        out[f"transformers-gguf:{path.stem.removeprefix('model-')}"] = (
            torch_client(model, eos),
            f"transformers' GGUF loader on {path.name}",
        )
        if available():
            lc = LlamaCppGenerator(path, threads=threads)
            out[f"llama.cpp:{path.stem.removeprefix('model-')}"] = (
                lambda ids, n, g=lc: g.generate(ids, n, stop_at_eos=False).tokens,
                f"llama.cpp (llama-cpp-python) on {path.name}",
            )
    return out


def main() -> None:
    p = base_parser("Greedy tokens/s of every deployment client of a run (batch 1).")
    p.add_argument("run_dir", type=Path)
    p.add_argument(
        "--onnx",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another ONNX decoder folder (e.g. an int8 variant, or a graph written by another exporter), repeatable",
    )
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = parse_args(p, {"new_tokens": 8, "repeats": 1, "prompts": 2})
    quiet_libraries()
    set_threads(args.threads)
    warn_if_busy()
    from transformers import AutoTokenizer

    from iqstar_lite.data.formatting import render_chat
    from iqstar_lite.runtimes.ort import dir_eos_ids

    tok = AutoTokenizer.from_pretrained(args.run_dir / "merged")
    prompt_ids = [render_chat(tok, t) for t in held_out_prompts(args.run_dir, args.prompts)]
    all_clients = clients(args.run_dir, args.onnx, args.threads)
    eos = dir_eos_ids(args.run_dir / "merged", tok)
    speed, tokens = {}, {}
    for name, (decode, _) in all_clients.items():
        times, _ = repeat(lambda: [decode(ids, args.new_tokens) for ids in prompt_ids], args.repeats)
        tokens[name] = [decode(ids, args.new_tokens) for ids in prompt_ids]
        speed[name] = stats([len(prompt_ids) * args.new_tokens / t for t in times], 2)
        print(f"{name:>28}: {speed[name]['median']:.1f} tokens/s", flush=True)
    base = speed["pytorch"]["median"]
    results = {
        "tokens_per_s": {n: {"batch_1": s} for n, s in speed.items()},
        "over_pytorch": {n: ratio(s["median"], base) for n, s in speed.items()},
        "same_tokens": {
            n: all(same_until_eos(a, b, eos) for a, b in zip(tokens[n], tokens["pytorch"])) for n in tokens
        },
        "tokens": tokens,
        "clients": {n: d for n, (_, d) in all_clients.items()},
    }
    settings = {
        "run_dir": str(args.run_dir),
        "new_tokens": args.new_tokens,
        "prompts": args.prompts,
        "repeats": args.repeats,
        "threads": args.threads,
        "onnx": args.onnx,
        "quick": args.quick,
        "prompt_tokens": [len(i) for i in prompt_ids],
    }
    notes = [
        "tokens/s = prompts x new_tokens / wall time of the greedy decodes of all prompts one at a time (prefill included); EOS suppressed; 1 warm-up.",
        "same_tokens: the client's greedy tokens equal PyTorch's on every prompt, up to the first EOS in either (OrtGenerator decodes past an EOS, "
        "the others suppress it). Lossy clients (int8, q8_0) may differ; the parity gate scores them by top-1 agreement.",
    ]
    write_result("deploy_clients", settings, results, notes, args.results)


if __name__ == "__main__":
    main()

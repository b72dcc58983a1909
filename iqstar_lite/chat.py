"""Chat with an exported model, in the runtime its format is made for.

    python -m iqstar_lite.chat RUN_DIR/onnx "Name three colours." [--max-new-tokens 128] [--sample]
    python -m iqstar_lite.chat RUN_DIR/onnx "First question?" "Second question?"    # answers in order
    python -m iqstar_lite.chat RUN_DIR/gguf/model-q8_0.gguf "Name three colours."

What serves what (``--runtime auto``, the default):

* a folder with ``genai_config.json`` (``export.onnx_graph=genai``): onnxruntime-genai's own runtime (its tokenizer,
  chat template and generator; ``genai_generate.py``); ``--runtime onnxruntime`` runs the same graph with
  ``OrtGenerator`` instead (batches in one call);
* another ONNX folder (``export.onnx_graph=optimum``): onnxruntime + numpy + a tokenizer (``ort_generate.py``);
* a ``.gguf`` file: llama.cpp where llama-cpp-python is installed (``llamacpp_generate.py``), else transformers' GGUF
  loader and the package's PyTorch decoding loop (``rollout.sample``; needs torch); ``--runtime`` picks either.

The ONNX paths never import torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from iqstar_lite.errors import UserError, run_cli

RUNTIMES = ("auto", "onnxruntime", "genai", "llama.cpp", "transformers")


def pick_runtime(path: Path, runtime: str = "auto") -> str:
    """Which client serves ``path`` (a ``UserError`` when it cannot be served)."""
    from iqstar_lite.genai_generate import is_genai_folder

    path = Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{str(path)!r} does not exist; pass RUN_DIR/gguf/model-q8_0.gguf (or -f16) written by 'python -m iqstar_lite.export RUN_DIR'")
        if runtime not in ("auto", "transformers", "llama.cpp"):
            raise UserError(f"a GGUF file runs with --runtime llama.cpp or transformers (or auto), not {runtime}")
        from iqstar_lite.llamacpp_generate import available

        return ("llama.cpp" if available() else "transformers") if runtime == "auto" else runtime
    if path.is_dir() and sorted(path.glob("model-*.gguf")) and not (path / "model.onnx").exists():
        raise UserError(f"{str(path)!r} holds GGUF files; pass one of them, e.g. {sorted(path.glob('model-*.gguf'))[-1]}")
    if runtime in ("transformers", "llama.cpp"):
        raise UserError(f"--runtime {runtime} serves .gguf files; {str(path)!r} is not one")
    if runtime == "genai" or (runtime == "auto" and is_genai_folder(path)):
        if not is_genai_folder(path):
            raise UserError(f"{str(path)!r} is not an onnxruntime-genai folder (no genai_config.json); export with export.onnx_graph=genai or use --runtime onnxruntime")
        return "genai"
    return "onnxruntime"


class GgufChat:
    """A GGUF file through transformers' GGUF loader (dequantized to fp32) and ``rollout.sample``."""

    def __init__(self, path: Path):
        from iqstar_lite.gguf_export import load_back

        path = Path(path)
        self.tokenizer, self.model = load_back(path)
        # transformers 4.57's GGUF tokenizer reports the BOS as EOS and no pad; the file's own ids are the truth.
        import gguf

        fields = gguf.GGUFReader(str(path)).fields
        eos = (int(fields["tokenizer.ggml.eos_token_id"].contents()) if "tokenizer.ggml.eos_token_id" in fields
               else self.tokenizer.eos_token_id)  # a GGUF written elsewhere may not name one
        pad = int(fields["tokenizer.ggml.padding_token_id"].contents()) if "tokenizer.ggml.padding_token_id" in fields else eos
        self.tokenizer.eos_token, self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens([eos, pad])
        self.model.generation_config.eos_token_id, self.model.generation_config.pad_token_id = eos, pad

    def chat_batch(self, prompts: list[str], max_new_tokens: int, system: str | None = None, sample: bool = False,
                   temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> list[str]:
        import torch

        from iqstar_lite.ort_generate import render_chat
        from iqstar_lite.rollout import sample as decode

        if seed is not None:
            torch.manual_seed(seed)
        ids = [render_chat(self.tokenizer, p, system) for p in prompts]
        with torch.no_grad():
            out = decode(self.model, self.tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=not sample)
        return [self.tokenizer.decode(row[mask.bool()], skip_special_tokens=True).strip() for row, mask in zip(out.response_ids, out.response_mask)]


def answers(path: Path, prompts: list[str], runtime: str, max_new_tokens: int, **kw) -> list[str]:
    """One answer per prompt from the client ``runtime`` (see ``pick_runtime``)."""
    if runtime == "transformers":
        return GgufChat(path).chat_batch(prompts, max_new_tokens, **kw)
    if runtime == "llama.cpp":
        from iqstar_lite.llamacpp_generate import LlamaCppGenerator

        # room for the longest prompt (a byte-level BPE token is at least one byte), the chat template and the answer
        gen = LlamaCppGenerator(path, n_ctx=max(1024, max(len(p.encode()) for p in prompts) + len((kw.get("system") or "").encode()) + max_new_tokens + 256))
        try:
            return [gen.chat(p, max_new_tokens, **kw) for p in prompts]
        finally:
            gen.close()
    if runtime == "genai":
        from iqstar_lite.genai_generate import GenaiGenerator

        gen = GenaiGenerator(path)
        return [gen.chat(p, max_new_tokens, **kw) for p in prompts]
    from iqstar_lite.ort_generate import OrtGenerator

    gen = OrtGenerator(path)
    return [gen.chat(prompts[0], max_new_tokens, **kw)] if len(prompts) == 1 else gen.chat_batch(prompts, max_new_tokens, **kw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m iqstar_lite.chat", description="Answer prompts with an exported model (greedy by default).")
    ap.add_argument("model", type=Path, help="RUN_DIR/onnx, RUN_DIR/onnx-int8 or RUN_DIR/gguf/model-q8_0.gguf")
    ap.add_argument("prompts", nargs="+", metavar="prompt", help="one prompt, or several (answered in order)")
    ap.add_argument("--runtime", choices=RUNTIMES, default="auto", help="client (auto: from the format, see the module doc)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--system", default=None, help="optional system message")
    args = ap.parse_args(argv)
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise UserError(f"need --temperature > 0 and 0 < --top-p <= 1, got {args.temperature} and {args.top_p}")
    runtime = pick_runtime(args.model, args.runtime)
    kw = {"system": args.system, "sample": args.sample, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    out = answers(args.model, args.prompts, runtime, args.max_new_tokens, **kw)
    if len(out) == 1:
        print(out[0])
        return 0
    for i, answer in enumerate(out):
        print(f"[{i + 1}] {answer}")
    return 0


if __name__ == "__main__":
    run_cli(main)

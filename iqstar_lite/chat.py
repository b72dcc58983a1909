"""Chat with an exported model, no torch needed: onnxruntime + numpy + a tokenizer.

    python -m iqstar_lite.chat RUN_DIR/onnx "Name three colours." [--max-new-tokens 128] [--sample]
    python -m iqstar_lite.chat RUN_DIR/onnx "First question?" "Second question?"    # one batch, answers in order
"""

from __future__ import annotations

import argparse
from pathlib import Path

from iqstar_lite.errors import UserError, run_cli
from iqstar_lite.ort_generate import OrtGenerator


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m iqstar_lite.chat", description="Answer prompts with an ONNX export (greedy by default).")
    ap.add_argument("onnx_dir", type=Path, help="RUN_DIR/onnx or RUN_DIR/onnx-int8")
    ap.add_argument("prompts", nargs="+", metavar="prompt", help="one prompt, or several (decoded as one batch)")
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
    gen = OrtGenerator(args.onnx_dir)
    kw = {"system": args.system, "sample": args.sample, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    if len(args.prompts) == 1:
        print(gen.chat(args.prompts[0], args.max_new_tokens, **kw))
        return 0
    for i, answer in enumerate(gen.chat_batch(args.prompts, args.max_new_tokens, **kw)):
        print(f"[{i + 1}] {answer}")
    return 0


if __name__ == "__main__":
    run_cli(main)

"""Chat with a run, its exports or an untrained base: a streaming REPL (stdin), or answers to prompts given.

    iqstar-lite chat RUN_DIR                                # REPL on the trained policy (PyTorch); one line = one prompt
    iqstar-lite chat RUN_DIR --compare                      # each answer three ways: base / contrastive / trained
    iqstar-lite chat smollm2_cpu --principle "Always answer in French."   # decode-time alignment, no training
    iqstar-lite chat RUN_DIR/onnx "Name three colours." [--max-new-tokens 128] [--sample]
    iqstar-lite chat RUN_DIR/gguf/model-q8_0.gguf "First question?" "Second question?"    # answers in order

What serves what (``--runtime auto``, the default):

* a run directory, an adapter folder, a recipe name or a model (``targets.py``): PyTorch, the package's decoding loop
  (``rollout.sample``), the model loaded as training ran it. Modes: ``trained`` (the adapter), ``base`` (adapters off:
  the untrained model), ``contrastive`` (principle-contrastive decoding of the base, pi-hat*: z* = (1+alpha) z+ -
  alpha z0, the principle in z+'s context only - a preview of what training reaches); ``--principle`` picks it,
  ``--compare`` prints all three;
* an exported ONNX folder (``genai_config.json``): onnxruntime-genai's own runtime (its tokenizer,
  chat template and generator; ``runtimes/genai.py``); ``--runtime onnxruntime`` runs the same graph with
  ``OrtGenerator`` instead (batches in one call);
* another ONNX decoder folder with a KV cache (e.g. one from optimum-onnx): onnxruntime + numpy + a tokenizer
  (``runtimes/ort.py``);
* a ``.gguf`` file: llama.cpp where llama-cpp-python is installed (``runtimes/llamacpp.py``), else transformers' GGUF
  loader and the package's PyTorch decoding loop (``rollout.sample``; needs torch); ``--runtime`` picks either.

The ONNX paths never import torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from iqstar_lite.errors import UserError, run_cli
from iqstar_lite.runtimes.base import Runtime

RUNTIMES = ("auto", "torch", "onnxruntime", "genai", "llama.cpp", "transformers")
MODES = ("base", "contrastive", "trained")


def is_export(path: Path) -> bool:
    """An exported model (ONNX file or folder, genai folder, GGUF file or folder) rather than a run, recipe or model."""
    path = Path(path)
    if path.suffix in (".gguf", ".onnx"):
        return True
    return path.is_dir() and (
        any(path.glob("*.onnx")) or (path / "genai_config.json").is_file() or any(path.glob("model-*.gguf"))
    )


def pick_runtime(path: Path, runtime: str = "auto") -> str:
    """Which client serves ``path`` (a ``UserError`` when it cannot be served)."""
    path = Path(path)
    if runtime == "torch" or (runtime == "auto" and not is_export(path)):
        if is_export(path):
            raise UserError(
                f"{str(path)!r} is an exported model; --runtime torch serves a run, an adapter, a recipe or a model "
                "(pass RUN_DIR), or drop --runtime"
            )
        return "torch"
    from iqstar_lite.runtimes.genai import is_genai_folder

    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(
                f"{str(path)!r} does not exist; pass RUN_DIR/gguf/model-q8_0.gguf (or -f16) written by 'iqstar-lite export RUN_DIR'"
            )
        if runtime not in ("auto", "transformers", "llama.cpp"):
            raise UserError(f"a GGUF file runs with --runtime llama.cpp or transformers (or auto), not {runtime}")
        from iqstar_lite.runtimes.llamacpp import available

        return ("llama.cpp" if available() else "transformers") if runtime == "auto" else runtime
    if path.is_dir() and sorted(path.glob("model-*.gguf")) and not (path / "model.onnx").exists():
        raise UserError(
            f"{str(path)!r} holds GGUF files; pass one of them, e.g. {sorted(path.glob('model-*.gguf'))[-1]}"
        )
    if runtime in ("transformers", "llama.cpp"):
        raise UserError(f"--runtime {runtime} serves .gguf files; {str(path)!r} is not one")
    if runtime == "genai" or (runtime == "auto" and is_genai_folder(path)):
        if not is_genai_folder(path):
            raise UserError(
                f"{str(path)!r} is not an onnxruntime-genai folder (no genai_config.json); run it with --runtime "
                "onnxruntime, or pass a folder written by 'iqstar-lite export RUN_DIR'"
            )
        return "genai"
    return "onnxruntime"


class TextStream:
    """Writes a reply as its tokens arrive: the new part of the decoded text, an incomplete UTF-8 character (a trailing
    U+FFFD) held back until its last byte comes; ``finish`` writes what is left and returns the whole reply."""

    def __init__(self, decode: Callable[[list[int]], str], out=None):
        self.decode, self.out, self.ids, self.shown = decode, out or sys.stdout, [], ""

    def __call__(self, token: int) -> None:
        self.ids.append(int(token))
        text = self.decode(self.ids).lstrip()
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return
        self.out.write(text[len(self.shown) :])
        self.out.flush()
        self.shown = text

    def finish(self) -> str:
        text = self.decode(self.ids).strip()
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown) :])
        self.out.write("\n")
        self.out.flush()
        return text


class TorchChat:
    """A run, adapter, recipe or model (``targets.resolve_target``) in PyTorch through ``rollout.sample``, loaded as training
    ran it: ``trained`` (the adapter's weights), ``base`` (adapters off: pi_ref), ``contrastive`` (pi-hat* of the base with
    ``principle`` in z+'s context: the same rule as the evaluation's contrastive row and the estimator's target)."""

    def __init__(self, target, principle: str | None = None):
        import torch

        from iqstar_lite.algorithm.rollout import model_eos_ids
        from iqstar_lite.data.formatting import Formatter
        from iqstar_lite.models.targets import load_adapter_weights, load_target

        self.target, self.cfg = target, target.cfg
        if principle:
            self.cfg.data.principle = principle
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        self.model, self.tokenizer = load_target(target)
        if target.adapter is not None:
            load_adapter_weights(self.model, target.adapter)
        self.fmt = Formatter(self.tokenizer, self.cfg.data)
        self.eos = model_eos_ids(self.model, self.tokenizer)

    def modes(self) -> tuple[str, ...]:
        """What this client can answer with, in --compare's order."""
        return MODES if self.target.adapter is not None else ("base", "contrastive")

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def reply(
        self,
        prompt: str,
        max_new_tokens: int,
        mode: str = "trained",
        system: str | None = None,
        sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> str:
        import torch

        from iqstar_lite.algorithm.reference import reference_mode
        from iqstar_lite.algorithm.rollout import sample as decode
        from iqstar_lite.data.formatting import messages_for
        from iqstar_lite.data.sources import Example

        if mode not in self.modes():
            raise UserError(
                f"mode {mode!r} needs a trained adapter; {self.target.label} has none (modes: {', '.join(self.modes())})"
            )
        if seed is not None:
            torch.manual_seed(seed)
        ex = Example(messages_for(prompt, system))
        kw = {
            "max_new_tokens": max_new_tokens,
            "greedy": not sample,
            "temperature": temperature,
            "top_p": top_p,
            "on_token": None if on_token is None else (lambda tokens: on_token(int(tokens[0]))),
        }
        plain = [self.fmt.plain(ex)]
        if (
            mode == "contrastive"
        ):  # the reference's pi-hat* (adapters off for the guided rows), whatever adapter is loaded
            roll = decode(
                self.model,
                self.tokenizer,
                plain,
                contrast=[self.fmt.conditioned(ex)],
                alpha=self.cfg.estimator.alpha,
                guided_reference=True,
                **kw,
            )
        elif mode == "base":
            with reference_mode(self.model):
                roll = decode(self.model, self.tokenizer, plain, **kw)
        else:
            roll = decode(self.model, self.tokenizer, plain, **kw)
        return self.decode(roll.response_ids[0][roll.response_mask[0].bool()].tolist()).strip()


def open_runtime(path: Path, runtime: str, n_ctx: int = 4096) -> Runtime:
    """The client ``runtime`` (``pick_runtime``) on an exported model."""
    if runtime == "transformers":
        from iqstar_lite.runtimes.gguf_transformers import GgufTransformers

        return GgufTransformers(path)
    if runtime == "llama.cpp":
        from iqstar_lite.runtimes.llamacpp import LlamaCppGenerator

        return LlamaCppGenerator(path, n_ctx=n_ctx)
    if runtime == "genai":
        from iqstar_lite.runtimes.genai import GenaiGenerator

        return GenaiGenerator(path)
    from iqstar_lite.runtimes.ort import OrtGenerator

    return OrtGenerator(path)


class ExportChat:
    """An exported model in the client ``runtime`` (``pick_runtime``): one mode, the model as exported."""

    def __init__(self, path: Path, runtime: str, n_ctx: int = 4096):
        self.runtime = runtime
        self.gen = open_runtime(path, runtime, n_ctx)

    def decode(self, ids: list[int]) -> str:
        return self.gen.decode([t for t in ids if t not in self.gen.eos_ids])

    def modes(self) -> tuple[str, ...]:
        return ("trained",)

    def reply(
        self, prompt: str, max_new_tokens: int, mode: str = "trained", system: str | None = None, **decoding
    ) -> str:
        """``decoding``: ``Runtime.generate``'s sample / temperature / top_p / seed / on_token."""
        if self.runtime == "llama.cpp":
            ids = self.gen.chat_ids(prompt, system)
            if len(ids) + max_new_tokens > self.gen.llm.n_ctx():
                raise UserError(
                    f"prompt of {len(ids)} tokens + {max_new_tokens} new ones exceed llama.cpp's context ({self.gen.llm.n_ctx()}); "
                    "shorten it or lower --max-new-tokens"
                )
        return self.gen.chat(prompt, max_new_tokens, system, **decoding)

    def close(self) -> None:
        if self.runtime == "llama.cpp":
            self.gen.close()


def open_client(model: str, runtime: str = "auto", overrides: list[str] | None = None, principle: str | None = None):
    """The client for ``model`` (an export, or a run / adapter / recipe / model for PyTorch)."""
    runtime = pick_runtime(Path(model), runtime)
    if runtime != "torch":
        if principle is not None or overrides:
            raise UserError(
                f"--principle, --compare and --set need the PyTorch client (pass RUN_DIR, a recipe or a model), not an export ({model})"
            )
        return ExportChat(Path(model), runtime)
    from iqstar_lite.models.targets import resolve_target

    return TorchChat(resolve_target(model, overrides), principle.strip() if principle else None)


def answers(path: Path, prompts: list[str], runtime: str, max_new_tokens: int, **kw) -> list[str]:
    """One answer per prompt from the client ``runtime`` (see ``pick_runtime``), without streaming."""
    if runtime == "onnxruntime" and len(prompts) > 1:
        from iqstar_lite.runtimes.ort import OrtGenerator

        return OrtGenerator(path).chat_batch(prompts, max_new_tokens, **kw)  # one batch
    client = open_client(str(path), runtime)
    try:
        return [client.reply(p, max_new_tokens, **kw) for p in prompts]
    finally:
        getattr(client, "close", lambda: None)()


def read_prompts(stdin, stderr) -> Iterable[str]:
    """The REPL's input: one prompt per line (no history: each line is answered on its own, as training saw prompts);
    ``/quit`` or end of input stops. A terminal gets a '> ' prompt on stderr."""
    tty = stdin.isatty()
    if tty:
        stderr.write("one prompt per line; /quit or Ctrl-D to stop\n")
    while True:
        if tty:
            stderr.write("> ")
            stderr.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return
        if line.strip():
            yield line.strip()


def converse(
    client, prompts: Iterable[str], modes: list[str], max_new_tokens: int, numbered: bool = False, out=None, **kw
) -> list[dict]:
    """Answer each prompt in each mode, streamed to ``out``: one mode alone -> the answer (``[i] `` before it when
    ``numbered``); several -> one ``mode: answer`` line each (side by side, base / contrastive / trained)."""
    out = out or sys.stdout
    done = []
    for i, prompt in enumerate(prompts, 1):
        row = {"prompt": prompt}
        for mode in modes:
            if len(modes) > 1:
                out.write(f"{mode:>11}: ")
            elif numbered:
                out.write(f"[{i}] ")
            stream = TextStream(client.decode, out)
            client.reply(prompt, max_new_tokens, mode=mode, on_token=stream, **kw)
            row[mode] = stream.finish()
        if len(modes) > 1:
            out.write("\n")
        done.append(row)
    return done


def main(argv: list[str] | None = None, prog: str = "python -m iqstar_lite.chat") -> int:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Chat with a run (PyTorch), its exports (ONNX, genai, GGUF) or an untrained base: "
        "answers stream as they are decoded (greedy by default). Without prompts: a REPL reading stdin.",
    )
    ap.add_argument(
        "model",
        help="RUN_DIR, RUN_DIR/adapter, a recipe or model (PyTorch); RUN_DIR/onnx, RUN_DIR/onnx-int8 or RUN_DIR/gguf/model-q8_0.gguf",
    )
    ap.add_argument(
        "prompts",
        nargs="*",
        metavar="prompt",
        help="one prompt, or several (answered in order); none: read stdin, one per line",
    )
    ap.add_argument(
        "--runtime", choices=RUNTIMES, default="auto", help="client (auto: from the format, see the module doc)"
    )
    ap.add_argument(
        "--principle",
        nargs="?",
        const="",
        default=None,
        metavar="TEXT",
        help="principle-contrastive decoding of the untrained base with TEXT (alone: the run's principle); PyTorch only",
    )
    ap.add_argument(
        "--compare",
        action="store_true",
        help="each answer from the base, contrastive decoding (the run's principle, "
        "or --principle TEXT) and the trained model, one after the other; PyTorch only",
    )
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--system", default=None, help="optional system message")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for the PyTorch client, e.g. --set estimator.alpha=2 (repeatable)",
    )
    args = ap.parse_intermixed_args(argv)
    from iqstar_lite.console import setup_logging

    setup_logging()
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise UserError(f"need --temperature > 0 and 0 < --top-p <= 1, got {args.temperature} and {args.top_p}")
    if args.principle is not None and not args.principle.strip() and args.principle != "":
        raise UserError(
            "--principle is blank; state the preference as one sentence, or give --principle alone for the run's"
        )
    prompts = args.prompts
    if args.compare and is_export(Path(args.model)):
        raise UserError(
            f"--compare needs the PyTorch client (pass RUN_DIR, a recipe or a model), not an export ({args.model})"
        )
    client = open_client(args.model, args.runtime, args.overrides, args.principle)
    if args.compare:
        modes = list(client.modes())
    elif args.principle is not None:
        modes = ["contrastive"]
    else:
        modes = ["trained" if "trained" in client.modes() else "base"]
    kw = {
        "system": args.system,
        "sample": args.sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    try:
        source = prompts or read_prompts(sys.stdin, sys.stderr)
        converse(client, source, modes, args.max_new_tokens, numbered=len(prompts) > 1, **kw)
    finally:
        getattr(client, "close", lambda: None)()
    return 0


if __name__ == "__main__":
    run_cli(main)

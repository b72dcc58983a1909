"""llama.cpp itself on a GGUF export, through llama-cpp-python (optional: ``pip install 'iqstar_lite[llamacpp]'``, which
builds the llama.cpp it vendors; the ``llamacpp`` extra).

    gen = LlamaCppGenerator("runs/x/gguf/model-q8_0.gguf")
    print(gen.chat("Name three colours."))

The chat template is the one in the GGUF metadata (``tokenizer.chat_template``), rendered with jinja2 as transformers
renders it; the prompt is tokenized by llama.cpp's own tokenizer (``special=True``: ``<|im_start|>`` is one token).
Decoding reads llama.cpp's logits after each ``eval`` (KV cache in llama.cpp): greedy = argmax, sampling = the package's
nucleus rule (``runtimes.ort.sample_token``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from iqstar_lite.data.formatting import messages_for
from iqstar_lite.errors import UserError
from iqstar_lite.extras import install_hint
from iqstar_lite.runtimes.base import Runtime


@functools.cache
def available() -> bool:
    """llama-cpp-python importable (installed with its dependencies, its llama.cpp library loads)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or OSError from the shared library
        return False
    return True


class LlamaCppGenerator(Runtime):
    """One prompt at a time in llama.cpp (``n_ctx`` tokens of context; logits of every evaluated position kept)."""

    label = "llama.cpp"

    def __init__(self, path: str | Path, n_ctx: int = 1024, threads: int = 0):
        if not available():
            raise UserError(
                f"llama.cpp is not installed; {install_hint('llama_cpp')} (builds llama.cpp; needs cmake and a C++ compiler)"
            )
        from llama_cpp import Llama

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(
                f"{str(self.path)!r} does not exist; pass RUN_DIR/gguf/model-q8_0.gguf written by 'python -m iqstar_lite export RUN_DIR'"
            )
        try:
            self.llm = Llama(
                model_path=str(self.path),
                n_ctx=n_ctx,
                logits_all=True,
                verbose=False,
                **({"n_threads": threads} if threads else {}),
            )
        except Exception as e:  # noqa: BLE001 - llama-cpp-python raises ValueError("Failed to load model from file") and others
            raise UserError(
                f"{str(self.path)!r} cannot be loaded by llama.cpp ({str(e).strip()[:160] or type(e).__name__}); "
                "re-export it with 'python -m iqstar_lite export RUN_DIR'"
            ) from None
        meta = self.llm.metadata
        self.eos_ids = [int(self.llm.token_eos())]
        self.template = meta.get("tokenizer.chat_template")
        self.bos_token = (
            self._piece(int(meta["tokenizer.ggml.bos_token_id"])) if "tokenizer.ggml.bos_token_id" in meta else ""
        )
        self.eos_token = self._piece(self.eos_ids[0])

    def _piece(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def chat_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """One user turn (after an optional system turn) + the assistant header: the GGUF's template, llama.cpp's tokenizer."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        messages = messages_for(prompt, system)
        if self.template:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )  # as transformers
            text = env.from_string(self.template).render(
                messages=messages, add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token
            )
        else:
            text = prompt
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize([t for t in ids if t not in self.eos_ids]).decode("utf-8", errors="replace")

    def _last_logits(self) -> np.ndarray:
        return np.array(
            self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32
        )  # a copy: llama-cpp-python reuses the buffer

    def _prefill(self, prompt_ids: list[int], max_new_tokens: int) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(prompt_ids)
        return self._last_logits()

    def _step(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self._last_logits()

    def teacher_forced_top1(self, prompt_ids: list[int], continuation: list[int]) -> list[int]:
        """llama.cpp's argmax at the end of the prompt and after each token of ``continuation`` (one eval)."""
        self.llm.reset()
        self.llm.eval(prompt_ids + continuation)
        n = len(prompt_ids)
        return [int(t) for t in np.asarray(self.llm.scores[n - 1 : n - 1 + len(continuation)]).argmax(-1)]

    def close(self) -> None:
        """Free llama.cpp's model and context now (llama-cpp-python's own finalizer fails at interpreter exit)."""
        self.llm.close()

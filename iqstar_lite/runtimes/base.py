"""The one interface every client of an exported model implements (onnxruntime, onnxruntime-genai, llama.cpp), the
``Generation`` it returns and the one nucleus rule they sample with. numpy only: no torch, no transformers.

A client renders a chat with its own template and tokenizer (``chat_ids``), feeds tokens through its own KV cache
(``_prefill`` / ``_step``, which the one decoding loop ``generate`` drives: greedy or sampled), scores a given
continuation (``teacher_forced_top1``) and turns ids back into text (``decode``). The parity gate
(``export/check.py``) runs every client through these five calls, and ``iqstar-lite chat`` talks to any of them.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Generation:
    tokens: list[int]
    """New token ids (the eos that stopped generation included)."""
    seconds: float
    step_logits: list[np.ndarray] = field(default_factory=list)
    """Per new token, the [V] logits it was chosen from (only with ``keep_logits=True``, where a client offers it)."""


def sample_token(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_p: float = 1.0) -> int:
    """Draw one id from softmax(logits / temperature), restricted to the top-p nucleus."""
    z = logits.astype(np.float64) / max(temperature, 1e-6)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]  # smallest set with mass >= top_p
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(p.size, p=p))


def token_picker(sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None):
    """The next-token rule of every runtime: argmax of the logits, or (``sample``) a seeded draw by ``sample_token``."""
    if not sample:
        return lambda logits: int(np.argmax(logits))
    rng = np.random.default_rng(seed)
    return lambda logits: sample_token(logits, rng, temperature, top_p)


class Runtime(ABC):
    """A client of an exported model. ``label`` names its runtime in reports; ``eos_ids`` end a turn."""

    label: str = "runtime"
    eos_ids: list[int]

    @abstractmethod
    def chat_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """One user turn (after an optional system turn) + the assistant header, with the client's template and tokenizer."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens left out)."""

    @abstractmethod
    def _prefill(self, prompt_ids: list[int], max_new_tokens: int) -> np.ndarray:
        """Feed the prompt through the client's own KV cache; the [V] logits after its last token."""

    @abstractmethod
    def _step(self, token: int) -> np.ndarray:
        """Feed one token; the [V] logits after it."""

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int = 64,
        *,
        sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_at_eos: bool = True,
        keep_logits: bool = False,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """The runtimes' one decoding loop: greedy (default) or sampled (``sample_token``, the one nucleus rule)
        continuation of ``prompt_ids`` through the client's KV cache. ``on_token(id)`` streams each token;
        ``stop_at_eos=False`` suppresses EOS and decodes exactly ``max_new_tokens`` (fixed work, for timings);
        ``keep_logits`` keeps the [V] logits each token was picked from."""
        pick = token_picker(sample, temperature, top_p, seed)
        start = time.perf_counter()
        tokens: list[int] = []
        kept: list[np.ndarray] = []
        last = self._prefill(list(prompt_ids), max_new_tokens) if max_new_tokens > 0 else None
        while last is not None:
            if keep_logits:
                kept.append(last)
            if not stop_at_eos:
                last = last.copy()
                last[self.eos_ids] = -np.inf
            token = pick(last)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if (stop_at_eos and token in self.eos_ids) or len(tokens) >= max_new_tokens:
                break
            last = self._step(token)
        return Generation(tokens, time.perf_counter() - start, kept)

    @abstractmethod
    def teacher_forced_top1(self, prompt_ids: list[int], continuation: list[int]) -> list[int]:
        """The client's argmax after the prompt and after each token of ``continuation`` fed in turn."""

    def chat(self, prompt: str, max_new_tokens: int = 128, system: str | None = None, **kwargs) -> str:
        """Answer one user message; ``kwargs`` go to ``generate``."""
        out = self.generate(self.chat_ids(prompt, system), max_new_tokens, **kwargs)
        return self.decode([t for t in out.tokens if t not in self.eos_ids]).strip()

    def close(self) -> None:
        """Free what the client holds outside Python's memory (nothing by default)."""

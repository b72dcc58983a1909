"""A GGUF file through transformers' GGUF reader (dequantized to fp32) and the package's decoding loop
(``algorithm.rollout.sample``): a check of the file where llama.cpp is not installed, and ``chat --runtime transformers``.
Unlike the other runtimes it needs torch and transformers.

transformers 4.57's GGUF tokenizer reports the BOS as EOS and no pad; the file's own ids are taken instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from iqstar_lite.data.formatting import render_chat
from iqstar_lite.errors import UserError
from iqstar_lite.runtimes.base import Generation, Runtime


def load_back(path: Path, model: bool = True):
    """(tokenizer, fp32 model or None) of a GGUF file through transformers' GGUF reader; one line when it cannot read it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        net = (
            AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
            if model
            else None
        )
    except Exception as e:  # noqa: BLE001 - the gguf reader raises ValueError / KeyError / struct errors on a damaged file
        raise UserError(
            f"{str(path)!r} cannot be loaded by transformers' GGUF reader ({str(e).strip()[:160] or type(e).__name__}); "
            "re-export it with 'iqstar-lite export RUN_DIR'"
        ) from None
    return tok, net


class GgufTransformers(Runtime):
    """One GGUF file, loaded back by transformers; greedy or sampled decoding through the package's one loop."""

    label = "transformers (GGUF loader)"

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(
                f"{str(self.path)!r} does not exist; pass RUN_DIR/gguf/model-f16.gguf written by 'iqstar-lite export RUN_DIR'"
            )
        self.tokenizer, self.model = load_back(self.path)
        fields = gguf.GGUFReader(str(self.path)).fields
        eos = (
            int(fields["tokenizer.ggml.eos_token_id"].contents())
            if "tokenizer.ggml.eos_token_id" in fields
            else self.tokenizer.eos_token_id
        )  # a GGUF written elsewhere may not name one
        pad = (
            int(fields["tokenizer.ggml.padding_token_id"].contents())
            if "tokenizer.ggml.padding_token_id" in fields
            else eos
        )
        self.tokenizer.eos_token, self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens([eos, pad])
        self.model.generation_config.eos_token_id, self.model.generation_config.pad_token_id = eos, pad
        self.eos_ids = [eos]

    def chat_ids(self, prompt: str, system: str | None = None) -> list[int]:
        return render_chat(self.tokenizer, prompt, system)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        """[T, V] fp32 logits of one pass over ``ids``."""
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.tensor([list(ids)]), use_cache=False).logits[0].float().numpy()

    def teacher_forced_top1(self, prompt_ids: list[int], continuation: list[int]) -> list[int]:
        n = len(prompt_ids)
        return self.logits(list(prompt_ids) + list(continuation))[n - 1 : n - 1 + len(continuation)].argmax(-1).tolist()

    def _decode_rows(
        self,
        prompts_ids: list[list[int]],
        max_new_tokens: int,
        sample: bool,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop_at_eos: bool,
        on_token: Callable[[int], None] | None,
    ) -> list[list[int]]:
        import torch

        from iqstar_lite.algorithm.rollout import sample as decode_loop

        if seed is not None:
            torch.manual_seed(seed)
        stream = None if on_token is None else (lambda tokens: on_token(int(tokens[0])))
        with torch.no_grad():
            out = decode_loop(
                self.model,
                self.tokenizer,
                prompts_ids,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                greedy=not sample,
                min_new_tokens=0 if stop_at_eos else max_new_tokens,
                on_token=stream,
            )
        return [row[mask.bool()].tolist() for row, mask in zip(out.response_ids, out.response_mask)]

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
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        start = time.perf_counter()
        tokens = self._decode_rows(
            [list(prompt_ids)], max_new_tokens, sample, temperature, top_p, seed, stop_at_eos, on_token
        )[0]
        return Generation(tokens, time.perf_counter() - start)

    def chat_batch(
        self,
        prompts: list[str],
        max_new_tokens: int,
        system: str | None = None,
        sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> list[str]:
        """Answers in one batch; ``on_token(id)`` streams the first row's tokens."""
        rows = self._decode_rows(
            [self.chat_ids(p, system) for p in prompts],
            max_new_tokens,
            sample,
            temperature,
            top_p,
            seed,
            True,
            on_token,
        )
        return [self.decode([t for t in row if t not in self.eos_ids]).strip() for row in rows]

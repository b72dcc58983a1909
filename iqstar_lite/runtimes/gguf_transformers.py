"""A GGUF file through transformers' GGUF reader (dequantized to fp32), decoded by the runtimes' one loop with
transformers' KV cache: a check of the file where llama.cpp is not installed, and ``chat --runtime transformers``.
Unlike the other runtimes it needs torch and transformers.

transformers 4.57's GGUF tokenizer reports the BOS as EOS and no pad; the file's own ids are taken instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iqstar_lite.data.formatting import render_chat
from iqstar_lite.errors import UserError
from iqstar_lite.models.cache import cache_kwargs, output_cache
from iqstar_lite.runtimes.base import Runtime


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
    """One GGUF file, loaded back by transformers."""

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

    def _forward(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True, **cache_kwargs(self.model, self._past))
        self._past = output_cache(out)
        return out.logits[0, -1].float().numpy()

    def _prefill(self, prompt_ids: list[int], max_new_tokens: int) -> np.ndarray:
        self._past = None
        return self._forward(prompt_ids)

    def _step(self, token: int) -> np.ndarray:
        return self._forward([token])

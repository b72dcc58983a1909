"""onnxruntime-genai's own runtime on an ``export.onnx_graph=genai`` folder: its tokenizer, chat template and generator.

This is the client a deployment without Python ML libraries uses (onnxruntime-genai has C, C#, Java and Objective-C
APIs over the same folder); no torch, no transformers::

    gen = GenaiGenerator("runs/x/onnx")
    print(gen.chat("Name three colours."))                           # greedy: genai's Generator
    print(gen.chat("Name three colours.", sample=True, top_p=0.9))  # the package's nucleus rule on genai's logits

Greedy decoding is onnxruntime-genai's ``Generator.generate_next_token`` (``do_sample=False``), which the parity gate
compares with the merged model. Sampling reads genai's logits and draws with ``runtimes.ort.sample_token`` (the one
nucleus rule of this package), then appends the token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from iqstar_lite.errors import UserError
from iqstar_lite.runtimes.base import Generation, Runtime, sample_token


def is_genai_folder(path: Path) -> bool:
    return (Path(path) / "genai_config.json").is_file()


class GenaiGenerator(Runtime):
    """One prompt at a time with onnxruntime-genai's ``Model``, ``Tokenizer`` and ``Generator``."""

    label = "onnxruntime-genai"

    def __init__(self, folder: str | Path):
        import onnxruntime_genai as og

        self.dir = Path(folder)
        if not is_genai_folder(self.dir):
            raise UserError(
                f"{str(self.dir)!r} has no genai_config.json; export with 'iqstar-lite export RUN_DIR export.onnx_graph=genai'"
            )
        self._og = og
        try:
            self.model = og.Model(str(self.dir))
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as e:  # noqa: BLE001 - onnxruntime-genai raises RuntimeError / OrtException with its own text
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(
                f"{str(self.dir)!r} cannot be loaded by onnxruntime-genai ({first}); re-export it with "
                "'iqstar-lite export RUN_DIR export.onnx_graph=genai'"
            ) from None
        self.eos_ids = [int(t) for t in self.tokenizer.eos_token_ids]
        self.context_length = int(
            json.loads((self.dir / "genai_config.json").read_text())["model"].get("context_length", 2048)
        )

    def chat_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """One user turn (after an optional system turn) + the assistant header, with genai's template and tokenizer."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(np.asarray(ids, dtype=np.int32))

    def _generator(self, prompt_ids: list[int], max_new_tokens: int, min_new_tokens: int = 0):
        params = self._og.GeneratorParams(self.model)
        length = min(len(prompt_ids) + max_new_tokens, self.context_length)
        params.set_search_options(do_sample=False, max_length=length, min_length=len(prompt_ids) + min_new_tokens)
        gen = self._og.Generator(self.model, params)
        gen.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
        return gen

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
        """Greedy (genai's generator) or sampled continuation of ``prompt_ids``; ``stop_at_eos=False`` decodes exactly
        ``max_new_tokens`` (EOS suppressed by genai's ``min_length``, so the work is fixed: for timings); ``on_token(id)``
        streams each token."""
        start = time.perf_counter()
        gen = self._generator(prompt_ids, max_new_tokens, 0 if stop_at_eos else max_new_tokens)
        rng = np.random.default_rng(seed)
        tokens: list[int] = []
        while len(tokens) < max_new_tokens and not gen.is_done():
            if sample:
                token = sample_token(
                    np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1), rng, temperature, top_p
                )
                gen.append_tokens(np.asarray([[token]], dtype=np.int32))
            else:
                gen.generate_next_token()
                token = int(gen.get_next_tokens()[0])
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if stop_at_eos and token in self.eos_ids:
                break
        return Generation(tokens, time.perf_counter() - start)

    def teacher_forced_top1(self, prompt_ids: list[int], continuation: list[int]) -> list[int]:
        """genai's argmax after the prompt and after each token of ``continuation`` fed in turn (KV cache on)."""
        gen = self._generator(prompt_ids, len(continuation) + 1)
        top1 = []
        for token in continuation:
            top1.append(int(np.asarray(gen.get_logits()).reshape(-1).argmax()))
            gen.append_tokens(np.asarray([[token]], dtype=np.int32))
        return top1

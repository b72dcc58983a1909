"""onnxruntime-genai's own runtime on an exported ONNX folder: its tokenizer, chat template and generator.

This is the client a deployment without Python ML libraries uses (onnxruntime-genai has C, C#, Java and Objective-C
APIs over the same folder); no torch, no transformers::

    gen = GenaiGenerator("runs/x/onnx")
    print(gen.chat("Name three colours."))                           # greedy
    print(gen.chat("Name three colours.", sample=True, top_p=0.9))  # the package's nucleus rule on genai's logits

Decoding runs genai's ``Generator`` (its model, KV cache and logits), fed one token at a time by the runtimes' one loop
(``runtimes.base.Runtime.generate``: argmax, or ``sample_token``). genai's own greedy search
(``Generator.generate_next_token``) picks the same tokens: ``tests/test_export.py`` checks it against the gate's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from iqstar_lite.data.formatting import messages_for
from iqstar_lite.errors import UserError
from iqstar_lite.extras import require
from iqstar_lite.runtimes.base import Runtime


def is_genai_folder(path: Path) -> bool:
    return (Path(path) / "genai_config.json").is_file()


class GenaiGenerator(Runtime):
    """One prompt at a time with onnxruntime-genai's ``Model``, ``Tokenizer`` and ``Generator``."""

    label = "onnxruntime-genai"

    def __init__(self, folder: str | Path):
        og = require("onnxruntime_genai")
        self.dir = Path(folder)
        if not is_genai_folder(self.dir):
            raise UserError(
                f"{str(self.dir)!r} has no genai_config.json; export the run with 'iqstar-lite export RUN_DIR'"
            )
        self._og = og
        try:
            self.model = og.Model(str(self.dir))
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as e:  # noqa: BLE001 - onnxruntime-genai raises RuntimeError / OrtException with its own text
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(
                f"{str(self.dir)!r} cannot be loaded by onnxruntime-genai ({first}); re-export it with "
                "'iqstar-lite export RUN_DIR'"
            ) from None
        self.eos_ids = [int(t) for t in self.tokenizer.eos_token_ids]
        self.context_length = int(
            json.loads((self.dir / "genai_config.json").read_text())["model"].get("context_length", 2048)
        )

    def chat_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """One user turn (after an optional system turn) + the assistant header, with genai's template and tokenizer."""
        messages = messages_for(prompt, system)
        text = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(np.asarray(ids, dtype=np.int32))

    def _generator(self, prompt_ids: list[int], max_new_tokens: int):
        params = self._og.GeneratorParams(self.model)
        length = min(len(prompt_ids) + max_new_tokens, self.context_length)
        params.set_search_options(do_sample=False, max_length=length, min_length=len(prompt_ids))
        gen = self._og.Generator(self.model, params)
        gen.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
        return gen

    def _prefill(self, prompt_ids: list[int], max_new_tokens: int) -> np.ndarray:
        self._gen = self._generator(prompt_ids, max_new_tokens)
        return self._logits()

    def _step(self, token: int) -> np.ndarray:
        self._gen.append_tokens(np.asarray([[token]], dtype=np.int32))
        return self._logits()

    def _logits(self) -> np.ndarray:
        return np.asarray(self._gen.get_logits(), dtype=np.float32).reshape(-1)

    def teacher_forced_top1(self, prompt_ids: list[int], continuation: list[int]) -> list[int]:
        """genai's argmax after the prompt and after each token of ``continuation`` fed in turn (KV cache on)."""
        gen = self._generator(prompt_ids, len(continuation) + 1)
        top1 = []
        for token in continuation:
            top1.append(int(np.asarray(gen.get_logits()).reshape(-1).argmax()))
            gen.append_tokens(np.asarray([[token]], dtype=np.int32))
        return top1

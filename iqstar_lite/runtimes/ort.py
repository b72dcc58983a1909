"""Torch-free text generation with an exported decoder: numpy + onnxruntime + a tokenizer.

This module never imports torch, so a deployment needs only ``onnxruntime``, ``numpy`` and
``transformers``/``tokenizers`` for the chat template. It drives a decoder with a KV cache, as ``export/to_onnx.py``
writes it (onnxruntime-genai's model builder) or in optimum's ``text-generation-with-past`` layout::

    inputs:  input_ids [B, T], attention_mask [B, P+T], (position_ids [B, T]: optimum's layout only),
             past_key_values.{i}.key / .value [B, kv_heads, P, head_dim]
    outputs: logits [B, T, V], present.{i}.key / .value [B, kv_heads, P+T, head_dim]

The first call feeds the prompt with an empty (P = 0) cache; every later call feeds one token
and the ``present.*`` tensors of the previous call as ``past_key_values.*``. Names, cache shapes
and dtypes are read from the session, not hard-coded. ``generate`` decodes one prompt,
``generate_batch`` several at once (right-padded; left-padded for a graph that takes ``position_ids``).

    gen = OrtGenerator("runs/x/onnx")
    print(gen.chat("Name three colours."))                           # greedy
    print(gen.chat("Name three colours.", sample=True, top_p=0.9))  # nucleus sampling

The parity check (``check.py``) uses this same loop for the ONNX side.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from iqstar_lite.data.formatting import eos_token_ids, render_chat
from iqstar_lite.errors import UserError
from iqstar_lite.extras import require
from iqstar_lite.runtimes.base import Generation, Runtime, token_picker

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


def find_onnx_file(onnx_dir: Path) -> Path:
    """``model.onnx`` in ``onnx_dir`` (or the only ``*.onnx`` file there)."""
    onnx_dir = Path(onnx_dir)
    if (onnx_dir / "model.onnx").is_file():
        return onnx_dir / "model.onnx"
    found = sorted(onnx_dir.glob("*.onnx")) if onnx_dir.is_dir() else []
    if len(found) != 1:
        raise UserError(
            f"{str(onnx_dir)!r} is not an ONNX export (no model.onnx); pass RUN_DIR/onnx as written by 'python -m iqstar_lite export RUN_DIR'"
        )
    return found[0]


def dir_eos_ids(model_dir: Path, tokenizer=None) -> list[int]:
    """An exported model's end-of-turn ids: generation_config.json, else config.json, else the tokenizer's eos
    (``formatting.eos_token_ids``, the rule training applies to the loaded model)."""
    declared = []
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        declared.append(json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None)
    return eos_token_ids(tokenizer, *declared)


def _config_head_dim(model_dir: Path) -> int | None:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    return cfg.get("head_dim") or (cfg["hidden_size"] // cfg["num_attention_heads"] if "hidden_size" in cfg else None)


def right_pad(batch_ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids [B, W] right-padded with ``pad_id`` and the attention mask [B, W] (1 on real tokens)."""
    ids, mask = left_pad([r[::-1] for r in batch_ids], pad_id)
    return ids[:, ::-1].copy(), mask[:, ::-1].copy()


def left_pad(batch_ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids [B, W] left-padded with ``pad_id`` and the attention mask [B, W] (1 on real tokens)."""
    width = max(len(r) for r in batch_ids)
    ids = np.full((len(batch_ids), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(batch_ids):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


class OrtGenerator(Runtime):
    """Greedy / sampled decoding with the KV cache of an exported decoder (one prompt, or a batch)."""

    label = "onnxruntime"

    def __init__(self, onnx_dir: str | Path, threads: int = 0, load_tokenizer: bool = True, spin: bool = True):
        """``threads``: intra-op threads (0 = onnxruntime's default); ``spin=False`` stops idle worker
        threads from busy-waiting (use it when torch shares the CPU, e.g. for fair timings)."""
        self.dir = Path(onnx_dir)
        ort = require("onnxruntime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = find_onnx_file(self.dir)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own (Fail, InvalidProtobuf, ...) on a damaged file
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(
                f"{str(path)!r} cannot be loaded by onnxruntime ({first}); re-export it with "
                f"'python -m iqstar_lite export RUN_DIR'"
            ) from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        if "input_ids" not in inputs:
            raise UserError(
                f"{str(self.dir)!r}: the ONNX model has no input_ids input; pass a folder written by 'iqstar-lite export RUN_DIR'"
            )
        past = sorted((int(m[1]), m[2] != "key", name) for name in inputs if (m := _PAST.match(name)))
        if not past:
            raise UserError(
                f"{str(self.dir)!r}: the ONNX model has no past_key_values inputs (a decoder without a KV cache); "
                "pass a folder written by 'iqstar-lite export RUN_DIR'"
            )
        self.past_names = [name for _, _, name in past]
        self.present_names = [name.replace("past_key_values.", "present.") for name in self.past_names]
        self.cache_shapes: dict[str, tuple[int, int]] = {}
        self.cache_dtype = np.float32
        for name in self.past_names:
            shape = list(inputs[name].shape)  # [batch, kv_heads, past_len, head_dim]
            if not isinstance(shape[3], int):  # a symbolic head_dim (onnxruntime-genai exports): from config.json
                shape[3] = _config_head_dim(self.dir)
            if not (isinstance(shape[1], int) and isinstance(shape[3], int)):
                raise UserError(f"{str(self.dir)!r}: cannot read the KV cache shape of {name} ({shape})")
            self.cache_shapes[name] = (shape[1], shape[3])
            self.cache_dtype = _NP_DTYPES.get(inputs[name].type, np.float32)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.tokenizer = None
        if load_tokenizer:
            from transformers import AutoTokenizer  # tokenizers + chat template; works without torch

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(self.dir)
            except (OSError, ValueError) as e:
                raise UserError(
                    f"{str(self.dir)!r} has no usable tokenizer ({str(e).splitlines()[0]}); "
                    "export with 'iqstar-lite export RUN_DIR' (it copies the tokenizer)"
                ) from None
        self.eos_ids = dir_eos_ids(self.dir, self.tokenizer)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0))

    # ------------------------------------------------------------------------- forward

    def empty_cache(self) -> dict[str, np.ndarray]:
        return {name: np.zeros((1, h, 0, d), dtype=self.cache_dtype) for name, (h, d) in self.cache_shapes.items()}

    def forward(
        self, ids: list[int] | np.ndarray, cache: dict[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Feed ``ids`` after ``cache`` (None = empty); return float32 logits [T, V] and the new cache."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        cache = cache if cache is not None else self.empty_cache()
        past_len = next(iter(cache.values())).shape[2] if cache else 0
        total = past_len + ids.shape[1]
        mask, pos = np.ones((1, total), dtype=np.int64), np.arange(past_len, total, dtype=np.int64).reshape(1, -1)
        logits, new_cache = self._run(ids, cache, mask, pos, past_len > 0)
        return logits[0].astype(np.float32), new_cache

    def _run(
        self, ids: np.ndarray, cache: dict, mask: np.ndarray, pos: np.ndarray, has_past: bool
    ) -> tuple[np.ndarray, dict]:
        """One session call with the inputs this graph takes; returns the logits and the ``present.*`` cache as ``past_key_values.*``."""
        feed = {"input_ids": ids, **cache}
        if "attention_mask" in self.input_names:
            feed["attention_mask"] = mask
        if "position_ids" in self.input_names:
            feed["position_ids"] = pos
        if "use_cache_branch" in self.input_names:  # older optimum "merged" decoders
            feed["use_cache_branch"] = np.array([has_past])
        outputs = dict(zip(self.output_names, self.session.run(None, feed)))
        return outputs["logits"], {past: outputs[present] for past, present in zip(self.past_names, self.present_names)}

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits [T, V] for a whole sequence (one forward, empty cache)."""
        return self.forward(ids)[0]

    # ------------------------------------------------------------------------- decoding

    def _prefill(self, prompt_ids: list[int], max_new_tokens: int) -> np.ndarray:
        logits, self._cache = self.forward(prompt_ids)
        return logits[-1]

    def _step(self, token: int) -> np.ndarray:
        logits, self._cache = self.forward([token], self._cache)
        return logits[-1]

    def generate_batch(
        self, prompts_ids: list[list[int]], max_new_tokens: int = 64, *, stop_at_eos: bool = True, **sampling
    ) -> list[Generation]:
        """``generate`` for several prompts in one batch: one session call per token for all rows; ``sampling``: the
        sample / temperature / top_p / seed of ``token_picker``.

        Prompts are left-padded; the attention mask hides the pads and positions count from each row's first
        real token, so a row decodes as it would alone (up to float rounding). A graph without a ``position_ids``
        input (the genai graph) gets right-padded rows instead (tested equal to one at a time).
        A row that emitted EOS is fed its pad id until every row has stopped (``stop_at_eos``; False: EOS suppressed); its ``tokens``
        end at its EOS. ``seconds`` is the whole batch's time, on every row.
        """
        pick = token_picker(**sampling)
        start = time.perf_counter()
        # A graph without position_ids takes positions from the attention mask (onnxruntime-genai's
        # GroupQueryAttention: each row's tokens from the start of its cache), so its rows are right-padded and the
        # first token is read at each row's last real position; with position_ids, rows are left-padded.
        right = "position_ids" not in self.input_names
        ids, mask = (right_pad if right else left_pad)(prompts_ids, self.pad_id)
        b = ids.shape[0]
        last_real = np.array([len(p) - 1 for p in prompts_ids]) if right else np.full(b, ids.shape[1] - 1)
        pos = np.clip(mask.cumsum(1) - 1, 0, None)
        cache = {name: np.zeros((b, h, 0, d), dtype=self.cache_dtype) for name, (h, d) in self.cache_shapes.items()}
        tokens: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros(b, dtype=bool)
        for step in range(max_new_tokens):
            logits, new_cache = self._run(ids, cache, mask, pos, step > 0)
            last = (logits[np.arange(b), last_real] if step == 0 else logits[:, -1]).astype(np.float32)
            if not stop_at_eos:  # fixed work, as generate: EOS suppressed
                last[:, self.eos_ids] = -np.inf
            nxt = np.array([pick(row) for row in last], dtype=np.int64)
            for i in np.flatnonzero(~done):
                tokens[i].append(int(nxt[i]))
            if stop_at_eos:
                done |= np.isin(nxt, self.eos_ids)
                if done.all():
                    break
            cache = new_cache
            ids, pos = np.where(done, self.pad_id, nxt)[:, None], pos[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
        seconds = time.perf_counter() - start
        return [Generation(row, seconds) for row in tokens]

    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("OrtGenerator was created with load_tokenizer=False")
        return self.tokenizer

    def chat_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """One user turn (after an optional system turn) + the assistant header: the training chat rendering
        (``formatting.render_chat``) with the export's tokenizer."""
        return render_chat(self._tok(), prompt, system)

    def decode(self, ids: list[int]) -> str:
        return self._tok().decode(ids, skip_special_tokens=True)

    def teacher_forced_top1(self, prompt_ids: list[int], continuation: list[int]) -> list[int]:
        """The argmax after the prompt and after each token of ``continuation``: one pass over both."""
        n = len(prompt_ids)
        return self.logits(list(prompt_ids) + list(continuation))[n - 1 : n - 1 + len(continuation)].argmax(-1).tolist()

    def chat_batch(
        self, prompts: list[str], max_new_tokens: int = 128, system: str | None = None, **kwargs
    ) -> list[str]:
        """Answer several user messages in one batch; ``kwargs`` go to ``generate_batch``."""
        outs = self.generate_batch([self.chat_ids(p, system) for p in prompts], max_new_tokens, **kwargs)
        return [self.decode(o.tokens).strip() for o in outs]

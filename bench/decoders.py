"""Batched greedy decoding shared by onnx_speed.py and decode_vs_trained.py: onnxruntime through the
package's ``OrtGenerator.generate_batch`` (left-padded), PyTorch through ``model.generate``."""

from __future__ import annotations

import numpy as np


def ort_generator(onnx_dir, threads: int = 0, spin: bool = False):
    """``OrtGenerator`` with idle-thread spinning off where the package supports it (torch shares the process)."""
    import inspect

    from iqstar_lite.ort_generate import OrtGenerator

    extra = {"spin": spin} if "spin" in inspect.signature(OrtGenerator).parameters else {}
    return OrtGenerator(onnx_dir, threads, **extra)


def ort_greedy(gen, batch_ids: list[list[int]], new_tokens: int, pad_id: int, stop_at_eos: bool = False) -> np.ndarray:
    """Greedy tokens [B, steps] from ``OrtGenerator.generate_batch`` (KV cache on, any batch size).

    ``stop_at_eos=False`` decodes exactly ``new_tokens`` steps (speed runs); True stops once every row has
    emitted an EOS, and rows that finished earlier are padded with ``pad_id``.
    """
    rows = [g.tokens for g in gen.generate_batch(batch_ids, new_tokens, stop_at_eos=stop_at_eos)]
    width = max(len(r) for r in rows)
    return np.array([r + [pad_id] * (width - len(r)) for r in rows], dtype=np.int64)


def torch_greedy(model, batch_ids: list[list[int]], new_tokens: int, pad_id: int, eos_ids: list[int], fixed_length: bool = True):
    """Greedy ``model.generate`` on a left-padded batch (eager PyTorch, KV cache); tokens [B, steps]."""
    import torch

    from iqstar_lite.ort_generate import left_pad

    ids, mask = (torch.from_numpy(a) for a in left_pad(batch_ids, pad_id))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens if fixed_length else None, pad_token_id=pad_id, eos_token_id=eos_ids or None,
                             temperature=None, top_p=None, top_k=None)
    return out[:, ids.shape[1]:]


def until_eos(tokens, eos_ids: list[int]) -> list[int]:
    """A row of new tokens up to and including its first EOS."""
    row = [int(t) for t in tokens]
    for k, t in enumerate(row):
        if t in eos_ids:
            return row[: k + 1]
    return row

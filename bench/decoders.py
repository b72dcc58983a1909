"""Batched greedy decoding shared by onnx_speed.py and decode_vs_trained.py: onnxruntime through the
package's ``OrtGenerator.generate_batch`` (left-padded), PyTorch through the package's one loop, ``rollout.sample``."""

from __future__ import annotations

import numpy as np


def ort_generator(onnx_dir, threads: int = 0, spin: bool = False):
    """``OrtGenerator`` with idle-thread spinning off where the package supports it (torch shares the process)."""
    import inspect

    from iqstar_lite.runtimes.ort import OrtGenerator

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


def torch_greedy(
    model, batch_ids: list[list[int]], new_tokens: int, pad_id: int, eos_ids: list[int], fixed_length: bool = True
):
    """Greedy tokens [B, steps] from the package's one decoding loop (``rollout.sample``: left-padded, KV cache);
    ``fixed_length`` blocks EOS so every row decodes ``new_tokens`` steps (speed runs)."""
    from types import SimpleNamespace

    from iqstar_lite.algorithm.rollout import sample

    ids_only = SimpleNamespace(
        pad_token_id=pad_id, eos_token_id=eos_ids[0] if eos_ids else None
    )  # contexts are ids: no encoding
    return sample(
        model,
        ids_only,
        batch_ids,
        max_new_tokens=new_tokens,
        greedy=True,
        min_new_tokens=new_tokens if fixed_length else 0,
    ).response_ids


def until_eos(tokens, eos_ids: list[int]) -> list[int]:
    """A row of new tokens up to and including its first EOS."""
    row = [int(t) for t in tokens]
    for k, t in enumerate(row):
        if t in eos_ids:
            return row[: k + 1]
    return row

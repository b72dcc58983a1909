"""Batched greedy decoding loops shared by onnx_speed.py and decode_vs_trained.py.

``iqstar_lite.ort_generate.OrtGenerator`` decodes batch 1 only; ``ort_greedy`` drives the same
session (its input/cache names, shapes and dtype are read from the generator) with left-padded
batches: attention_mask marks the pads, position_ids count from each row's first real token.
"""

from __future__ import annotations

import numpy as np


def ort_generator(onnx_dir, threads: int = 0, spin: bool = False):
    """``OrtGenerator`` with idle-thread spinning off where the package supports it (torch shares the process)."""
    import inspect

    from iqstar_lite.ort_generate import OrtGenerator

    extra = {"spin": spin} if "spin" in inspect.signature(OrtGenerator).parameters else {}
    return OrtGenerator(onnx_dir, threads, **extra)


def left_pad(batch_ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in batch_ids)
    ids = np.full((len(batch_ids), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(batch_ids):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def ort_greedy(gen, batch_ids: list[list[int]], new_tokens: int, pad_id: int, stop_at_eos: bool = False) -> np.ndarray:
    """Greedy tokens [B, steps] from an ``OrtGenerator``'s session, KV cache on, batch of any size.

    ``stop_at_eos=False`` decodes exactly ``new_tokens`` steps (speed runs); True stops once every row has
    emitted an EOS, and rows that finished get ``pad_id``.
    """
    ids, mask = left_pad(batch_ids, pad_id)
    b = ids.shape[0]
    pos = np.clip(mask.cumsum(1) - 1, 0, None)
    cache = {name: np.zeros((b, h, 0, d), dtype=gen.cache_dtype) for name, (h, d) in gen.cache_shapes.items()}
    done = np.zeros(b, dtype=bool)
    out = []
    for step in range(new_tokens):
        feed = {"input_ids": ids, **cache}
        if "attention_mask" in gen.input_names:
            feed["attention_mask"] = mask
        if "position_ids" in gen.input_names:
            feed["position_ids"] = pos
        if "use_cache_branch" in gen.input_names:
            feed["use_cache_branch"] = np.array([step > 0])
        outputs = dict(zip(gen.output_names, gen.session.run(None, feed)))
        nxt = outputs["logits"][:, -1].argmax(-1).astype(np.int64)
        if stop_at_eos:
            nxt = np.where(done, pad_id, nxt)
            done |= np.isin(nxt, gen.eos_ids)
        out.append(nxt)
        if stop_at_eos and done.all():
            break
        cache = {past: outputs[present] for past, present in zip(gen.past_names, gen.present_names)}
        ids, pos = nxt[:, None], pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
    return np.stack(out, axis=1)


def torch_greedy(model, batch_ids: list[list[int]], new_tokens: int, pad_id: int, eos_ids: list[int], fixed_length: bool = True):
    """Greedy ``model.generate`` on a left-padded batch (eager PyTorch, KV cache); tokens [B, steps]."""
    import torch

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

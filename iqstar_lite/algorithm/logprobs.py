"""Token log-probs from logits, chunked over positions: never more than one chunk of [T, V] in fp32.

Used for policy, reference and estimator alike (one shape-checked function, style item 4).
With autograd on, each chunk is recomputed in backward (activation checkpointing), so the fp32
log-softmax of the whole [B, T, V] is never stored either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def chunked_over_time(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Apply ``fn`` to time-chunks ``t[:, s:e]`` of every tensor and concatenate the [B, t] results."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    T = tensors[0].shape[1]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    outs = []
    for s in range(0, T, chunk_size):
        parts = [t[:, s : s + chunk_size] for t in tensors]
        outs.append(checkpoint(fn, *parts, use_reentrant=False) if needs_grad else fn(*parts))
    return torch.cat(outs, dim=1) if outs else tensors[0].new_zeros(tensors[0].shape[:2], dtype=torch.float32)


def _gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, chunk_size: int = 16) -> torch.Tensor:
    """log softmax(logits)[..., tokens] in fp32.

    Args:
        logits: [B, T, V] logits predicting ``tokens`` (already shifted), any float dtype.
        tokens: [B, T] token ids.
        chunk_size: positions per chunk.
    Returns:
        [B, T] float32 log-probs.
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, T, V] and tokens [B, T], got {tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    return chunked_over_time(_gather_logprobs, logits, tokens, chunk_size=chunk_size)


def kl_rows(target_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL( p || softmax(logits) ) over the last dim, p given by log-probs (-inf where p = 0); one chunk, fp32."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    # Non-finite target entries (p = 0 outside a nucleus; garbage at masked rows) become p = 0 *before*
    # any arithmetic, so neither the value nor the gradient can turn into nan.
    finite = torch.isfinite(target_logp)
    target = torch.where(finite, target_logp.float(), torch.zeros_like(logq))
    p = torch.where(finite, target.exp(), torch.zeros_like(logq))
    return (p * (target - logq)).sum(-1)


def kl_to_logits(target_logp: torch.Tensor, logits: torch.Tensor, chunk_size: int = 16) -> torch.Tensor:
    """Per-position KL( p || softmax(logits) ) over the vocabulary, [B, T] fp32.

    ``target_logp`` are log-probs of p ([B, T, V]; -inf allowed where p = 0).
    """
    if target_logp.shape != logits.shape:
        raise ValueError(
            f"target_logp and logits must have the same shape, got {tuple(target_logp.shape)} and {tuple(logits.shape)}"
        )
    return chunked_over_time(kl_rows, target_logp, logits, chunk_size=chunk_size)


def _kl_logits_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    return kl_rows(torch.log_softmax(p_logits.float(), dim=-1), q_logits)


def kl_between_logits(p_logits: torch.Tensor, q_logits: torch.Tensor, chunk_size: int = 16) -> torch.Tensor:
    """Per-position KL( softmax(p_logits) || softmax(q_logits) ), [B, T] fp32 (e.g. KL(pi_theta || pi_ref))."""
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logits must have the same shape, got {tuple(p_logits.shape)} and {tuple(q_logits.shape)}")
    return chunked_over_time(_kl_logits_rows, p_logits, q_logits, chunk_size=chunk_size)


def nucleus_mask(z: torch.Tensor, top_p: float, candidates: int = 256) -> torch.Tensor:
    """Boolean mask of the smallest token set whose softmax(z) mass reaches top_p (the argmax always stays), as
    transformers' TopPLogitsWarper. The one nucleus rule: sampling (``rollout.next_token``) and the estimator use it.

    Exact with a shortcut: when the ``candidates`` most probable tokens of every row already hold top_p of the mass,
    no token outside them can be kept, so only they are ranked (a full sort of 49k logits per row cost ~14 ms per
    decoding step, 12% of a rollout); otherwise the whole vocabulary is sorted.
    """
    if top_p >= 1.0:
        return torch.ones_like(z, dtype=torch.bool)
    probs = torch.softmax(z.float(), dim=-1)
    if candidates + 1 < probs.shape[-1]:
        sorted_p, order = probs.topk(candidates + 1, dim=-1)  # sorted, descending
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p  # the same prefix sums as the full sort's
        if not bool(
            keep_sorted[..., -1].any()
        ):  # the (candidates+1)-th token is out in every row: so is every later one
            return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep_sorted)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = mass_before < top_p
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep_sorted)

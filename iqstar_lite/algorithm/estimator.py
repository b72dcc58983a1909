"""The conditionally optimal policy pi* and the token rewards of Inverse-Q* (pure tensor functions).

Principle-contrastive estimator (Linear Alignment, Gao et al. 2024, as used by Inverse-Q*,
Xia et al. 2024): with z+ the reference logits with the principle P in context and z0 without it,

    z* = (1 + alpha) z+ - alpha z0,        log pi*(.|s) = log_softmax(z*)

optionally restricted to the nucleus (top-p) of softmax(z+). Auto reward assignment ("From r to Q*",
Rafailov et al. 2024: beta log pi*/pi_ref is the optimal token advantage):

    r_t = beta (log pi*(a_t|s_t) - log pi_ref(a_t|s_t))
"""

from __future__ import annotations

import torch

from iqstar_lite.algorithm.logprobs import chunked_over_time, nucleus_mask


def contrastive_logits(z_pos: torch.Tensor, z_neg: torch.Tensor, alpha: float) -> torch.Tensor:
    """z* = (1 + alpha) z+ - alpha z0, in fp32. alpha = 0 gives plain principle conditioning."""
    return (1.0 + alpha) * z_pos.float() - alpha * z_neg.float()


def log_pi_star(z_pos: torch.Tensor, z_neg: torch.Tensor, alpha: float, top_p: float = 1.0) -> torch.Tensor:
    """log pi*(.|s) over the vocabulary: log_softmax of z*, -inf outside the nucleus of z+ (renormalised)."""
    z_star = contrastive_logits(z_pos, z_neg, alpha)
    if top_p < 1.0:
        z_star = z_star.masked_fill(~nucleus_mask(z_pos, top_p), float("-inf"))
    return torch.log_softmax(z_star, dim=-1)


def token_rewards(logp_star: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = beta (log pi*(a_t) - log pi_ref(a_t)) on gathered [B, T] log-probs."""
    return beta * (logp_star - logp_ref)


def estimate(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    tokens: torch.Tensor,
    alpha: float,
    top_p: float = 1.0,
    chunk_size: int = 16,
    keep_full: bool = False,
) -> dict[str, torch.Tensor]:
    """Chunked estimator over [B, T, V] reference logits, reduced to [B, T] gathers.

    Returns ``logp_star`` (log pi*(a_t)), ``logp_ref`` (log pi_ref(a_t), from z0) and, with
    ``keep_full``, ``logp_star_full`` [B, T, V] (the distill target; the only [B, T, V] kept).
    """
    if z_pos.dim() != 3 or z_pos.shape != z_neg.shape or z_pos.shape[:2] != tokens.shape:
        raise ValueError(
            f"z_pos/z_neg [B, T, V] and tokens [B, T] disagree: {tuple(z_pos.shape)}, {tuple(z_neg.shape)}, {tuple(tokens.shape)}"
        )
    star_full = []

    def star_tok(zp: torch.Tensor, zn: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        lp = log_pi_star(zp, zn, alpha, top_p)
        if keep_full:
            star_full.append(lp)
        return lp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)

    def ref_tok(zn: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(zn.float(), dim=-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)

    out = {
        "logp_star": chunked_over_time(star_tok, z_pos, z_neg, tokens, chunk_size=chunk_size),
        "logp_ref": chunked_over_time(ref_tok, z_neg, tokens, chunk_size=chunk_size),
    }
    if keep_full:
        out["logp_star_full"] = torch.cat(star_full, dim=1)
    return out


def without_repeats(logp_star_full: torch.Tensor, tokens: torch.Tensor, ngram: int) -> torch.Tensor:
    """log pi*(.|s_t) [B, T, V] with every token that would repeat an n-gram of the answer so far set to -inf and the
    rest renormalised: the target pi* decoded with transformers' ``no_repeat_ngram_size`` (its
    ``NoRepeatNGramLogitsProcessor``, applied at each position t to the response prefix tokens[:, :t]). A token is
    banned at t when tokens[t-n+1:t] followed by it already occurs in tokens[:t]. ``ngram`` <= 0: unchanged. Positions
    after a row's end may lose all their mass (nan); callers mask them."""
    if ngram <= 0:
        return logp_star_full
    from transformers import NoRepeatNGramLogitsProcessor

    ban = NoRepeatNGramLogitsProcessor(ngram)
    out = logp_star_full.clone()
    for t in range(ngram, tokens.shape[1]):  # fewer than n tokens before t: nothing to ban
        out[:, t] = torch.log_softmax(ban(tokens[:, :t], out[:, t]), dim=-1)
    return out

"""Inverse-Q* policy losses: pure functions of [B, T] tensors and a response mask.

Each returns ``(loss, metrics)`` with detached float metrics. Token means are over unmasked
tokens only; masked positions change neither the loss nor the gradient (they are zeroed with
``torch.where`` before any arithmetic, so even inf/nan there cannot leak).

- ``pg``: token-level RL (PPO-style clipped surrogate with A_t = r_t, plus a k3 KL penalty to pi_ref).
- ``imitation``: reward imitation, (beta (log pi_theta - log pi_ref) - r_t)^2.
- ``distill``: KL(pi* || pi_theta) over the vocabulary (per-token values computed by logprobs.kl_to_logits).
All three have the fixed point pi_theta = pi* on visited states (Xia et al. 2024, arXiv 2408.14874).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _clean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask == 1 (0 when the mask is empty); a mask of non-negative token weights gives the weighted
    mean sum(w x) / sum(w) over w > 0."""
    m = mask.to(torch.float32)
    total = m.sum()
    return (_clean(x, mask) * m).sum() / torch.where(total > 0, total, torch.ones_like(total))


def position_weights(mask: torch.Tensor, halflife: float) -> torch.Tensor:
    """Token weights w_t = mask_t / (1 + t / halflife) for response position t = 0, 1, ...: a state's weight halves
    at t = halflife and falls as 1/t after it. Every weight stays positive, so each state's loss keeps its minimum
    at pi_theta = pi*; only how much of the update each position gets changes. ``halflife`` <= 0: the mask itself."""
    if halflife <= 0:
        return mask
    t = torch.arange(mask.shape[-1], dtype=torch.float32, device=mask.device)
    return mask.to(torch.float32) / (1.0 + t / halflife)


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 1e-8,
    all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(x - mean) / std over unmasked entries (a 0/1 mask, not token weights); masked entries become 0.

    ``all_sum``: sums a tensor over the processes of a data-parallel run, so mean and std are those of the global
    batch (each process holds a slice of it); None for one process."""
    if all_sum is None:
        mean = masked_mean(x, mask)
        var = masked_mean((x - mean) ** 2, mask)
    else:
        xm = torch.where(mask > 0, x, torch.zeros_like(x))
        n = all_sum(mask.sum().reshape(1)).clamp(min=1.0)
        mean = all_sum(xm.sum().reshape(1)) / n
        var = all_sum(torch.where(mask > 0, (x - mean) ** 2, torch.zeros_like(x)).sum().reshape(1)) / n
    return _clean((x - mean) * torch.rsqrt(var + eps), mask)


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi_theta || pi_ref) per sampled token: exp(q) - q - 1, q = log pi_ref - log pi_theta."""
    q = logp_ref - logp
    return torch.exp(q) - q - 1.0


def kl_shaped_advantages(
    rewards: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, beta: float
) -> torch.Tensor:
    """A_t = r_t - beta (log pi_old(a_t) - log pi_ref(a_t)): the KL to pi_ref inside the advantage (as PPO's
    KL-shaped reward). With r_t = beta (log pi* - log pi_ref) this is beta (log pi*(a_t) - log pi_old(a_t)):
    the policy gradient of E[A] is then that of -beta KL(pi_theta || pi*), zero exactly at pi_theta = pi*.
    Whitening such advantages rescales the whole objective, so it keeps that fixed point (whitening r_t alone
    and adding beta k3 in the loss does not: it weighs the reward 1/std(r) times more than the KL)."""
    return rewards - beta * (logp_old - logp_ref)


def pg_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    clip_eps: float = 0.2,
    whiten_advantages: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate with dense advantages A_t = r_t and a k3 KL penalty with weight beta.

    L = mean_t [ -min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t) + beta k3_t ],  rho_t = pi_theta/pi_old.
    """
    logp, logp_old, logp_ref = _clean(logp, mask), _clean(logp_old, mask), _clean(logp_ref, mask)
    adv = whiten(rewards, mask) if whiten_advantages else _clean(rewards, mask)
    adv = adv.detach()
    ratio = torch.exp(logp - logp_old.detach())
    surr = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    kl = k3_kl(logp, logp_ref.detach())
    loss = masked_mean(-surr + beta * kl, mask)
    clipped = ((ratio - 1.0).abs() > clip_eps).float()
    metrics = {"kl": masked_mean(kl, mask).item(), "clip_frac": masked_mean(clipped, mask).item()}
    return loss, metrics


def imitation_loss(
    logp: torch.Tensor, logp_ref: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """L = mean_t ( beta (log pi_theta(a_t) - log pi_ref(a_t)) - r_t )^2 : the implicit reward imitates r_t."""
    implicit = beta * (_clean(logp, mask) - _clean(logp_ref, mask).detach())
    err = implicit - _clean(rewards, mask).detach()
    loss = masked_mean(err**2, mask)
    return loss, {"kl": masked_mean(k3_kl(_clean(logp, mask), _clean(logp_ref, mask)), mask).item(), "clip_frac": 0.0}


def distill_loss(per_token_kl: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """L = mean_t KL(pi*(.|s_t) || pi_theta(.|s_t)); ``per_token_kl`` from logprobs.kl_to_logits."""
    loss = masked_mean(per_token_kl, mask)
    return loss, {"clip_frac": 0.0}

"""Inverse-Q* losses (iqstar_lite/algorithm/loss.py): hand arithmetic on 2-3 token tensors, then invariants.

Style (docs/style.md items 1-2): every expected value is written out in the docstring and checked with
``torch.testing.assert_close``. Invariants: pi_theta = pi_ref = pi* is a fixed point (zero reward,
zero imitation loss, zero distill KL); masked positions change neither the loss nor the gradient
(garbage there: huge values, +/-inf, nan); float64 gradcheck.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from iqstar_lite.algorithm.estimator import token_rewards
from iqstar_lite.algorithm.logprobs import kl_to_logits
from iqstar_lite.algorithm.loss import (
    distill_loss,
    imitation_loss,
    k3_kl,
    kl_shaped_advantages,
    masked_mean,
    pg_loss,
    position_weights,
    whiten,
)

D = torch.float64
LN2 = math.log(2.0)


def t(*vals) -> torch.Tensor:
    return torch.tensor(vals, dtype=D)


# ----------------------------------------------------------------------------------------------
# masked_mean / whiten / k3_kl
# ----------------------------------------------------------------------------------------------


def test_masked_mean_hand():
    """x = [1, 2, 30], mask = [1, 1, 0] -> (1 + 2) / 2 = 1.5; 2-D: [[1,2],[3,4]] mask [[1,0],[1,1]] -> 8/3."""
    assert_close(masked_mean(t(1.0, 2.0, 30.0), t(1, 1, 0)), t(1.5)[0])
    x = t([1.0, 2.0], [3.0, 4.0])
    m = torch.tensor([[True, False], [True, True]])
    assert_close(masked_mean(x, m), torch.tensor(8.0 / 3.0, dtype=D))


def test_masked_mean_empty_mask_is_zero_not_nan():
    """mask all 0 -> 0 (denominator 1 then), even with inf/nan in x."""
    x = t(float("nan"), float("inf"), 5.0)
    out = masked_mean(x, torch.zeros(3))
    assert torch.isfinite(out)
    assert_close(out, torch.tensor(0.0, dtype=D))


def test_masked_mean_ignores_garbage_at_masked():
    """x = [2, nan, 4, inf], mask = [1, 0, 1, 0] -> (2 + 4) / 2 = 3."""
    x = t(2.0, float("nan"), 4.0, float("inf"))
    assert_close(masked_mean(x, t(1, 0, 1, 0)), torch.tensor(3.0, dtype=D))


def test_masked_mean_with_token_weights_hand():
    """x = [1, 2, 30], weights [1, 0.5, 0] -> (1 + 1) / 1.5 = 4/3; one token of weight 0.2 -> its value (not 0.2 x it)."""
    assert_close(masked_mean(t(1.0, 2.0, 30.0), t(1.0, 0.5, 0.0)), torch.tensor(4.0 / 3.0, dtype=D))
    assert_close(masked_mean(t(7.0, float("nan")), t(0.2, 0.0)), torch.tensor(7.0, dtype=D))


def test_position_weights_hand():
    """halflife 2, mask [[1,1,1,1],[1,1,0,0]] -> 1/(1 + t/2) = [1, 2/3, 1/2, 2/5], masked -> 0; halflife 0 -> the mask."""
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert_close(position_weights(m, 2.0), torch.tensor([[1.0, 2 / 3, 0.5, 0.4], [1.0, 2 / 3, 0.0, 0.0]]))
    assert position_weights(m, 0.0) is m


def test_distill_loss_position_weighted_keeps_the_fixed_point():
    """Weights change how much each state counts, not where the minimum is: KL = [0.3, 0.1, 0.7] with weights
    [1, 0.5, 1/3] -> (0.3 + 0.05 + 0.7/3) / (1 + 0.5 + 1/3) = 0.318...; all-zero KL (pi_theta = pi*) -> 0."""
    w = position_weights(torch.ones(1, 3), 1.0).to(D)
    loss, _ = distill_loss(t([0.3, 0.1, 0.7]), w)
    assert_close(loss, torch.tensor((0.3 + 0.05 + 0.7 / 3) / (1 + 0.5 + 1 / 3), dtype=D))
    assert_close(distill_loss(torch.zeros(1, 3, dtype=D), w)[0], torch.tensor(0.0, dtype=D))


def test_whiten_hand():
    """x = [1, 2, 3, 99], mask = [1, 1, 1, 0]: mean 2, var (1 + 0 + 1)/3 = 2/3 (population),
    -> [-1, 0, 1] / sqrt(2/3) = [-1.2247, 0, 1.2247], masked -> 0."""
    out = whiten(t(1.0, 2.0, 3.0, 99.0), t(1, 1, 1, 0))
    s = math.sqrt(2.0 / 3.0)
    assert_close(out, t(-1.0 / s, 0.0, 1.0 / s, 0.0))


def test_whiten_mean0_std1_on_unmasked_and_masked_zero():
    """Random x with garbage at masked entries: unmasked entries have mean 0, population std 1; masked are 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dtype=D, generator=g) * 4 + 7
    mask = torch.rand(3, 5, generator=g) > 0.4
    mask[0, 0] = True
    x = torch.where(mask, x, torch.full_like(x, float("nan")))
    x[~mask & (torch.arange(5) % 2 == 0)] = float("inf")
    out = whiten(x, mask)
    assert torch.isfinite(out).all()
    v = out[mask]
    assert_close(v.mean(), torch.tensor(0.0, dtype=D), atol=1e-12, rtol=0)
    assert_close((v**2).mean(), torch.tensor(1.0, dtype=D), atol=1e-7, rtol=0)
    assert (out[~mask] == 0).all()


def test_whiten_degenerate():
    """Constant x -> 0 / sqrt(0 + eps) = 0 (no nan); empty mask -> all 0."""
    assert_close(whiten(t(3.0, 3.0, 5.0), t(1, 1, 0)), t(0.0, 0.0, 0.0))
    assert_close(whiten(t(3.0, float("nan")), t(0, 0)), t(0.0, 0.0))


def test_kl_shaped_advantages_hand():
    """A = r - beta (log pi_old - log pi_ref), beta = 0.1: r = [0.2, -0.1], log pi_old = [-1, -2], log pi_ref = [-1.5, -1]
    -> [0.2 - 0.1 * 0.5, -0.1 - 0.1 * (-1)] = [0.15, 0]."""
    assert_close(kl_shaped_advantages(t(0.2, -0.1), t(-1.0, -2.0), t(-1.5, -1.0), 0.1), t(0.15, 0.0))


def test_kl_shaped_advantages_give_the_reverse_kl_gradient_to_pi_star():
    """On one state with a 4-token vocabulary: the exact policy gradient sum_a pi(a) A(a) grad log pi(a), with
    r = beta (log pi* - log pi_ref) and A = kl_shaped_advantages, equals -grad beta KL(pi || pi*) (autograd), and
    is zero at pi = pi*. (Whitened r plus a separate beta k3 term has no such fixed point.)"""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, dtype=D, generator=g, requires_grad=True)
    lp_ref, lp_star, beta = (
        torch.randn(4, dtype=D, generator=g).log_softmax(-1),
        torch.randn(4, dtype=D, generator=g).log_softmax(-1),
        0.3,
    )

    def policy_gradient(z):
        lp = z.log_softmax(-1)
        adv = kl_shaped_advantages(token_rewards(lp_star, lp_ref, beta), lp.detach(), lp_ref, beta)
        return torch.autograd.grad((lp.exp().detach() * adv * lp).sum(), z)[0]

    lp = z.log_softmax(-1)
    (want,) = torch.autograd.grad(-beta * (lp.exp() * (lp - lp_star)).sum(), z)
    assert_close(policy_gradient(z), want)
    assert policy_gradient(z).abs().max() > 1e-3
    assert_close(policy_gradient(lp_star.clone().requires_grad_(True)), torch.zeros(4, dtype=D), atol=1e-12, rtol=0)


def test_k3_kl_hand():
    """k3 = exp(q) - q - 1 with q = logp_ref - logp:
    q = 0 -> 0;  q = ln 2 -> 2 - ln2 - 1 = 1 - ln2 = 0.30685;  q = -ln 2 -> 0.5 + ln2 - 1 = ln2 - 0.5 = 0.19315."""
    logp = t(-1.0, -1.0 - LN2, -1.0)
    logp_ref = t(-1.0, -1.0, -1.0 - LN2)
    assert_close(k3_kl(logp, logp_ref), t(0.0, 1.0 - LN2, LN2 - 0.5))


def test_k3_kl_nonnegative():
    """exp(q) >= 1 + q for every q, so k3 >= 0."""
    q = torch.linspace(-5, 5, 41, dtype=D)
    assert (k3_kl(torch.zeros_like(q), q) >= 0).all()


# ----------------------------------------------------------------------------------------------
# pg_loss
# ----------------------------------------------------------------------------------------------


def _pg_inputs():
    """Three tokens, clip eps 0.2:
    rho = [1.1, 1.5, 0.5], A = [2, 1, -1]
      t1: min(1.1*2, clip(1.1)*2) = min(2.2, 2.2) = 2.2   (inside the clip, gradient flows)
      t2: min(1.5*1, 1.2*1)       = 1.2                    (clipped, no gradient)
      t3: min(0.5*-1, 0.8*-1)     = min(-0.5, -0.8) = -0.8 (clipped, no gradient)
    """
    logp_old = t(-1.0, -2.0, -0.5)
    logp = (logp_old + torch.log(t(1.1, 1.5, 0.5))).requires_grad_()
    rewards = t(2.0, 1.0, -1.0)
    return logp, logp_old, rewards


def test_pg_loss_hand_no_kl_no_whiten():
    """beta = 0: L = -(2.2 + 1.2 - 0.8) / 3 = -2.6/3 = -0.86667.
    clip_frac = #(|rho - 1| > 0.2) / 3 = #{1.5, 0.5} / 3 = 2/3.
    dL/dlogp = -(1/3) d surr/d logp = [-(1/3) * rho1 * A1, 0, 0] = [-2.2/3, 0, 0]."""
    logp, logp_old, rewards = _pg_inputs()
    loss, met = pg_loss(
        logp, logp_old, logp.detach().clone(), rewards, t(1, 1, 1), beta=0.0, clip_eps=0.2, whiten_advantages=False
    )
    assert_close(loss, torch.tensor(-2.6 / 3, dtype=D))
    assert met["clip_frac"] == pytest.approx(2.0 / 3.0)
    assert met["kl"] == pytest.approx(0.0)
    loss.backward()
    assert_close(logp.grad, t(-2.2 / 3, 0.0, 0.0))


def test_pg_loss_ratio_outside_clip_but_unclipped_branch_selected():
    """rho = 0.5, A = +1: min(0.5, 0.8) = 0.5 -> the unclipped term wins and the gradient flows:
    L = -0.5, dL/dlogp = -rho*A = -0.5; clip_frac counts |rho - 1| = 0.5 > 0.2 -> 1."""
    logp = torch.log(t(0.5)).requires_grad_()
    loss, met = pg_loss(logp, t(0.0), logp.detach(), t(1.0), t(1), beta=0.0, whiten_advantages=False)
    assert_close(loss, torch.tensor(-0.5, dtype=D))
    assert met["clip_frac"] == pytest.approx(1.0)
    loss.backward()
    assert_close(logp.grad, t(-0.5))


def test_pg_loss_hand_with_kl():
    """Same surrogate plus beta = 0.5 and logp_ref - logp = q = [0, ln2, -ln2]:
    k3 = [0, 1 - ln2, ln2 - 0.5];  mean k3 = (0.5) / 3 = 1/6  (1 - ln2 + ln2 - 0.5 = 0.5)
    L = -2.6/3 + 0.5 * 1/6 = -0.78333.
    d k3/d logp = 1 - exp(q) = [0, -1, 0.5]
    dL/dlogp = (1/3) [-2.2 + 0, 0 + 0.5 * -1, 0 + 0.5 * 0.5] = [-2.2, -0.5, 0.25] / 3."""
    logp, logp_old, rewards = _pg_inputs()
    logp_ref = logp.detach() + t(0.0, LN2, -LN2)
    loss, met = pg_loss(logp, logp_old, logp_ref, rewards, t(1, 1, 1), beta=0.5, clip_eps=0.2, whiten_advantages=False)
    assert_close(loss, torch.tensor(-2.6 / 3 + 0.5 / 6, dtype=D))
    assert met["kl"] == pytest.approx(1.0 / 6.0)
    loss.backward()
    assert_close(logp.grad, t(-2.2, -0.5, 0.25) / 3)


def test_pg_loss_hand_whitened():
    """whiten on, rewards r = [1, 2, 3] -> A = [-1, 0, 1] / sqrt(2/3) = [-1.22474, 0, 1.22474];
    rho = [1.1, 1.5, 0.9] (clip 0.2: only 1.5 is outside):
      t1: min(1.1 * -1.2247, 1.1 * -1.2247) = -1.34722
      t2: 0
      t3: min(0.9 * 1.2247, 0.9 * 1.2247)   =  1.10227
    L = -(-1.34722 + 0 + 1.10227) / 3 = 0.2 * 1.22474 / 3 = 0.081650;  clip_frac = 1/3.
    dL/dlogp = -(1/3) rho * A = [1.1 * 1.2247, 0, -0.9 * 1.2247] / 3."""
    logp_old = t(-1.0, -2.0, -0.5)
    logp = (logp_old + torch.log(t(1.1, 1.5, 0.9))).requires_grad_()
    a = 1.0 / math.sqrt(2.0 / 3.0)
    loss, met = pg_loss(
        logp, logp_old, logp.detach(), t(1.0, 2.0, 3.0), t(1, 1, 1), beta=0.0, clip_eps=0.2, whiten_advantages=True
    )
    assert_close(loss, torch.tensor(0.2 * a / 3, dtype=D))
    assert met["clip_frac"] == pytest.approx(1.0 / 3.0)
    loss.backward()
    assert_close(logp.grad, t(1.1 * a, 0.0, -0.9 * a) / 3)


def test_pg_loss_whiten_off_vs_on_differ_by_affine_rewards():
    """Whitening makes the loss invariant to r -> 10 r + 3 (with whiten off it is not)."""
    logp, logp_old, _ = _pg_inputs()
    r = t(0.3, -1.0, 2.0)
    m = t(1, 1, 1)
    on1, _ = pg_loss(logp, logp_old, logp.detach(), r, m, 0.1, whiten_advantages=True)
    on2, _ = pg_loss(logp, logp_old, logp.detach(), 10 * r + 3, m, 0.1, whiten_advantages=True)
    off1, _ = pg_loss(logp, logp_old, logp.detach(), r, m, 0.1, whiten_advantages=False)
    off2, _ = pg_loss(logp, logp_old, logp.detach(), 10 * r + 3, m, 0.1, whiten_advantages=False)
    assert_close(on1, on2)
    assert not torch.allclose(off1, off2)


def test_pg_loss_no_grad_to_old_ref_or_rewards():
    """logp_old, logp_ref and rewards are targets: gradient only reaches logp."""
    logp, logp_old, rewards = _pg_inputs()
    logp_old = logp_old.clone().requires_grad_()
    logp_ref = (logp.detach() + 0.3).requires_grad_()
    rewards = rewards.clone().requires_grad_()
    loss, _ = pg_loss(logp, logp_old, logp_ref, rewards, t(1, 1, 1), beta=0.1, whiten_advantages=True)
    loss.backward()
    assert logp.grad is not None
    assert logp_old.grad is None and logp_ref.grad is None and rewards.grad is None


# ----------------------------------------------------------------------------------------------
# imitation_loss / distill_loss
# ----------------------------------------------------------------------------------------------


def test_imitation_loss_hand():
    """beta = 0.5, logp - logp_ref = [ln2, 0, -1], r = [0.1, 0.2, -0.5]:
    implicit = 0.5 * [ln2, 0, -1] = [0.34657, 0, -0.5]
    err = implicit - r = [0.24657, -0.2, 0.0]
    L = (0.24657^2 + 0.04 + 0) / 3 = 0.033599
    dL/dlogp = (2/3) * beta * err = [0.24657, -0.2, 0] / 3
    metric kl = mean k3(q = [-ln2, 0, 1]) = ((0.5 + ln2 - 1) + 0 + (e - 2)) / 3."""
    logp_ref = t(-1.0, -2.0, -0.5)
    logp = (logp_ref + t(LN2, 0.0, -1.0)).requires_grad_()
    r = t(0.1, 0.2, -0.5)
    loss, met = imitation_loss(logp, logp_ref, r, t(1, 1, 1), beta=0.5)
    e1 = 0.5 * LN2 - 0.1
    assert_close(loss, torch.tensor((e1**2 + 0.04) / 3, dtype=D))
    assert met["kl"] == pytest.approx(((LN2 - 0.5) + (math.e - 2.0)) / 3)
    assert met["clip_frac"] == 0.0
    loss.backward()
    assert_close(logp.grad, t(e1, -0.2, 0.0) / 3)


def test_imitation_loss_masked_hand():
    """mask = [1, 0]: only t1 counts: beta = 1, logp - logp_ref = 1, r = 0.25 -> (1 - 0.25)^2 / 1 = 0.5625."""
    loss, _ = imitation_loss(t(-1.0, -3.0), t(-2.0, 0.0), t(0.25, 9.0), t(1, 0), beta=1.0)
    assert_close(loss, torch.tensor(0.5625, dtype=D))


def test_distill_loss_hand():
    """per-token KL = [0.2, 0.4, 7.0], mask = [1, 1, 0] -> (0.2 + 0.4)/2 = 0.3; d L / d kl = [1/2, 1/2, 0]."""
    kl = t(0.2, 0.4, 7.0).requires_grad_()
    loss, met = distill_loss(kl, t(1, 1, 0))
    assert_close(loss, torch.tensor(0.3, dtype=D))
    assert met["clip_frac"] == 0.0
    loss.backward()
    assert_close(kl.grad, t(0.5, 0.5, 0.0))


def test_distill_loss_through_kl_to_logits_hand():
    """p = [0.5, 0.5, 0] (log p = [ln .5, ln .5, -inf]), q = softmax([0, 0, ln 2]) = [0.25, 0.25, 0.5]:
    KL(p || q) = 2 * 0.5 * ln(0.5 / 0.25) = ln 2; dKL/dz = q - p = [-0.25, -0.25, 0.5]."""
    target = torch.log(torch.tensor([[[0.5, 0.5, 0.0]]], dtype=D))
    z = torch.tensor([[[0.0, 0.0, LN2]]], dtype=D, requires_grad=True)
    loss, _ = distill_loss(kl_to_logits(target, z), torch.ones(1, 1))
    assert_close(loss, torch.tensor(LN2, dtype=torch.float32))
    loss.backward()
    assert_close(z.grad, torch.tensor([[[-0.25, -0.25, 0.5]]], dtype=D))


# ----------------------------------------------------------------------------------------------
# Fixed point: pi_theta = pi_ref = pi*
# ----------------------------------------------------------------------------------------------


def test_fixed_point_zero_reward_zero_losses():
    """logp = logp_ref = logp_star:
    r = beta (logp* - logp_ref) = 0; imitation L = (beta * 0 - 0)^2 = 0 with zero gradient;
    distill KL(pi* || pi_theta) = 0 with zero gradient; pg with rho = 1, A = 0, k3 = 0 -> L = 0, zero gradient."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 5, dtype=D, generator=g)
    full = torch.log_softmax(z, -1)
    tok = torch.tensor([[0, 4, 2], [1, 1, 3]])
    lp = full.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])

    r = token_rewards(lp, lp, beta=0.1)
    assert (r == 0).all()

    logp = lp.clone().requires_grad_()
    il, met = imitation_loss(logp, lp, r, mask, beta=0.1)
    il.backward()
    assert il.item() == 0.0 and met["kl"] == 0.0
    assert (logp.grad == 0).all()

    for whiten_adv in (True, False):
        logp = lp.clone().requires_grad_()
        pl, met = pg_loss(logp, lp, lp, r, mask, beta=0.1, whiten_advantages=whiten_adv)
        pl.backward()
        assert pl.item() == 0.0 and met["kl"] == 0.0 and met["clip_frac"] == 0.0
        assert_close(logp.grad, torch.zeros_like(lp))

    zz = z.clone().requires_grad_()
    dl, _ = distill_loss(kl_to_logits(full, zz, chunk_size=2), mask)
    dl.backward()
    assert_close(dl, torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(zz.grad, torch.zeros_like(z), atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------------------------
# Masked positions change neither loss nor gradient
# ----------------------------------------------------------------------------------------------

MASK = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
GARBAGE = torch.tensor([1e30, float("inf"), float("nan"), float("-inf")], dtype=D)


def _dirty(x: torch.Tensor, shift: int) -> torch.Tensor:
    """x with a cycle of (1e30, +inf, nan, -inf) written into its masked positions."""
    junk = GARBAGE.roll(shift)[torch.arange(x.numel()) % 4].reshape(x.shape)
    return torch.where(MASK.bool(), x, junk)


def _clean_inputs():
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(3, 4, dtype=D, generator=g) * 3
    logp_old = logp + 0.4 * torch.randn(3, 4, dtype=D, generator=g)
    logp_ref = logp + 0.3 * torch.randn(3, 4, dtype=D, generator=g)
    rewards = torch.randn(3, 4, dtype=D, generator=g)
    return logp, logp_old, logp_ref, rewards


def _loss_and_grad(fn, logp, *rest):
    logp = logp.clone().requires_grad_()
    loss, met = fn(logp, *rest)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, grad, met


@pytest.mark.parametrize("whiten_adv", [True, False])
def test_pg_loss_masked_garbage_changes_nothing(whiten_adv):
    """Garbage in masked positions of logp, logp_old, logp_ref, rewards -> same loss, same grad, zero grad there."""
    logp, logp_old, logp_ref, rewards = _clean_inputs()

    def fn(lp, lo, lr, r):
        return pg_loss(lp, lo, lr, r, MASK, beta=0.3, clip_eps=0.2, whiten_advantages=whiten_adv)

    l0, g0, m0 = _loss_and_grad(fn, logp, logp_old, logp_ref, rewards)
    l1, g1, m1 = _loss_and_grad(fn, _dirty(logp, 0), _dirty(logp_old, 1), _dirty(logp_ref, 2), _dirty(rewards, 3))
    assert torch.isfinite(l0) and torch.isfinite(g0).all()
    assert_close(l1, l0)
    assert_close(g1, g0)
    assert m1 == pytest.approx(m0)
    assert (g1[~MASK.bool()] == 0).all()
    assert (g0[MASK.bool()] != 0).any()


def test_imitation_loss_masked_garbage_changes_nothing():
    """Same for imitation: garbage in masked logp, logp_ref, rewards changes neither loss nor grad."""
    logp, _, logp_ref, rewards = _clean_inputs()

    def fn(lp, lr, r):
        return imitation_loss(lp, lr, r, MASK, beta=0.5)

    l0, g0, m0 = _loss_and_grad(fn, logp, logp_ref, rewards)
    l1, g1, m1 = _loss_and_grad(fn, _dirty(logp, 1), _dirty(logp_ref, 2), _dirty(rewards, 3))
    assert torch.isfinite(l0)
    assert_close(l1, l0)
    assert_close(g1, g0)
    assert m1 == pytest.approx(m0)
    assert (g1[~MASK.bool()] == 0).all()


def test_distill_loss_masked_garbage_changes_nothing():
    """Garbage in masked per-token KL values -> same loss and grad; grad 0 at masked positions, 1/4 elsewhere."""
    kl = torch.rand(3, 4, dtype=D, generator=torch.Generator().manual_seed(3))
    l0, g0, _ = _loss_and_grad(distill_loss, kl, MASK)
    l1, g1, _ = _loss_and_grad(distill_loss, _dirty(kl, 2), MASK)
    assert_close(l1, l0)
    assert_close(g1, g0)
    assert_close(g1, MASK.to(D) / 4)


def _distill_run(target: torch.Tensor, logits: torch.Tensor):
    z = logits.clone().requires_grad_()
    loss, _ = distill_loss(kl_to_logits(target, z, chunk_size=3), MASK)
    loss.backward()
    return loss, z.grad


def _distill_target_and_logits():
    g = torch.Generator().manual_seed(4)
    target = torch.log_softmax(torch.randn(3, 4, 5, dtype=D, generator=g), -1)
    logits = torch.randn(3, 4, 5, dtype=D, generator=g)
    return target, logits


def test_distill_masked_target_other_logprobs_through_kl_to_logits():
    """Any other (valid) log-prob rows at masked positions of the pi* target -- including -inf entries and
    huge negative values -- and huge / -inf logits there: distill loss and d/dlogits unchanged, and
    d/dlogits exactly 0 at masked positions."""
    target, logits = _distill_target_and_logits()
    m = MASK.bool().unsqueeze(-1)
    other = torch.log_softmax(torch.randn(3, 4, 5, dtype=D) * 30, -1)
    other[..., 0] = float("-inf")
    other[..., 1] = -1e30
    dirty_logits = logits.clone()
    dirty_logits[..., 2] = 1e30
    dirty_logits[..., 3] = float("-inf")
    l0, g0 = _distill_run(target, logits)
    l1, g1 = _distill_run(torch.where(m, target, other), torch.where(m, logits, dirty_logits))
    assert_close(l1, l0)
    assert_close(g1, g0)
    assert (g1[~MASK.bool()] == 0).all()


def test_distill_masked_target_nan_does_not_leak_into_grad():
    """Target log-probs nan at one masked position (row [0, 2]): loss unchanged and d/dlogits finite and equal
    to the clean case (a nan there would poison every LoRA gradient through the model)."""
    target, logits = _distill_target_and_logits()
    dirty = target.clone()
    dirty[0, 2, 0] = float("nan")
    assert not MASK[0, 2]
    l0, g0 = _distill_run(target, logits)
    l1, g1 = _distill_run(dirty, logits)
    assert_close(l1, l0)
    assert torch.isfinite(g1).all()
    assert_close(g1, g0)


# ----------------------------------------------------------------------------------------------
# float64 gradcheck
# ----------------------------------------------------------------------------------------------


def test_gradcheck_pg_loss():
    """pg_loss (whiten off) w.r.t. logp in float64; ratios kept away from the clip boundaries (kinks)."""
    logp_old = t(-1.0, -2.0, -0.5, -1.5)
    logp = (logp_old + torch.log(t(1.05, 1.6, 0.5, 0.95))).requires_grad_()
    logp_ref = logp.detach() + t(0.2, -0.3, 0.1, 0.4)
    rewards = t(1.0, 0.5, -2.0, -0.7)
    mask = t(1, 1, 1, 0)

    def f(lp):
        return pg_loss(lp, logp_old, logp_ref, rewards, mask, beta=0.2, clip_eps=0.2, whiten_advantages=False)[0]

    assert torch.autograd.gradcheck(f, (logp,))


def test_gradcheck_imitation_loss():
    g = torch.Generator().manual_seed(5)
    logp = (-torch.rand(2, 3, dtype=D, generator=g)).requires_grad_()
    logp_ref = -torch.rand(2, 3, dtype=D, generator=g)
    r = torch.randn(2, 3, dtype=D, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert torch.autograd.gradcheck(lambda lp: imitation_loss(lp, logp_ref, r, mask, beta=0.7)[0], (logp,))


def test_gradcheck_distill_loss_on_per_token_kl():
    """distill_loss itself in float64 (it is linear in per_token_kl)."""
    kl = torch.rand(2, 3, dtype=D, generator=torch.Generator().manual_seed(6)).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert torch.autograd.gradcheck(lambda k: distill_loss(k, mask)[0], (kl,))


def test_gradcheck_distill_through_kl_to_logits():
    """distill_loss(kl_to_logits(target, logits)) w.r.t. random float64 logits, incl. a -inf target entry.

    kl_to_logits computes in fp32 (``.float()`` also downcasts float64), so the finite-difference
    Jacobian is only fp32-accurate: gradcheck runs with eps 1e-3 and fp32-level tolerances. The
    default float64 tolerances (eps 1e-6, atol 1e-5) fail for that reason alone; the next test checks
    the gradient against the float64 analytic value instead."""
    g = torch.Generator().manual_seed(7)
    target = torch.log_softmax(torch.randn(2, 3, 4, dtype=D, generator=g), -1)
    target[0, 1, 2] = float("-inf")
    target[0, 1] = torch.log_softmax(target[0, 1], -1)
    logits = torch.randn(2, 3, 4, dtype=D, generator=g).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])

    def f(z):
        return distill_loss(kl_to_logits(target, z, chunk_size=3), mask)[0].double()

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-3, atol=1e-4, rtol=1e-3)


def test_distill_grad_matches_analytic_float64():
    """d/dz mean_t KL(p_t || softmax(z_t)) = (softmax(z_t) - p_t) * mask_t / n, checked against float64 analytic values."""
    g = torch.Generator().manual_seed(8)
    target = torch.log_softmax(torch.randn(2, 3, 4, dtype=D, generator=g), -1)
    logits = torch.randn(2, 3, 4, dtype=D, generator=g).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    loss, _ = distill_loss(kl_to_logits(target, logits, chunk_size=2), mask)
    loss.backward()
    expected = (torch.softmax(logits.detach(), -1) - target.exp()) * mask.unsqueeze(-1) / 4
    assert_close(logits.grad, expected, atol=1e-6, rtol=1e-5)

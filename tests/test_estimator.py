"""The pi* estimator (iqstar_lite/algorithm/estimator.py): hand values, nucleus, rewards, chunked == naive.

z* = (1 + alpha) z+ - alpha z0; log pi* = log_softmax(z*) restricted to the top-p nucleus of softmax(z+);
r_t = beta (log pi*(a_t) - log pi_ref(a_t)) with pi_ref = softmax(z0).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from iqstar_lite.algorithm.estimator import (
    contrastive_logits,
    estimate,
    log_pi_star,
    nucleus_mask,
    token_rewards,
    without_repeats,
)

NEG_INF = float("-inf")


def test_contrastive_logits_hand():
    """z+ = [1, 2, 3], z0 = [0, 1, 1]:
    alpha = 1:   2 z+ - z0           = [2, 3, 5]
    alpha = 0.5: 1.5 z+ - 0.5 z0     = [1.5, 2.5, 4]
    alpha = 0:   z+                  = [1, 2, 3]"""
    zp, zn = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 1.0])
    assert_close(contrastive_logits(zp, zn, 1.0), torch.tensor([2.0, 3.0, 5.0]))
    assert_close(contrastive_logits(zp, zn, 0.5), torch.tensor([1.5, 2.5, 4.0]))
    assert_close(contrastive_logits(zp, zn, 0.0), zp)


def test_contrastive_logits_bf16_in_fp32_out():
    """bf16 inputs (exactly representable) -> fp32 result: 2 * [1, 2] - [0.5, 0.25] = [1.5, 3.75]."""
    out = contrastive_logits(
        torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.tensor([0.5, 0.25], dtype=torch.bfloat16), 1.0
    )
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([1.5, 3.75]))


# ----------------------------------------------------------------------------------------------
# nucleus_mask
# ----------------------------------------------------------------------------------------------

P = torch.tensor([0.5, 0.3, 0.2])


@pytest.mark.parametrize(
    "top_p, keep",
    [
        (0.6, [True, True, False]),  # 0.5 < 0.6, 0.5 + 0.3 = 0.8 >= 0.6 -> 2 tokens
        (0.5, [True, False, False]),  # 0.5 reaches 0.5 -> argmax alone
        (0.3, [True, False, False]),  # argmax always kept
        (1e-6, [True, False, False]),  # argmax always kept, tiny top_p
        (0.8, [True, True, False]),  # 0.8 reaches 0.8 exactly (fp32 cumsum)
        (0.9, [True, True, True]),  # 0.8 < 0.9 -> all three
        (1.0, [True, True, True]),  # top_p = 1 keeps all
    ],
)
def test_nucleus_mask_hand(top_p, keep):
    """probs softmax(log [0.5, 0.3, 0.2]) = [0.5, 0.3, 0.2]; mass before each sorted token = [0, 0.5, 0.8];
    keep while mass before < top_p."""
    assert nucleus_mask(P.log(), top_p).tolist() == keep


def test_nucleus_mask_unsorted_and_batched():
    """Vocabulary order must not matter: probs [0.2, 0.5, 0.3] with top_p 0.6 keep ids {1, 2};
    a second row [0.1, 0.1, 0.8] keeps only id 2 (0.8 >= 0.6). Shape [2, 1, 3] (B, T, V)."""
    z = torch.tensor([[[0.2, 0.5, 0.3]], [[0.1, 0.1, 0.8]]]).log()
    out = nucleus_mask(z, 0.6)
    assert out.dtype == torch.bool and out.shape == (2, 1, 3)
    assert out.tolist() == [[[False, True, True]], [[False, False, True]]]


def test_nucleus_mask_top_p_one_is_all_true_even_with_minus_inf():
    """top_p >= 1: everything kept (no softmax computed)."""
    z = torch.tensor([0.0, NEG_INF, 3.0])
    assert nucleus_mask(z, 1.0).all()


def test_nucleus_mask_bf16_input():
    """bf16 logits go through fp32 softmax: same as fp32 for log [0.5, 0.3, 0.2] at top_p 0.6."""
    assert nucleus_mask(P.log().to(torch.bfloat16), 0.6).tolist() == [True, True, False]


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.9, 0.99])
def test_nucleus_mask_shortcut_equals_full_sort(top_p):
    """Ranking only the 4 most probable tokens (when they hold top_p of the mass) or sorting all of them (when some row's
    top 4 do not: the fallback) gives the same mask as ranking everything; peaked and flat rows mixed."""
    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(3, 50, generator=g) * 4, torch.randn(2, 50, generator=g) * 0.1])
    full = nucleus_mask(z, top_p, candidates=50)
    assert torch.equal(nucleus_mask(z, top_p, candidates=4), full)
    assert torch.equal(nucleus_mask(z[:3], top_p, candidates=4), full[:3])


# ----------------------------------------------------------------------------------------------
# log_pi_star
# ----------------------------------------------------------------------------------------------


def test_log_pi_star_alpha0_top_p_hand():
    """alpha = 0 -> pi* = softmax(z+) = [0.2, 0.5, 0.3]; top_p = 0.6 keeps ids {1, 2}:
    renormalised [0, 0.5/0.8, 0.3/0.8] = [0, 0.625, 0.375] -> log = [-inf, ln 0.625, ln 0.375]."""
    zp = torch.tensor([0.2, 0.5, 0.3]).log()
    out = log_pi_star(zp, torch.zeros(3), alpha=0.0, top_p=0.6)
    assert_close(out, torch.tensor([NEG_INF, math.log(0.625), math.log(0.375)]))


def test_log_pi_star_alpha1_top_p_hand():
    """z+ = log [0.2, 0.5, 0.3], z0 = z+ + [0, 0, ln 2], alpha = 1:
    z* = 2 z+ - z0 = z+ - [0, 0, ln 2] -> unnormalised [0.2, 0.5, 0.15].
    Nucleus of softmax(z+) (not of z*) at top_p 0.6 = ids {1, 2} -> [0, 0.5, 0.15] / 0.65 = [0, 10/13, 3/13].
    Without the nucleus: [0.2, 0.5, 0.15] / 0.85 = [4/17, 10/17, 3/17]."""
    zp = torch.tensor([0.2, 0.5, 0.3]).log()
    zn = zp + torch.tensor([0.0, 0.0, math.log(2.0)])
    assert_close(log_pi_star(zp, zn, 1.0, 0.6), torch.tensor([NEG_INF, math.log(10 / 13), math.log(3 / 13)]))
    assert_close(log_pi_star(zp, zn, 1.0), torch.tensor([4 / 17, 10 / 17, 3 / 17]).log())


def test_log_pi_star_nucleus_is_taken_from_z_pos_not_z_star():
    """z+ = log [0.6, 0.3, 0.1], z0 = [0, 5, 0], alpha = 1 -> z* = [2 ln .6, 2 ln .3 - 5, 2 ln .1] puts little
    mass on id 1, but the nucleus (top_p 0.7) is {0, 1} from softmax(z+): id 2 is -inf, id 1 finite."""
    zp = torch.tensor([0.6, 0.3, 0.1]).log()
    out = log_pi_star(zp, torch.tensor([0.0, 5.0, 0.0]), 1.0, 0.7)
    assert torch.isfinite(out[:2]).all() and out[2] == NEG_INF
    zs = 2 * zp[:2] - torch.tensor([0.0, 5.0])
    assert_close(out[:2], torch.log_softmax(zs, -1))


@pytest.mark.parametrize("alpha, top_p", [(0.0, 1.0), (1.0, 1.0), (2.5, 0.9), (1.0, 0.3)])
def test_log_pi_star_normalised(alpha, top_p):
    """logsumexp(log pi*) = 0 on every row; -inf exactly outside the nucleus; fp32 output for bf16 input."""
    g = torch.Generator().manual_seed(0)
    zp = (torch.randn(2, 4, 7, generator=g) * 2).to(torch.bfloat16)
    zn = (torch.randn(2, 4, 7, generator=g) * 2).to(torch.bfloat16)
    out = log_pi_star(zp, zn, alpha, top_p)
    assert out.dtype == torch.float32
    assert_close(out.logsumexp(-1), torch.zeros(2, 4), atol=1e-6, rtol=0)
    keep = nucleus_mask(zp, top_p)
    assert torch.isfinite(out[keep]).all()
    assert (out[~keep] == NEG_INF).all()


# ----------------------------------------------------------------------------------------------
# token_rewards
# ----------------------------------------------------------------------------------------------


def test_token_rewards_hand():
    """beta = 0.1, logp* = [-1, -2, -0.5], logp_ref = [-1.5, -1, -0.5] -> 0.1 * [0.5, -1, 0] = [0.05, -0.1, 0]."""
    r = token_rewards(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5]), 0.1)
    assert_close(r, torch.tensor([0.05, -0.1, 0.0]))


def test_zero_reward_when_principle_changes_nothing():
    """z+ = z0 and alpha anything -> z* = z0 -> pi* = pi_ref -> r = 0 (top_p = 1)."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 5, 6, generator=g)
    tok = torch.randint(0, 6, (2, 5), generator=g)
    out = estimate(z, z.clone(), tok, alpha=1.7, chunk_size=2)
    assert_close(token_rewards(out["logp_star"], out["logp_ref"], 0.1), torch.zeros(2, 5), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# estimate (chunked) == naive
# ----------------------------------------------------------------------------------------------


def _naive(zp, zn, tok, alpha, top_p):
    full = log_pi_star(zp, zn, alpha, top_p)
    star = full.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    ref = torch.log_softmax(zn.float(), -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    return star, ref, full


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    B, T, V = 2, 7, 11
    zp = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    zn = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    tok = torch.randint(0, V, (B, T), generator=g)
    return zp, zn, tok


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 50])
@pytest.mark.parametrize(
    "alpha, top_p, dtype",
    [(0.0, 1.0, torch.float32), (1.0, 1.0, torch.bfloat16), (0.5, 0.8, torch.float32), (0.5, 0.8, torch.bfloat16)],
)
def test_estimate_matches_naive(chunk_size, alpha, top_p, dtype):
    """Chunk sizes 1, 3, T = 7 and > T give the unchunked result (incl. -inf at sampled tokens outside the
    nucleus) and the full [B, T, V] distill target with keep_full; without keep_full no full tensor."""
    zp, zn, tok = _inputs(dtype)
    star, ref, full = _naive(zp, zn, tok, alpha, top_p)
    out = estimate(zp, zn, tok, alpha, top_p, chunk_size=chunk_size, keep_full=True)
    assert set(out) == {"logp_star", "logp_ref", "logp_star_full"}
    for k in out:
        assert out[k].dtype == torch.float32
    assert_close(out["logp_star"], star, rtol=0, atol=0)
    assert_close(out["logp_ref"], ref, rtol=0, atol=0)
    assert_close(out["logp_star_full"], full, rtol=0, atol=0)
    out2 = estimate(zp, zn, tok, alpha, top_p, chunk_size=chunk_size)
    assert set(out2) == {"logp_star", "logp_ref"}
    assert_close(out2["logp_star"], star, rtol=0, atol=0)
    if top_p < 1.0:
        assert (out["logp_star_full"] == NEG_INF).any()


def test_estimate_hand_one_position():
    """B = T = 1, V = 3, z+ = log [0.2, 0.5, 0.3], z0 = z+ + [0, 0, ln 2], alpha 1, top_p 0.6, token 2:
    log pi*(2) = ln 3/13 (see test_log_pi_star_alpha1_top_p_hand); log pi_ref(2) = ln (0.3*2 / 1.3) = ln 6/13
    -> r = beta (ln 3/13 - ln 6/13) = -beta ln 2."""
    zp = torch.tensor([[[0.2, 0.5, 0.3]]]).log()
    zn = zp + torch.tensor([0.0, 0.0, math.log(2.0)])
    out = estimate(zp, zn, torch.tensor([[2]]), 1.0, 0.6)
    assert_close(out["logp_star"], torch.tensor([[math.log(3 / 13)]]))
    assert_close(out["logp_ref"], torch.tensor([[math.log(6 / 13)]]))
    assert_close(token_rewards(out["logp_star"], out["logp_ref"], 0.1), torch.tensor([[-0.1 * math.log(2.0)]]))


def test_estimate_shape_mismatch_raises():
    zp, zn, tok = _inputs()
    with pytest.raises(ValueError):
        estimate(zp, zn[..., :-1], tok, 1.0)  # V differs
    with pytest.raises(ValueError):
        estimate(zp, zn[:, :-1], tok, 1.0)  # T differs between z+ and z0
    with pytest.raises(ValueError):
        estimate(zp, zn, tok[:, :-1], 1.0)  # tokens T differs
    with pytest.raises(ValueError):
        estimate(zp, zn, tok[:1], 1.0)  # tokens B differs
    with pytest.raises(ValueError):
        estimate(zp, zn, tok, 1.0, chunk_size=0)


def test_estimate_no_grad_needed_and_no_graph():
    """The estimator runs under no_grad in training; with plain tensors the outputs carry no graph."""
    zp, zn, tok = _inputs()
    out = estimate(zp, zn, tok, 1.0, 0.9, chunk_size=3, keep_full=True)
    assert not any(v.requires_grad for v in out.values())


def test_nucleus_mask_shortcut_at_the_boundary():
    """Prefix sums that meet top_p exactly: the shortcut (3 candidates) keeps what the full sort keeps (row 0); among equal
    probabilities at the cut (row 1) the same number of tokens and the same mass (which of the ties may differ)."""
    p = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125], [0.1] * 5 + [0.5]])
    for top_p in (0.75, 0.875, 0.5, 0.6):
        fast, full = nucleus_mask(p.log(), top_p, candidates=3), nucleus_mask(p.log(), top_p, candidates=100)
        assert torch.equal(fast[0], full[0])
        assert torch.equal(fast.sum(-1), full.sum(-1)) and torch.allclose((p * fast).sum(-1), (p * full).sum(-1))


def test_without_repeats_hand():
    """Answer 5 6 7 5 6 | ?: with n = 3, at t = 5 the prefix ends in "5 6", which was followed by 7 -> 7 is banned and
    the rest renormalised; with n = 2, at t = 4 the prefix ends in "5", followed by 6 -> 6 banned; earlier positions
    and an unbanned row are unchanged."""
    V, T = 8, 6
    logp = torch.log_softmax(torch.arange(2 * T * V, dtype=torch.float32).reshape(2, T, V).sin(), dim=-1)
    tokens = torch.tensor([[5, 6, 7, 5, 6, 1], [1, 2, 3, 4, 5, 6]])
    out = without_repeats(logp, tokens, 3)
    assert out[0, 5, 7] == float("-inf")
    keep = torch.arange(V) != 7
    assert_close(out[0, 5, keep], logp[0, 5, keep] - math.log(1.0 - logp[0, 5, 7].exp().item()))
    assert_close(out[0, :5], logp[0, :5])
    assert_close(out[1], logp[1])  # no repeated 2-gram prefix in row 1
    out2 = without_repeats(logp, tokens, 2)
    assert out2[0, 4, 6] == float("-inf") and out2[0, 5, 7] == float("-inf")  # "5" -> 6 at t=4, "6" -> 7 at t=5
    assert bool(torch.isfinite(out2[0, :4]).all())
    assert_close(out2[0, 4].exp().sum(), torch.tensor(1.0))
    assert without_repeats(logp, tokens, 0) is logp

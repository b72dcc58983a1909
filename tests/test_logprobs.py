"""Chunked log-probs and KLs (iqstar_lite/algorithm/logprobs.py) against naive full-tensor versions.

The chunked functions must be numerically the naive ``log_softmax(logits.float()).gather(tokens)`` /
``sum_v p (log p - log q)``, with identical gradients (the autograd path recomputes each chunk in
backward via activation checkpointing), fp32 output for any input dtype, and ValueError on bad shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from iqstar_lite.algorithm.logprobs import chunked_over_time, kl_between_logits, kl_to_logits, token_logprobs

B, T, V = 2, 20, 13
CHUNKS = [1, 3, 16, 100]


def _logits(dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, V, generator=g) * scale).to(dtype)


def _tokens(seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed + 100))


def _naive_logprobs(logits, tokens):
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _naive_kl(target_logp, logits):
    """KL(p || q) via F.kl_div on probabilities (xlogy: p = 0 contributes 0)."""
    logq = torch.log_softmax(logits.float(), -1)
    return F.kl_div(logq, target_logp.float().exp(), reduction="none").sum(-1)


# ----------------------------------------------------------------------------------------------
# token_logprobs
# ----------------------------------------------------------------------------------------------


def test_token_logprobs_hand():
    """logits [[0, 0, ln 2]] (probs [1/4, 1/4, 1/2]), tokens [2, 0] at two positions -> [ln 1/2, ln 1/4]."""
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)], [0.0, 0.0, math.log(2.0)]]])
    out = token_logprobs(logits, torch.tensor([[2, 0]]), chunk_size=1)
    assert_close(out, torch.tensor([[math.log(0.5), math.log(0.25)]]))


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_logprobs_matches_naive(chunk_size, dtype):
    """Random logits (fp32 / bf16 / fp16 in) -> fp32 out, bit-equal to the unchunked fp32 log_softmax gather."""
    logits, tokens = _logits(dtype), _tokens()
    out = token_logprobs(logits, tokens, chunk_size=chunk_size)
    assert out.dtype == torch.float32 and out.shape == (B, T)
    assert_close(out, _naive_logprobs(logits, tokens), rtol=0, atol=0)


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_grad_matches_naive(chunk_size, dtype):
    """Gradient w.r.t. the logits (in their own dtype) through the checkpointed chunks equals the naive one."""
    tokens = _tokens()
    w = torch.randn(B, T, generator=torch.Generator().manual_seed(5))
    a = _logits(dtype).requires_grad_()
    b = _logits(dtype).requires_grad_()
    (token_logprobs(a, tokens, chunk_size) * w).sum().backward()
    (_naive_logprobs(b, tokens) * w).sum().backward()
    assert a.grad.dtype == dtype
    assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_token_logprobs_grad_analytic():
    """d/dz sum_t log softmax(z_t)[y_t] = onehot(y_t) - softmax(z_t)."""
    logits, tokens = _logits().requires_grad_(), _tokens()
    token_logprobs(logits, tokens, chunk_size=3).sum().backward()
    expected = F.one_hot(tokens, V).float() - torch.softmax(logits.detach(), -1)
    assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)


def test_token_logprobs_uses_checkpointing_under_autograd(monkeypatch):
    """With autograd on, every chunk goes through torch.utils.checkpoint (so fp32 [t, V] chunks are recomputed
    in backward, not stored); under no_grad, or with no input requiring grad, checkpoint is not used."""
    import iqstar_lite.algorithm.logprobs as lp

    calls = []
    real = lp.checkpoint

    def spy(fn, *args, **kw):
        calls.append(args[0].shape[1])
        return real(fn, *args, **kw)

    monkeypatch.setattr(lp, "checkpoint", spy)
    logits, tokens = _logits().requires_grad_(), _tokens()
    token_logprobs(logits, tokens, chunk_size=8).sum().backward()
    assert calls == [8, 8, 4]
    calls.clear()
    with torch.no_grad():
        token_logprobs(logits, tokens, chunk_size=8)
    token_logprobs(logits.detach(), tokens, chunk_size=8)
    assert calls == []


def test_token_logprobs_masked_logit_garbage_does_not_leak():
    """Huge finite / -inf policy logits at one position: other positions' log-probs and grads are unchanged
    (positions are independent rows)."""
    tokens = _tokens()
    clean = _logits()
    dirty = clean.clone()
    dirty[0, 5, :3] = torch.tensor([1e30, float("-inf"), -1e30])
    a, b = clean.clone().requires_grad_(), dirty.clone().requires_grad_()
    la, lb = token_logprobs(a, tokens, 3), token_logprobs(b, tokens, 3)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, 5] = False
    assert_close(la[keep], lb[keep])
    (la * keep).sum().backward()
    (lb * keep).sum().backward()
    assert_close(a.grad, b.grad)
    assert (b.grad[0, 5] == 0).all()


def test_token_logprobs_shape_errors():
    logits, tokens = _logits(), _tokens()
    with pytest.raises(ValueError):
        token_logprobs(logits[0], tokens[0])  # [T, V] instead of [B, T, V]
    with pytest.raises(ValueError):
        token_logprobs(logits, tokens[:, :-1])  # T differs
    with pytest.raises(ValueError):
        token_logprobs(logits, tokens[:1])  # B differs
    with pytest.raises(ValueError):
        token_logprobs(logits, tokens.unsqueeze(-1))  # tokens [B, T, 1]
    with pytest.raises(ValueError):
        token_logprobs(logits, tokens, chunk_size=0)
    with pytest.raises(ValueError):
        token_logprobs(logits, tokens, chunk_size=-3)


def test_token_logprobs_empty_time():
    """T = 0 -> an empty [B, 0] fp32 tensor."""
    out = token_logprobs(torch.zeros(2, 0, 5, dtype=torch.bfloat16), torch.zeros(2, 0, dtype=torch.long))
    assert out.shape == (2, 0) and out.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# chunked_over_time (memory shape)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size, sizes", [(1, [1] * 7), (3, [3, 3, 1]), (7, [7]), (100, [7])])
def test_chunked_over_time_never_sees_more_than_chunk(chunk_size, sizes):
    """fn only ever receives [B, <= chunk_size, ...] slices covering T = 7 in order; results concatenated."""
    seen = []

    def fn(x, y):
        seen.append((x.shape, y.shape))
        return x.float().sum(-1) + y

    x = torch.arange(2 * 7 * 4).reshape(2, 7, 4)
    y = torch.ones(2, 7)
    out = chunked_over_time(fn, x, y, chunk_size=chunk_size)
    assert [s[0][1] for s in seen] == sizes
    assert all(s[0] == (2, n, 4) and s[1] == (2, n) for s, n in zip(seen, sizes))
    assert_close(out, x.float().sum(-1) + 1)


# ----------------------------------------------------------------------------------------------
# kl_to_logits / kl_between_logits
# ----------------------------------------------------------------------------------------------


def test_kl_to_logits_hand():
    """p = [1/2, 1/2, 0], q = [1/4, 1/4, 1/2]: KL = 1/2 ln 2 + 1/2 ln 2 + 0 = ln 2 (p = 0 contributes 0, no nan).
    Second position p = q -> 0."""
    target = torch.tensor([[[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]]]).log()
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)], [1.0, 1.0, 1.0 + math.log(2.0)]]])
    out = kl_to_logits(target, logits, chunk_size=1)
    assert_close(out, torch.tensor([[math.log(2.0), 0.0]]))


def _target_with_neg_inf(seed=1):
    """log pi* with a random third of the vocabulary at -inf (a nucleus), renormalised; every row keeps >= 1 id."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g) * 2
    drop = torch.rand(B, T, V, generator=g) < 0.33
    drop[..., 0] = False
    return torch.log_softmax(z.masked_fill(drop, float("-inf")), -1)


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("with_inf", [False, True])
def test_kl_to_logits_matches_naive(chunk_size, with_inf):
    target = _target_with_neg_inf() if with_inf else torch.log_softmax(_logits(seed=1), -1)
    if with_inf:
        assert torch.isinf(target).any()
    logits = _logits(seed=2)
    out = kl_to_logits(target, logits, chunk_size=chunk_size)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out >= -1e-6).all()
    assert_close(out, _naive_kl(target, logits), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_kl_to_logits_grad_with_neg_inf_target(chunk_size):
    """d/dz KL(p || softmax(z)) = softmax(z) - p: finite (no nan from the p = 0 entries) and equal to the naive grad."""
    target = _target_with_neg_inf()
    a = _logits(torch.bfloat16, seed=2).requires_grad_()
    b = _logits(torch.bfloat16, seed=2).requires_grad_()
    kl_to_logits(target, a, chunk_size=chunk_size).sum().backward()
    _naive_kl(target, b).sum().backward()
    assert torch.isfinite(a.grad).all()
    assert_close(a.grad, b.grad)
    expected = torch.softmax(a.detach().float(), -1) - target.exp()
    assert_close(a.grad.float(), expected, rtol=0, atol=1e-2)  # bf16 grad


def test_kl_to_logits_bf16_inputs():
    """bf16 target and logits -> fp32 output equal to the naive fp32 computation on the upcast inputs."""
    target = torch.log_softmax(_logits(seed=1), -1).to(torch.bfloat16)
    logits = _logits(torch.bfloat16, seed=2)
    out = kl_to_logits(target, logits, chunk_size=3)
    assert out.dtype == torch.float32
    assert_close(out, _naive_kl(target, logits), rtol=1e-5, atol=1e-6)


def test_kl_to_logits_shape_error():
    with pytest.raises(ValueError):
        kl_to_logits(_logits(), _logits()[..., :-1])
    with pytest.raises(ValueError):
        kl_to_logits(_logits(), _logits()[:, :-1])
    with pytest.raises(ValueError):
        kl_to_logits(_logits(), _logits(), chunk_size=0)


def test_kl_between_logits_zero_for_identical():
    """KL(p || p) = 0 (up to fp32 rounding), also for bf16 and for a shift by a per-row constant."""
    z = _logits()
    assert_close(kl_between_logits(z, z.clone(), chunk_size=3), torch.zeros(B, T), atol=1e-6, rtol=0)
    assert_close(kl_between_logits(z, z + 5.0, chunk_size=3), torch.zeros(B, T), atol=1e-5, rtol=0)
    zb = z.to(torch.bfloat16)
    assert_close(kl_between_logits(zb, zb, chunk_size=7), torch.zeros(B, T), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_kl_between_logits_matches_naive(chunk_size):
    p, q = _logits(seed=3), _logits(seed=4)
    out = kl_between_logits(p, q, chunk_size=chunk_size)
    assert out.dtype == torch.float32
    naive = _naive_kl(torch.log_softmax(p, -1), q)
    assert_close(out, naive, rtol=1e-5, atol=1e-6)
    assert (out > 0).all()


def test_kl_between_logits_hand_and_grads():
    """p = softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2], q = uniform:
    KL = 2 * 1/4 ln(3/4) + 1/2 ln(3/2) = 1/2 ln(3/4) + 1/2 ln(3/2) = 1/2 ln(9/8) = 0.058892.
    Gradients flow to both sides and match the naive version."""
    p = torch.tensor([[[0.0, 0.0, math.log(2.0)]]], requires_grad=True)
    q = torch.zeros(1, 1, 3, requires_grad=True)
    out = kl_between_logits(p, q)
    assert_close(out, torch.tensor([[0.5 * math.log(9 / 8)]]))
    out.sum().backward()
    p2, q2 = p.detach().clone().requires_grad_(), q.detach().clone().requires_grad_()
    _naive_kl(torch.log_softmax(p2, -1), q2).sum().backward()
    assert_close(p.grad, p2.grad)
    assert_close(q.grad, q2.grad)


def test_kl_between_logits_shape_error():
    with pytest.raises(ValueError):
        kl_between_logits(_logits(), _logits()[..., :-1])

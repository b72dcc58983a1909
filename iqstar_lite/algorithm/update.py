"""One policy update: ``loss.epochs`` optimizer steps over a rollout batch, each group of rows with its loss (``LOSSES``:
distill / pg / imitation), micro-batched with token-weighted gradient accumulation (also across data-parallel processes).
Called by ``train.train`` once per step; the losses themselves are pure tensor functions in ``loss.py``."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from iqstar_lite.algorithm.logprobs import kl_to_logits, token_logprobs
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
from iqstar_lite.algorithm.rollout import pack, response_logits
from iqstar_lite.config import RecipeConfig
from iqstar_lite.models.bnb import assert_trainable_layout

log = logging.getLogger("iqstar_lite")


@dataclass
class Guided:
    """Responses sampled from pi-hat* itself (``rollout.guided_samples``), with their estimator pass (``keep_full``):
    trained with the distill loss KL(pi-hat* || pi_theta) over the vocabulary on the states pi-hat* visits."""

    plain_ids: list[list[int]]
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    est: dict[str, torch.Tensor]


@dataclass
class LossGroup:
    """Rows an update trains with one loss: contexts, responses, token weights (response mask x position weights),
    estimator outputs and, for ``pg``, the advantages."""

    loss: str
    """A key of ``LOSSES``."""
    context_ids: list[list[int]]
    response_ids: torch.Tensor
    weights: torch.Tensor
    est: dict[str, torch.Tensor]
    advantages: torch.Tensor | None = None


def _distill(*, logits, logp, est, mask, chunk, **_):
    loss, met = distill_loss(kl_to_logits(est["logp_star_full"], logits, chunk), mask)
    met["kl"] = masked_mean(k3_kl(logp.detach(), est["logp_ref"]), mask).item()
    return loss, met


def _pg(*, logp, logp_old, est, adv, mask, kl_coef, lc, **_):
    return pg_loss(logp, logp_old, est["logp_ref"], adv, mask, kl_coef, lc.clip_eps, whiten_advantages=False)


def _imitation(*, logp, est, mask, lc, **_):
    return imitation_loss(logp, est["logp_ref"], est["rewards"], mask, lc.beta)


LOSSES = {"distill": _distill, "pg": _pg, "imitation": _imitation}
"""``loss.type`` -> the micro-batch loss: (loss, metrics) from the policy's logits / log-probs and the group's slice."""


def update(
    model,
    cfg: RecipeConfig,
    plain_ids,
    resp,
    mask,
    est,
    pad_id,
    params,
    optimizer,
    scheduler,
    accelerator,
    logp_sampled: torch.Tensor | None = None,
    guided: Guided | None = None,
    forward_model=None,
) -> dict:
    """``loss.epochs`` optimizer steps over one rollout batch, micro-batched with token-weighted accumulation.

    ``logp_sampled``: [N, T] log pi of the policy at the sampled tokens, recorded by the rollout (needed by
    ``loss.kl_in_advantage``). ``guided``: pi-hat*'s own samples, trained with ``distill`` beside the on-policy rows
    (``loss.type``); every token of both groups weighs the same, or, with ``loss.position_halflife`` > 0, by its
    position (``loss.position_weights``; the loss, kl and clip_frac metrics are then weighted means too).

    Data-parallel (``accelerator.num_processes`` > 1): each process holds a slice of the step's batch and
    ``forward_model`` is the DDP-wrapped model, whose backward averages the LoRA gradients over processes (once per
    optimizer step: the other micro-batches run under ``no_sync``). Token weights use the global token count, so the
    update equals the one-process update of the whole batch (``tests/test_distributed.py``)."""
    fwd = model if forward_model is None else forward_model
    world = accelerator.num_processes
    all_sum = (lambda t: accelerator.reduce(t, "sum")) if world > 1 else None
    lc, chunk = cfg.loss, cfg.train.logprob_chunk
    if (
        lc.type != "distill" and not torch.isfinite(est["rewards"][mask > 0]).all()
    ):  # would turn every gradient into nan
        raise RuntimeError(
            "non-finite token rewards (pi* = 0 for a sampled token?); the pg / imitation losses need estimator.top_p=1.0"
        )
    adv, kl_coef = est["rewards"], lc.beta
    if lc.type == "pg" and lc.kl_in_advantage:
        if logp_sampled is None:
            raise ValueError("loss.kl_in_advantage needs the rollout's log-probs (logp_sampled)")
        adv, kl_coef = kl_shaped_advantages(adv, logp_sampled, est["logp_ref"], lc.beta), 0.0
    if lc.type == "pg" and lc.whiten:  # pg only; batch-wide (global batch across processes)
        adv = whiten(adv, mask, all_sum=all_sum)
    groups = [LossGroup(lc.type, plain_ids, resp, position_weights(mask, lc.position_halflife), est, adv)]
    if guided is not None and guided.response_ids.shape[0]:
        groups.append(
            LossGroup(
                "distill",
                guided.plain_ids,
                guided.response_ids,
                position_weights(guided.response_mask, lc.position_halflife),
                guided.est,
            )
        )
    total_tokens = sum(g.weights.sum() for g in groups).reshape(1).float()
    if all_sum is not None:  # DDP averages gradients over processes: weigh by the global count, times the world size
        total_tokens = all_sum(total_tokens)
    total_tokens = total_tokens.clamp(min=1.0) / world
    g_totals = [g.weights.sum().reshape(1).float() for g in groups]
    if all_sum is not None:
        g_totals = [all_sum(t) / world for t in g_totals]
    micro = [(gi, s) for gi, g in enumerate(groups) for s in range(0, g.response_ids.shape[0], cfg.train.micro_batch)]
    logp_old: dict[tuple[int, int], torch.Tensor] = {}
    sums = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "nonfinite_skipped": 0}
    if len(groups) > 1:
        sums["kl_star_guided"] = 0.0
    model.train()
    assert_trainable_layout(model)
    for epoch in range(lc.epochs):
        finite = True
        for k, (gi, s) in enumerate(micro):
            g = groups[gi]
            n, T = g.response_ids.shape
            g_tokens = g_totals[gi].clamp(min=1.0)
            sl = slice(s, min(n, s + cfg.train.micro_batch))
            with (
                accelerator.no_sync(fwd) if k + 1 < len(micro) else nullcontext()
            ):  # one gradient all-reduce per optimizer step
                m, r = g.weights[sl], g.response_ids[sl]
                # packed, not rollout.shared_context_logits: sharing the K samples' prefill measured 1.08-1.12x slower here
                # (SmolLM2, micro-batch 4 on CPU: two smaller GEMMs and two dequantizations per layer cost more than the saved rows)
                logits = response_logits(fwd, pack(g.context_ids[sl], r, pad_id), T)
                logp = token_logprobs(logits, r, chunk)
                if epoch == 0:
                    logp_old[gi, s] = logp.detach()
                loss, met = LOSSES[g.loss](
                    logits=logits,
                    logp=logp,
                    logp_old=logp_old[gi, s],
                    est={key: v[sl] for key, v in g.est.items()},
                    adv=None if g.advantages is None else g.advantages[sl],
                    mask=m,
                    kl_coef=kl_coef,
                    lc=lc,
                    chunk=chunk,
                )
                w = float(m.sum() / total_tokens)
                finite = finite and bool(torch.isfinite(loss))
                accelerator.backward(loss * w)
                sums["loss"] += loss.item() * w / lc.epochs
                sums["kl"] += met["kl"] * w / lc.epochs
                sums["clip_frac"] += met["clip_frac"] * w / lc.epochs
                if gi == 1:
                    sums["kl_star_guided"] += loss.item() * float(m.sum() / g_tokens) / lc.epochs
        grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
        sums["grad_norm"] += float(grad_norm) / lc.epochs
        if all_sum is not None:  # every process takes the same decision, or the LoRA replicas would drift apart
            finite = bool(all_sum(torch.tensor([float(not finite)], device=accelerator.device)).item() == 0)
        if finite and bool(torch.isfinite(grad_norm)):
            optimizer.step()
        else:  # a nan / inf loss or gradient would poison the adapter and AdamW's moments: this optimizer step is skipped
            sums["nonfinite_skipped"] += 1
            log.warning("non-finite loss or gradient (grad norm %s): optimizer step skipped", float(grad_norm))
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return sums

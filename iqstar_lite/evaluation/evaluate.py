"""Before/after evaluation on held-out prompts with the principle absent (spec, last section).

- principle score: mean_t [log pi_ref(y_t | P, s_t) - log pi_ref(y_t | s_t)] of the model's greedy answer,
- KL(pi_theta || pi_ref) per token on the same answers,
- a task judge (language id / refusal detector), per kind of prompt (harmful / benign),
- decode-time reference row: principle-contrastive greedy decoding of the untrained model (pi-hat*'s greedy answers),
- convergence: KL(pi-hat* || pi_theta) per token, teacher-forced on pi-hat*'s greedy answers,
- degeneration: word repetition, near copies (repeats with one word changed), loop rate (answers that repeat
  themselves), mean length (the text measures: ``measures.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from iqstar_lite.algorithm.estimator import log_pi_star
from iqstar_lite.algorithm.logprobs import chunked_over_time, kl_rows
from iqstar_lite.algorithm.reference import adapters_are_identity, reference_mode
from iqstar_lite.algorithm.rollout import (
    eval_mode,
    model_eos_ids,
    pack,
    response_logits,
    response_mask,
    sample,
    shared_context_logits,
)
from iqstar_lite.algorithm.scoring import PassSettings, estimator_pass
from iqstar_lite.config import RecipeConfig
from iqstar_lite.data.formatting import Formatter
from iqstar_lite.data.sources import Example
from iqstar_lite.evaluation.measures import common_prefix, loops, near_copy, repetition
from iqstar_lite.models.bnb import dense_weights


def contrastive_generate(
    model, tokenizer, cond: list[str], plain: list[str], alpha: float, max_new_tokens: int
) -> torch.Tensor:
    """Greedy principle-contrastive decoding of the reference (pi-hat*'s greedy answers): ``rollout.sample`` with ``contrast``."""
    return sample(
        model,
        tokenizer,
        plain,
        max_new_tokens=max_new_tokens,
        greedy=True,
        contrast=cond,
        alpha=alpha,
        guided_reference=True,
    ).response_ids


def _target_measures(alpha: float):
    """What the contrastive row scores on pi-hat*'s path, from the decoding loop's own z+ / z0 (``sample(observe=...)``):
    the principle gap log pi_ref(y|P,s) - log pi_ref(y|s) and KL(pi-hat* || pi_ref) per step."""

    def measure(z_pos: torch.Tensor, z_neg: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        lp_pos, lp_neg = torch.log_softmax(z_pos.float(), -1), torch.log_softmax(z_neg.float(), -1)
        gap = (lp_pos - lp_neg).gather(-1, tokens[:, None]).squeeze(-1)
        return {"principle_gap": gap, "kl_star_ref": kl_rows(log_pi_star(z_pos, z_neg, alpha), z_neg)}

    return measure


def greedy_answers(
    model,
    tokenizer,
    fmt: Formatter,
    examples: list[Example],
    max_new_tokens: int,
    eos: list[int],
    alpha: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str], dict[str, torch.Tensor] | None]:
    """Greedy answers with the principle absent (``alpha`` given: pi-hat*'s, principle-contrastive decoding), through the
    one decoding loop: (response ids [N, T], mask up to and including EOS, decoded texts, and for pi-hat*'s answers the
    per-step ``principle_gap`` / ``kl_star_ref`` [N, T] measured while decoding them)."""
    plain = [fmt.plain(e) for e in examples]
    if alpha is not None:
        roll = sample(
            model,
            tokenizer,
            plain,
            max_new_tokens=max_new_tokens,
            greedy=True,
            contrast=[fmt.conditioned(e) for e in examples],
            alpha=alpha,
            guided_reference=True,
            observe=_target_measures(alpha),
        )
    else:
        roll = sample(model, tokenizer, plain, max_new_tokens=max_new_tokens, greedy=True)
    resp = roll.response_ids
    mask = response_mask(resp, eos)
    texts = [tokenizer.decode(resp[i][mask[i].bool()], skip_special_tokens=True) for i in range(resp.shape[0])]
    return resp, mask, texts, roll.observed


def length_batches(lengths: list[int], batch_size: int, spread: float = 2.0) -> list[list[int]]:
    """Indices in batches of at most ``batch_size`` prompts of like length: sorted by length, a new batch where a prompt is
    over ``spread`` times its batch's shortest. A 500-token request beside 40-token questions would pad them all to 500
    (the out-of-distribution set: 123 s -> see bench notes). Answers do not depend on the batching beyond float noise."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if not batches or len(batches[-1]) >= batch_size or lengths[i] > spread * lengths[batches[-1][0]]:
            batches.append([])
        batches[-1].append(i)
    return batches


def _rate(scores: list[float]) -> float | None:
    return round(sum(scores) / len(scores), 4) if scores else None


@torch.no_grad()
def kl_to_target(
    model,
    plain_ids: list[list[int]],
    cond_ids: list[list[int]],
    target: torch.Tensor,
    pad_id: int,
    alpha: float,
    micro_batch: int = 8,
    chunk_size: int = 16,
) -> torch.Tensor:
    """[N, T] KL(pi-hat* || pi_theta) per position, teacher-forced on ``target`` (pi-hat*'s own greedy answers).

    The direct convergence measure: 0 when the policy is pi-hat* on the states pi-hat* visits (where greedy
    evaluation goes). pi-hat* comes from the reference (adapters off) with / without the principle, as in training.
    Adapters at identity (before training): pi_theta is the reference without the principle, no policy forward.
    """
    identity = adapters_are_identity(model)
    parts = []
    with eval_mode(model):
        for s in range(0, target.shape[0], micro_batch):
            sl = slice(s, s + micro_batch)
            m, tgt = len(plain_ids[sl]), target[sl]
            with reference_mode(model):
                z = shared_context_logits(model, cond_ids[sl] + plain_ids[sl], torch.cat([tgt, tgt]), pad_id)
            z_pos, z_neg = z[:m], z[m:]
            pol = z_neg if identity else response_logits(model, pack(plain_ids[sl], tgt, pad_id), tgt.shape[1])
            parts.append(
                chunked_over_time(
                    lambda zp, zn, zq: kl_rows(log_pi_star(zp, zn, alpha), zq), z_pos, z_neg, pol, chunk_size=chunk_size
                )
            )
    return torch.cat(parts)


def _ids(tokens: list[int], width: int, pad_id: int) -> list[int]:
    return tokens + [pad_id] * (width - len(tokens))


def evaluate(
    model,
    tokenizer,
    fmt: Formatter,
    examples: list[Example],
    cfg: RecipeConfig,
    judge: Callable[[str], float] | None,
    contrastive: bool = False,
    target: list[list[int]] | None = None,
    target_kl_ref: list[float] | None = None,
) -> dict:
    """Greedy answers without the principle (or, ``contrastive``, pi-hat*'s: contrastive decoding with it), then scores.

    ``target``: pi-hat*'s greedy answers (token ids per example, from the contrastive row's ``response_ids``) for the
    convergence measure ``kl_to_target``; the contrastive row is that target itself (0). ``target_kl_ref``: the
    contrastive row's per-answer ``kl_star_ref`` (KL(pi-hat* || pi_ref) on those answers, measured while decoding
    them): while the adapters are at identity (pi_theta = pi_ref) that *is* ``kl_to_target``, so no pass recomputes it.

    Passes per row: the contrastive row takes its principle score and ``kl_star_ref`` from the decoding loop's own
    logits; the others score their answers with the reference with / without the principle, stacked (plus the policy,
    which shares the plain reference logits for KL(pi_theta || pi_ref), once trained), then pi-hat*'s answers.
    """
    t0 = time.time()
    bs, ec = cfg.eval.batch_size, cfg.eval
    eos, pad = model_eos_ids(model, tokenizer), tokenizer.pad_token_id
    identity = adapters_are_identity(model)
    scoring = PassSettings.from_recipe(cfg, source="ref", top_p=1.0)  # the principle score is the reference's own
    records: list[dict | None] = [None] * len(examples)
    with dense_weights(model):  # 4-bit layers dequantized once per row (CPU): decoding and scoring passes
        for idx in length_batches([len(fmt.ids(fmt.plain(e))) for e in examples], bs):
            chunk = [examples[i] for i in idx]
            plain = [fmt.plain(e) for e in chunk]
            resp, mask, texts, seen = greedy_answers(
                model, tokenizer, fmt, chunk, ec.max_new_tokens, eos, cfg.estimator.alpha if contrastive else None
            )
            plain_ids = [fmt.ids(p) for p in plain]
            cond_ids = [fmt.ids(fmt.conditioned(e)) for e in chunk]
            if (
                contrastive
            ):  # the reference with and without the principle on pi-hat*'s path: the decoding loop had both
                gap = seen["principle_gap"]
            else:
                est = estimator_pass(model, plain_ids, cond_ids, resp, pad, scoring, policy_kl=not identity)
                gap = est["principle_gap"]
            # KL(pi_theta || pi_ref): exactly 0 while the adapters are at identity (before training; contrastive row)
            kl_ref = torch.zeros_like(gap) if identity or contrastive else est["kl_policy_ref"]
            kl_target = None  # KL(pi-hat* || pi_theta) per answer of the chunk, on pi-hat*'s answer to the same prompt
            if target is not None and not contrastive:
                if identity and target_kl_ref is not None:
                    kl_target = [target_kl_ref[j] for j in idx]
                else:
                    rows = [target[j] for j in idx]
                    width = max(1, max(len(r) for r in rows))
                    tgt = torch.tensor([_ids(r, width, pad) for r in rows], dtype=torch.long, device=resp.device)
                    tmask = (
                        torch.arange(width, device=resp.device)[None]
                        < torch.tensor([len(r) for r in rows], device=resp.device)[:, None]
                    ).float()
                    kl = kl_to_target(
                        model,
                        plain_ids,
                        cond_ids,
                        tgt,
                        pad,
                        cfg.estimator.alpha,
                        cfg.train.micro_batch,
                        cfg.train.logprob_chunk,
                    )
                    kl_target = ((kl * tmask).sum(1) / tmask.sum(1).clamp(min=1.0)).tolist()
            for i, ex in enumerate(chunk):
                m = mask[i]
                n_tok = max(float(m.sum()), 1.0)
                kept, text = resp[i][m.bool()], texts[i]
                rec = {
                    "prompt": ex.text,
                    "kind": ex.kind,
                    "response": text,
                    "tokens": int(m.sum()),
                    "principle_score": float((gap[i] * m).sum() / n_tok),
                    "kl_per_token": float((kl_ref[i] * m).sum() / n_tok),
                    "judge": judge(text) if judge else None,
                    "repetition": round(repetition(text), 4),
                    "near_copy": round(near_copy(text), 4),
                    "loops": loops(text),
                }
                if kl_target is not None:
                    rec["kl_to_target"] = float(kl_target[i])
                    rec["target_prefix"] = common_prefix(kept.tolist(), target[idx[i]])
                elif contrastive:
                    rec["kl_to_target"], rec["target_prefix"] = 0.0, int(m.sum())
                if contrastive:
                    rec["kl_star_ref"] = float((seen["kl_star_ref"][i] * m).sum() / n_tok)
                    rec["response_ids"] = kept.tolist()
                records[idx[i]] = rec
    summary = {
        "n": len(records),
        "principle_score": _rate([r["principle_score"] for r in records]),
        "kl_per_token": _rate([r["kl_per_token"] for r in records]),
        "kl_to_target": _rate([r["kl_to_target"] for r in records if "kl_to_target" in r]),
        "kl_star_ref": _rate([r["kl_star_ref"] for r in records if "kl_star_ref" in r]),
        "target_prefix": _rate([r["target_prefix"] for r in records if "target_prefix" in r]),
        "judge": getattr(judge, "__name__", None),
        "judge_rate": _rate([r["judge"] for r in records if r["judge"] is not None]),
        "mean_tokens": _rate([r["tokens"] for r in records]),
        "repetition": _rate([r["repetition"] for r in records]),
        "near_copy": _rate([r["near_copy"] for r in records]),
        "loop_rate": _rate([float(r["loops"]) for r in records]),
        "seconds": round(time.time() - t0, 1),
    }
    for kind in sorted({r["kind"] for r in records if r["kind"]}):
        summary[f"judge_rate_{kind}"] = _rate(
            [r["judge"] for r in records if r["kind"] == kind and r["judge"] is not None]
        )
    return {"summary": summary, "records": records}


def untrained_rows(
    model, tokenizer, fmt: Formatter, examples: list[Example], cfg: RecipeConfig, judge: Callable[[str], float] | None
) -> tuple[dict, dict]:
    """The two rows that need the adapters at identity, in the order the second needs the first: principle-contrastive
    decoding (pi-hat*'s greedy answers: the reference row, and the trajectories of every row's KL(pi-hat* || pi_theta)),
    then the untrained model, whose KL(pi-hat* || pi_theta) is what contrastive decoding measured as it decoded (pi_theta
    = pi_ref). Training's before-rows and ``iqstar-lite eval`` both come from here."""
    cd = evaluate(model, tokenizer, fmt, examples, cfg, judge, contrastive=True)
    before = evaluate(
        model,
        tokenizer,
        fmt,
        examples,
        cfg,
        judge,
        target=target_ids(cd),
        target_kl_ref=[r["kl_star_ref"] for r in cd["records"]],
    )
    return cd, before


def target_ids(contrastive_row: dict) -> list[list[int]]:
    """pi-hat*'s greedy answers (token ids per prompt) from the contrastive row: the ``target`` of the other rows."""
    return [r["response_ids"] for r in contrastive_row["records"]]

"""Before/after evaluation on held-out prompts with the principle absent (spec, last section).

- principle score: mean_t [log pi_ref(y_t | P, s_t) - log pi_ref(y_t | s_t)] of the model's greedy answer,
- KL(pi_theta || pi_ref) per token on the same answers,
- a task judge (language id / refusal detector), per kind of prompt (harmful / benign),
- decode-time reference row: principle-contrastive greedy decoding of the untrained model.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from iqstar_lite.config import RecipeConfig
from iqstar_lite.data import Example, Formatter
from iqstar_lite.estimator import contrastive_logits
from iqstar_lite.reference import reference_mode
from iqstar_lite.rollout import eos_token_ids, eval_mode, response_mask, sample
from iqstar_lite.scoring import estimator_pass, policy_vs_reference


@torch.no_grad()
def contrastive_generate(model, tokenizer, cond: list[str], plain: list[str], alpha: float, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding from z* = (1+alpha) z+ - alpha z0 of the reference: two contexts stacked, KV cache on."""
    n = len(plain)
    enc = tokenizer(cond + plain, return_tensors="pt", padding=True, add_special_tokens=False).to(next(model.parameters()).device)
    attn = enc["attention_mask"]
    eos = torch.tensor(eos_token_ids(model, tokenizer), device=attn.device)
    out, past, ids = [], None, enc["input_ids"]
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    done = torch.zeros(n, dtype=torch.bool, device=attn.device)
    with eval_mode(model), reference_mode(model):
        for _ in range(max_new_tokens):
            res = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = res.past_key_values
            z = res.logits[:, -1]
            nxt = contrastive_logits(z[:n], z[n:], alpha).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, tokenizer.pad_token_id), nxt)
            out.append(nxt)
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
            ids = torch.cat([nxt, nxt]).unsqueeze(1)
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
    return torch.stack(out, dim=1)


def repetition(text: str) -> float:
    """1 - distinct words / words: 0 for no repeated word, -> 1 for a loop. A degeneration check beside the judge."""
    words = text.split()
    return 1.0 - len(set(words)) / len(words) if words else 0.0


def _rate(scores: list[float]) -> float | None:
    return round(sum(scores) / len(scores), 4) if scores else None


def evaluate(
    model, tokenizer, fmt: Formatter, examples: list[Example], cfg: RecipeConfig, judge: Callable[[str], float] | None, contrastive: bool = False
) -> dict:
    """Greedy answers without the principle (or contrastive decoding with it), then scores."""
    t0 = time.time()
    bs, ec = cfg.eval.batch_size, cfg.eval
    records = []
    for s in range(0, len(examples), bs):
        chunk = examples[s : s + bs]
        plain = [fmt.plain(e) for e in chunk]
        if contrastive:
            resp = contrastive_generate(model, tokenizer, [fmt.conditioned(e) for e in chunk], plain, cfg.estimator.alpha, ec.max_new_tokens)
        else:
            resp = sample(model, tokenizer, plain, max_new_tokens=ec.max_new_tokens, greedy=True).response_ids
        mask = response_mask(resp, eos_token_ids(model, tokenizer))
        plain_ids = [fmt.ids(p) for p in plain]
        cond_ids = [fmt.ids(fmt.conditioned(e)) for e in chunk]
        est = estimator_pass(model, plain_ids, cond_ids, resp, tokenizer.pad_token_id, cfg.estimator.alpha, cfg.loss.beta,
                             micro_batch=cfg.train.micro_batch, chunk_size=cfg.train.logprob_chunk)
        pvr = policy_vs_reference(model, plain_ids, resp, tokenizer.pad_token_id, cfg.train.micro_batch, cfg.train.logprob_chunk)
        for i, ex in enumerate(chunk):
            m = mask[i]
            n_tok = max(float(m.sum()), 1.0)
            text = tokenizer.decode(resp[i][m.bool()], skip_special_tokens=True)
            records.append({
                "prompt": ex.text, "kind": ex.kind, "response": text, "tokens": int(m.sum()),
                "principle_score": float((est["principle_gap"][i] * m).sum() / n_tok),
                "kl_per_token": float((pvr["kl"][i] * m).sum() / n_tok),
                "judge": judge(text) if judge else None,
                "repetition": round(repetition(text), 4),
            })
    summary = {
        "n": len(records),
        "principle_score": _rate([r["principle_score"] for r in records]),
        "kl_per_token": _rate([r["kl_per_token"] for r in records]),
        "judge": getattr(judge, "__name__", None),
        "judge_rate": _rate([r["judge"] for r in records if r["judge"] is not None]),
        "mean_tokens": _rate([r["tokens"] for r in records]),
        "repetition": _rate([r["repetition"] for r in records]),
        "seconds": round(time.time() - t0, 1),
    }
    for kind in sorted({r["kind"] for r in records if r["kind"]}):
        summary[f"judge_rate_{kind}"] = _rate([r["judge"] for r in records if r["kind"] == kind and r["judge"] is not None])
    return {"summary": summary, "records": records}

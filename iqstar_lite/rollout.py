"""Sampling with the KV cache, and packing (context, response) pairs into left-padded batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """K sampled responses per prompt. Row i belongs to prompt ``prompt_index[i]``."""

    response_ids: torch.Tensor  # [N, T] (pad after EOS)
    response_mask: torch.Tensor  # [N, T] float: 1 up to and including the first EOS
    prompt_index: torch.Tensor  # [N]


def response_mask(response_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 for tokens up to and including the first EOS, 0 after it."""
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= response_ids == e
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).float()


def eos_token_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]


@torch.no_grad()
def sample(
    model,
    tokenizer,
    contexts: list[str],
    samples_per_prompt: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> Rollout:
    """Generate K responses per chat-formatted context with the model as it is (adapters on)."""
    device = next(model.parameters()).device
    enc = tokenizer(contexts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    was_training = model.training
    model.eval()  # cache on; dropout off. Safe for NF4 on CPU: model.disable_cpu_repack ran at load.
    try:
        out = model.generate(
            **enc,
            do_sample=not greedy,
            temperature=temperature if not greedy else None,
            top_p=top_p if not greedy else None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            num_return_sequences=1 if greedy else samples_per_prompt,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_token_ids(model, tokenizer),
            use_cache=True,
        )
    finally:
        model.train(was_training)
    resp = out[:, enc["input_ids"].shape[1] :]
    k = 1 if greedy else samples_per_prompt
    index = torch.arange(len(contexts), device=device).repeat_interleave(k)
    return Rollout(resp, response_mask(resp, eos_token_ids(model, tokenizer)), index)


def pack(context_ids: list[list[int]], response_ids: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad contexts, append responses: the last T positions are the response in every row.

    Returns input_ids, attention_mask and position_ids (counted from the first real token, as
    ``generate`` does), so scoring a sequence sees the same positions as sampling it.
    """
    n, T = response_ids.shape
    if len(context_ids) != n:
        raise ValueError(f"{len(context_ids)} contexts for {n} responses")
    width = max(len(c) for c in context_ids)
    device = response_ids.device
    ids = torch.full((n, width + T), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((n, width + T), dtype=torch.long, device=device)
    for i, c in enumerate(context_ids):
        ids[i, width - len(c) : width] = torch.tensor(c, dtype=torch.long, device=device)
        attn[i, width - len(c) :] = 1
    ids[:, width:] = response_ids
    pos = (attn.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": pos}


def response_logits(model, batch: dict[str, torch.Tensor], T: int) -> torch.Tensor:
    """Logits [N, T, V] predicting the last T tokens (only T+1 positions go through lm_head)."""
    out = model(**batch, logits_to_keep=T + 1, use_cache=False)
    return out.logits[:, :-1]

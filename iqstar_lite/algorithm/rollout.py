"""Sampling with the KV cache, and packing (context, response) pairs into left-padded batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from iqstar_lite.algorithm.estimator import contrastive_logits
from iqstar_lite.algorithm.logprobs import nucleus_mask
from iqstar_lite.data.formatting import eos_token_ids
from iqstar_lite.models.bnb import dense_weights
from iqstar_lite.models.cache import cache_kwargs, output_cache


@dataclass
class Rollout:
    """K sampled responses per prompt. Row i belongs to prompt ``prompt_index[i]``."""

    response_ids: torch.Tensor  # [N, T] (pad after EOS)
    response_mask: torch.Tensor  # [N, T] float: 1 up to and including the first EOS
    prompt_index: torch.Tensor  # [N]
    logprobs: torch.Tensor | None = (
        None  # [N, T] the model's log pi(y_t | s_t) (before temperature / top-p / min_new_tokens; 0 after EOS)
    )
    guided: torch.Tensor | None = (
        None  # [N] bool: drawn from pi-hat* (principle-contrastive) rather than from the model's own z
    )
    star_logp_full: torch.Tensor | None = None  # [N_guided, T, V] log pi-hat*(.|s_t) of the guided rows (``keep_star``)
    star_ref_logp: torch.Tensor | None = (
        None  # [N_guided, T] log softmax(z0) at the guided rows' tokens (``keep_star``)
    )
    observed: dict[str, torch.Tensor] | None = (
        None  # name -> [N_guided, T] what ``observe`` measured per step (0 after EOS)
    )


def response_mask(response_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 for tokens up to and including the first EOS, 0 after it."""
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= response_ids == e
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).float()


def model_eos_ids(model, tokenizer) -> list[int]:
    """A loaded model's end-of-turn ids (``formatting.eos_token_ids``: the one rule runtimes apply to the exported files)."""
    return eos_token_ids(
        tokenizer,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
    )


def next_token(z: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False) -> torch.Tensor:
    """One token per row from logits [N, V]: argmax, or a draw from softmax(z / temperature) within the top-p nucleus.

    The nucleus is ``logprobs.nucleus_mask`` (the one rule, shared with the estimator). The draw inverts the CDF with
    one uniform number per row (``searchsorted``); ``torch.multinomial``, which ``generate`` uses, draws V
    exponentials per row: measured 10.7 ms per token for 16 x 49k on this CPU.
    """
    if greedy:
        return z.argmax(-1)
    z = z.float() / temperature
    if top_p < 1.0:
        z = z.masked_fill(~nucleus_mask(z, top_p), float("-inf"))
    cdf = z.softmax(-1).cumsum(-1)
    u = torch.rand(z.shape[0], 1, device=z.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=z.shape[-1] - 1)


def _encode(tokenizer, contexts: list[str] | list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask from chat-formatted strings or from token-id lists."""
    if contexts and not isinstance(contexts[0], str):
        b = pack(
            [list(c) for c in contexts],
            torch.empty(len(contexts), 0, dtype=torch.long, device=device),
            tokenizer.pad_token_id,
        )
        return b["input_ids"], b["attention_mask"]
    enc = tokenizer(contexts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    return enc["input_ids"], enc["attention_mask"]


BASE_ROWS = "__base__"  # peft's per-row adapter name for "adapters off" (LoRA's mixed-batch forward)


@torch.no_grad()
def sample(
    model,
    tokenizer,
    contexts: list[str] | list[list[int]],
    samples_per_prompt: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    min_new_tokens: int | None = None,
    contrast: list[str] | list[list[int]] | None = None,
    alpha: float = 1.0,
    guided_samples: int | None = None,
    guided_top_p: float | None = None,
    guided_reference: bool = False,
    keep_star: bool = False,
    observe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> Rollout:
    """The one decoding loop (rollout, evaluation, benchmarks): K responses per context, KV cache on.

    Without ``contrast``: every row draws from the model's logits z, the model as it is. With ``contrast`` (the same
    prompts with the principle in context): ``guided_samples`` rows per prompt (default: all K) are principle-contrastive,
    drawn from z* = (1+alpha) z+ - alpha z0 (``estimator.contrastive_logits``: z+ from ``contrast``, z0 from ``contexts``,
    stacked in the same batch) with nucleus ``guided_top_p`` (default ``top_p``); the other K - G rows draw from z.
    ``guided_reference``: the contrastive rows run with adapters off (pi-hat* of the reference) - by peft's per-row adapter
    names when rows of both kinds share the batch, so one forward per token serves policy and pi-hat* samples alike.
    Rows come policy rows first, then guided ones, each prompt-major (``Rollout.guided`` flags them). ``keep_star`` keeps
    the guided rows' full log pi-hat* per position (the distill target; [N_guided, T, V] fp32) and their log softmax(z0)
    at the drawn tokens, so no second pass over them is needed. ``observe(z_pos, z0, tokens)`` is called at every step
    with the guided rows' logits with / without the principle [G, V] and their tokens [G], and returns [G] measures
    (e.g. evaluation's principle gap and KL(pi-hat* || pi_ref) on pi-hat*'s own path), stacked into ``observed`` [G, T]:
    what a teacher-forced pass over the finished answers would compute, from logits the loop already has.
    ``on_token(tokens)`` is called with every step's tokens [rows] (pad after a row's EOS) as they are drawn: streaming.

    ``logprobs`` records log softmax of the logits a row decodes from (z, or z*) at its tokens, before temperature,
    top-p and ``min_new_tokens`` (0 after EOS). ``min_new_tokens`` (default: the model's generation_config) masks EOS
    until that many tokens exist. A plain loop rather than ``generate``: each prompt is prefilled once and its cache
    repeated for its K samples, and no per-token logits-processor machinery. Contexts are strings or token-id lists.
    """
    device = next(model.parameters()).device
    n = len(contexts)
    k = 1 if greedy else samples_per_prompt
    g = 0 if contrast is None else (k if guided_samples is None else guided_samples)
    if contrast is not None and len(contrast) != n:
        raise ValueError(f"{len(contrast)} contrast contexts for {n} contexts")
    if not 0 <= g <= k:
        raise ValueError(f"guided_samples must be in [0, {k}], got {g}")
    if observe is not None and not g:
        raise ValueError("observe needs guided rows (contrast and guided_samples > 0)")
    kp = k - g  # rows per prompt drawn from z
    groups = [(contexts, kp)] + ([(contrast, g), (contexts, g)] if g else [])
    groups = [(c, r) for c, r in groups if r > 0]
    ids, attn = _encode(tokenizer, [c for ctx, _ in groups for c in ctx], device)
    if min_new_tokens is None:
        min_new_tokens = getattr(model.generation_config, "min_new_tokens", None) or 0
    eos_list = model_eos_ids(model, tokenizer)
    eos = torch.tensor(eos_list, device=device)
    pos = (attn.cumsum(1) - 1).clamp(min=0)  # positions from the first real token, as in pack()
    p_rows, g_rows = n * kp, n * g
    g_top_p = top_p if guided_top_p is None else guided_top_p
    extra: dict = {}
    ref_ctx = nullcontext()
    prefill_extra: dict = {}
    if g and guided_reference:
        if p_rows:
            own = getattr(model, "active_adapter", "default")
            extra["adapter_names"] = [own] * p_rows + [BASE_ROWS] * (2 * g_rows)
            prefill_extra["adapter_names"] = [own] * n + [BASE_ROWS] * (2 * n)
        else:
            from iqstar_lite.algorithm.reference import reference_mode

            ref_ctx = reference_mode(model)

    def pick(z: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [rows] and the logits they were drawn from, [policy rows; guided rows]."""
        parts = []
        if p_rows:
            parts.append((z[:p_rows], top_p))
        if g_rows:
            parts.append((contrastive_logits(z[p_rows : p_rows + g_rows], z[p_rows + g_rows :], alpha), g_top_p))
        if g_rows and keep_star:
            refs.append(torch.log_softmax(z[p_rows + g_rows :].float(), -1))
        toks, logits = [], []
        for zd, tp in parts:
            zs = zd.index_fill(-1, eos, float("-inf")) if t < min_new_tokens else zd
            toks.append(next_token(zs, temperature, tp, greedy))
            logits.append(zd)
        return torch.cat(toks), torch.cat(logits)

    out: list[torch.Tensor] = []
    logps: list[torch.Tensor] = []
    stars: list[torch.Tensor] = []
    refs: list[torch.Tensor] = []
    seen: dict[str, list[torch.Tensor]] = {}
    with eval_mode(model), ref_ctx, dense_weights(model):  # dropout off; 4-bit layers dequantized once
        first = model(
            input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1, **prefill_extra
        )
        past, z = output_cache(first), first.logits[:, -1]
        reps = torch.tensor([r for _, r in groups for _ in range(n)], device=device)
        if bool((reps != 1).any()):  # each context's cache repeated for its rows
            index = torch.arange(len(reps), device=device).repeat_interleave(reps)
            past.batch_select_indices(index)
            attn, pos, z = attn[index], pos[index], z[index]
        done = torch.zeros(p_rows + g_rows, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            nxt, zd = pick(z, t)
            nxt = torch.where(done, tokenizer.pad_token_id, nxt)
            out.append(nxt)
            if on_token is not None:
                on_token(nxt)
            lp = torch.log_softmax(
                zd.float(), -1
            )  # once per step: recorded log-probs, and the guided rows' pi-hat* (keep_star)
            logps.append(torch.where(done, 0.0, lp.gather(-1, nxt[:, None]).squeeze(-1)))
            if keep_star and g_rows:
                stars.append(lp[p_rows:])
            if refs:
                refs[-1] = refs[-1].gather(-1, nxt[p_rows:, None]).squeeze(-1)
            if observe is not None:
                for name, v in observe(z[p_rows : p_rows + g_rows], z[p_rows + g_rows :], nxt[p_rows:]).items():
                    seen.setdefault(name, []).append(torch.where(done[p_rows:], 0.0, v.float()))
            done |= torch.isin(nxt, eos)
            if t + 1 == max_new_tokens or bool(done.all()):
                break
            step_ids = torch.cat([nxt, nxt[p_rows:]]) if g_rows else nxt
            attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
            pos = pos[:, -1:] + 1
            res = model(
                input_ids=step_ids[:, None],
                attention_mask=attn,
                position_ids=pos,
                use_cache=True,
                **cache_kwargs(model, past),
                **extra,
            )
            past, z = output_cache(res), res.logits[:, -1]
    resp = torch.stack(out, dim=1) if out else torch.empty(p_rows + g_rows, 0, dtype=torch.long, device=device)
    logp = torch.stack(logps, dim=1) if logps else resp.new_zeros(resp.shape, dtype=torch.float32)
    prompts = torch.arange(n, device=device)
    index = torch.cat([prompts.repeat_interleave(kp), prompts.repeat_interleave(g)])
    guided = torch.cat(
        [torch.zeros(p_rows, dtype=torch.bool, device=device), torch.ones(g_rows, dtype=torch.bool, device=device)]
    )
    star = torch.stack(stars, dim=1) if stars else None
    star_ref = torch.stack(refs, dim=1) if refs else None
    observed = {name: torch.stack(v, dim=1) for name, v in seen.items()} if observe is not None else None
    return Rollout(resp, response_mask(resp, eos_list), index, logp, guided, star, star_ref, observed)


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


def _checkpointing(model) -> bool:
    """Activation (gradient) checkpointing is on; transformers 5.25 renamed the flag and warns on the old name."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def shared_context_logits(model, context_ids: list[list[int]], response_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``response_logits(model, pack(context_ids, response_ids, pad_id), T)`` with each distinct context run once.

    Rows that share a context (the K samples of a prompt) share its prefill: every distinct context but its
    last token goes through the model once with the KV cache on (no lm_head), the cache is copied to every
    row, then [last context token, response[:-1]] runs on top and gives the T logits that predict the
    response. Same logits up to float rounding, and the same gradients where grad is on (the copies'
    gradients sum into the shared prefill). Falls back to the packed pass when no context repeats, a context
    is a single token, or in train mode with gradient checkpointing on (transformers then drops the cache).
    """
    n, T = response_ids.shape
    keys = [tuple(c) for c in context_ids]
    distinct = list(dict.fromkeys(keys))
    checkpointing = model.training and _checkpointing(model)
    if len(distinct) == n or T == 0 or min(len(k) for k in distinct) < 2 or checkpointing:
        return response_logits(model, pack(context_ids, response_ids, pad_id), T)
    device = response_ids.device
    row = {k: i for i, k in enumerate(distinct)}
    index = torch.tensor([row[k] for k in keys], device=device)
    ctx = pack([list(k[:-1]) for k in distinct], response_ids.new_empty(len(distinct), 0), pad_id)
    no_logits = torch.empty(0, dtype=torch.long, device=device)
    past = output_cache(model(**ctx, use_cache=True, logits_to_keep=no_logits))
    past.batch_select_indices(index)
    last = torch.tensor([k[-1] for k in distinct], device=device)[index]
    attn = torch.cat([ctx["attention_mask"][index], ctx["attention_mask"].new_ones(n, T)], dim=1)
    pos = torch.tensor([len(k) - 1 for k in distinct], device=device)[index, None] + torch.arange(T, device=device)
    ids = torch.cat([last[:, None], response_ids[:, :-1]], dim=1)
    return model(
        input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **cache_kwargs(model, past)
    ).logits


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """Dropout off (and transformers' cache kept under gradient checkpointing) inside; the mode restored after.
    Safe for NF4 on CPU: ``models.bnb.disable_cpu_repack`` ran at load."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)

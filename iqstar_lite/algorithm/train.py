"""The Inverse-Q* loop: rollout -> estimator (2 reference passes, batched) -> policy update (``update.py``).

One 4-bit base serves policy (adapters on), reference and estimator (adapters off).
Driven by accelerate's ``Accelerator`` (single process here; ``accelerate launch`` for more).
"""

from __future__ import annotations

import json
import logging
import random
import resource
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from iqstar_lite.algorithm.averaging import WeightAverage
from iqstar_lite.algorithm.estimator import without_repeats
from iqstar_lite.algorithm.loss import masked_mean
from iqstar_lite.algorithm.rollout import Rollout, model_eos_ids, sample
from iqstar_lite.algorithm.scoring import PassSettings, estimator_pass
from iqstar_lite.algorithm.update import Guided, update
from iqstar_lite.checkpoint import (
    checkpoints,
    keep_metrics_until,
    load_average,
    resume_latest,
    save_adapter_atomic,
    save_checkpoint,
)
from iqstar_lite.config import RecipeConfig
from iqstar_lite.data.formatting import Formatter
from iqstar_lite.data.sources import Example
from iqstar_lite.errors import Stopped, UserError
from iqstar_lite.heap import freed_blocks_returned, release_free_heap
from iqstar_lite.models.bnb import dense_weights
from iqstar_lite.rundir import RunDir
from iqstar_lite.stopping import stop_requests
from iqstar_lite.tracking import log_step

log = logging.getLogger("iqstar_lite")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def make_optimizer(params: list[torch.nn.Parameter], cfg: RecipeConfig):
    if cfg.train.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(
                params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
            ), "bitsandbytes AdamW8bit"
        except Exception as e:  # pragma: no cover - depends on the bnb build
            log.warning("8-bit AdamW unavailable (%s); using torch AdamW", e)
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay), "torch AdamW"


def make_scheduler(optimizer, cfg: RecipeConfig):
    from transformers import get_scheduler

    total = max(1, cfg.train.steps * cfg.loss.epochs)
    name = "constant_with_warmup" if cfg.train.schedule == "constant" and cfg.train.warmup_steps else cfg.train.schedule
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=total)


def rollout_step(
    model, tokenizer, plain: list[str], cond: list[str], cfg: RecipeConfig
) -> tuple[Rollout, Rollout | None]:
    """One decoding loop for the step's samples: K - G per prompt from the policy and, with ``rollout.guided_samples``
    = G, G from pi-hat* (principle-contrastive sampling of the reference - or of the policy with
    ``estimator.source=policy`` - at the rollout temperature and ``rollout.guided_top_p``), in the same batch.
    Returns (policy rows, guided rows or None)."""
    rc = cfg.rollout
    if not rc.guided_samples:
        return sample(model, tokenizer, plain, rc.samples_per_prompt, rc.max_new_tokens, rc.temperature, rc.top_p), None
    roll = sample(
        model,
        tokenizer,
        plain,
        rc.samples_per_prompt,
        rc.max_new_tokens,
        rc.temperature,
        rc.top_p,
        contrast=cond,
        alpha=cfg.estimator.alpha,
        guided_samples=rc.guided_samples,
        guided_top_p=rc.guided_top_p,
        guided_reference=cfg.estimator.source == "ref",
        keep_star=reuses_rollout_star(cfg),
    )
    return rows_of(roll, ~roll.guided), rows_of(roll, roll.guided)


def reuses_rollout_star(cfg: RecipeConfig) -> bool:
    """The guided rows' distill target is the pi-hat* their sampling already computed (z+ and z0 of the reference, every
    token): no second estimator pass over them. Only where that is the estimator's pi-hat* (no nucleus, source=ref)."""
    return cfg.estimator.top_p == 1.0 and cfg.estimator.source == "ref"


def rows_of(roll: Rollout, keep: torch.Tensor) -> Rollout:
    """The rows ``keep`` of a rollout, trailing all-padding columns dropped; pi-hat* kept for guided rows only."""
    mask = roll.response_mask[keep]
    width = int(mask.sum(1).max()) if mask.shape[0] else 0
    star = star_ref = None
    if roll.star_logp_full is not None and bool(roll.guided[keep].all()):
        star, star_ref = roll.star_logp_full[:, :width], roll.star_ref_logp[:, :width]
    return Rollout(
        roll.response_ids[keep, :width],
        mask[:, :width],
        roll.prompt_index[keep],
        roll.logprobs[keep, :width],
        roll.guided[keep],
        star,
        star_ref,
    )


def ban_repeats(est: dict[str, torch.Tensor], response_ids: torch.Tensor, mask: torch.Tensor, ngram: int) -> float:
    """Replaces ``est``'s distill target by pi* without repeated n-grams (``estimator.without_repeats``) and returns
    the share of the rollout's response tokens it bans (logged as repeat_rate)."""
    est["logp_star_full"] = without_repeats(est["logp_star_full"], response_ids, ngram)
    banned = est["logp_star_full"].gather(-1, response_ids.unsqueeze(-1)).squeeze(-1) == float("-inf")
    return round(masked_mean(banned.float(), mask).item(), 4)


def eos_rate(roll, eos_ids: list[int]) -> float:
    """Fraction of responses that ended with an EOS within the token limit (the rest were truncated)."""
    if roll.response_ids.numel() == 0:
        return 0.0
    return float(
        torch.isin(roll.response_ids, torch.tensor(eos_ids, device=roll.response_ids.device)).any(1).float().mean()
    )


def prompt_batch(examples: list[Example], step: int, n: int, seed: int) -> list[Example]:
    """Deterministic epoch-wise shuffled cycling: the same step always gets the same prompts (resume)."""
    orders: dict[int, list[int]] = {}
    out = []
    for j in range(step * n, step * n + n):
        epoch, i = divmod(j, len(examples))
        if epoch not in orders:
            orders[epoch] = list(range(len(examples)))
            random.Random(seed * 100_003 + epoch).shuffle(orders[epoch])
        out.append(examples[orders[epoch][i]])
    return out


def train(
    cfg: RecipeConfig,
    run_dir: Path,
    model,
    tokenizer,
    examples: list[Example],
    device: torch.device,
    on_step: Callable[[dict], bool | None] | None = None,
    accelerator=None,
) -> dict:
    """Run ``cfg.train.steps`` Inverse-Q* steps; writes metrics.jsonl, checkpoints/ and adapter/, and logs each metrics
    row to ``accelerator``'s trackers (``tracking.make_accelerator``; default: an Accelerator without trackers).

    ``on_step(metrics)`` runs after each step (its metrics line and any checkpoint written); returning True
    stops training there (the adapter is still saved).
    """
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=device.type == "cpu")
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, opt_name = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, cfg)  # not prepared: accelerate would step it once per process
    # data-parallel: DDP over the LoRA parameters (gloo on CPU, NCCL on GPUs); one process: the model as it is
    if (
        world > 1
    ):  # DDP would broadcast (and, for mmap'ed embeddings, copy) every frozen weight at start: only the LoRA ones
        model._ddp_params_and_buffers_to_ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
    forward_model = accelerator.prepare_model(model) if world > 1 else model
    optimizer = accelerator.prepare_optimizer(optimizer)
    log.info(
        "optimizer: %s on %d LoRA tensors (%.2fM params)%s",
        opt_name,
        len(params),
        sum(p.numel() for p in params) / 1e6,
        f"; data-parallel over {world} processes" if world > 1 else "",
    )
    torch.manual_seed(cfg.train.seed + rank)  # sampling differs per process; the LoRA init (load_policy) does not
    random.seed(cfg.train.seed + rank)

    metrics_path = RunDir(run_dir).metrics
    if main:
        checkpoints(run_dir)  # one process completes or removes what an interrupted save left
    accelerator.wait_for_everyone()
    ckpt, start = resume_latest(run_dir, model, optimizer, scheduler, rank, world) if cfg.train.resume else (None, 0)
    average = WeightAverage(params, cfg.train.ema) if cfg.train.ema else None
    if average is not None and ckpt is not None:
        saved_average = load_average(ckpt)
        if saved_average is None:
            log.warning("%s has no weight average (train.ema was off): averaging from step %d", ckpt, start)
        else:
            average.load_state_dict(saved_average)
    if main:
        if ckpt is not None:
            log.info("resumed from %s (step %d)", ckpt, start)
            for path in (metrics_path, RunDir(run_dir).samples):
                keep_metrics_until(path, start)
        else:
            if cfg.train.resume:
                log.warning(
                    "train.resume=true but no checkpoint in %s: training from step 0", RunDir(run_dir).checkpoints
                )
            for path in (metrics_path, RunDir(run_dir).samples):
                path.unlink(missing_ok=True)

    fmt = Formatter(tokenizer, cfg.data, cfg.estimator.kind)
    rc, pad = cfg.rollout, tokenizer.pad_token_id
    scoring = PassSettings.from_recipe(cfg)
    eos = model_eos_ids(model, tokenizer)
    settle = (
        release_free_heap if device.type == "cpu" else (lambda: None)
    )  # keeps CPU RSS from creeping up between phases
    give_back = {"always": True, "never": False}.get(cfg.train.return_freed_memory, cfg.model.gradient_checkpointing)
    update_heap = freed_blocks_returned if (device.type == "cpu" and give_back) else nullcontext
    last: dict = {}
    nonfinite_run = 0
    saved_at = time.time()
    bar = tqdm(
        range(start, cfg.train.steps),
        desc="inverse-q*",
        unit="step",
        dynamic_ncols=True,
        initial=start,
        total=cfg.train.steps,
        disable=not main,
    )
    with stop_requests() as stop, dense_weights(model):  # 4-bit layers dequantized once for the run (CPU)
        for step in bar:
            t0 = time.time()
            batch = prompt_batch(examples, step, rc.prompts_per_step, cfg.train.seed)[
                rank::world
            ]  # this process's slice
            plain, cond = [fmt.plain(e) for e in batch], [fmt.conditioned(e) for e in batch]
            roll, g_roll = rollout_step(model, tokenizer, plain, cond, cfg)
            rows = roll.prompt_index.tolist()
            plain_ids = [fmt.ids(plain[i]) for i in rows]
            cond_ids = [fmt.ids(cond[i]) for i in rows]
            settle()
            t1 = time.time()
            est = estimator_pass(
                model, plain_ids, cond_ids, roll.response_ids, pad, scoring, keep_full=cfg.loss.type == "distill"
            )
            guided = None
            if g_roll is not None:
                g_rows = g_roll.prompt_index.tolist()
                g_plain, g_cond = [fmt.ids(plain[i]) for i in g_rows], [fmt.ids(cond[i]) for i in g_rows]
                if g_roll.star_logp_full is not None:
                    g_est = {"logp_star_full": g_roll.star_logp_full, "logp_ref": g_roll.star_ref_logp}
                else:
                    g_est = estimator_pass(model, g_plain, g_cond, g_roll.response_ids, pad, scoring, keep_full=True)
                guided = Guided(g_plain, g_roll.response_ids, g_roll.response_mask, g_est)
            repeats, n_rep = {}, cfg.estimator.no_repeat_ngram
            if n_rep and "logp_star_full" in est:  # loss.type=distill (pg / imitation train on rewards, unchanged)
                repeats["repeat_rate"] = ban_repeats(est, roll.response_ids, roll.response_mask, n_rep)
            if n_rep and guided is not None:
                repeats["repeat_rate_guided"] = ban_repeats(
                    guided.est, guided.response_ids, guided.response_mask, n_rep
                )
            settle()
            t2 = time.time()
            with update_heap():
                sums = update(
                    model,
                    cfg,
                    plain_ids,
                    roll.response_ids,
                    roll.response_mask,
                    est,
                    pad,
                    params,
                    optimizer,
                    scheduler,
                    accelerator,
                    logp_sampled=roll.logprobs,
                    guided=guided,
                    forward_model=forward_model,
                )
            if average is not None:
                average.update()
            settle()
            t3 = time.time()
            n_tok = float(roll.response_mask.sum())
            last = {
                "step": step + 1,
                **{k: round(v, 6) for k, v in sums.items()},
                "reward_mean": round(masked_mean(est["rewards"], roll.response_mask).item(), 6),
                "principle_gap": round(masked_mean(est["principle_gap"], roll.response_mask).item(), 6),
                "response_len": round(n_tok / roll.response_mask.shape[0], 2),
                "eos_rate": round(eos_rate(roll, eos), 4),
                **(
                    {
                        "response_len_guided": round(
                            float(guided.response_mask.sum()) / guided.response_mask.shape[0], 2
                        ),
                        "eos_rate_guided": round(eos_rate(g_roll, eos), 4),
                    }
                    if guided is not None
                    else {}
                ),
                **repeats,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": round(n_tok / max(t3 - t0, 1e-9), 2),
                "seconds": round(t3 - t0, 3),
                "t_rollout": round(t1 - t0, 3),
                "t_estimator": round(t2 - t1, 3),
                "t_update": round(t3 - t2, 3),
                "peak_mem_gib": round(peak_memory_gib(device), 3),
            }
            last, requested = across_processes(accelerator, last, stop.requested or 0)
            last["world_size"] = world
            if main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(last) + "\n")
                log_step(accelerator, last)
            bar.set_postfix(
                loss=f"{last['loss']:.3g}",
                reward=f"{last['reward_mean']:+.4f}",
                kl=f"{last['kl']:.4f}",
                s=f"{last['seconds']:.1f}",
            )
            nonfinite_run = nonfinite_run + 1 if last["nonfinite_skipped"] == cfg.loss.epochs else 0
            if nonfinite_run >= cfg.train.max_nonfinite_steps:
                bar.close()
                raise UserError(
                    f"training diverged: {nonfinite_run} steps in a row had nan/inf losses or gradients (skipped, adapter "
                    f"kept at the last finite step, nothing saved); lower train.lr or train.max_grad_norm and start again"
                )
            every, minutes = cfg.train.checkpoint_every, cfg.train.checkpoint_minutes
            stopping = requested > 0  # any process asked: all stop after the same step
            due = minutes and time.time() - saved_at >= 60 * minutes
            if world > 1:  # the same decision on every process (clocks differ)
                due = bool(
                    accelerator.reduce(torch.tensor([float(bool(due))], device=accelerator.device), "sum").item()
                )
            if (every and (step + 1) % every == 0) or step + 1 == cfg.train.steps or stopping or due:
                save_checkpoint(
                    run_dir,
                    step + 1,
                    model,
                    optimizer,
                    scheduler,
                    accelerator,
                    average=None if average is None else average.state_dict(),
                )
                saved_at = time.time()
            if stopping:
                bar.close()
                raise Stopped(
                    requested,
                    f"stopped by {signal.Signals(requested).name} after step {step + 1} of {cfg.train.steps}; "
                    f"checkpoint saved in {RunDir(run_dir).checkpoints}; continue with the same command plus "
                    f"out_dir={run_dir} train.resume=true",
                )
            if on_step is not None and on_step(last):
                break
    bar.close()
    if average is not None:  # the adapter saved, evaluated and exported is the average (train.ema)
        average.copy_to_params()
    if main:
        save_adapter_atomic(model, RunDir(run_dir).adapter)
    accelerator.wait_for_everyone()
    return last


MAX_KEYS = ("seconds", "t_rollout", "t_estimator", "t_update", "peak_mem_gib")  # the slowest / largest process
SUM_KEYS = ("tokens_per_s",)


def across_processes(accelerator, row: dict, stop: int) -> tuple[dict, int]:
    """One step's metrics over all processes (means; sums for throughput; max for times and memory), and the stop
    signal any process received (0 for none). One process: as they are."""
    if accelerator.num_processes == 1:
        return row, stop
    keys = [k for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"]
    local = torch.tensor(
        [[float(row[k]) for k in keys] + [float(stop)]], dtype=torch.float64, device=accelerator.device
    )
    every = accelerator.gather(local)  # [world, keys + 1]
    out = dict(row)
    for i, k in enumerate(keys):
        col = every[:, i]
        out[k] = round(float(col.max() if k in MAX_KEYS else col.sum() if k in SUM_KEYS else col.mean()), 6)
    return out, int(every[:, -1].max())

"""Alignment convergence: Inverse-Q* (never sees the judge) vs TRL GRPO rewarded by the judge and TRL's self-distillation,
same wall-clock budget.

    python bench/convergence.py                          # "Always answer in French." (recipe smollm2_cpu), 3 runs
    python bench/convergence.py --recipe smollm2_short   # "Answer in one short sentence."
    python bench/convergence.py --quick                  # tiny random model, smoke test only
    python bench/convergence.py --eval-set ood           # every peer judged on the out-of-distribution dev prompts

The judge is the recipe's evaluation judge, ``iqstar_lite.evaluation.judges.pick_judge('auto', principle)`` (py3langid
French; one sentence of at most 20 words). Peers, each in its own subprocess, ``--runs`` times, alternating order:
* iq-distill / iq-pg / iq-imitation: ``iqstar_lite.algorithm.train.train`` with that loss (the recipe's rollout: 8 prompts x 2),
* trl-grpo: TRL ``GRPOTrainer`` (beta > 0, peft LoRA, load_base()'s NF4 model object), reward = a dense form of the
  judge (``dense_score``) or the 0/1 judge, ``--trl-prompts`` x ``--trl-samples`` per step (default 4 x 4),
* trl-sdft: TRL's ``SDFTTrainer``, teacher = the initial model given the principle as privileged context.
Same training prompts in the same order, same lr / beta / LoRA / NF4.
Training clock = sum of step seconds (iq: metrics "seconds"; TRL: on_step_begin -> on_step_end); evaluation is
outside it. A run stops at the first step end past ``--budget-s``. Every ``--eval-every-s`` of clock, before
training and at the end: the project's own evaluation (``iqstar_lite.evaluation.evaluate.evaluate``: greedy answers *without*
the principle on the recipe's held-out prompts; judge rate overall / harmful / benign, principle score, KL to the
reference, KL(pi-hat* || pi_theta) on pi-hat*'s greedy answers, repetition, loop rate, mean length).
Principle-contrastive decoding of the untrained model (pi-hat*) is the reference line and the quality target: a run
reaches *target quality* at the first evaluation with judge >= ``--quality-judge`` and repetition <= contrastive
decoding's + ``--quality-repetition-margin``.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import (
    base_parser,
    parse_args,
    quiet_libraries,
    ratio,
    run_child,
    set_threads,
    stats,
    training_prompts,
    warn_if_busy,
    write_result,
)

IQ_PEERS = ("iq-distill", "iq-pg", "iq-imitation")
TRL_PEERS = ("trl-grpo", "trl-sdft")
EVAL_SETS = {
    "heldout": "held-out prompts (heldout_for_eval)",
    "ood": "out-of-distribution dev prompts (eval.ood_prompts)",
}
MAX_STEPS = 2000  # the budget stops every run long before this


# ----------------------------------------------------------------------------- children


def recipe(s: dict, loss: str = "distill"):
    from iqstar_lite.config import load_recipe

    return load_recipe(
        s.get("recipe", "smollm2_cpu"),
        [
            f"model.path={s['model']}",
            f"rollout.max_new_tokens={s['tokens']}",
            f"loss.type={loss}",
            f"train.steps={MAX_STEPS}",
            "train.checkpoint_every=0",
            "train.checkpoint_minutes=0",
            "eval.enabled=false",
            f"train.seed={s.get('seed', 0)}",
            f"eval.max_new_tokens={s['eval_tokens']}",
            f"eval.batch_size={s['eval_batch']}",
        ],
    )


def heldout(cfg, s: dict):
    """The prompts every peer is judged on: ``--eval-set heldout`` (the recipe's held-out prompts, as the demo's table),
    or ``ood`` (``eval.ood_prompts``' ``eval.ood_split`` rows, the demo's out-of-distribution set, training prompts left
    out), the first ``--eval-prompts``."""
    from iqstar_lite.data.sources import load_prompts
    from iqstar_lite.evaluation.report import heldout_for_eval, ood_examples

    prompts = load_prompts(cfg.data)
    if s.get("eval_set", "heldout") == "ood":
        cfg.eval.ood_max_prompts = s["eval_prompts"]
        return ood_examples(cfg, prompts.train)
    return heldout_for_eval(prompts.heldout, s["eval_prompts"])


QUALITY_KEYS = (
    "judge_rate",
    "judge_rate_harmful",
    "judge_rate_benign",
    "principle_score",
    "kl_per_token",
    "kl_to_target",
    "target_prefix",
    "repetition",
    "loop_rate",
    "mean_tokens",
)


def quality(model, tok, fmt, examples, cfg, judge, target: list[list[int]] | None, contrastive: bool = False) -> dict:
    """The project's evaluation (one metrics implementation for the package and its benchmarks), summary only."""
    from iqstar_lite.evaluation.evaluate import evaluate

    t0 = time.perf_counter()
    ev = evaluate(model, tok, fmt, examples, cfg, judge, contrastive=contrastive, target=target)
    out = {k: ev["summary"].get(k) for k in QUALITY_KEYS}
    if contrastive:
        out["target"] = [r["response_ids"] for r in ev["records"]]
    return {**out, "eval_s": round(time.perf_counter() - t0, 2)}


def load_target(s: dict) -> list[list[int]] | None:
    return json.loads(Path(s["target_file"]).read_text()) if s.get("target_file") else None


class Clock:
    """Training clock and evaluation schedule shared by both peers: tick(step seconds) -> True when the budget is spent."""

    def __init__(self, s: dict, evaluate, per_step: int):
        self.s, self.evaluate, self.per_step = s, evaluate, per_step
        self.seconds, self.step, self.next_eval, self.curve = 0.0, 0, s["eval_every_s"], []

    def point(self) -> None:
        pt = {
            "train_seconds": round(self.seconds, 3),
            "step": self.step,
            "samples_seen": self.step * self.per_step,
            **self.evaluate(),
        }
        self.curve.append(pt)
        print(
            f"  {pt['train_seconds']:7.1f} s  step {pt['step']:3d}  judge {pt['judge_rate']:.3f}  rep {pt['repetition']:.2f}  "
            f"loops {pt['loop_rate']:.2f}  tokens {pt['mean_tokens']:.1f}  KL to pi* {pt['kl_to_target']}",
            flush=True,
        )

    def tick(self, seconds: float) -> bool:
        self.seconds, self.step = self.seconds + seconds, self.step + 1
        done = self.seconds >= self.s["budget_s"]
        if done or self.seconds >= self.next_eval:
            self.point()
            while self.next_eval <= self.seconds:
                self.next_eval += self.s["eval_every_s"]
        return done


def child_iq(s: dict, loss: str) -> dict:
    from iqstar_lite.algorithm.train import train
    from iqstar_lite.data.formatting import Formatter
    from iqstar_lite.evaluation.judges import pick_judge
    from iqstar_lite.models.load import load_policy, load_tokenizer, pick_device

    cfg = recipe(s, loss)
    device, tok = pick_device(cfg.model), load_tokenizer(cfg.model.path)
    model, fmt, judge = (
        load_policy(cfg.model, cfg.lora, device, seed=cfg.train.seed),
        Formatter(tok, cfg.data),
        pick_judge("auto", cfg.data.principle),
    )
    examples, target = heldout(cfg, s), load_target(s)
    clock = Clock(
        s,
        lambda: quality(model, tok, fmt, examples, cfg, judge, target),
        cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt,
    )
    clock.point()
    with tempfile.TemporaryDirectory(prefix=f"bench-{loss}-") as tmp:
        train(
            cfg, Path(tmp), model, tok, training_prompts(cfg, tok), device, on_step=lambda m: clock.tick(m["seconds"])
        )
    return {"curve": clock.curve, "samples_per_step": clock.per_step}


def _trl_setup(s: dict) -> dict:
    """What both TRL peers share: recipe, tokenizer, judge, held-out prompts, the iq prompt sequence, batch shape, LoRA
    config, the common trainer arguments and a clock callback."""
    from peft import LoraConfig
    from transformers import TrainerCallback

    from iqstar_lite.algorithm.train import prompt_batch
    from iqstar_lite.data.formatting import Formatter
    from iqstar_lite.evaluation.judges import pick_judge
    from iqstar_lite.models.load import load_tokenizer, pick_device

    cfg = recipe(s)
    device, tok = pick_device(cfg.model), load_tokenizer(cfg.model.path)
    fmt, judge, examples = (Formatter(tok, cfg.data), pick_judge("auto", cfg.data.principle), heldout(cfg, s))
    rc, k = cfg.rollout, s["trl_samples"]
    n = s["trl_prompts"] * k
    mb = min(cfg.train.micro_batch, n)
    prompts = training_prompts(cfg, tok)
    order = [
        e for step in range(MAX_STEPS) for e in prompt_batch(prompts, step, s["trl_prompts"], cfg.train.seed)
    ]  # = iq's sequence
    lora = cfg.lora
    targets = (
        lora.target_modules
        if lora.target_modules == "all-linear"
        else [t.strip() for t in lora.target_modules.split(",")]
    )
    args = dict(
        output_dir=s["tmp"],
        per_device_train_batch_size=mb,
        gradient_accumulation_steps=n // mb,
        num_generations=k,
        max_completion_length=rc.max_new_tokens,
        temperature=rc.temperature,
        top_p=rc.top_p,
        learning_rate=cfg.train.lr,
        max_grad_norm=cfg.train.max_grad_norm,
        max_steps=MAX_STEPS,
        lr_scheduler_type="constant",
        optim=s["trl_optim"],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        shuffle_dataset=False,
        disable_tqdm=True,
        seed=cfg.train.seed,
        dataloader_num_workers=0,
    )

    def timed(clock):
        class Timed(TrainerCallback):
            def on_train_begin(self, *a, **kw):
                clock.point()

            def on_step_begin(self, *a, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                control.should_training_stop = clock.tick(time.perf_counter() - self.t0)

        return Timed()

    return {
        "cfg": cfg,
        "device": device,
        "tok": tok,
        "fmt": fmt,
        "judge": judge,
        "examples": examples,
        "n": n,
        "order": order,
        "peft": LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"
        ),
        "args": args,
        "timed": timed,
    }


def _train_timed(trainer, c: dict, s: dict) -> dict:
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    target = load_target(s)
    clock = Clock(
        s, lambda: quality(trainer.model, c["tok"], c["fmt"], c["examples"], c["cfg"], c["judge"], target), c["n"]
    )
    trainer.add_callback(c["timed"](clock))
    trainer.train()
    return {"curve": clock.curve, "samples_per_step": c["n"]}


def dense_score(judge):
    """A dense form of a 0/1 judge, which moves before the judge flips: for a language judge, log P(target language) from
    the judge's own classifier; for one short sentence, minus the sentences beyond one and the words beyond 20 (/ 10)."""
    from iqstar_lite.evaluation.judges import SHORT_WORDS, one_short_sentence, sentences

    if judge is one_short_sentence:
        return lambda t: -abs(len(sentences(t)) - 1) - max(0, len(t.split()) - SHORT_WORDS) / 10
    if judge.__name__.startswith("language="):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        ident, lang = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True), judge.__name__.split("=")[-1]
        return lambda t: math.log(dict(ident.rank(t.strip())).get(lang, 0.0) + 1e-6)
    raise SystemExit(f"no dense form of the judge {judge.__name__}; use --trl-reward judge")


def child_trl(s: dict) -> dict:
    """TRL GRPO rewarded by the judge (``--trl-reward judge``) or its dense form (``dense``, ``dense_score``)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from iqstar_lite.models.load import load_base

    c = _trl_setup(s)
    cfg, judge = c["cfg"], c["judge"]
    score = judge if s.get("trl_reward", "dense") == "judge" else dense_score(judge)

    def judge_reward(completions, **_):
        return [score(cc[-1]["content"] if isinstance(cc, list) else cc) for cc in completions]

    args = GRPOConfig(**c["args"], beta=cfg.loss.beta, epsilon=cfg.loss.clip_eps)
    trainer = GRPOTrainer(
        model=load_base(cfg.model, c["device"]),
        reward_funcs=judge_reward,
        args=args,
        processing_class=c["tok"],
        peft_config=c["peft"],
        train_dataset=Dataset.from_list([{"prompt": e.messages} for e in c["order"]]),
    )
    return _train_timed(trainer, c, s)


def child_sdft(s: dict) -> dict:
    """TRL's on-policy self-distillation (``trl.experimental.sdft``): the teacher is the initial model (adapters off)
    given the principle as ``privileged_context``; full-logit distillation on the student's own samples."""
    from datasets import Dataset
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from iqstar_lite.models.load import load_base

    c = _trl_setup(s)
    cfg = c["cfg"]
    args = SDFTConfig(
        **c["args"],
        max_prompt_length=cfg.data.max_prompt_tokens,
        teacher_model_kind="base",
        distillation_mode="full_logits",
    )
    data = [{"prompt": e.messages, "privileged_context": cfg.data.principle} for e in c["order"]]
    trainer = SDFTTrainer(
        model=load_base(cfg.model, c["device"]),
        args=args,
        processing_class=c["tok"],
        peft_config=c["peft"],
        train_dataset=Dataset.from_list(data),
    )
    return _train_timed(trainer, c, s)


def child_contrastive(s: dict) -> dict:
    """pi-hat*'s greedy answers (contrastive decoding of the untrained model): the reference row, and the trajectories of
    every peer's KL(pi-hat* || pi_theta)."""
    from iqstar_lite.data.formatting import Formatter
    from iqstar_lite.evaluation.judges import pick_judge
    from iqstar_lite.models.load import load_policy, load_tokenizer, pick_device

    cfg = recipe(s)
    device, tok = pick_device(cfg.model), load_tokenizer(cfg.model.path)
    model = load_policy(
        cfg.model, cfg.lora, device, seed=cfg.train.seed
    )  # fresh adapters; decoding runs in reference_mode
    ev = quality(
        model,
        tok,
        Formatter(tok, cfg.data),
        heldout(cfg, s),
        cfg,
        pick_judge("auto", cfg.data.principle),
        None,
        contrastive=True,
    )
    return {**ev, "alpha": cfg.estimator.alpha}


def child_main(peer: str, settings: str, out: str) -> None:
    quiet_libraries()
    s = json.loads(settings)
    set_threads(s["threads"])
    with tempfile.TemporaryDirectory(prefix=f"bench-{peer}-") as tmp:
        if peer == "contrastive":
            data = child_contrastive(s)
        elif peer == "trl-grpo":
            data = child_trl({**s, "tmp": tmp})
        elif peer == "trl-sdft":
            data = child_sdft({**s, "tmp": tmp})
        else:
            data = child_iq(s, peer.removeprefix("iq-"))
    Path(out).write_text(json.dumps(data))


# ----------------------------------------------------------------------------- parent


def first_reach(curve: list[dict], ok) -> dict | None:
    return next((p for p in curve if ok(p)), None)


def median_never_inf(values: list[float | None]) -> float | None:
    """Median where a run that never got there counts as infinitely slow (None if the median run never did)."""
    m = statistics.median([math.inf if v is None else v for v in values]) if values else math.inf
    return None if math.isinf(m) else round(m, 3)


def reached(hits: list[dict | None], key: str) -> dict:
    return {
        **stats([h[key] for h in hits if h]),
        "reached": sum(map(bool, hits)),
        "median_never_as_inf": median_never_inf([h and h[key] for h in hits]),
    }


def at_quality(cd: dict, s: dict):
    """The target quality of one run: judge >= --quality-judge, repetition <= that run's contrastive decoding's + margin."""
    return lambda p: (
        p["judge_rate"] >= s["quality_judge"] and p["repetition"] <= cd["repetition"] + s["quality_repetition_margin"]
    )


def summarize(runs: list[dict], contrastive: list[dict], s: dict, target: float | None) -> dict:
    curves = [r["curve"] for r in runs]
    out = {"baseline_judge_rate": stats([c[0]["judge_rate"] for c in curves])}
    out.update(
        {
            key: stats([c[-1][k] for c in curves])
            for key, k in (
                ("final_judge_rate", "judge_rate"),
                ("final_repetition", "repetition"),
                ("clock_s", "train_seconds"),
                ("steps", "step"),
                ("samples", "samples_seen"),
            )
        }
    )
    out.update(
        {
            f"final_{k}": stats([c[-1][k] for c in curves if c[-1].get(k) is not None])
            for k in QUALITY_KEYS
            if f"final_{k}" not in out and any(c[-1].get(k) is not None for c in curves)
        }
    )
    out["judge_rate_per_s"] = stats(
        [(c[-1]["judge_rate"] - c[0]["judge_rate"]) / max(c[-1]["train_seconds"], 1e-9) for c in curves], 6
    )
    hits = [first_reach(c, at_quality(cd, s)) for c, cd in zip(curves, contrastive)]
    out["time_to_quality_s"], out["samples_to_quality"] = reached(hits, "train_seconds"), reached(hits, "samples_seen")
    # runs that never got there: their best point (highest judge rate, then lowest repetition)
    out["best_points_of_runs_not_reaching"] = [
        max(c, key=lambda p: (p["judge_rate"], -p["repetition"])) for c, h in zip(curves, hits) if not h
    ]
    if target is not None:
        hits = [first_reach(c, lambda p: p["judge_rate"] >= target) for c in curves]
        out["time_to_trl_final_s"], out["samples_to_trl_final"] = (
            reached(hits, "train_seconds"),
            reached(hits, "samples_seen"),
        )
    out["peak_rss_gib"] = stats([r["peak_rss_bytes"] / 2**30 for r in runs], 3)
    return out


def to_peer_final(curves: list[list[dict]], peer: dict) -> dict:
    """Training seconds until a run first matches a peer's final quality (the peer's final median judge rate, with
    repetition at most its final median repetition), over runs (never = infinitely slow in the median)."""
    judge, rep = peer["final_judge_rate"]["median"], peer["final_repetition"]["median"]
    return reached(
        [first_reach(c, lambda p: p["judge_rate"] >= judge and p["repetition"] <= rep) for c in curves], "train_seconds"
    )


def compare(results: dict, peers: list[str], runs: dict[str, list[dict]] | None = None) -> dict:
    iq, trl = [p for p in peers if p in IQ_PEERS], [p for p in peers if p in TRL_PEERS]
    out: dict = {"winner_per_second": max(iq, key=lambda p: results[p]["judge_rate_per_s"]["median"]) if iq else None}
    if runs:  # the paper's claim: Inverse-Q* reaches the best peer's final quality in <= 0.5x that peer's wall-clock
        out["to_peer_final_quality"] = {}
        for t in trl:
            clock = results[t]["clock_s"]["median"]
            out["to_peer_final_quality"][t] = {
                "peer_final_judge_rate": results[t]["final_judge_rate"]["median"],
                "peer_final_repetition": results[t]["final_repetition"]["median"],
                "peer_clock_s": clock,
                **{
                    p: {
                        **(hit := to_peer_final([r["curve"] for r in runs[p]], results[t])),
                        "over_peer_clock": ratio(hit["median_never_as_inf"], clock),
                        "met_0.5x": hit["median_never_as_inf"] is not None
                        and hit["median_never_as_inf"] <= 0.5 * clock,
                    }
                    for p in iq
                },
            }
        if trl:  # the best peer: highest final median judge rate, then lowest repetition
            out["best_peer"] = max(
                trl, key=lambda t: (results[t]["final_judge_rate"]["median"], -results[t]["final_repetition"]["median"])
            )
    # the headline: time to target quality, median over runs (never = infinitely slow), Inverse-Q* / each TRL peer
    out["time_to_quality_iq_over_trl"] = {
        p: {
            t: ratio(
                results[p]["time_to_quality_s"]["median_never_as_inf"],
                results[t]["time_to_quality_s"]["median_never_as_inf"],
            )
            for t in trl
        }
        for p in iq
    }
    out["samples_to_quality_iq_over_trl"] = {
        p: {
            t: ratio(
                results[p]["samples_to_quality"]["median_never_as_inf"],
                results[t]["samples_to_quality"]["median_never_as_inf"],
            )
            for t in trl
        }
        for p in iq
    }
    if "trl-grpo" in peers and iq:
        grpo = results["trl-grpo"]
        trl_t, trl_clock = grpo["time_to_trl_final_s"]["median_never_as_inf"], grpo["clock_s"]["median"]
        out["ratios_iq_over_trl"] = {
            p: {
                "time_to_trl_final": ratio(results[p]["time_to_trl_final_s"]["median_never_as_inf"], trl_t),
                "final_judge_rate": ratio(results[p]["final_judge_rate"]["median"], grpo["final_judge_rate"]["median"]),
                "judge_rate_per_s": ratio(results[p]["judge_rate_per_s"]["median"], grpo["judge_rate_per_s"]["median"]),
            }
            for p in iq
        }
        out["targets"] = {
            "trl_final_judge_rate_median": results["trl_final_judge_rate_median"],
            "trl_clock_s_median": trl_clock,
            "trl_improved": grpo["final_judge_rate"]["median"] > grpo["baseline_judge_rate"]["median"],
            **{
                f"{p}_met": (t := results[p]["time_to_trl_final_s"]["median_never_as_inf"]) is not None
                and t <= trl_clock
                for p in iq
            },
        }
    return out


def notes(args) -> list[str]:
    return [
        f"Recipe {args.recipe}; judge: iqstar_lite.evaluation.judges.pick_judge('auto', principle); Inverse-Q* never sees it, TRL GRPO's reward is it "
        f"({'its dense form, bench/convergence.py dense_score' if args.trl_reward == 'dense' else 'the 0/1 judge'}); SDFT's teacher sees the principle.",
        f"Responses per step: iq 8 prompts x 2 samples (the recipe's rollout), TRL {args.trl_prompts} prompts x {args.trl_samples} samples "
        "(GRPO needs groups to get an advantage); same training prompt sequence (prompt_batch), "
        f"<= {args.tokens} new tokens, same lr / beta / LoRA / NF4 (load_base() model object on both sides).",
        "Training clock = sum of optimizer-step seconds, first (warm-up) step included on both sides (evaluation, logging and loading "
        f"excluded); runs stop at the first step end past {args.budget_s} s. Evaluation: iqstar_lite.evaluation.evaluate.evaluate, greedy, principle "
        f"absent, {args.eval_prompts} {EVAL_SETS[args.eval_set]}, {args.eval_tokens} new tokens; KL to pi* on contrastive "
        "decoding's greedy answers of the same run.",
        f"time_to_quality = training seconds of the first evaluation with judge >= {args.quality_judge} and repetition <= the run's "
        f"contrastive decoding's + {args.quality_repetition_margin} (evaluation every {args.eval_every_s} s: a resolution of one interval); "
        "median_never_as_inf counts runs that never got there as infinitely slow; their best points are listed.",
        "time_to_trl_final = the first evaluation at or above TRL GRPO's final median judge rate. to_peer_final_quality = for each TRL "
        "peer, the first evaluation of an Inverse-Q* run with judge >= that peer's final median judge rate and repetition <= its final "
        "median repetition, median over runs, as a fraction of the peer's own median training clock (the paper's claim: <= 0.5x "
        "for the best peer).",
        "Run r (0, 1, 2, ...) of every peer trains with train.seed = r: LoRA init, sampling and prompt order differ between runs, "
        "and every peer sees the same prompt sequence within a run.",
        *(
            [f"Runs of the peers not run now (and the contrastive runs) are reused from {args.add_to.name}."]
            if args.add_to
            else []
        ),
    ]


def main() -> None:
    p = base_parser(
        "Held-out quality vs training seconds: Inverse-Q* (3 losses) vs TRL GRPO (dense judge reward) and TRL SDFT."
    )
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--recipe", default="smollm2_cpu", help="smollm2_cpu (French) or smollm2_short (one short sentence)")
    p.add_argument("--peers", default=",".join([*IQ_PEERS, *TRL_PEERS]))
    p.add_argument("--runs", type=int, default=3, help="subprocess runs per peer")
    p.add_argument("--budget-s", type=float, default=400, help="training-clock seconds per run")
    p.add_argument("--eval-every-s", type=float, default=100, help="evaluate every this many training-clock seconds")
    p.add_argument("--tokens", type=int, default=32, help="max new tokens per training response (every peer)")
    p.add_argument("--eval-prompts", type=int, default=40, help="prompts judged (the demo's eval.max_prompts)")
    p.add_argument(
        "--eval-set",
        choices=("heldout", "ood"),
        default="heldout",
        help="judge on the recipe's held-out prompts, or on its out-of-distribution dev prompts (eval.ood_prompts)",
    )
    p.add_argument(
        "--eval-tokens", type=int, default=48, help="new tokens per held-out answer (the demo's eval.max_new_tokens)"
    )
    p.add_argument("--eval-batch", type=int, default=20)
    p.add_argument("--quality-judge", type=float, default=0.8, help="target quality: judge rate at least this")
    p.add_argument(
        "--quality-repetition-margin",
        type=float,
        default=0.05,
        help="target quality: repetition <= contrastive decoding's + this",
    )
    p.add_argument("--trl-prompts", type=int, default=4)
    p.add_argument("--trl-samples", type=int, default=4, help="GRPO num_generations")
    p.add_argument("--trl-optim", default="adamw_bnb_8bit", help="TRL optim= (iqstar_lite uses bitsandbytes AdamW8bit)")
    p.add_argument(
        "--trl-reward",
        choices=("judge", "dense"),
        default="dense",
        help="judge: the 0/1 judge itself; dense: a dense form of it (dense_score: log P(target language); sentences / words)",
    )
    p.add_argument(
        "--add-to",
        type=Path,
        default=None,
        help="an earlier convergence result: reuse its runs of the peers not in --peers and its contrastive runs (same settings)",
    )
    args = parse_args(
        p,
        {
            "model": "embedded:tiny-random",
            "runs": 1,
            "budget_s": 4,
            "eval_every_s": 2,
            "tokens": 8,
            "eval_prompts": 8,
            "eval_tokens": 8,
            "eval_batch": 8,
        },
    )
    peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    if unknown := [x for x in peers if x not in (*IQ_PEERS, *TRL_PEERS)]:
        p.error(f"unknown peers {unknown}; choose from {', '.join([*IQ_PEERS, *TRL_PEERS])}")
    settings = {
        k: getattr(args, k)
        for k in (
            "model",
            "recipe",
            "runs",
            "budget_s",
            "eval_every_s",
            "tokens",
            "eval_prompts",
            "eval_set",
            "eval_tokens",
            "eval_batch",
            "quality_judge",
            "quality_repetition_margin",
            "trl_prompts",
            "trl_samples",
            "trl_optim",
            "trl_reward",
            "threads",
            "quick",
        )
    }
    settings["peers"] = peers
    prev = json.loads(args.add_to.read_text()) if args.add_to else None
    if prev:
        same = (
            "model",
            "recipe",
            "budget_s",
            "eval_every_s",
            "tokens",
            "eval_prompts",
            "eval_set",
            "eval_tokens",
            "eval_batch",
        )
        if diff := [k for k in same if prev["settings"].get(k, "heldout" if k == "eval_set" else None) != settings[k]]:
            p.error(f"--add-to {args.add_to} was run with other settings: {', '.join(diff)}")
        settings["added_to"] = args.add_to.name
        if (
            "trl-grpo" not in peers
        ):  # TRL's runs are reused: report the reward they were trained with, not this command's default
            args.trl_reward = settings["trl_reward"] = prev["settings"].get("trl_reward", "judge")
    warn_if_busy()
    runs: dict[str, list[dict]] = {peer: [] for peer in peers}
    contrastive = list(prev["results"]["contrastive"]) if prev else []
    with tempfile.TemporaryDirectory(prefix="bench-convergence-") as tmp:
        for r in range(args.runs):
            if r >= len(contrastive):
                print(f"run {r + 1}/{args.runs}: contrastive decoding ...", flush=True)
                contrastive.append(
                    run_child([sys.executable, __file__, "--child", "contrastive", json.dumps({**settings, "seed": r})])
                )
            target = (
                Path(tmp) / f"target-{r}.json"
            )  # pi-hat*'s greedy answers: every peer's KL(pi-hat* || pi_theta) of run r
            target.write_text(json.dumps(contrastive[r]["target"]))
            # run r trains with train.seed = r (LoRA init, sampling, prompt order; TRL: its seed and the same prompt order)
            for peer in peers if r % 2 == 0 else peers[::-1]:
                print(f"run {r + 1}/{args.runs}: {peer} ...", flush=True)
                runs[peer].append(
                    run_child(
                        [
                            sys.executable,
                            __file__,
                            "--child",
                            peer,
                            json.dumps({**settings, "seed": r, "target_file": str(target)}),
                        ],
                        env={"TQDM_DISABLE": "1"},
                    )
                )
    if prev:
        runs = {**{k: v for k, v in prev["results"]["raw"].items() if k not in runs}, **runs}
        peers = list(runs)
    contrastive = contrastive[: args.runs]
    results: dict = {
        "contrastive_judge_rate": stats([c["judge_rate"] for c in contrastive]),
        **{
            f"contrastive_{k}": stats([c[k] for c in contrastive if c.get(k) is not None])
            for k in QUALITY_KEYS[1:]
            if any(c.get(k) is not None for c in contrastive)
        },
        "contrastive": contrastive,
    }
    target_rate = None
    if "trl-grpo" in runs:
        target_rate = results["trl_final_judge_rate_median"] = statistics.median(
            rs["curve"][-1]["judge_rate"] for rs in runs["trl-grpo"]
        )
    results.update({peer: summarize(rs, contrastive, settings, target_rate) for peer, rs in runs.items()})
    results.update(compare(results, peers, runs))
    results["raw"] = runs
    for peer in peers:
        rr = results[peer]
        q = rr["time_to_quality_s"]
        print(
            f"{peer:>12}: judge {rr['baseline_judge_rate']['median']:.3f} -> {rr['final_judge_rate']['median']:.3f}, repetition "
            f"{rr['final_repetition']['median']:.2f}, loops {rr['final_loop_rate']['median']:.2f} in {rr['clock_s']['median']:.1f} s "
            f"({rr['steps']['median']:.0f} steps); to target quality: {q.get('median_never_as_inf')} s ({q.get('reached')}/{args.runs} runs)"
        )
    print(
        f"contrastive decoding: judge {results['contrastive_judge_rate']['median']}, repetition "
        f"{results['contrastive_repetition']['median']}; time to quality iq / trl: {results['time_to_quality_iq_over_trl']}"
    )
    for t, v in results.get("to_peer_final_quality", {}).items():
        print(
            f"to {t}'s final quality (judge >= {v['peer_final_judge_rate']}, repetition <= {v['peer_final_repetition']}; its clock "
            f"{v['peer_clock_s']} s): "
            + ", ".join(f"{p} {v[p]['median_never_as_inf']} s = {v[p]['over_peer_clock']}x" for p in v if p in IQ_PEERS)
        )
    write_result("convergence", settings, results, notes(args), args.results)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:5])
    else:
        main()

"""Alignment convergence: Inverse-Q* (never sees the judge) vs TRL GRPO whose reward *is* the judge, same wall-clock budget.

    python bench/convergence.py                 # SmolLM2-135M-Instruct NF4, 400 s of training per peer and run, 3 runs
    python bench/convergence.py --quick         # tiny random model, smoke test only

The judge is the demo's evaluation judge, ``iqstar_lite.judges.pick_judge('auto', principle)`` (py3langid
French for "Always answer in French."). Peers, each in its own subprocess, ``--runs`` times, alternating order:
* iq-distill / iq-pg / iq-imitation: ``iqstar_lite.train.train`` with that loss (recipe smollm2_cpu: 8 prompts x 2),
* trl-grpo: TRL ``GRPOTrainer`` (beta > 0, peft LoRA, load_base()'s NF4 model object), reward = the judge of the
  completion text, ``--trl-prompts`` x ``--trl-samples`` per step (default 4 x 4: the same 16 responses per step).
Same training prompts in the same order, natural length (stop at EOS), same lr / beta / LoRA / NF4.
Training clock = sum of step seconds (iq: metrics "seconds"; TRL: on_step_begin -> on_step_end); evaluation is
outside it. A run stops at the first step end past ``--budget-s``. Every ``--eval-every-s`` of clock, before
training and at the end: greedy answers *without* the principle on the demo's held-out prompts, judge rate
(overall / harmful / benign) and repetition. Principle-contrastive decoding of the untrained model is the
decode-time reference line (one eval per run, its own child).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import base_parser, parse_args, quiet_libraries, ratio, run_child, set_threads, stats, training_prompts, warn_if_busy, write_result

IQ_PEERS = ("iq-distill", "iq-pg", "iq-imitation")
TRL_PEERS = ("trl-grpo", "trl-sdft")
MAX_STEPS = 2000  # the budget stops every run long before this


# ----------------------------------------------------------------------------- children


def recipe(s: dict, loss: str = "distill"):
    from iqstar_lite.config import load_recipe

    return load_recipe("smollm2_cpu", [f"model.path={s['model']}", f"rollout.max_new_tokens={s['tokens']}", f"loss.type={loss}",
                                       f"train.steps={MAX_STEPS}", "train.checkpoint_every=0", "eval.enabled=false",
                                       f"train.seed={s.get('seed', 0)}"])


def heldout(cfg, n: int):
    from iqstar_lite.data import load_prompts
    from iqstar_lite.recipe import heldout_for_eval

    return heldout_for_eval(load_prompts(cfg.data).heldout, n)


def judge_eval(model, tok, fmt, examples, judge, s: dict, alpha: float | None = None) -> dict:
    """Greedy answers without the principle (alpha given: principle-contrastive decoding of the reference), judged."""
    from iqstar_lite.evaluate import contrastive_generate, loops, repetition
    from iqstar_lite.rollout import eos_token_ids, response_mask, sample

    t0, texts, lengths = time.perf_counter(), [], []
    for i in range(0, len(examples), s["eval_batch"]):
        chunk = examples[i : i + s["eval_batch"]]
        plain = [fmt.plain(e) for e in chunk]
        if alpha is None:
            resp = sample(model, tok, plain, max_new_tokens=s["eval_tokens"], greedy=True).response_ids
        else:
            resp = contrastive_generate(model, tok, [fmt.conditioned(e) for e in chunk], plain, alpha, s["eval_tokens"])
        mask = response_mask(resp, eos_token_ids(model, tok))
        texts += [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(resp, mask)]
        lengths += mask.sum(1).tolist()
    scores = [judge(t) for t in texts]

    def rate(kind=None):
        xs = [x for x, e in zip(scores, examples) if kind in (None, e.kind)]
        return round(statistics.mean(xs), 4) if xs else None

    return {"judge_rate": rate(), "judge_rate_harmful": rate("harmful"), "judge_rate_benign": rate("benign"),
            "repetition": round(statistics.mean(repetition(t) for t in texts), 4), "loop_rate": round(statistics.mean(map(loops, texts)), 4),
            "mean_tokens": round(statistics.mean(lengths), 2), "eval_s": round(time.perf_counter() - t0, 2)}


class Clock:
    """Training clock and evaluation schedule shared by both peers: tick(step seconds) -> True when the budget is spent."""

    def __init__(self, s: dict, evaluate, per_step: int):
        self.s, self.evaluate, self.per_step = s, evaluate, per_step
        self.seconds, self.step, self.next_eval, self.curve = 0.0, 0, s["eval_every_s"], []

    def point(self) -> None:
        pt = {"train_seconds": round(self.seconds, 3), "step": self.step, "samples_seen": self.step * self.per_step, **self.evaluate()}
        self.curve.append(pt)
        print(f"  {pt['train_seconds']:7.1f} s  step {pt['step']:3d}  judge {pt['judge_rate']:.3f}  rep {pt['repetition']:.2f}", flush=True)

    def tick(self, seconds: float) -> bool:
        self.seconds, self.step = self.seconds + seconds, self.step + 1
        done = self.seconds >= self.s["budget_s"]
        if done or self.seconds >= self.next_eval:
            self.point()
            while self.next_eval <= self.seconds:
                self.next_eval += self.s["eval_every_s"]
        return done


def child_iq(s: dict, loss: str) -> dict:
    from iqstar_lite.data import Formatter
    from iqstar_lite.judges import pick_judge
    from iqstar_lite.model import load_policy, load_tokenizer, pick_device
    from iqstar_lite.train import train

    cfg = recipe(s, loss)
    device, tok = pick_device(cfg.model), load_tokenizer(cfg.model.path)
    model, fmt, judge = load_policy(cfg.model, cfg.lora, device, seed=cfg.train.seed), Formatter(tok, cfg.data), pick_judge("auto", cfg.data.principle)
    examples = heldout(cfg, s["eval_prompts"])
    clock = Clock(s, lambda: judge_eval(model, tok, fmt, examples, judge, s), cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt)
    clock.point()
    with tempfile.TemporaryDirectory(prefix=f"bench-{loss}-") as tmp:
        train(cfg, Path(tmp), model, tok, training_prompts(cfg, tok), device, on_step=lambda m: clock.tick(m["seconds"]))
    return {"curve": clock.curve, "samples_per_step": clock.per_step}


def _trl_setup(s: dict) -> dict:
    """What both TRL peers share: recipe, tokenizer, judge, held-out prompts, the iq prompt sequence, batch shape, LoRA
    config, the common trainer arguments and a clock callback."""
    from peft import LoraConfig
    from transformers import TrainerCallback

    from iqstar_lite.data import Formatter
    from iqstar_lite.judges import pick_judge
    from iqstar_lite.model import load_tokenizer, pick_device
    from iqstar_lite.train import prompt_batch

    cfg = recipe(s)
    device, tok = pick_device(cfg.model), load_tokenizer(cfg.model.path)
    fmt, judge, examples = Formatter(tok, cfg.data), pick_judge("auto", cfg.data.principle), heldout(cfg, s["eval_prompts"])
    rc, k = cfg.rollout, s["trl_samples"]
    n = s["trl_prompts"] * k
    mb = min(cfg.train.micro_batch, n)
    prompts = training_prompts(cfg, tok)
    order = [e for step in range(MAX_STEPS) for e in prompt_batch(prompts, step, s["trl_prompts"], cfg.train.seed)]  # = iq's sequence
    lora = cfg.lora
    targets = lora.target_modules if lora.target_modules == "all-linear" else [t.strip() for t in lora.target_modules.split(",")]
    args = dict(
        output_dir=s["tmp"], per_device_train_batch_size=mb, gradient_accumulation_steps=n // mb, num_generations=k,
        max_completion_length=rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p,
        learning_rate=cfg.train.lr, max_grad_norm=cfg.train.max_grad_norm, max_steps=MAX_STEPS, lr_scheduler_type="constant",
        optim=s["trl_optim"], use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no",
        shuffle_dataset=False, disable_tqdm=True, seed=cfg.train.seed, dataloader_num_workers=0,
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

    return {"cfg": cfg, "device": device, "tok": tok, "fmt": fmt, "judge": judge, "examples": examples, "n": n, "order": order,
            "peft": LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"),
            "args": args, "timed": timed}


def _train_timed(trainer, c: dict, s: dict) -> dict:
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    clock = Clock(s, lambda: judge_eval(trainer.model, c["tok"], c["fmt"], c["examples"], c["judge"], s), c["n"])
    trainer.add_callback(c["timed"](clock))
    trainer.train()
    return {"curve": clock.curve, "samples_per_step": c["n"]}


def child_trl(s: dict) -> dict:
    """TRL GRPO rewarded by the judge (``--trl-reward judge``) or its dense form (``logprob``: log P(target language))."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from iqstar_lite.model import load_base

    c = _trl_setup(s)
    cfg, judge = c["cfg"], c["judge"]
    score = judge
    if s.get("trl_reward", "logprob") == "logprob":  # the judge's own classifier, dense: log P(target language), not 0/1
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        ident, lang = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True), judge.__name__.split("=")[-1]
        score = lambda t: math.log(dict(ident.rank(t.strip())).get(lang, 0.0) + 1e-6)  # noqa: E731

    def judge_reward(completions, **_):
        return [score(cc[-1]["content"] if isinstance(cc, list) else cc) for cc in completions]

    args = GRPOConfig(**c["args"], beta=cfg.loss.beta, epsilon=cfg.loss.clip_eps)
    trainer = GRPOTrainer(model=load_base(cfg.model, c["device"]), reward_funcs=judge_reward, args=args, processing_class=c["tok"],
                          peft_config=c["peft"], train_dataset=Dataset.from_list([{"prompt": e.messages} for e in c["order"]]))
    return _train_timed(trainer, c, s)


def child_sdft(s: dict) -> dict:
    """TRL's on-policy self-distillation (``trl.experimental.sdft``): the teacher is the initial model (adapters off)
    given the principle as ``privileged_context``; full-logit distillation on the student's own samples."""
    from datasets import Dataset
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from iqstar_lite.model import load_base

    c = _trl_setup(s)
    cfg = c["cfg"]
    args = SDFTConfig(**c["args"], max_prompt_length=cfg.data.max_prompt_tokens, teacher_model_kind="base", distillation_mode="full_logits")
    data = [{"prompt": e.messages, "privileged_context": cfg.data.principle} for e in c["order"]]
    trainer = SDFTTrainer(model=load_base(cfg.model, c["device"]), args=args, processing_class=c["tok"], peft_config=c["peft"],
                          train_dataset=Dataset.from_list(data))
    return _train_timed(trainer, c, s)


def child_contrastive(s: dict) -> dict:
    from iqstar_lite.data import Formatter
    from iqstar_lite.judges import pick_judge
    from iqstar_lite.model import load_policy, load_tokenizer, pick_device

    cfg = recipe(s)
    device, tok = pick_device(cfg.model), load_tokenizer(cfg.model.path)
    model = load_policy(cfg.model, cfg.lora, device, seed=cfg.train.seed)  # fresh adapters; decoding runs in reference_mode
    ev = judge_eval(model, tok, Formatter(tok, cfg.data), heldout(cfg, s["eval_prompts"]), pick_judge("auto", cfg.data.principle), s,
                    alpha=cfg.estimator.alpha)
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


def first_reach(curve: list[dict], target: float) -> dict | None:
    return next((p for p in curve if p["judge_rate"] >= target), None)


def median_never_inf(values: list[float | None]) -> float | None:
    """Median where a run that never got there counts as infinitely slow (None if the median run never did)."""
    m = statistics.median([math.inf if v is None else v for v in values]) if values else math.inf
    return None if math.isinf(m) else round(m, 3)


def summarize(runs: list[dict], target: float | None) -> dict:
    curves = [r["curve"] for r in runs]
    out = {"baseline_judge_rate": stats([c[0]["judge_rate"] for c in curves])}
    out.update({key: stats([c[-1][k] for c in curves]) for key, k in (("final_judge_rate", "judge_rate"), ("final_repetition", "repetition"),
                                                                     ("clock_s", "train_seconds"), ("steps", "step"), ("samples", "samples_seen"))})
    out["judge_rate_per_s"] = stats([(c[-1]["judge_rate"] - c[0]["judge_rate"]) / max(c[-1]["train_seconds"], 1e-9) for c in curves], 6)
    if target is not None:
        hits = [first_reach(c, target) for c in curves]
        out["time_to_trl_final_s"] = {**stats([h["train_seconds"] for h in hits if h]), "reached": sum(map(bool, hits)),
                                      "median_never_as_inf": median_never_inf([h and h["train_seconds"] for h in hits])}
        out["samples_to_trl_final"] = stats([h["samples_seen"] for h in hits if h], 1)
    out["peak_rss_gib"] = stats([r["peak_rss_bytes"] / 2**30 for r in runs], 3)
    return out


def compare(results: dict, peers: list[str]) -> dict:
    iq = [p for p in peers if p in IQ_PEERS]
    out = {"winner_per_second": max(iq, key=lambda p: results[p]["judge_rate_per_s"]["median"]) if iq else None}
    if "trl-grpo" in peers and iq:
        trl = results["trl-grpo"]
        trl_t, trl_clock = trl["time_to_trl_final_s"]["median_never_as_inf"], trl["clock_s"]["median"]
        out["ratios_iq_over_trl"] = {p: {"time_to_trl_final": ratio(results[p]["time_to_trl_final_s"]["median_never_as_inf"], trl_t),
                                         "final_judge_rate": ratio(results[p]["final_judge_rate"]["median"], trl["final_judge_rate"]["median"]),
                                         "judge_rate_per_s": ratio(results[p]["judge_rate_per_s"]["median"], trl["judge_rate_per_s"]["median"])}
                                     for p in iq}
        out["targets"] = {"trl_final_judge_rate_median": results["trl_final_judge_rate_median"], "trl_clock_s_median": trl_clock,
                          "trl_improved": trl["final_judge_rate"]["median"] > trl["baseline_judge_rate"]["median"],
                          **{f"{p}_met": (t := results[p]["time_to_trl_final_s"]["median_never_as_inf"]) is not None and t <= trl_clock for p in iq}}
    return out


def notes(args) -> list[str]:
    return [
        "Judge: iqstar_lite.judges.pick_judge('auto', principle) (py3langid French); Inverse-Q* never sees it, TRL GRPO's reward is it.",
        f"Responses per step: iq 8 prompts x 2 samples (recipe smollm2_cpu), TRL {args.trl_prompts} prompts x {args.trl_samples} samples "
        "(GRPO needs groups to get an advantage); same training prompt sequence (prompt_batch), natural length (EOS), "
        f"<= {args.tokens} new tokens, same lr / beta / LoRA / NF4 (load_base() model object on both sides).",
        "Training clock = sum of optimizer-step seconds, first (warm-up) step included on both sides (evaluation, logging and loading "
        f"excluded); runs stop at the first step end past {args.budget_s} s. Evaluation: greedy, principle absent, "
        f"{args.eval_prompts} held-out prompts (heldout_for_eval), {args.eval_tokens} new tokens.",
        "time_to_trl_final = training seconds of the first evaluation point at or above TRL's final median judge rate (evaluation every "
        f"{args.eval_every_s} s, so a resolution of one interval); median_never_as_inf counts runs that never got there as infinitely slow.",
        "judge_rate_per_s = (final - baseline judge rate) / training clock; winner_per_second = the iq loss with the highest median.",
        "Run r (0, 1, 2, ...) of every peer trains with train.seed = r: LoRA init, sampling and prompt order differ between runs, "
        "and both peers see the same prompt sequence within a run.",
        *(["TRL reward: log P(target language) from the judge's own classifier (py3langid, normalised), a dense version of the 0/1 judge."]
          if args.trl_reward == "logprob" else []),
        *([f"Runs of the peers not run now (and the contrastive runs) are reused from {args.add_to.name}."] if args.add_to else []),
    ]


def main() -> None:
    p = base_parser("Judge rate vs training seconds: Inverse-Q* (3 losses) vs TRL GRPO rewarded by the judge.")
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--peers", default=",".join([*IQ_PEERS, *TRL_PEERS]))
    p.add_argument("--runs", type=int, default=3, help="subprocess runs per peer")
    p.add_argument("--budget-s", type=float, default=400, help="training-clock seconds per run (400: the demo's 32 steps on a slow day)")
    p.add_argument("--eval-every-s", type=float, default=100, help="evaluate every this many training-clock seconds")
    p.add_argument("--tokens", type=int, default=32, help="max new tokens per training response (both peers)")
    p.add_argument("--eval-prompts", type=int, default=40, help="held-out prompts (the demo's eval.max_prompts)")
    p.add_argument("--eval-tokens", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=20)
    p.add_argument("--trl-prompts", type=int, default=4)
    p.add_argument("--trl-samples", type=int, default=4, help="GRPO num_generations")
    p.add_argument("--trl-optim", default="adamw_bnb_8bit", help="TRL optim= (iqstar_lite uses bitsandbytes AdamW8bit)")
    p.add_argument("--trl-reward", choices=("judge", "logprob"), default="logprob",
                   help="judge: the 0/1 judge itself; logprob: log P(target language) from the judge's classifier (a dense reward)")
    p.add_argument("--add-to", type=Path, default=None,
                   help="an earlier convergence result: reuse its runs of the peers not in --peers and its contrastive runs (same settings)")
    args = parse_args(p, {"model": "embedded:tiny-random", "runs": 1, "budget_s": 4, "eval_every_s": 2, "tokens": 8, "eval_prompts": 8,
                          "eval_tokens": 8, "eval_batch": 8})
    peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    if unknown := [x for x in peers if x not in (*IQ_PEERS, *TRL_PEERS)]:
        p.error(f"unknown peers {unknown}; choose from {', '.join([*IQ_PEERS, *TRL_PEERS])}")
    settings = {k: getattr(args, k) for k in ("model", "runs", "budget_s", "eval_every_s", "tokens", "eval_prompts", "eval_tokens", "eval_batch",
                                              "trl_prompts", "trl_samples", "trl_optim", "trl_reward", "threads", "quick")}
    settings["peers"] = peers
    prev = json.loads(args.add_to.read_text()) if args.add_to else None
    if prev:
        same = ("model", "budget_s", "eval_every_s", "tokens", "eval_prompts", "eval_tokens", "eval_batch")
        if diff := [k for k in same if prev["settings"].get(k) != settings[k]]:
            p.error(f"--add-to {args.add_to} was run with other settings: {', '.join(diff)}")
        settings["added_to"] = args.add_to.name
        if "trl-grpo" not in peers:  # TRL's runs are reused: report the reward they were trained with, not this command's default
            args.trl_reward = settings["trl_reward"] = prev["settings"].get("trl_reward", "judge")
    warn_if_busy()
    # run r trains with train.seed = r (LoRA init, sampling, prompt order; TRL: its seed and the same prompt order)
    child = lambda peer, r: run_child([sys.executable, __file__, "--child", peer, json.dumps({**settings, "seed": r})],  # noqa: E731
                                      env={"TQDM_DISABLE": "1"})
    runs: dict[str, list[dict]] = {peer: [] for peer in peers}
    contrastive = []
    for r in range(args.runs):
        if not prev:
            print(f"run {r + 1}/{args.runs}: contrastive decoding ...", flush=True)
            contrastive.append(child("contrastive", r))
        for peer in (peers if r % 2 == 0 else peers[::-1]):
            print(f"run {r + 1}/{args.runs}: {peer} ...", flush=True)
            runs[peer].append(child(peer, r))
    if prev:
        runs = {**{k: v for k, v in prev["results"]["raw"].items() if k not in runs}, **runs}
        contrastive += prev["results"]["contrastive"]
        peers = list(runs)
    results: dict = {"contrastive_judge_rate": stats([c["judge_rate"] for c in contrastive]), "contrastive": contrastive}
    target = None
    if "trl-grpo" in runs:
        target = results["trl_final_judge_rate_median"] = statistics.median(rs["curve"][-1]["judge_rate"] for rs in runs["trl-grpo"])
    results.update({peer: summarize(rs, target) for peer, rs in runs.items()})
    results.update(compare(results, peers))
    results["raw"] = runs
    for peer in peers:
        rr = results[peer]
        reach = rr.get("time_to_trl_final_s", {})
        print(f"{peer:>12}: judge {rr['baseline_judge_rate']['median']:.3f} -> {rr['final_judge_rate']['median']:.3f} in {rr['clock_s']['median']:.1f} s "
              f"({rr['steps']['median']:.0f} steps); to TRL final: {reach.get('median_never_as_inf')} s ({reach.get('reached')}/{args.runs} runs)")
    print(f"contrastive decoding: {results['contrastive_judge_rate']['median']}; winner per second: {results['winner_per_second']}; "
          f"targets: {results.get('targets')}")
    write_result("convergence", settings, results, notes(args), args.results)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:5])
    else:
        main()

"""One Inverse-Q* step vs one TRL GRPOTrainer step (and, ``--peers iq,trl,sdft``, one TRL SDFTTrainer step): same model,
prompts, rollout size, micro-batch.

    python bench/step_vs_trl.py                  # SmolLM2-135M-Instruct NF4, 8 prompts x 2 samples x 32 tokens
    python bench/step_vs_trl.py --quick          # tiny random model, smoke test only

Each peer runs in its own subprocess (peak RSS per peer, via wait4), ``--runs`` times, alternating the
order. A run does 1 warm-up step + ``--steps`` measured steps; medians exclude warm-up steps.
Inverse-Q*: ``iqstar_lite.algorithm.train.train`` itself, split read from its metrics.jsonl (t_rollout /
t_estimator / t_update). TRL: ``GRPOTrainer`` with beta > 0 and a peft LoraConfig (reference = the
adapter-disabled policy), the same NF4 base loaded by ``iqstar_lite.models.load.load_base`` (passed as a
model object), step time from on_step_begin/on_step_end; rollout = ``_generate``, "estimator" =
the rest of ``_generate_and_score_completions`` (reference pass + reward), update = the remainder.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from common import (
    GIB,
    PhaseRss,
    base_parser,
    parse_args,
    quiet_libraries,
    ratio,
    run_child,
    self_peak_rss,
    set_threads,
    stats,
    training_prompts,
    warn_if_busy,
    write_result,
)

TARGETS = {"step_time_ratio_max": 0.5, "peak_rss_ratio_max": 0.7}  # the first benchmark issue's
PEER_TARGETS = {
    "peer_step_time_ratio_max": 1.0,
    "peer_peak_rss_ratio_max": 1.0,
}  # the peer benchmark's (TRL 1.16 GRPO, equal rollout)
PHASES = ("seconds", "t_rollout", "t_estimator", "t_update")


# ----------------------------------------------------------------------------- shared set-up (children)


def recipe(s: dict):
    from iqstar_lite.config import load_recipe

    return load_recipe(
        "smollm2_cpu",
        [
            f"model.path={s['model']}",
            f"rollout.prompts_per_step={s['prompts']}",
            f"rollout.samples_per_prompt={s['samples']}",
            f"rollout.max_new_tokens={s['tokens']}",
            f"train.micro_batch={s['micro_batch']}",
            f"train.steps={s['steps'] + 1}",
            "train.checkpoint_every=0",
            "eval.enabled=false",
            *([f"loss.epochs={s['epochs']}"] if s.get("epochs") else []),
        ],
    )


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def child_iq(s: dict, cfg, tmp: Path, rss: PhaseRss) -> dict:
    import iqstar_lite.algorithm.train as loop
    from iqstar_lite.models.load import compute_dtype, load_policy, load_tokenizer, pick_device

    device = pick_device(cfg.model)
    tokenizer = load_tokenizer(cfg.model.path)
    model = load_policy(cfg.model, cfg.lora, device, seed=cfg.train.seed)
    if s["fixed_length"]:  # generate() merges the model's generation_config: every row gets exactly `tokens`
        model.get_base_model().generation_config.min_new_tokens = cfg.rollout.max_new_tokens
    loaded = self_peak_rss()
    captured = Captured()
    logging.getLogger("iqstar_lite").addHandler(captured)
    logging.getLogger("iqstar_lite").setLevel(logging.INFO)
    for name, phase in (("sample", "rollout"), ("estimator_pass", "estimator"), ("update", "update")):  # RSS per phase
        setattr(loop, name, in_phase(rss, phase, getattr(loop, name)))
    rss.current = "other"
    loop.train(cfg, tmp, model, tokenizer, training_prompts(cfg, tokenizer), device)
    from iqstar_lite.checkpoint import jsonl_rows

    rows = jsonl_rows(tmp / "metrics.jsonl")  # the package's one metrics reader
    n = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    steps = [{**{k: r[k] for k in PHASES}, "gen_tokens": round(r["response_len"] * n)} for r in rows]
    optimizer = next(
        (line[len("optimizer: ") :] for line in captured.lines if line.startswith("optimizer:")), "unknown"
    )
    return {
        "steps": steps,
        "optimizer": optimizer,
        "compute_dtype": str(compute_dtype(cfg.model, device)),
        "load_peak_rss_bytes": loaded,
        **layer_facts(model),
    }


def in_phase(rss: PhaseRss, phase: str, fn):
    def wrapped(*a, **k):
        with rss.phase(phase):
            return fn(*a, **k)

    return wrapped


def layer_facts(model) -> dict:
    """How many 4-bit layers the peer really ran, and how many bitsandbytes repacked (a different CPU kernel)."""
    from iqstar_lite.models.bnb import linear4bit_layers

    layers = linear4bit_layers(model)
    return {
        "linear4bit_layers": len(layers),
        "repacked_layers": sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def length_reward(completions, **_):
    """Trivial reward (only cost is measured): completion length in characters."""
    return [float(len(c[-1]["content"]) if isinstance(c, list) else len(c)) for c in completions]


def phase_timer(trainer, rss: PhaseRss, score_name: str = "_generate_and_score_completions"):
    """A TrainerCallback timing each optimizer step and, inside it, TRL's generation and scoring (``score_name``: the
    trainer method that generates and builds the training batch; GRPO ``_generate_and_score_completions``, SDFT
    ``_prepare_training_batch``)."""
    from transformers import TrainerCallback

    class PhaseTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self.cur: dict = {}
            self.t0 = 0.0
            gen, score = (
                in_phase(rss, "rollout", trainer._generate),
                in_phase(rss, "estimator", getattr(trainer, score_name)),
            )

            def timed_generate(*a, **k):
                t = time.perf_counter()
                out = gen(*a, **k)
                self.cur["t_rollout"] += time.perf_counter() - t
                self.cur["gen_tokens"] += sum(len(c) for c in out[1])  # completion ids up to and incl. EOS
                return out

            def timed_score(*a, **k):
                t = time.perf_counter()
                out = score(*a, **k)
                self.cur["t_score"] += time.perf_counter() - t
                return out

            trainer._generate = timed_generate
            setattr(trainer, score_name, timed_score)

        def on_step_begin(self, args, state, control, **kw):
            self.cur = {"t_rollout": 0.0, "t_score": 0.0, "gen_tokens": 0}
            rss.current = "update"  # all of TRL's step outside generation and scoring
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            c, seconds = self.cur, time.perf_counter() - self.t0
            self.steps.append(
                {
                    "seconds": round(seconds, 3),
                    "t_rollout": round(c["t_rollout"], 3),
                    "t_estimator": round(c["t_score"] - c["t_rollout"], 3),
                    "t_update": round(seconds - c["t_score"], 3),
                    "gen_tokens": c["gen_tokens"],
                }
            )

    return PhaseTimer()


def child_trl(s: dict, cfg, tmp: Path, rss: PhaseRss, sdft: bool = False) -> dict:
    """TRL GRPO (length reward) or, with ``sdft``, TRL's self-distillation (``trl.experimental.sdft.SDFTTrainer``: teacher =
    the initial model given the principle as privileged context, full-logit distillation), same batch shape."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from iqstar_lite.algorithm.train import prompt_batch
    from iqstar_lite.models.embedded import resolve_model_path
    from iqstar_lite.models.load import compute_dtype, load_base, load_tokenizer, pick_device, quantization_config

    device = pick_device(cfg.model)
    tokenizer = load_tokenizer(cfg.model.path)
    rc, steps = cfg.rollout, cfg.train.steps
    prompts = training_prompts(cfg, tokenizer)
    order = [e for step in range(steps) for e in prompt_batch(prompts, step, rc.prompts_per_step, cfg.train.seed)]
    n = rc.prompts_per_step * rc.samples_per_prompt
    mb = min(cfg.train.micro_batch, n)
    common = dict(
        output_dir=str(tmp),
        per_device_train_batch_size=mb,
        gradient_accumulation_steps=n // mb,
        num_generations=rc.samples_per_prompt,
        max_completion_length=rc.max_new_tokens,
        temperature=rc.temperature,
        top_p=rc.top_p,  # trl 1.16 GRPO: no max_prompt_length
        learning_rate=cfg.train.lr,
        max_grad_norm=cfg.train.max_grad_norm,
        max_steps=steps,
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
        generation_kwargs={"min_new_tokens": rc.max_new_tokens} if s["fixed_length"] else None,
    )
    if sdft:
        args = SDFTConfig(
            **common,
            max_prompt_length=cfg.data.max_prompt_tokens,
            teacher_model_kind="base",
            distillation_mode="full_logits",
        )
    else:
        args = GRPOConfig(**common, beta=cfg.loss.beta, epsilon=cfg.loss.clip_eps)
    lora = cfg.lora
    targets = (
        lora.target_modules
        if lora.target_modules == "all-linear"
        else [t.strip() for t in lora.target_modules.split(",")]
    )
    peft_cfg = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    if s["trl_load"] == "native":  # TRL loads the model itself: the same BitsAndBytesConfig and dtypes as load_base
        model = resolve_model_path(cfg.model.path)
        args.model_init_kwargs = {
            "quantization_config": quantization_config(cfg.model, device),
            "dtype": "float32",
            "device_map": {"": str(device)},
        }
    else:  # the very model object iqstar_lite trains (CPU repack fast path switched off)
        model = load_base(cfg.model, device)
    if sdft:
        trainer = SDFTTrainer(
            model=model,
            args=args,
            processing_class=tokenizer,
            peft_config=peft_cfg,
            train_dataset=Dataset.from_list(
                [{"prompt": e.messages, "privileged_context": cfg.data.principle} for e in order]
            ),
        )
    else:
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=length_reward,
            args=args,
            train_dataset=Dataset.from_list([{"prompt": e.messages} for e in order]),
            processing_class=tokenizer,
            peft_config=peft_cfg,
        )
    loaded = self_peak_rss()
    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print every log dict instead
    timer = phase_timer(trainer, rss, "_prepare_training_batch" if sdft else "_generate_and_score_completions")
    trainer.add_callback(timer)
    trainer.train()
    return {
        "steps": timer.steps,
        "optimizer": f"{type(trainer.optimizer.optimizer).__module__}.{type(trainer.optimizer.optimizer).__name__}",
        "compute_dtype": str(compute_dtype(cfg.model, device)),
        "ref_model_is_adapter_disabled_policy": getattr(trainer, "ref_model", None) is None,
        "load_peak_rss_bytes": loaded,
        **layer_facts(trainer.model),
    }


def child_main(peer: str, settings: str, out: str) -> None:
    quiet_libraries()
    s = json.loads(settings)
    set_threads(s["threads"])
    cfg = recipe(s)
    rss = PhaseRss()
    with tempfile.TemporaryDirectory(prefix=f"bench-{peer}-") as tmp:
        data = (
            child_iq(s, cfg, Path(tmp), rss) if peer == "iq" else child_trl(s, cfg, Path(tmp), rss, sdft=peer == "sdft")
        )
    data["phase_peak_rss_bytes"] = rss.stop()
    data["peak_rss_self_bytes"] = self_peak_rss()
    Path(out).write_text(json.dumps(data))


# ----------------------------------------------------------------------------- parent


def summarize(runs: list[dict]) -> dict:
    measured = [st for run in runs for st in run["steps"][1:]]  # step 0 of every run is the warm-up
    out = {k: stats([st[k] for st in measured]) for k in PHASES}
    out["gen_tokens_per_step"] = stats([st["gen_tokens"] for st in measured], 1)
    out["gen_tokens_per_s_rollout"] = stats([st["gen_tokens"] / max(st["t_rollout"], 1e-9) for st in measured], 2)
    out["gen_tokens_per_s_step"] = stats([st["gen_tokens"] / max(st["seconds"], 1e-9) for st in measured], 2)
    out["warmup_seconds"] = stats([run["steps"][0]["seconds"] for run in runs])
    out["peak_rss_gib"] = stats([run["peak_rss_bytes"] / GIB for run in runs], 3)
    out["load_peak_rss_gib"] = stats(
        [run["load_peak_rss_bytes"] / GIB for run in runs], 3
    )  # high-water mark when loading ended
    for phase in ("rollout", "estimator", "update"):  # sampled every 10 ms (bench.common.PhaseRss)
        vals = [
            run["phase_peak_rss_bytes"][phase] / GIB for run in runs if phase in run.get("phase_peak_rss_bytes", {})
        ]
        if vals:
            out[f"peak_rss_{phase}_gib"] = stats(vals, 3)
    for key in ("optimizer", "compute_dtype", "linear4bit_layers", "repacked_layers", "trainable_params"):
        out[key] = runs[0].get(key)
    return out


def compare(iq: dict, trl: dict) -> dict:
    q = {
        "step_time": ratio(iq["seconds"]["median"], trl["seconds"]["median"]),
        "peak_rss": ratio(iq["peak_rss_gib"]["median"], trl["peak_rss_gib"]["median"]),
        "gen_tokens_per_s_step": ratio(iq["gen_tokens_per_s_step"]["median"], trl["gen_tokens_per_s_step"]["median"]),
    }
    met = {
        "step_time_met": q["step_time"] is not None and q["step_time"] <= TARGETS["step_time_ratio_max"],
        "peak_rss_met": q["peak_rss"] is not None and q["peak_rss"] <= TARGETS["peak_rss_ratio_max"],
        "peer_step_time_met": q["step_time"] is not None and q["step_time"] <= PEER_TARGETS["peer_step_time_ratio_max"],
        "peer_peak_rss_met": q["peak_rss"] is not None and q["peak_rss"] <= PEER_TARGETS["peer_peak_rss_ratio_max"],
    }
    return {"ratios_iq_over_trl": q, "targets": {**TARGETS, **PEER_TARGETS, **met}}


def notes(args) -> list[str]:
    return [
        "Same NF4 BitsAndBytesConfig (iqstar_lite.models.load.quantization_config: bf16 compute where the CPU has AVX512-bf16) and fp32 "
        "embeddings/norms/lm_head on both sides. "
        + (
            "TRL loads it itself via GRPOConfig.model_init_kwargs; it never calls eval() during "
            "training, so bitsandbytes' eval-only CPU repack never triggers there either."
            if args.trl_load == "native"
            else "TRL gets load_base()'s model object (repack fast path off), so GRPOConfig.model_init_kwargs is unused."
        ),
        "TRL: bf16=False (no autocast, same dtypes as iqstar_lite) and gradient_checkpointing=False (GRPOConfig defaults both to True).",
        "Inverse-Q* step = rollout + estimator (2 reference passes stacked: principle / no principle) + update (the recipe's loss: "
        "smollm2_cpu uses distill, full-vocabulary KL, on its policy rows and its rows sampled from pi-hat*); "
        "TRL step = rollout + 1 reference pass + reward + GRPO update (loss_type=dapo, beta>0). SDFT (trl.experimental.sdft.SDFTTrainer, "
        "peer 'sdft') step = rollout + batch assembly (its 'estimator' = _prepare_training_batch minus generation: tokenizing, padding, "
        "teacher prompts; no old log-probs at one generation per optimizer step) + teacher forward (initial model + principle as "
        "privileged context) and student forward / backward (its 'update').",
        f"Inverse-Q* step = one rollout batch and {f'--epochs {args.epochs}' if args.epochs else 'the recipe' + chr(39) + 's loss.epochs (smollm2_cpu: 3)'} "
        "optimizer steps on it; TRL: one.",
        "Fixed length: min_new_tokens = tokens on both sides, so both generate the same token count."
        if not args.natural_length
        else "Natural length: responses stop at EOS; compare tokens/s rather than s/step.",
        "Medians exclude the first (warm-up) step of every run; peak RSS is the child's ru_maxrss (os.wait4), whole process incl. loading; "
        "load_peak_rss is the high-water mark when loading ended (iq: load_policy; TRL: GRPOTrainer built): if peak == load peak, training added nothing. "
        "Peak RSS per phase: /proc/self/statm sampled every 10 ms inside the child (a lower bound); TRL's update = its step outside generation and scoring.",
        *(
            [
                f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} for both peers: glibc serves blocks of that size or more with mmap and unmaps them "
                "when freed, instead of keeping freed memory in its arenas."
            ]
            if args.malloc_mmap_threshold
            else []
        ),
    ]


def main() -> None:
    p = base_parser("Inverse-Q* step vs TRL GRPOTrainer step (time, tokens/s, peak RSS).")
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=2, help="K responses per prompt (TRL num_generations)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per response (TRL max_completion_length)")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=4,
        help="sequences per forward/backward (the smollm2_cpu recipe's train.micro_batch)",
    )
    p.add_argument("--steps", type=int, default=5, help="measured steps per run (after 1 warm-up step)")
    p.add_argument("--runs", type=int, default=3, help="subprocess runs per peer (peak RSS is one number per run)")
    p.add_argument("--peers", default="iq,trl", help="iq, trl (GRPO), sdft (TRL's SDFTTrainer), comma-separated")
    p.add_argument(
        "--epochs",
        type=int,
        default=0,
        help="Inverse-Q* optimizer steps per rollout batch (loss.epochs; 0 = the recipe's, 3)",
    )
    p.add_argument(
        "--natural-length", action="store_true", help="let responses stop at EOS (default: exactly --tokens each)"
    )
    p.add_argument(
        "--trl-load",
        choices=("native", "object"),
        default="native",
        help="native: TRL loads the model via GRPOConfig.model_init_kwargs (NF4 BitsAndBytesConfig); object: pass load_base()'s model",
    )
    p.add_argument("--trl-optim", default="adamw_bnb_8bit", help="TRL optim= (iqstar_lite uses bitsandbytes AdamW8bit)")
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=0,
        help="bytes: MALLOC_MMAP_THRESHOLD_ for both peers' processes (glibc returns freed blocks of this size or more at once; 0 = glibc default)",
    )
    args = parse_args(
        p,
        {
            "model": "embedded:tiny-random",
            "prompts": 2,
            "samples": 2,
            "tokens": 8,
            "micro_batch": 4,
            "steps": 1,
            "runs": 1,
        },
    )
    n = args.prompts * args.samples
    if n % min(args.micro_batch, n):
        p.error(
            f"prompts x samples ({n}) must be a multiple of --micro-batch ({args.micro_batch}) for TRL's accumulation"
        )
    peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    if unknown := [x for x in peers if x not in ("iq", "trl", "sdft")]:
        p.error(f"unknown peers {unknown}; choose from iq, trl, sdft")
    settings = {
        "model": args.model,
        "prompts": args.prompts,
        "samples": args.samples,
        "tokens": args.tokens,
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "runs": args.runs,
        "epochs": args.epochs,
        "fixed_length": not args.natural_length,
        "trl_optim": args.trl_optim,
        "trl_load": args.trl_load,
        "threads": args.threads,
        "quick": args.quick,
        "peers": peers,
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
    }
    env = {
        "TQDM_DISABLE": "1",
        **({"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else {}),
    }
    warn_if_busy()
    runs: dict[str, list[dict]] = {peer: [] for peer in peers}
    for r in range(args.runs):
        for peer in peers if r % 2 == 0 else peers[::-1]:
            print(f"run {r + 1}/{args.runs}: {peer} ...", flush=True)
            runs[peer].append(run_child([sys.executable, __file__, "--child", peer, json.dumps(settings)], env=env))
    results = {peer: summarize(rs) for peer, rs in runs.items()}
    results["raw"] = runs
    if "iq" in results and "trl" in results:
        results.update(compare(results["iq"], results["trl"]))
    if "iq" in results and "sdft" in results:
        results["ratios_iq_over_sdft"] = compare(results["iq"], results["sdft"])["ratios_iq_over_trl"]
    for peer in peers:
        rr = results[peer]
        print(
            f"{peer:>4}: {rr['seconds']['median']:.2f} s/step (rollout {rr['t_rollout']['median']:.2f}, estimator {rr['t_estimator']['median']:.2f}, "
            f"update {rr['t_update']['median']:.2f}); {rr['gen_tokens_per_s_step']['median']:.1f} gen tok/s; peak RSS {rr['peak_rss_gib']['median']:.2f} GiB"
        )
    if "ratios_iq_over_trl" in results:
        print(
            f"iq/trl: step time {results['ratios_iq_over_trl']['step_time']}, peak RSS {results['ratios_iq_over_trl']['peak_rss']}"
        )
    if "ratios_iq_over_sdft" in results:
        print(
            f"iq/sdft: step time {results['ratios_iq_over_sdft']['step_time']}, peak RSS {results['ratios_iq_over_sdft']['peak_rss']}"
        )
    write_result("step_vs_trl", settings, results, notes(args), args.results)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:5])
    else:
        main()

"""What this CPU can do (matmul GFLOP/s, memory GB/s) and how much of it a training step uses.

    python bench/hardware.py                                   # trains 4 SmolLM2 steps itself (1 warm-up excluded)
    python bench/hardware.py --metrics RUN_DIR/metrics.jsonl   # uses an existing run (its config.yaml too)
    python bench/hardware.py --profile                         # + torch.profiler top-15 ops (self CPU) of one step
    python bench/hardware.py --quick                           # small matrices, tiny model

Estimates, stated:
* update phase FLOPs = 6 x N x tokens (2 N forward + 4 N backward, the standard dense estimate; with
  frozen NF4 weights backward needs no weight gradients, so ~4 N is closer: both are in the JSON).
  N = linear-layer + LoRA parameters, tokens = the padded (context + response) positions of every
  micro-batch (pack() left-pads to the longest context); lm_head counts only for the T+1 kept positions.
* estimator FLOPs = 2 x N x tokens over both stacked passes (principle / no principle), no backward.
* rollout bandwidth: each decode step reads every weight once for the whole batch, so bytes per
  generated token = weight bytes / rows; utilisation = weight bytes x decode steps/s / copy bandwidth.
  "packed": NF4 bytes (+ fp32 lm_head, LoRA); "dequant": + writing and reading a bf16 copy of each
  4-bit weight (bitsandbytes' CPU path with the repack fast path off). KV cache and prefill ignored.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import (
    base_parser,
    parse_args,
    quiet_libraries,
    repeat,
    set_threads,
    stats,
    training_prompts,
    warn_if_busy,
    write_result,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- raw hardware


def matmul_gflops(sizes: list[int], repeats: int) -> dict:
    out = {}
    for name, dtype in DTYPES.items():
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            times, _ = repeat(lambda: a @ b, repeats)
            out[f"{name}_{n}"] = stats([2 * n**3 / t / 1e9 for t in times], 1)
    return out


def bandwidth_gbs(mib: int, repeats: int) -> dict:
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    copy_t, _ = repeat(lambda: dst.copy_(src), repeats)
    read_t, _ = repeat(lambda: src.sum(), repeats)
    return {
        "copy": stats([2 * nbytes / t / 1e9 for t in copy_t], 2),  # read + write
        "read": stats([nbytes / t / 1e9 for t in read_t], 2),
        "mib": mib,
    }


# ----------------------------------------------------------------------------- the run


def train_run(recipe: str, steps: int, out_dir: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "iqstar_lite.recipe",
        recipe,
        "stages=train",
        "eval.enabled=false",
        f"train.steps={steps}",
        "train.checkpoint_every=0",
        f"out_dir={out_dir}",
    ]
    print("training:", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    return out_dir / "metrics.jsonl"


def model_sizes(cfg) -> dict:
    from iqstar_lite.models.load import load_model_config
    from iqstar_lite.models.memory import count_params

    mc = load_model_config(cfg.model.path)
    total, linear, lora = count_params(mc, cfg.lora.r, cfg.lora.target_modules)
    per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if cfg.model.double_quant else 4 / 64)
    return {
        "total": total,
        "linear": linear,
        "lora": lora,
        "lm_head": mc.vocab_size * mc.hidden_size,
        "nf4_bytes_per_param": per_param,
    }


def step_tokens(cfg, step: int) -> dict:
    """Padded positions the update and estimator forward for metrics step ``step`` (1-based)."""
    from iqstar_lite.algorithm.train import prompt_batch
    from iqstar_lite.data.formatting import Formatter
    from iqstar_lite.models.load import load_tokenizer

    tok = load_tokenizer(cfg.model.path)
    fmt = Formatter(tok, cfg.data, cfg.estimator.kind)
    rc, mb, T = cfg.rollout, cfg.train.micro_batch, cfg.rollout.max_new_tokens
    batch = [
        e
        for e in prompt_batch(training_prompts(cfg, tok), step - 1, rc.prompts_per_step, cfg.train.seed)
        for _ in range(rc.samples_per_prompt)
    ]
    plain = [len(fmt.ids(fmt.plain(e))) for e in batch]
    cond = [len(fmt.ids(fmt.conditioned(e))) for e in batch]
    chunks = [slice(s, s + mb) for s in range(0, len(batch), mb)]
    update = sum(len(plain[c]) * (max(plain[c]) + T) for c in chunks)
    estimator = sum(
        2 * len(plain[c]) * (max(plain[c] + cond[c]) + T) for c in chunks
    )  # both contexts stacked, one width
    return {"rows": len(batch), "response_width": T, "update": update, "estimator": estimator}


def utilisation(cfg, rows: list[dict], hw: dict) -> dict:
    sizes = model_sizes(cfg)
    peak = {k: max(v["max"] for key, v in hw["matmul_gflops"].items() if key.startswith(k)) for k in DTYPES}
    per_step = []
    for r in rows:
        tk = step_tokens(cfg, r["step"])
        n_body = sizes["linear"] + sizes["lora"]
        head = sizes["lm_head"] * tk["rows"] * (tk["response_width"] + 1)
        upd6 = 6 * (n_body * tk["update"] + head)
        est2 = 2 * (n_body * tk["estimator"] + 2 * head)
        gen_tokens = r["response_len"] * tk["rows"]
        decode_steps_per_s = gen_tokens / tk["rows"] / r["t_rollout"]
        packed = sizes["linear"] * sizes["nf4_bytes_per_param"] + sizes["lm_head"] * 4 + sizes["lora"] * 4
        dequant = packed + sizes["linear"] * 2 * 2
        per_step.append(
            {
                "update_gflops_6N": upd6 / r["t_update"] / 1e9,
                "update_gflops_4N": upd6 * 4 / 6 / r["t_update"] / 1e9,
                "estimator_gflops": est2 / r["t_estimator"] / 1e9,
                "gen_tokens_per_s": gen_tokens / r["t_rollout"],
                "rollout_gbs_packed": packed * decode_steps_per_s / 1e9,
                "rollout_gbs_dequant": dequant * decode_steps_per_s / 1e9,
                "update_tokens": tk["update"],
                "estimator_tokens": tk["estimator"],
            }
        )
    agg = {k: stats([p[k] for p in per_step], 3) for k in per_step[0]}
    bw = hw["bandwidth_gbs"]["copy"]["max"]
    dtype = "bf16" if torch.bfloat16 == _compute_dtype(cfg) else "fp32"
    med = lambda k: agg[k]["median"]  # noqa: E731
    agg["mfu_update_6N_vs_measured_peak"] = round(med("update_gflops_6N") / peak[dtype], 4)
    agg["mfu_update_4N_vs_measured_peak"] = round(med("update_gflops_4N") / peak[dtype], 4)
    agg["mfu_estimator_vs_measured_peak"] = round(med("estimator_gflops") / peak[dtype], 4)
    agg["rollout_bw_util_packed"] = round(med("rollout_gbs_packed") / bw, 4)
    agg["rollout_bw_util_dequant"] = round(med("rollout_gbs_dequant") / bw, 4)
    agg["peak_used"] = {"compute_dtype": dtype, "gflops": peak[dtype], "copy_gbs": bw}
    agg["model"] = sizes
    return agg


def _compute_dtype(cfg):
    from iqstar_lite.models.load import compute_dtype, pick_device

    return compute_dtype(cfg.model, pick_device(cfg.model))


def profile_step(cfg, top: int = 15) -> dict:
    """torch.profiler over one ``train`` step, after one warm-up step (own model load, temp dir)."""
    from iqstar_lite.algorithm.train import train
    from iqstar_lite.models.load import load_policy, load_tokenizer, pick_device

    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.resume = 1, 0, False
    device = pick_device(cfg.model)
    tok, model = load_tokenizer(cfg.model.path), load_policy(cfg.model, cfg.lora, device, seed=cfg.train.seed)
    prompts = training_prompts(cfg, tok)
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp), model, tok, prompts, device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            train(cfg, Path(tmp), model, tok, prompts, device)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "note": "one train() call (steps=1): rollout + estimator + update + optimizer creation + adapter save",
        "top_self_cpu": [
            {
                "op": e.key,
                "calls": e.count,
                "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
                "cpu_total_ms": round(e.cpu_time_total / 1e3, 2),
            }
            for e in events
        ],
        "table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top),
    }


def main() -> None:
    p = base_parser("Matmul GFLOP/s, memory bandwidth, and the utilisation of a training step.")
    p.add_argument("--metrics", type=Path, help="RUN_DIR/metrics.jsonl of an existing run (else a short run is made)")
    p.add_argument("--sizes", default="2048,4096", help="square matmul sizes")
    p.add_argument("--mib", type=int, default=1024, help="tensor size for the bandwidth copy")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--recipe", default="smollm2_cpu", help="recipe for the short run")
    p.add_argument(
        "--train-steps", type=int, default=4, help="steps of the short run (the first is excluded as warm-up)"
    )
    p.add_argument("--profile", action="store_true", help="add a torch.profiler table of one step")
    args = parse_args(p, {"sizes": "256,512", "mib": 64, "repeats": 3, "recipe": "tiny_cpu", "train_steps": 2})
    quiet_libraries()
    set_threads(args.threads)
    warn_if_busy()
    from iqstar_lite.checkpoint import jsonl_rows
    from iqstar_lite.config import load_run_config

    hw = {
        "matmul_gflops": matmul_gflops([int(x) for x in args.sizes.split(",")], args.repeats),
        "bandwidth_gbs": bandwidth_gbs(args.mib, args.repeats),
    }
    for k, v in hw["matmul_gflops"].items():
        print(f"matmul {k}: {v['median']:.1f} GFLOP/s (max {v['max']:.1f})")
    print(
        f"copy {hw['bandwidth_gbs']['copy']['median']:.1f} GB/s, read {hw['bandwidth_gbs']['read']['median']:.1f} GB/s"
    )
    with tempfile.TemporaryDirectory(prefix="bench-hw-") as tmp:
        metrics = args.metrics or train_run(args.recipe, args.train_steps, Path(tmp) / "run")
        cfg = load_run_config(metrics.parent)
        rows = jsonl_rows(metrics)  # the package's one metrics reader
    rows = rows[1:] if len(rows) > 1 else rows
    results = {
        **hw,
        "run": {
            "metrics": str(args.metrics) if args.metrics else f"short run: {args.recipe}, {args.train_steps} steps",
            "steps_used": [r["step"] for r in rows],
        },
        "utilisation": utilisation(cfg, rows, hw),
    }
    u = results["utilisation"]
    print(
        f"update: {u['update_gflops_6N']['median']:.2f} GFLOP/s (6N) = MFU {u['mfu_update_6N_vs_measured_peak']:.1%} of measured "
        f"{u['peak_used']['compute_dtype']} peak; estimator MFU {u['mfu_estimator_vs_measured_peak']:.1%}; rollout "
        f"{u['gen_tokens_per_s']['median']:.1f} tok/s = {u['rollout_bw_util_packed']:.1%} (packed) / "
        f"{u['rollout_bw_util_dequant']:.1%} (dequant) of copy bandwidth"
    )
    if args.profile:
        results["profile"] = profile_step(cfg)
        print(results["profile"]["table"])
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    notes = [
        "Utilisation is relative to the peak measured here with torch (best repeat), not the CPU's datasheet peak.",
        "6N = 2N forward + 4N backward (standard estimate); 4N shown too since frozen weights need no weight gradient.",
        "rollout_bw_util_packed counts NF4 weight bytes; _dequant adds bitsandbytes' bf16 dequantize round trip.",
        "Response width is taken as rollout.max_new_tokens (an upper bound when every row of a step stopped early).",
    ]
    write_result("hardware", settings, results, notes, args.results)


if __name__ == "__main__":
    main()

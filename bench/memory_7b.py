"""7B memory, measured: ``laptop_7b`` for 2 optimizer steps on this CPU, peak RSS and its split vs ``--dry-run``.

No download: ``build`` writes (once, in the cache, outside the repo) a random-initialised bf16 checkpoint with
the exact architecture of the recipe's model (``iqstar_lite/models/known_configs/``: Qwen2.5-7B-Instruct, 7.6B
params, 152k vocabulary) and the embedded SmolLM2 tokenizer (its ids fit in the vocabulary; only memory is
measured, so the weights' values do not matter). Responses are forced to exactly ``--tokens`` tokens.

The child loads the policy exactly as the recipe does (``load_policy``), then resets the kernel's peak-RSS
counter (``/proc/self/clear_refs``), so "step peak" is the high-water mark of the RL steps alone (rollout +
estimator + update), and it resets it again around every phase to get each phase's transient above the
resident weights. Static parts are counted exactly from the tensors: 4-bit weights, unquantized weights
(embeddings / norms / lm_head), LoRA + gradients + optimizer state.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import GIB, base_parser, parse_args, quiet_libraries, run_child, self_peak_rss, set_threads, write_result

KNOWN = "Qwen/Qwen2.5-7B-Instruct"
SHARD_BYTES = 2 * GIB


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


class RssMeter:
    """CPU: resident set size of this process (VmRSS / VmHWM)."""

    def current(self) -> int:
        return status_kib("VmRSS") * 1024

    def peak(self) -> int:
        return status_kib("VmHWM") * 1024

    def reset(self) -> None:
        reset_peak()

    def extra(self) -> dict:
        return {}


class CudaMeter:
    """CUDA: bytes allocated by PyTorch's caching allocator (peak since reset); ``extra`` adds what the card sees."""

    def __init__(self):
        import torch

        self.torch = torch
        self.reserved_peak = 0
        self.device_used_peak = 0

    def current(self) -> int:
        return self.torch.cuda.memory_allocated()

    def peak(self) -> int:
        self.reserved_peak = max(self.reserved_peak, self.torch.cuda.max_memory_reserved())
        free, total = self.torch.cuda.mem_get_info()
        self.device_used_peak = max(self.device_used_peak, total - free)  # reserved + CUDA context (+ other processes)
        return self.torch.cuda.max_memory_allocated()

    def reset(self) -> None:
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()

    def extra(self) -> dict:
        return {
            "max_reserved": self.reserved_peak,
            "device_used": self.device_used_peak,
            "device_total": self.torch.cuda.mem_get_info()[1],
            "device_name": self.torch.cuda.get_device_name(),
        }


def build_random(target: Path, seed: int = 0, tokenizer: str | None = None) -> Path:
    """Random bf16 safetensors shards with the known config's architecture + a tokenizer (default: the embedded one)."""
    import shutil

    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from iqstar_lite.atomic import atomic_dir
    from iqstar_lite.config import EMBEDDED_MODEL
    from iqstar_lite.models.embedded import resolve_model_path
    from iqstar_lite.models.load import load_model_config

    if (target / "config.json").is_file():
        return target
    config = load_model_config(KNOWN)
    tok_dir = tokenizer or resolve_model_path(EMBEDDED_MODEL)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config.eos_token_id = config.pad_token_id = tok.eos_token_id
    config.bos_token_id = tok.bos_token_id
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    print(f"building random {KNOWN} architecture in {target} ...", flush=True)
    with atomic_dir(target) as tmp:
        shards, cur, size, index = [], {}, 0, {}

        def flush():
            nonlocal cur, size
            if cur:
                name = f"model-{len(shards) + 1:05d}.safetensors"
                save_file(cur, str(tmp / name), metadata={"format": "pt"})
                shards.append(name)
                index.update(dict.fromkeys(cur, name))
                cur, size = {}, 0

        for name, p in meta.state_dict().items():
            if name.endswith("norm.weight"):
                t = torch.ones(p.shape, dtype=torch.bfloat16)
            elif name.endswith(".bias"):
                t = torch.zeros(p.shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(p.shape, generator=gen, dtype=torch.float32) * config.initializer_range).to(
                    torch.bfloat16
                )
            cur[name] = t
            size += t.numel() * 2
            if size >= SHARD_BYTES:
                flush()
        flush()
        total = sum(p.numel() * 2 for p in meta.state_dict().values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
        )
        config.torch_dtype = "bfloat16"
        config._name_or_path = f"random-init {KNOWN} architecture (iqstar_lite bench/memory_7b.py), SmolLM2 tokenizer"
        config.save_pretrained(tmp)
        for f in Path(tok_dir).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                shutil.copy(f, tmp / f.name)
    return target


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def static_split(model, optimizer) -> dict:
    """Exact bytes of what stays resident: 4-bit weights (+ quant state), other frozen weights, LoRA + grad + optimizer state."""
    from iqstar_lite.models.bnb import linear4bit_layers
    from iqstar_lite.models.mapped import is_mapped, mapping_residency

    q4 = 0
    seen = set()
    for m in linear4bit_layers(model):
        seen.add(id(m.weight))
        q4 += tensor_bytes(m.weight.data)
        qs = m.weight.quant_state
        q4 += tensor_bytes(qs.absmax) + (tensor_bytes(qs.code) if qs.code is not None else 0)
        if getattr(qs, "state2", None) is not None:
            q4 += tensor_bytes(qs.state2.absmax) + tensor_bytes(qs.state2.code)
    mapped = [p for p in model.parameters() if is_mapped(p)]
    seen.update(id(p) for p in mapped)
    frozen = sum(tensor_bytes(p) for p in model.parameters() if not p.requires_grad and id(p) not in seen)
    resident = [mapping_residency(p) for p in mapped]
    lora = sum(tensor_bytes(p) for p in model.parameters() if p.requires_grad)
    grads = sum(tensor_bytes(p.grad) for p in model.parameters() if p.requires_grad and p.grad is not None)
    opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    state = sum(tensor_bytes(v) for st in opt.state.values() for v in st.values() if hasattr(v, "numel"))
    return {
        "weights_4bit": q4,
        "weights_unquantized": frozen,
        "weights_mapped": sum(tensor_bytes(p) for p in mapped),
        "weights_mapped_resident": sum(r[0] for r in resident if r),
        "lora": lora,
        "lora_grads": grads,
        "optimizer_state": state,
    }


def child_main(settings: str, out: str) -> None:
    quiet_libraries()
    s = json.loads(settings)
    set_threads(s["threads"])
    import torch

    import iqstar_lite.algorithm.train as tr
    from iqstar_lite.config import load_recipe
    from iqstar_lite.data.formatting import Formatter
    from iqstar_lite.data.sources import load_prompts
    from iqstar_lite.models.load import load_model_config, load_policy, load_tokenizer, pick_device, unquantized_dtype
    from iqstar_lite.models.memory import estimate_memory

    cfg = load_recipe(s["recipe"], s["overrides"])
    device = pick_device(cfg.model)
    tokenizer = load_tokenizer(cfg.model.path)
    t0 = time.time()
    model = load_policy(cfg.model, cfg.lora, device, seed=cfg.train.seed)
    load_s = time.time() - t0
    model.get_base_model().generation_config.min_new_tokens = (
        cfg.rollout.max_new_tokens
    )  # every response exactly T tokens
    meter = CudaMeter() if device.type == "cuda" else RssMeter()
    load_peak = meter.peak() if device.type == "cuda" else self_peak_rss()
    after_load = meter.current()
    fmt = Formatter(tokenizer, cfg.data, cfg.estimator.kind)
    prompts = [
        e for e in load_prompts(cfg.data).train if len(fmt.ids(fmt.conditioned(e))) <= cfg.data.max_prompt_tokens
    ]

    phases: list[dict] = []
    captured: dict = {}

    def measured(name, fn):
        def wrapper(*a, **k):
            before = meter.current()
            meter.reset()
            t = time.time()
            out = fn(*a, **k)
            phases.append(
                {
                    "phase": name,
                    "rss_before": before,
                    "peak": meter.peak(),
                    "rss_after": meter.current(),
                    "seconds": round(time.time() - t, 2),
                }
            )
            meter.reset()
            return out

        return wrapper

    def capture_optimizer(*a, **k):
        captured["optimizer"] = make_optimizer(*a, **k)
        return captured["optimizer"]

    make_optimizer = tr.make_optimizer
    tr.sample, tr.estimator_pass, tr.update = (
        measured("rollout", tr.sample),
        measured("estimator", tr.estimator_pass),
        measured("update", tr.update),
    )
    tr.make_optimizer = capture_optimizer
    meter.reset()
    with tempfile.TemporaryDirectory(prefix="bench-7b-") as tmp:
        last = tr.train(cfg, Path(tmp), model, tokenizer, prompts, device)
    step_peak = meter.peak()  # reset after each phase; max over phases is the step peak
    est = estimate_memory(cfg, load_model_config(cfg.model.path))
    Path(out).write_text(
        json.dumps(
            {
                "load_s": round(load_s, 1),
                "load_peak_rss": load_peak,
                "rss_after_load": after_load,
                "phases": phases,
                "step_peak_rss": max([p["peak"] for p in phases] + [step_peak]),
                "static": static_split(model, captured["optimizer"][0]),
                "unquantized_dtype": str(unquantized_dtype(cfg.model, device, load_model_config(cfg.model.path))),
                "estimate": {"peak": est.peak, **est.parts},
                "last_metrics": last,
                "torch_threads": torch.get_num_threads(),
                "device": device.type,
                "device_memory": meter.extra(),
            }
        )
    )


def summarize(run: dict) -> dict:
    by = {}
    for p in run["phases"]:
        by.setdefault(p["phase"], []).append(p)
    split = {k: round(v / GIB, 3) for k, v in run["static"].items()}
    split.update(
        {f"{k}_transient": round(max(p["peak"] - p["rss_before"] for p in ps) / GIB, 3) for k, ps in by.items()}
    )
    split["rss_after_load"] = round(run["rss_after_load"] / GIB, 3)
    est, measured = run["estimate"]["peak"] / GIB, run["step_peak_rss"] / GIB
    # On CUDA the estimate is compared with what the card reports used (allocator cache + CUDA context included).
    vs = run["device_memory"]["device_used"] / GIB if run.get("device_memory") else measured
    return {
        "step_peak_rss_gib": round(measured, 3),
        "load_peak_rss_gib": round(run["load_peak_rss"] / GIB, 3),
        "load_s": run["load_s"],
        "split_gib": split,
        "phase_seconds": {k: [p["seconds"] for p in ps] for k, ps in by.items()},
        "estimate_gib": {k: round(v / GIB, 3) for k, v in run["estimate"].items()},
        "estimate_error": round((est - vs) / vs, 3),
        "target_met": measured <= 6.0,
        "unquantized_dtype": run["unquantized_dtype"],
        "device": run.get("device", "cpu"),
        **(
            {
                "device_memory_gib": {
                    k: round(v / GIB, 3) if isinstance(v, int) else v for k, v in run["device_memory"].items()
                }
            }
            if run.get("device_memory")
            else {}
        ),
    }


def main() -> None:
    p = base_parser(
        "laptop_7b for 2 steps on a random-init checkpoint of its architecture: peak RSS, split, vs the dry-run estimate."
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="where the random checkpoint goes (default: $IQSTAR_CACHE/models/random-qwen2.5-7b)",
    )
    p.add_argument("--prompts", type=int, default=2, help="rollout.prompts_per_step")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per response")
    p.add_argument("--max-prompt-tokens", type=int, default=96)
    p.add_argument(
        "--variants",
        default="default",
        help="comma list: 'default' and/or overrides, e.g. unquantized_dtype=fp32 (model.*) or loss.type=distill",
    )
    p.add_argument("--runs", type=int, default=1)
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu: peak RSS; cuda: peak bytes allocated on the GPU (+ reserved, + what the card reports used)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory for the random checkpoint (default: the embedded SmolLM2 one)",
    )
    args = parse_args(p, {})
    from iqstar_lite.models.embedded import cache_dir

    target = args.cache or cache_dir() / "models" / "random-qwen2.5-7b-instruct"
    build_random(target, tokenizer=args.tokenizer)
    base = [
        f"model.path={target}",
        f"model.device={args.device}",
        "train.steps=2",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.max_new_tokens={args.tokens}",
        f"data.max_prompt_tokens={args.max_prompt_tokens}",
        "train.checkpoint_every=0",
    ]
    results, settings = (
        {},
        {
            "recipe": "laptop_7b",
            "base_overrides": base,
            "variants": args.variants,
            "runs": args.runs,
            "threads": args.threads,
            "device": args.device,
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        },
    )
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        extra = [] if variant == "default" else [variant if "." in variant.split("=")[0] else f"model.{variant}"]
        s = {"recipe": "laptop_7b", "overrides": base + extra, "threads": args.threads}
        runs = []
        for r in range(args.runs):
            print(f"{variant}: run {r + 1}/{args.runs} ...", flush=True)
            runs.append(run_child([sys.executable, __file__, "--child", json.dumps(s)], env={"TQDM_DISABLE": "1"}))
            sm = summarize(runs[-1])
            print(
                f"  step peak {sm['step_peak_rss_gib']} GiB (load {sm['load_peak_rss_gib']}); "
                f"estimate {sm['estimate_gib']['peak']} GiB ({sm['estimate_error']:+.1%}); split {sm['split_gib']}",
                flush=True,
            )
        results[variant] = {"runs": [summarize(r) for r in runs], "raw": runs}
    write_result(
        "memory_7b",
        settings,
        results,
        [
            "Random-init weights with the exact Qwen2.5-7B-Instruct architecture (config from iqstar_lite/models/known_configs), SmolLM2 tokenizer; "
            "responses forced to exactly --tokens tokens (min_new_tokens).",
            "step peak = VmHWM after a /proc/self/clear_refs reset once loading ended (rollout + estimator + update of 2 steps); "
            "load peak = ru_maxrss when loading ended: it counts the checkpoint's memory-mapped bf16 shards (file-backed, reclaimable page "
            "cache) that from_pretrained reads; *_transient = a phase's high-water mark above the RSS when it began. (clear_refs also resets "
            "ru_maxrss, so the child's wait4 peak is not reported.)",
            "weights_mapped = input embeddings served from the checkpoint by mmap (model.map_embeddings; not counted in weights_unquantized); "
            "weights_mapped_resident = how much of that mapping was resident at the end (/proc/self/smaps Rss: the pages of rows read).",
            "estimate = iqstar_lite.models.memory.estimate_memory for the same config (what --dry-run prints); error = (estimate - measured) / measured, "
            "measured = step peak RSS on CPU, the GPU memory the card reports used (device_used) on CUDA.",
        ],
        args.results,
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:4])
    else:
        main()

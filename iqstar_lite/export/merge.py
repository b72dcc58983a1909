"""Merge the LoRA adapter into plain base weights -> ``RUN_DIR/merged/`` (a normal transformers checkpoint).

The merge never happens inside the 4-bit model. ``export.merge_base``:

* ``dequantized`` (default): load the NF4 base exactly as training did, replace every 4-bit layer
  by an fp32 ``nn.Linear`` holding its dequantized weight (``models.bnb.dequantize_4bit_``), then
  ``merge_and_unload`` the adapter. The merged model computes the function that was trained.
* ``original``: merge into the original (unquantized) weights. The adapter was trained against the
  NF4 weights, so the result differs from the trained model by the NF4 quantization error.

``merge.json`` reports the max |logit diff| of the reloaded merged checkpoint against the trained
4-bit+LoRA model twice: at the training compute dtype (bf16 on most CPUs: includes bf16 activation
rounding, 1.2 logits on SmolLM2-135M) and with fp32 compute (the "merge is exact" number for
``dequantized``: 1e-4 on SmolLM2-135M, fp32 rounding of W + BA vs the separate LoRA matmuls). That fp32 model is
loaded exactly as training loaded it (so its NF4 codes are the trained ones; on CUDA the checkpoint is cast to bf16
before quantizing) and then computes in fp32; the dequantized weights are the fp32 values of the NF4 codes, which is
what bitsandbytes' fp32 forward uses. Verified on an H100 (``tests/test_cuda.py``): 4e-7 on the tiny model.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path

import torch

from iqstar_lite.atomic import atomic_dir
from iqstar_lite.config import ModelConfig, RecipeConfig
from iqstar_lite.data.formatting import render_chat
from iqstar_lite.models.bnb import dequantize_4bit_, linear4bit_layers
from iqstar_lite.models.embedded import resolve_model_path
from iqstar_lite.models.load import adapter_dir, compute_dtype, hub_kwargs, load_base, pick_device
from iqstar_lite.rundir import RunDir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

DEFAULT_PROMPTS = [
    "What is the capital of Japan?",
    "Give me three tips for staying focused while studying.",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about autumn leaves.",
    "How do I boil an egg?",
    "What are the benefits of drinking water?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "Suggest a name for a small bakery.",
]


def pick_prompts(prompts: list[str] | None, n: int) -> list[str]:
    """The first ``n`` of ``prompts`` (user messages, e.g. the held-out split), else generic chat prompts."""
    chosen = [p for p in (prompts or []) if p.strip()] or DEFAULT_PROMPTS
    return chosen[:n]


def load_trained(model_cfg: ModelConfig, adapter: Path, device: torch.device | None = None, fp32_compute: bool = False):
    """The trained model as it ran in training: ``load_base`` + the saved adapter, eval mode.

    ``fp32_compute``: the same weights (loaded, and so NF4-quantized, exactly as training did) with fp32 arithmetic:
    other weights upcast, 4-bit layers computing in fp32. Loading with ``dtype=fp32`` instead would quantize the
    fp32 checkpoint values rather than the bf16 ones training quantized (0.03-0.3 logits apart on a tiny model).
    """
    from peft import PeftModel

    base = load_base(model_cfg, device)
    if fp32_compute:
        for p in base.parameters():  # (transformers refuses .to(dtype) on a bitsandbytes model)
            if p.is_floating_point() and not hasattr(p, "quant_state"):
                p.data = p.data.float()
        for layer in linear4bit_layers(base):
            layer.compute_dtype = torch.float32
    model = PeftModel.from_pretrained(base, str(adapter))
    return model.eval()


def merge_adapter(cfg: RecipeConfig, adapter: Path, device: torch.device | None = None):
    """Plain fp32 transformers model = base (per ``export.merge_base``) + merged LoRA delta."""
    from peft import PeftModel

    if cfg.export.merge_base == "dequantized" and cfg.model.quantize == "nf4":
        base = dequantize_4bit_(load_base(cfg.model, device), torch.float32)
    else:  # original weights, unquantized
        base = load_base(dataclasses.replace(cfg.model, quantize="none", dtype="fp32"), device)
    base = base.to(torch.float32)  # norms/embeddings may be in the compute dtype on GPU
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(merged.config, attr):
            delattr(merged.config, attr)
    return merged.eval()


def save_merged(model, tokenizer_src: str, out_dir: Path, dtype: str, hub: dict | None = None) -> None:
    """Safetensors + config + generation_config + tokenizer (with chat template), written atomically. ``hub``: the
    model's revision / trust_remote_code (``model.hub_kwargs``)."""
    from transformers import AutoTokenizer

    with atomic_dir(out_dir) as tmp:
        model.to(DTYPES[dtype]).save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_src, **(hub or {})).save_pretrained(tmp)
        saved = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in saved:  # a loader would try to re-quantize the merged weights
            raise RuntimeError("merged config.json still carries a quantization_config")


@torch.no_grad()
def prompt_logits(model, prompt_ids: list[list[int]]) -> list[torch.Tensor]:
    """Per prompt, fp32 CPU logits [T, V] over all prompt positions (batch 1, no padding)."""
    device = next(model.parameters()).device
    out = []
    for ids in prompt_ids:
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]
        out.append(logits.float().cpu())
    return out


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _logits_of(load, prompt_ids: list[list[int]]) -> list[torch.Tensor]:
    """Load a model, take its prompt logits, drop it (keeps one model in memory at a time)."""
    model = load()
    try:
        return prompt_logits(model, prompt_ids)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def merge_run(run_dir: Path, cfg: RecipeConfig, prompts: list[str] | None = None) -> dict:
    """Write ``RUN_DIR/merged/`` and ``RUN_DIR/merge.json``; return the report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    run_dir = Path(run_dir)
    adapter = adapter_dir(run_dir)
    device = pick_device(cfg.model)
    model_path = resolve_model_path(cfg.model.path)
    tok = AutoTokenizer.from_pretrained(model_path, **hub_kwargs(cfg.model))
    texts = pick_prompts(prompts, cfg.export.check_prompts)
    ids = [render_chat(tok, p) for p in texts]

    # One model in memory at a time (a 7B base is loaded three times, the merged model once).
    trained_logits = _logits_of(lambda: load_trained(cfg.model, adapter, device), ids)
    fp32_logits = _logits_of(lambda: load_trained(cfg.model, adapter, device, fp32_compute=True), ids)
    save_merged(
        merge_adapter(cfg, adapter, device), model_path, RunDir(run_dir).merged, cfg.export.dtype, hub_kwargs(cfg.model)
    )
    gc.collect()
    # Measured on the checkpoint as written (saved dtype, config round trip), computed in fp32.
    merged_logits = _logits_of(
        lambda: AutoModelForCausalLM.from_pretrained(
            RunDir(run_dir).merged, dtype=torch.float32, use_safetensors=True
        ).eval(),
        ids,
    )

    train_dtype = str(compute_dtype(cfg.model, device)).replace("torch.", "")
    exact = cfg.export.merge_base == "dequantized" or cfg.model.quantize == "none"
    report = {
        "merge_base": cfg.export.merge_base,
        "dtype": cfg.export.dtype,
        "base_model": cfg.model.path,
        "quantize": cfg.model.quantize,
        "prompts": len(ids),
        "positions": sum(len(i) for i in ids),
        "trained_compute_dtype": train_dtype,
        "max_abs_logit_diff_vs_trained": max_abs_diff(merged_logits, trained_logits),
        "max_abs_logit_diff_vs_fp32_compute": max_abs_diff(merged_logits, fp32_logits),
        "fp32_compute_diff_is_merge_exactness": exact,
        "note": (
            f"vs_trained: merged (fp32 compute) vs the trained {cfg.model.quantize}+LoRA model at its training compute dtype "
            f"({train_dtype}; includes its activation rounding). vs_fp32_compute: same {cfg.model.quantize}+LoRA model with fp32 compute; "
            + (
                "this is the merge-is-exact check."
                if exact
                else "merge_base=original, so this includes the NF4 quantization error."
            )
        ),
        "seconds": round(time.perf_counter() - start, 2),
    }
    RunDir(run_dir).merge_report.write_text(json.dumps(report, indent=2) + "\n")
    return report

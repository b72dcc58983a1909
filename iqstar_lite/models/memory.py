"""Parameter count (meta device, nothing loaded) and a peak-memory estimate for one RL step."""

from __future__ import annotations

from dataclasses import dataclass

from iqstar_lite.config import RecipeConfig

GIB = 2**30
RUNTIME_OVERHEAD = (
    0.45 * GIB
)  # torch + transformers + tokenizer in a CPU process: 0.45 GiB measured (bench/memory_7b.py)
DEQUANT_COPIES = (
    6  # update-phase transient of the 7B CPU run (bench/memory_7b.py): ~0.8 GiB = 6-7 x its largest layer in bf16
)


@dataclass
class Estimate:
    params_total: int
    params_quantized: int
    params_lora: int
    parts: dict[str, float]  # bytes

    @property
    def peak(self) -> float:
        return sum(self.parts.values())


def count_params(model_config, lora_r: int, targets: str):
    """Total / quantizable (linear layers in the blocks) / LoRA parameter counts, on the meta device."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config)
    total = sum(p.numel() for p in model.parameters())
    wanted = None if targets == "all-linear" else {t.strip() for t in targets.split(",")}
    quant, lora = 0, 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            quant += mod.weight.numel()
            if wanted is None or name.rsplit(".", 1)[-1] in wanted:
                lora += lora_r * (mod.in_features + mod.out_features)
    return total, quant, lora


def dtype_bytes(cfg: RecipeConfig, model_config) -> tuple[int, int]:
    """Bytes per element of (the NF4 compute dtype, the unquantized parts' dtype), as ``model.load_base`` picks them.

    On CUDA without a GPU to ask: bf16/fp16 compute, unquantized parts in it unless ``unquantized_dtype=fp32``.
    """
    if cfg.model.device == "cuda":
        return 2, 4 if cfg.model.unquantized_dtype == "fp32" else 2
    import torch

    from iqstar_lite.models.load import compute_dtype, unquantized_dtype

    cpu = torch.device("cpu")
    return compute_dtype(cfg.model, cpu).itemsize, unquantized_dtype(cfg.model, cpu, model_config).itemsize


def mapped_embedding_bytes(cfg: RecipeConfig, model_config) -> int:
    """Bytes of input embeddings that ``model.map_embeddings`` serves from the checkpoint file instead of memory.

    The rule of ``mapped.map_input_embeddings``: CPU, untied, stored in exactly the dtype ``model.load_base`` loads
    them in. Only the rows read become resident (a few thousand distinct tokens x one row), counted as nothing here.
    """
    if (
        not cfg.model.map_embeddings
        or cfg.model.device == "cuda"
        or getattr(model_config, "tie_word_embeddings", False)
    ):
        return 0
    import torch

    from iqstar_lite.models.load import compute_dtype, unquantized_dtype

    cpu = torch.device("cpu")
    used = (
        unquantized_dtype(cfg.model, cpu, model_config)
        if cfg.model.quantize == "nf4"
        else compute_dtype(cfg.model, cpu)
    )
    stored = getattr(model_config, "torch_dtype", None) or getattr(model_config, "dtype", None)
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    if stored != used:
        return 0
    return model_config.vocab_size * model_config.hidden_size * used.itemsize


def estimate_memory(cfg: RecipeConfig, model_config) -> Estimate:
    total, quant, lora = count_params(model_config, cfg.lora.r, cfg.lora.target_modules)
    on_gpu = cfg.model.device == "cuda"
    act_bytes = 2 if (on_gpu or cfg.model.dtype in ("bf16", "fp16")) else 4
    compute_bytes, unquantized_bytes = dtype_bytes(cfg, model_config)
    if cfg.model.quantize == "nf4":
        per_param = 0.5 + (4.0 / 64 if not cfg.model.double_quant else 1.0 / 64 + 4.0 / (64 * 256))
        weights = quant * per_param + (total - quant) * unquantized_bytes
        weights -= mapped_embedding_bytes(cfg, model_config)
    else:
        weights = total * act_bytes - mapped_embedding_bytes(cfg, model_config)
    opt_state = 2 if cfg.train.optimizer == "adamw8bit" else 8
    lora_bytes = lora * (4 + 4 + opt_state)
    h = model_config.hidden_size
    L = model_config.num_hidden_layers
    V = model_config.vocab_size
    inter = getattr(model_config, "intermediate_size", 4 * h)
    kv_heads = getattr(model_config, "num_key_value_heads", model_config.num_attention_heads)
    head_dim = getattr(model_config, "head_dim", None) or h // model_config.num_attention_heads
    n = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    mb = min(cfg.train.micro_batch, n)
    T = cfg.rollout.max_new_tokens
    seq = cfg.data.max_prompt_tokens // 2 + T  # typical prompt length ~ half the cap
    kv = 2 * L * kv_heads * head_dim * n * (seq + 64) * act_bytes  # rollout; +64 for the principle in the estimator
    per_token_layer = (h * 8 + inter * 3) * act_bytes  # activations one block keeps for backward
    if cfg.model.gradient_checkpointing:
        acts = mb * seq * (L * h * act_bytes + per_token_layer)
    else:
        acts = mb * seq * L * per_token_layer
    logits = mb * T * V * 4 * (2 + 2)  # estimator: two stacked contexts; update: logits + grad
    if cfg.loss.type == "distill":
        logits += n * T * V * 4  # the pi* target distribution
    # bitsandbytes materialises each 4-bit layer dequantized (compute dtype) while it runs, forward and backward
    largest = max(inter * h, h * h, V * h if cfg.model.quantize != "nf4" else 0)
    dequant = DEQUANT_COPIES * largest * compute_bytes if cfg.model.quantize == "nf4" else 0
    # model.dense_weights_gib: the 4-bit layers kept dequantized through training and evaluation, where that fits the budget
    dense = quant * compute_bytes if cfg.model.quantize == "nf4" and not on_gpu else 0
    dense = dense if dense <= cfg.model.dense_weights_gib * GIB else 0
    parts = {
        "weights": weights,
        "lora+grad+optimizer": lora_bytes,
        "kv_cache": kv,
        "activations": acts,
        "logits": logits,
        "dequantized_layers": dequant,
        "dense_weights": dense,
        "runtime": RUNTIME_OVERHEAD,
    }
    return Estimate(total, quant, lora, parts)


def format_estimate(est: Estimate) -> str:
    rows = [
        f"parameters: {est.params_total / 1e6:,.1f}M total, {est.params_quantized / 1e6:,.1f}M in linear layers, {est.params_lora / 1e6:,.2f}M LoRA"
    ]
    rows.append(f"estimated peak memory per step: {est.peak / GIB:.2f} GiB")
    rows += [f"  {k:<22}{v / GIB:8.3f} GiB" for k, v in est.parts.items()]
    return "\n".join(rows)

"""The 4-bit (bitsandbytes NF4) layers of a loaded model: what is done to them after loading.

bitsandbytes CPU hazard: in eval mode a no-grad forward through ``Linear4bit`` repacks the 4-bit
weights into an AVX512-bf16 layout; later backward passes through repacked layers return silently
wrong gradients. ``load.load_base`` switches that fast path off on every ``Linear4bit`` before the first
forward (``disable_cpu_repack``) and the training step calls ``assert_trainable_layout``. Measured
on SmolLM2-135M (8 prompts x 32 sampled tokens): train-mode generation 2.6 s, eval-mode with
repack 2.3 s, eval-mode with the fast path off 2.9-3.2 s; the repack path is the only one that breaks
gradients, and an exact restore after repacking was not possible (bnb's inverse conversion gave
gradients off by ~9), so the fast path stays off: mode-independent and robust.

Dense weights (``model.dense_weights_gib``): bitsandbytes' CPU 4-bit matmul dequantizes the layer on every call (and
again in backward). Inside ``dense_weights`` (a decoding loop, a training run, an evaluation row) each layer keeps its
dequantized weight instead, where all of them fit the budget: same outputs and gradients, bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def linear4bit_layers(model) -> list:
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a hard dependency
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def disable_cpu_repack(model) -> None:
    """Turn off bitsandbytes' CPU eval-mode repack (it silently breaks later gradients)."""
    for layer in linear4bit_layers(model):
        layer.support_avx512bf16_for_cpu = False


def allow_dense_weights(model, max_bytes: int) -> int:
    """Let ``dense_weights`` keep the 4-bit layers dequantized inside its block, where they are on CPU and their
    dequantized weights need at most ``max_bytes`` together (``model.dense_weights_gib``). Returns those bytes (0: not
    allowed)."""
    every = linear4bit_layers(model)
    for m in every:  # a smaller budget than at an earlier call takes back what that allowed
        m.__dict__.pop("_iq_dense_ok", None)
    layers = [m for m in every if m.weight.device.type == "cpu"]
    if not layers or max_bytes <= 0:
        return 0
    need = sum(m.out_features * m.in_features * (m.compute_dtype or torch.float32).itemsize for m in layers)
    if need > max_bytes:
        return 0
    for m in layers:
        m._iq_dense_ok = True
    return need


def _dense_forward(layer):
    """``Linear4bit.forward`` with the weight dequantized once: bitsandbytes' CPU ``gemm_4bit`` is dequantize + linear per
    call, and its backward dequantizes again for the input's gradient (the frozen weight gets none), so ``linear`` on the
    kept weight gives the same outputs and the same gradients. A layer without its quantization state or in the CPU
    inference layout (repacked: ``disable_cpu_repack`` not called) takes bitsandbytes' own path."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        dtype = layer.compute_dtype or x.dtype
        w = layer.__dict__.get("_iq_dense_w")
        if w is None:
            from bitsandbytes.functional import dequantize_4bit

            state = getattr(layer.weight, "quant_state", None)
            if state is None or getattr(state, "packing_format_for_cpu", False):
                return type(layer).forward(layer, x)
            w = layer.__dict__["_iq_dense_w"] = dequantize_4bit(layer.weight.data, state).to(dtype)
        bias = None if layer.bias is None else layer.bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), w, bias).to(x.dtype)

    return forward


@contextmanager
def dense_weights(model) -> Iterator[None]:
    """While the block runs, the 4-bit layers ``allow_dense_weights`` marked compute from their dequantized weights
    (made at first use, dropped at exit): a decoding loop's forwards, one per token, and a training step's forwards and
    backwards stop re-dequantizing every layer. Nested blocks share the outer one's weights. A no-op for other models."""
    layers = [m for m in linear4bit_layers(model) if getattr(m, "_iq_dense_ok", False) and "forward" not in m.__dict__]
    for m in layers:
        m.forward = _dense_forward(m)
    try:
        yield
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_iq_dense_w", None)


def assert_trainable_layout(model) -> None:
    """Raise if any 4-bit weight is in the CPU inference layout (backward would be wrong)."""
    packed = [
        layer
        for layer in linear4bit_layers(model)
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    ]
    if packed:
        raise RuntimeError(
            f"{len(packed)} 4-bit layers were repacked for CPU inference; gradients through them are wrong. "
            "Call iqstar_lite.models.bnb.disable_cpu_repack(model) right after loading."
        )


def dequantize_4bit_(model, dtype: torch.dtype = torch.float32):
    """Replace every ``Linear4bit`` by an ``nn.Linear`` holding its dequantized weight (in place).

    The result computes the same function the 4-bit model computed (up to matmul rounding), so a
    LoRA delta merged into it reproduces the trained 4-bit+LoRA model.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    assert_trainable_layout(model)

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                # At fp32 (the exact NF4 code x absmax values, what bitsandbytes' fp32 forward uses), not at the
                # load dtype: a bf16 load would round them to bf16 first.
                state = copy.copy(child.weight.quant_state)
                state.dtype = torch.float32
                weight = bnbf.dequantize_4bit(child.weight.data, state).to(dtype)
                linear = torch.nn.Linear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    device=weight.device,
                    dtype=dtype,
                )
                linear.weight.data.copy_(weight)
                if child.bias is not None:
                    linear.bias.data.copy_(child.bias.data.to(dtype))
                linear.requires_grad_(False)
                setattr(parent, child_name, linear)
    if hasattr(model, "config"):
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        if hasattr(model, "quantization_method"):  # left by from_pretrained; makes .to(dtype) refuse
            del model.quantization_method
        model.is_loaded_in_4bit = False
        model.is_quantized = False
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
    return model

"""Which dtype the parts NF4 leaves unquantized get, and the lm_head input hooks (pure shape/dtype checks)."""

from types import SimpleNamespace

import pytest
import torch

from iqstar_lite.config import ModelConfig
from iqstar_lite.models.load import (
    FP32_UNQUANTIZED_MAX_BYTES,
    _head_input_2d,
    _head_output_3d,
    embedding_params,
    unquantized_dtype,
)

SMOLLM2 = SimpleNamespace(vocab_size=49152, hidden_size=576, tie_word_embeddings=True)
QWEN_7B = SimpleNamespace(vocab_size=152064, hidden_size=3584, tie_word_embeddings=False)
CPU = torch.device("cpu")


def test_embedding_params_counts_an_untied_head_twice():
    assert embedding_params(SMOLLM2) == 49152 * 576
    assert embedding_params(QWEN_7B) == 2 * 152064 * 3584


def test_auto_keeps_fp32_for_small_models_and_compute_dtype_for_large_ones():
    cfg = ModelConfig(dtype="bf16")
    assert (
        embedding_params(SMOLLM2) * 4 <= FP32_UNQUANTIZED_MAX_BYTES < embedding_params(QWEN_7B) * 4
    )  # 108 MiB vs 4.1 GiB
    assert unquantized_dtype(cfg, CPU, SMOLLM2) == torch.float32
    assert unquantized_dtype(cfg, CPU, QWEN_7B) == torch.bfloat16


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_explicit_unquantized_dtype_wins(name, dtype):
    assert unquantized_dtype(ModelConfig(dtype="bf16", unquantized_dtype=name), CPU, QWEN_7B) == dtype


def test_head_hooks_give_the_same_logits_through_a_2d_gemm():
    """hidden[:, -k:] (strided, grad-requiring) -> 2-D contiguous input -> output reshaped back: same values, same grads."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    want = head(hidden[:, -2:])
    head.register_forward_pre_hook(_head_input_2d)
    head.register_forward_hook(_head_output_3d)
    got = head(hidden[:, -2:])
    assert got.shape == (3, 2, 11)
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(want.square().sum(), hidden)
    (g2,) = torch.autograd.grad(got.square().sum(), hidden)
    torch.testing.assert_close(g1, g2)

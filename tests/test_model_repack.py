"""The bitsandbytes CPU repack hazard: gradients after a no-grad rollout must equal gradients without one."""

import pytest
import torch
from conftest import make_policy

from iqstar_lite.algorithm.rollout import sample
from iqstar_lite.models.bnb import assert_trainable_layout, linear4bit_layers

pytestmark = pytest.mark.filterwarnings("ignore")


def _grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    assert_trainable_layout(model)
    model(input_ids=ids, labels=ids).loss.backward()
    return torch.cat([p.grad.flatten().clone() for p in model.parameters() if p.requires_grad])


def _rollout(model, tokenizer):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("Hi?", "Tell me more.")
    ]
    sample(model, tokenizer, texts, samples_per_prompt=2, max_new_tokens=6)
    with torch.no_grad():  # plus an explicit eval-mode no-grad forward, the exact trigger
        model.eval()
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_grads_after_rollout_equal_grads_without(tiny_path, tokenizer):
    model = make_policy(tiny_path, quantize="nf4")
    assert linear4bit_layers(model), "the test needs a 4-bit model"
    ids = torch.tensor([[1, 17, 300, 42, 7, 99]])
    clean = _grads(model, ids)
    _rollout(model, tokenizer)
    torch.testing.assert_close(_grads(model, ids), clean, rtol=0, atol=0)


def test_hazard_is_real_without_the_guard(tiny_path, tokenizer):
    """With bitsandbytes' fast path re-enabled the rollout repacks weights; the guard must catch it."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-bf16: bitsandbytes never repacks here")
    model = make_policy(tiny_path, quantize="nf4")
    for layer in linear4bit_layers(model):
        layer.support_avx512bf16_for_cpu = True
    _rollout(model, tokenizer)
    with pytest.raises(RuntimeError, match="repacked"):
        assert_trainable_layout(model)

"""Dense decoding (``model.dense_decoding_gib``): the one decoding loop keeps each 4-bit layer's dequantized weight while it
runs. Same tokens and log-probs bit for bit, one dequantization per layer per loop instead of one per token, nothing
left behind, and off where the budget is too small."""

import bitsandbytes.functional as bnbf
import pytest
import torch
from conftest import make_policy

from iqstar_lite.algorithm.rollout import sample
from iqstar_lite.config import LoraSettings, ModelConfig
from iqstar_lite.models.load import allow_dense_decoding, linear4bit_layers, load_policy

pytestmark = pytest.mark.filterwarnings("ignore")

TOKENS = 6


def _texts(tokenizer):
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("Hi?", "Tell me more about the sea.")
    ]


def _roll(model, tokenizer):
    """Sampled policy rows plus principle-contrastive rows of the reference in one batch (peft's per-row adapters)."""
    texts = _texts(tokenizer)
    torch.manual_seed(0)
    return sample(
        model,
        tokenizer,
        texts,
        samples_per_prompt=2,
        max_new_tokens=TOKENS,
        min_new_tokens=TOKENS,
        contrast=[t.replace("Hi?", "Hi? Answer in French.") for t in texts],
        guided_samples=1,
        guided_reference=True,
    )


def _count_dequantize(monkeypatch) -> list[int]:
    calls = [0]
    real = bnbf.dequantize_4bit

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(bnbf, "dequantize_4bit", counted)
    return calls


def test_dense_decoding_gives_the_same_tokens_and_logprobs(tiny_path, tokenizer, monkeypatch):
    model = make_policy(tiny_path, quantize="nf4")
    layers = linear4bit_layers(model)
    assert layers and all(getattr(m, "_iq_dense_ok", False) for m in layers), "a tiny model is within the budget"
    calls = _count_dequantize(monkeypatch)
    dense = _roll(model, tokenizer)
    assert calls[0] == len(layers), "each layer dequantized once for the whole loop"
    for m in layers:  # nothing left behind: the layer is the plain 4-bit layer again
        assert "forward" not in m.__dict__ and "_iq_dense_w" not in m.__dict__
        m._iq_dense_ok = False
    plain = _roll(model, tokenizer)
    assert dense.response_ids.shape == (4, TOKENS)  # 2 prompts x (1 policy + 1 contrastive row)
    assert torch.equal(dense.response_ids, plain.response_ids)
    torch.testing.assert_close(dense.logprobs, plain.logprobs, rtol=0, atol=0)


def test_autograd_takes_the_4bit_path(tiny_path, tokenizer):
    """A forward that needs gradients inside the block is bitsandbytes' own (its backward), not the cached weight."""
    from iqstar_lite.models.load import dense_decoding

    model = make_policy(tiny_path, quantize="nf4")
    ids = torch.tensor([[1, 17, 300, 42]])
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with dense_decoding(model):
        model(inputs_embeds=emb).logits.sum().backward()
        assert not any("_iq_dense_w" in m.__dict__ for m in linear4bit_layers(model))
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


def test_over_the_budget_or_zero_it_stays_off(tiny_path, tokenizer, monkeypatch):
    model = load_policy(ModelConfig(path=tiny_path, dense_decoding_gib=0), LoraSettings(r=4, alpha=8))
    layers = linear4bit_layers(model)
    assert layers and not any(getattr(m, "_iq_dense_ok", False) for m in layers)
    need = sum(m.out_features * m.in_features for m in layers) * 2  # bf16 compute (fp32: twice that)
    assert allow_dense_decoding(model, need - 1) == 0
    assert not any(getattr(m, "_iq_dense_ok", False) for m in layers)
    calls = _count_dequantize(monkeypatch)
    _roll(model, tokenizer)
    assert calls[0] == 0, "off: bitsandbytes' own per-call path (its op, not this helper)"
    assert allow_dense_decoding(model, 2 * need) in (need, 2 * need) and all(m._iq_dense_ok for m in layers)

"""Dense 4-bit layers (``model.dense_weights_gib``): inside ``dense_weights`` (a decoding loop, a training run, an
evaluation row) each 4-bit layer keeps its dequantized weight. Same tokens, log-probs and gradients bit for bit, one
dequantization per layer per block instead of one per call, nothing left behind, and off where the budget is too small."""

import bitsandbytes.functional as bnbf
import pytest
import torch
from conftest import make_policy

from iqstar_lite.algorithm.rollout import sample
from iqstar_lite.config import LoraSettings, ModelConfig
from iqstar_lite.models.bnb import allow_dense_weights, linear4bit_layers
from iqstar_lite.models.load import load_policy

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


def test_dense_weights_give_the_same_tokens_and_logprobs(tiny_path, tokenizer, monkeypatch):
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


def _grads(model):
    """Gradients of a LoRA loss and of the input embeddings through every 4-bit layer (forward and backward)."""
    model.zero_grad(set_to_none=True)
    ids = torch.tensor([[1, 17, 300, 42, 7]])
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=emb).logits.float().logsumexp(-1).sum().backward()
    lora = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return emb.grad.clone(), lora


def test_training_forwards_and_backwards_give_the_same_gradients(tiny_path, monkeypatch):
    """A training step inside the block: the kept weight gives bitsandbytes' gradients bit for bit (its backward
    dequantizes the same weight for the input's gradient), with one dequantization per layer for forward + backward."""
    from iqstar_lite.models.bnb import dense_weights

    model = make_policy(tiny_path, quantize="nf4")
    layers = linear4bit_layers(model)
    plain_emb, plain_lora = _grads(model)
    calls = _count_dequantize(monkeypatch)
    with dense_weights(model):
        dense_emb, dense_lora = _grads(model)
        _grads(model)  # a second micro-batch: no new dequantization
    assert calls[0] == len(layers)
    assert plain_lora and plain_lora.keys() == dense_lora.keys()
    torch.testing.assert_close(dense_emb, plain_emb, rtol=0, atol=0)
    for name, g in plain_lora.items():
        torch.testing.assert_close(dense_lora[name], g, rtol=0, atol=0, msg=name)


def test_a_nested_block_keeps_the_outer_weights(tiny_path, tokenizer, monkeypatch):
    """The training loop's block holds the weights; the decoding loop's own block inside it neither makes nor drops
    them, and the outer exit leaves the plain 4-bit layers."""
    from iqstar_lite.models.bnb import dense_weights

    model = make_policy(tiny_path, quantize="nf4")
    layers = linear4bit_layers(model)
    calls = _count_dequantize(monkeypatch)
    with dense_weights(model):
        _roll(model, tokenizer)
        assert all("_iq_dense_w" in m.__dict__ for m in layers), "kept after the inner loop ends"
        _roll(model, tokenizer)
    assert calls[0] == len(layers)
    assert not any("forward" in m.__dict__ or "_iq_dense_w" in m.__dict__ for m in layers)


def test_over_the_budget_or_zero_it_stays_off(tiny_path, tokenizer, monkeypatch):
    model = load_policy(ModelConfig(path=tiny_path, dense_weights_gib=0), LoraSettings(r=4, alpha=8))
    layers = linear4bit_layers(model)
    assert layers and not any(getattr(m, "_iq_dense_ok", False) for m in layers)
    need = sum(m.out_features * m.in_features for m in layers) * 2  # bf16 compute (fp32: twice that)
    assert allow_dense_weights(model, need - 1) == 0
    assert not any(getattr(m, "_iq_dense_ok", False) for m in layers)
    calls = _count_dequantize(monkeypatch)
    _roll(model, tokenizer)
    assert calls[0] == 0, "off: bitsandbytes' own per-call path (its op, not this helper)"
    assert allow_dense_weights(model, 2 * need) in (need, 2 * need) and all(m._iq_dense_ok for m in layers)
    assert allow_dense_weights(model, need // 4) == 0 and not any(getattr(m, "_iq_dense_ok", False) for m in layers)


def test_a_repacked_layer_takes_the_bitsandbytes_path(tiny_path, monkeypatch):
    """A layer in the CPU inference layout (``disable_cpu_repack`` not called, an AVX512-bf16 CPU) is never dequantized
    from that layout: its forward is bitsandbytes' own, every call."""
    from iqstar_lite.models.bnb import dense_weights

    model = make_policy(tiny_path, quantize="nf4")
    layers = linear4bit_layers(model)
    packed = layers[0]
    monkeypatch.setattr(packed.weight.quant_state, "packing_format_for_cpu", True, raising=False)
    own = []

    def bitsandbytes_forward(self, x):  # stands in for the repacked kernel (this CPU may not have it)
        own.append(self)
        return torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype)

    monkeypatch.setattr(type(packed), "forward", bitsandbytes_forward)
    with dense_weights(model), torch.no_grad():
        model(input_ids=torch.tensor([[1, 17, 300]]))
        model(input_ids=torch.tensor([[1, 17, 300]]))
        assert "_iq_dense_w" not in packed.__dict__
        assert all("_iq_dense_w" in m.__dict__ for m in layers[1:])
    assert own == [packed, packed]

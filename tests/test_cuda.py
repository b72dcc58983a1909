"""The CUDA path of the 4-bit loop (skipped where no CUDA GPU is visible, e.g. in CI).

Same checks the CPU tests make, on a GPU: gradients after a rollout equal gradients without one, the
reference shares the base weights, a recipe trains end to end on ``model.device=cuda`` and its
dequantized merge reproduces the trained NF4+LoRA model.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_policy

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible"),
    pytest.mark.filterwarnings("ignore"),
]


def _grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return torch.cat([p.grad.flatten().clone() for p in model.parameters() if p.requires_grad])


def test_cuda_policy_is_4bit_on_gpu(tiny_path):
    from iqstar_lite.models.bnb import linear4bit_layers

    model = make_policy(tiny_path, device="cuda")
    layers = linear4bit_layers(model)
    assert layers and all(layer.weight.device.type == "cuda" for layer in layers)
    assert all(p.device.type == "cuda" for p in model.parameters() if p.requires_grad)


def test_cuda_grads_after_rollout_equal_grads_without(tiny_path, tokenizer):
    from iqstar_lite.algorithm.rollout import sample

    model = make_policy(tiny_path, device="cuda")
    ids = torch.tensor([[1, 17, 300, 42, 7, 99]], device="cuda")
    clean = _grads(model, ids)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("Hi?", "More.")
    ]
    roll = sample(model, tokenizer, texts, samples_per_prompt=2, max_new_tokens=6)
    assert roll.response_ids.shape[0] == 4
    with torch.no_grad():
        model.eval()
        model(input_ids=ids)
    torch.testing.assert_close(_grads(model, ids), clean, rtol=0, atol=0)


def test_cuda_reference_is_adapters_off(tiny_path):
    from iqstar_lite.algorithm.reference import reference_mode

    model = make_policy(tiny_path, device="cuda")
    ids = torch.tensor([[1, 17, 300, 42]], device="cuda")
    with torch.no_grad():
        policy = model(input_ids=ids).logits
        with reference_mode(model):
            ref = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert not torch.equal(policy, ref)
    torch.testing.assert_close(ref, base, rtol=0, atol=0)
    torch.testing.assert_close(again, policy, rtol=0, atol=0)


def test_cuda_recipe_trains_and_merge_is_exact(tmp_path, tiny_path):
    from iqstar_lite.config import load_recipe
    from iqstar_lite.export.merge import merge_run
    from iqstar_lite.recipe import run

    out = tmp_path / "run"
    cfg = load_recipe(
        "tiny_cpu", [f"model.path={tiny_path}", "model.device=cuda", f"out_dir={out}", "stages=train", "train.steps=3"]
    )
    assert run(cfg, out) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(m["peak_mem_gib"] > 0 for m in lines)  # measured on the GPU
    assert (out / "adapter" / "adapter_config.json").is_file()
    report = merge_run(out, cfg)
    assert report["trained_compute_dtype"] in ("bfloat16", "float16")
    assert report["max_abs_logit_diff_vs_fp32_compute"] < 1e-3, report


def test_cuda_same_seed_same_adapters(tiny_path):
    from iqstar_lite.config import LoraSettings, ModelConfig
    from iqstar_lite.models.load import load_policy

    cfg, lora = ModelConfig(path=tiny_path, quantize="nf4", device="cuda"), LoraSettings(r=4, alpha=8)
    a = {n: p.detach().clone() for n, p in load_policy(cfg, lora, seed=3).named_parameters() if p.requires_grad}
    torch.rand(100, device="cuda"), torch.rand(100)
    state = torch.cuda.get_rng_state()
    b = {n: p.detach().clone() for n, p in load_policy(cfg, lora, seed=3).named_parameters() if p.requires_grad}
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert all(p.device.type == "cuda" for p in a.values()) and all(torch.equal(a[k], b[k]) for k in a)

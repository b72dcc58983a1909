"""Fresh LoRA adapters are drawn from the run's seed: same seed -> same adapters, whatever the global RNG did before."""

import torch

from iqstar_lite.config import LoraSettings, ModelConfig
from iqstar_lite.models.load import load_policy


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_same_seed_same_adapters_and_global_rng_untouched(tiny_path):
    cfg, lora = ModelConfig(path=tiny_path, quantize="nf4", device="cpu"), LoraSettings(r=4, alpha=8)
    torch.manual_seed(123)
    a = _lora(load_policy(cfg, lora, seed=7))
    torch.rand(1000)  # a different global RNG state: before the fix this changed lora_A
    state = torch.get_rng_state()
    b = _lora(load_policy(cfg, lora, seed=7))
    assert torch.equal(torch.get_rng_state(), state)  # load_policy leaves the caller's RNG alone
    c = _lora(load_policy(cfg, lora, seed=8))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("lora_A" in k and not torch.equal(a[k], c[k]) for k in a)

"""Shared fixtures: a tiny random Llama (2 layers, SmolLM2 tokenizer) built once per session, offline."""

from __future__ import annotations

import os
import tempfile

import pytest

# Every test run gets its own cache: nothing from a developer's ~/.cache leaks into CI results.
os.environ.setdefault("IQSTAR_CACHE", tempfile.mkdtemp(prefix="iqstar-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from iqstar_lite.config import TINY_MODEL
    from iqstar_lite.models.embedded import resolve_model_path

    return resolve_model_path(TINY_MODEL)


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from iqstar_lite.models.load import load_tokenizer

    return load_tokenizer(tiny_path)


def make_policy(path: str, quantize: str = "nf4", seed: int = 0, randomize_lora: bool = True, device: str = "cpu"):
    """Tiny base + LoRA with non-zero B (so adapters change the output)."""
    from iqstar_lite.config import LoraSettings, ModelConfig
    from iqstar_lite.models.load import load_policy

    model = load_policy(ModelConfig(path=path, quantize=quantize, device=device), LoraSettings(r=4, alpha=8))
    return randomize_lora_b(model, std=0.05, seed=seed) if randomize_lora else model


def randomize_lora_b(model, std: float, seed: int = 0):
    """LoRA B starts at zero (adapter = identity); give it small random values so merges and exports matter."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_((torch.randn(p.shape, generator=g) * std).to(p.device))
    return model

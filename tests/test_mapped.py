"""Input embeddings served from the checkpoint by mmap: exact, only the rows read resident, the file never written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from iqstar_lite.config import LoraSettings, ModelConfig
from iqstar_lite.models.load import load_base, load_policy
from iqstar_lite.models.mapped import is_mapped, mapping_residency, safetensors_entry

VOCAB, HIDDEN = 131072, 256  # a 64 MiB bf16 table: big enough to tell "a few rows resident" from "all of it"
FOLIO = 2 * 2**20  # the kernel may map a whole page-cache folio (up to 2 MiB on x86-64) per row read


def _build(path: Path, tied: bool, shard: str | None = None) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    return str(path)


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> str:
    return _build(tmp_path_factory.mktemp("untied"), tied=False)


def _cfg(path: str, **kw) -> ModelConfig:
    return ModelConfig(path=path, quantize="nf4", unquantized_dtype="bf16", dtype="bf16", device="cpu", **kw)


def _files_digest(path: str) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def test_mapped_embeddings_are_exact_and_only_touched_rows_are_resident(untied):
    digest = _files_digest(untied)
    mapped = load_base(_cfg(untied))
    plain = load_base(_cfg(untied, map_embeddings=False))
    assert is_mapped(mapped.get_input_embeddings().weight)
    assert not is_mapped(plain.get_input_embeddings().weight)

    ids = torch.tensor([[5, 17, 131000, 250]])
    with torch.no_grad():
        torch.testing.assert_close(mapped(ids).logits, plain(ids).logits, rtol=0, atol=0)
        rss, size = mapping_residency(mapped.get_input_embeddings().weight)
    assert VOCAB * HIDDEN * 2 <= size < VOCAB * HIDDEN * 2 + 2**16  # the table's bytes only
    rows_read = 4 + 10  # the lookups + the 10 rows map_input_embeddings compares with the loaded table
    assert rss <= rows_read * FOLIO < size, (
        f"{rss} bytes of a {size}-byte mapping resident after reading {rows_read} rows"
    )

    torch.testing.assert_close(
        mapped.get_input_embeddings().weight, plain.get_input_embeddings().weight, rtol=0, atol=0
    )
    mapped.get_input_embeddings().weight.data[5] += 1.0  # private mapping: a write stays in this process
    assert _files_digest(untied) == digest


def test_lora_gradients_through_mapped_embeddings_are_exact(untied):
    ids = torch.tensor([[3, 9, 400, 12, 7, 2]])
    grads = []
    for flag in (True, False):
        model = load_policy(_cfg(untied, map_embeddings=flag), LoraSettings(r=4, alpha=8), seed=0)
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0, msg=name)


def test_sharded_checkpoint_is_found_through_its_index(tmp_path):
    path = _build(tmp_path / "sharded", tied=False, shard="2MB")
    assert (Path(path) / "model.safetensors.index.json").is_file()
    assert is_mapped(load_base(_cfg(path)).get_input_embeddings().weight)


@pytest.mark.parametrize("case", ["tied", "dtype differs", "switched off"])
def test_falls_back_to_memory_where_mapping_would_not_be_exact(tmp_path, untied, case):
    if case == "tied":
        cfg = _cfg(_build(tmp_path / "tied", tied=True))
    elif case == "dtype differs":
        cfg = ModelConfig(path=untied, quantize="nf4", unquantized_dtype="fp32", dtype="bf16", device="cpu")
    else:
        cfg = _cfg(untied, map_embeddings=False)
    model = load_base(cfg)
    assert not is_mapped(model.get_input_embeddings().weight)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_header_entry_points_at_the_tensor_bytes(untied):
    from safetensors import safe_open

    file = Path(untied) / "model.safetensors"
    dtype, shape, offset, nbytes = safetensors_entry(file, "model.embed_tokens.weight")
    assert (dtype, shape, nbytes) == (torch.bfloat16, (VOCAB, HIDDEN), VOCAB * HIDDEN * 2)
    raw = file.read_bytes()[offset : offset + nbytes]
    want = safe_open(str(file), "pt").get_tensor("model.embed_tokens.weight")
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).view(shape), want)
    assert safetensors_entry(file, "no.such.tensor") is None


def test_merge_from_a_mapped_base_equals_the_in_memory_merge(untied, tmp_path):
    """Export reads the mapped table in full: the merged checkpoint is the same tensor for tensor."""
    import dataclasses

    from conftest import randomize_lora_b

    from iqstar_lite.config import RecipeConfig
    from iqstar_lite.export.merge import merge_adapter

    policy = randomize_lora_b(load_policy(_cfg(untied), LoraSettings(r=4, alpha=8), seed=0), std=0.05)
    policy.save_pretrained(tmp_path / "adapter")
    merged = {}
    for flag in (True, False):
        cfg = dataclasses.replace(RecipeConfig(), model=_cfg(untied, map_embeddings=flag))
        merged[flag] = merge_adapter(cfg, tmp_path / "adapter").state_dict()
    assert merged[True].keys() == merged[False].keys()
    for name, t in merged[True].items():
        torch.testing.assert_close(t, merged[False][name], rtol=0, atol=0, msg=name)

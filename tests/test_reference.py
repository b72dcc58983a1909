import pytest
import torch
from conftest import make_policy

from iqstar_lite.algorithm.reference import reference_mode


@pytest.fixture
def policy(tiny_path):
    return make_policy(tiny_path, quantize="none")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_reference_equals_base_model_exactly(policy, tiny_path):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 200, 31]])
    base = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    with reference_mode(policy):
        ref = _logits(policy, ids)
    assert torch.equal(ref, _logits(base, ids))
    assert not torch.allclose(_logits(policy, ids), ref)  # adapters do change the output


def test_no_grad_inside_and_adapters_back_after_exception(policy):
    ids = torch.tensor([[1, 5, 9]])
    before = _logits(policy, ids)
    with pytest.raises(ValueError):
        with reference_mode(policy):
            assert not torch.is_grad_enabled()
            raise ValueError("boom")
    assert torch.is_grad_enabled()
    assert torch.equal(_logits(policy, ids), before)


def test_reference_shares_base_storage(policy):
    """No base weight is copied: the reference reads the very same tensors."""
    ptrs = {n: p.data_ptr() for n, p in policy.named_parameters() if "lora_" not in n}
    with reference_mode(policy):
        policy(input_ids=torch.tensor([[1, 2, 3]]))
        assert {n: p.data_ptr() for n, p in policy.named_parameters() if "lora_" not in n} == ptrs


def test_refuses_merged_model(policy):
    policy.merge_adapter()
    with pytest.raises(RuntimeError, match="merged"):
        with reference_mode(policy):
            pass

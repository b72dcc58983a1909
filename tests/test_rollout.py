import torch

from conftest import make_policy
from iqstar_lite.rollout import pack, response_logits, response_mask, sample


def test_response_mask_keeps_first_eos():
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 9], [5, 6, 7, 8, 9]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).float()
    assert torch.equal(response_mask(ids, [2]), expected)


def test_pack_left_pads_and_counts_positions():
    b = pack([[7, 8], [9]], torch.tensor([[1, 2], [3, 4]]), pad_id=0)
    assert b["input_ids"].tolist() == [[7, 8, 1, 2], [0, 9, 3, 4]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]


def test_padded_scoring_equals_unpadded(tiny_path):
    """A left-padded row scores its response exactly like the same row alone (positions handled)."""
    model = make_policy(tiny_path, quantize="none")
    model.eval()
    resp = torch.tensor([[11, 12, 13], [21, 22, 23]])
    ctx = [[1, 40, 41, 42, 43], [1, 50]]
    with torch.no_grad():
        both = response_logits(model, pack(ctx, resp, pad_id=2), 3)
        alone = response_logits(model, pack(ctx[1:], resp[1:], pad_id=2), 3)
    torch.testing.assert_close(both[1:], alone, atol=1e-4, rtol=1e-4)


def test_sample_shapes_and_k(tiny_path, tokenizer):
    model = make_policy(tiny_path, quantize="none")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) for q in ("a?", "longer question?")]
    r = sample(model, tokenizer, texts, samples_per_prompt=3, max_new_tokens=5)
    assert r.response_ids.shape == (6, 5) and r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert model.training  # mode restored

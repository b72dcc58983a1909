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


def test_sample_records_the_models_logprobs_of_its_tokens(tiny_path, tokenizer):
    """Rollout.logprobs = log pi(y_t | s_t) of the sampled tokens, untempered: equal to scoring the responses
    afterwards with a full forward (the KV-cache loop and the packed forward agree); 0 after EOS."""
    from iqstar_lite.logprobs import token_logprobs

    model = make_policy(tiny_path, quantize="none")
    fmt = lambda q: tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)  # noqa: E731
    texts = [fmt("a?"), fmt("a longer question?")]
    torch.manual_seed(0)
    r = sample(model, tokenizer, texts, samples_per_prompt=2, max_new_tokens=6, temperature=0.7)
    ctx = [tokenizer(texts[i], add_special_tokens=False)["input_ids"] for i in r.prompt_index.tolist()]
    model.eval()
    with torch.no_grad():
        scored = token_logprobs(response_logits(model, pack(ctx, r.response_ids, tokenizer.pad_token_id), 6), r.response_ids)
    assert r.logprobs.shape == r.response_ids.shape and (r.logprobs <= 0).all()
    torch.testing.assert_close(r.logprobs * r.response_mask, scored * r.response_mask, atol=1e-4, rtol=1e-4)
    assert (r.logprobs[r.response_mask == 0] == 0).all()

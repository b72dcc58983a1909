import torch
from conftest import make_policy

from iqstar_lite.algorithm.rollout import next_token, sample


def test_next_token_frequencies_match_softmax():
    """Inverse-CDF sampling: empirical frequencies over 20k draws within 0.01 of softmax(z / T)."""
    torch.manual_seed(0)
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).repeat(20_000, 1)
    p = torch.softmax(z[0] / 0.7, -1)
    got = torch.bincount(next_token(z, temperature=0.7), minlength=5).float() / 20_000
    torch.testing.assert_close(got, p, atol=0.01, rtol=0)
    assert got[4] == 0  # p = 0 is never drawn


def test_next_token_top_p_keeps_the_nucleus_only():
    """p = [.5, .3, .15, .05]: top_p 0.7 keeps {0, 1} (mass before token 1 is .5 < .7, before token 2 is .8)."""
    torch.manual_seed(0)
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20_000, 1)
    got = torch.bincount(next_token(z, top_p=0.7), minlength=4).float() / 20_000
    torch.testing.assert_close(got, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.012, rtol=0)


def test_greedy_sample_equals_generate(tiny_path, tokenizer):
    """The KV-cached loop gives the same greedy tokens as transformers' generate on padded batches."""
    model = make_policy(tiny_path, quantize="none")
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("a?", "a much longer question about rain?")
    ]
    got = sample(model, tokenizer, texts, max_new_tokens=8, greedy=True).response_ids
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.eval()
    want = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)[
        :, enc["input_ids"].shape[1] :
    ]
    n = min(got.shape[1], want.shape[1])
    assert torch.equal(got[:, :n], want[:, :n])


def test_min_new_tokens_blocks_eos(tiny_path, tokenizer):
    model = make_policy(tiny_path, quantize="none")
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ]
    r = sample(model, tokenizer, texts, samples_per_prompt=4, max_new_tokens=6, min_new_tokens=6)
    assert r.response_ids.shape == (4, 6) and bool(r.response_mask.all())

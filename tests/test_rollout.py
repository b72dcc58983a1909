import pytest
import torch
from conftest import make_policy

from iqstar_lite.algorithm.rollout import pack, response_logits, response_mask, sample, shared_context_logits


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
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("a?", "longer question?")
    ]
    r = sample(model, tokenizer, texts, samples_per_prompt=3, max_new_tokens=5)
    assert r.response_ids.shape == (6, 5) and r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert model.training  # mode restored


def test_sample_records_the_models_logprobs_of_its_tokens(tiny_path, tokenizer):
    """Rollout.logprobs = log pi(y_t | s_t) of the sampled tokens, untempered: equal to scoring the responses
    afterwards with a full forward (the KV-cache loop and the packed forward agree); 0 after EOS."""
    from iqstar_lite.algorithm.logprobs import token_logprobs

    model = make_policy(tiny_path, quantize="none")

    def fmt(q):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )

    texts = [fmt("a?"), fmt("a longer question?")]
    torch.manual_seed(0)
    r = sample(model, tokenizer, texts, samples_per_prompt=2, max_new_tokens=6, temperature=0.7)
    ctx = [tokenizer(texts[i], add_special_tokens=False)["input_ids"] for i in r.prompt_index.tolist()]
    model.eval()
    with torch.no_grad():
        scored = token_logprobs(
            response_logits(model, pack(ctx, r.response_ids, tokenizer.pad_token_id), 6), r.response_ids
        )
    assert r.logprobs.shape == r.response_ids.shape and (r.logprobs <= 0).all()
    torch.testing.assert_close(r.logprobs * r.response_mask, scored * r.response_mask, atol=1e-4, rtol=1e-4)
    assert (r.logprobs[r.response_mask == 0] == 0).all()


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_shared_context_logits_equal_the_packed_pass(tiny_path, quantize):
    """Prefilling each distinct context once and copying its cache gives the packed pass's logits, rows in any
    order, contexts of different lengths; also with gradient checkpointing on in train mode (where transformers
    would drop the cache), and the mode is restored."""
    model = make_policy(tiny_path, quantize=quantize)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    a, b = [1, 40, 41, 42, 43], [1, 50]
    ctx = [a, a, b, a, b]
    resp = torch.tensor([[11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34], [41, 42, 43, 44], [51, 52, 53, 54]])
    model.eval()
    with torch.no_grad():
        packed = response_logits(model, pack(ctx, resp, pad_id=2), 4)
    model.train()
    shared = shared_context_logits(model, ctx, resp, pad_id=2)
    assert model.training
    assert shared.shape == packed.shape
    torch.testing.assert_close(shared, packed, atol=1e-4, rtol=1e-4)
    one = shared_context_logits(model, ctx, resp[:, :1], pad_id=2)
    torch.testing.assert_close(one, packed[:, :1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_shared_context_gradients_equal_the_packed_pass(tiny_path, quantize):
    """With grad on (the update), the copies of a shared prefill pass their gradients back into it: LoRA
    gradients equal those of the packed pass (fp32: to 1e-5; bf16 compute: to its rounding)."""
    from iqstar_lite.algorithm.logprobs import token_logprobs

    model = make_policy(tiny_path, quantize=quantize)
    model.train()
    ctx = [[1, 40, 41, 42], [1, 40, 41, 42], [1, 50], [1, 50]]
    resp = torch.tensor([[11, 12, 13], [21, 22, 23], [31, 32, 33], [41, 42, 43]])
    weights = torch.linspace(-1.0, 1.0, 12).reshape(4, 3)
    grads = []
    for fn in (
        lambda: response_logits(model, pack(ctx, resp, pad_id=2), 3),
        lambda: shared_context_logits(model, ctx, resp, pad_id=2),
    ):
        model.zero_grad(set_to_none=True)
        (token_logprobs(fn(), resp) * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        if quantize == "none":
            torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)
        else:  # NF4 computes in bf16 here: the two passes round differently (measured <= 0.25% of the largest entry)
            err = (grads[1][name] - grads[0][name]).abs().max() / grads[0][name].abs().max().clamp(min=1e-12)
            assert err < 1e-2, (name, float(err))


def test_contrastive_sampling_records_log_pi_star_of_its_tokens(tiny_path, tokenizer):
    """With ``contrast`` the one loop samples K rows per prompt from z* = (1+a) z+ - a z0 and records log softmax(z*) at
    the drawn tokens: equal to z+ and z0 scored afterwards by packed forwards, row by row (the stacked halves stay aligned
    after the K-fold repeat)."""
    from iqstar_lite.algorithm.estimator import contrastive_logits
    from iqstar_lite.algorithm.logprobs import token_logprobs

    model = make_policy(tiny_path, quantize="none")
    chat = lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)  # noqa: E731
    qs = ("a?", "a longer question about rain?")
    plain = [chat([{"role": "user", "content": q}]) for q in qs]
    cond = [chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]) for q in qs]
    torch.manual_seed(0)
    r = sample(
        model, tokenizer, plain, samples_per_prompt=2, max_new_tokens=6, temperature=0.9, contrast=cond, alpha=1.5
    )
    assert r.response_ids.shape[0] == 4 and r.prompt_index.tolist() == [0, 0, 1, 1]
    ids = lambda texts: [tokenizer(texts[i], add_special_tokens=False)["input_ids"] for i in r.prompt_index.tolist()]  # noqa: E731
    T = r.response_ids.shape[1]
    model.eval()
    with torch.no_grad():
        z_pos = response_logits(model, pack(ids(cond), r.response_ids, tokenizer.pad_token_id), T)
        z_neg = response_logits(model, pack(ids(plain), r.response_ids, tokenizer.pad_token_id), T)
    want = token_logprobs(contrastive_logits(z_pos, z_neg, 1.5), r.response_ids)
    torch.testing.assert_close(r.logprobs * r.response_mask, want * r.response_mask, atol=1e-4, rtol=1e-4)


def test_sample_takes_token_ids_or_strings(tiny_path, tokenizer):
    model = make_policy(tiny_path, quantize="none")
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("a?", "longer question?")
    ]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    a = sample(model, tokenizer, texts, max_new_tokens=6, greedy=True).response_ids
    b = sample(model, tokenizer, ids, max_new_tokens=6, greedy=True).response_ids
    assert torch.equal(a, b)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_mixed_rollout_policy_rows_and_reference_pi_star_rows_in_one_batch(tiny_path, tokenizer, quantize):
    """guided_samples=1 of K=3: per prompt 2 rows from the policy (adapters on) and 1 from pi-hat* of the reference
    (adapters off for those rows only, peft's per-row adapter names), one forward per token. Each row's recorded
    log-probs equal scoring it afterwards the separate way: policy rows with the policy, guided rows with
    z* = 2 z+ - z0 of the reference."""
    from iqstar_lite.algorithm.estimator import contrastive_logits
    from iqstar_lite.algorithm.logprobs import token_logprobs
    from iqstar_lite.algorithm.reference import reference_mode

    model = make_policy(tiny_path, quantize=quantize)
    chat = lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)  # noqa: E731
    qs = ("a?", "a longer question about rain?")
    plain = [chat([{"role": "user", "content": q}]) for q in qs]
    cond = [chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]) for q in qs]
    torch.manual_seed(0)
    r = sample(
        model,
        tokenizer,
        plain,
        samples_per_prompt=3,
        max_new_tokens=6,
        temperature=0.9,
        contrast=cond,
        alpha=1.0,
        guided_samples=1,
        guided_reference=True,
        keep_star=True,
    )
    assert r.prompt_index.tolist() == [0, 0, 1, 1, 0, 1] and r.guided.tolist() == [False] * 4 + [True] * 2
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert model.training and not any(m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer))

    def ids(texts, rows):
        return [tokenizer(texts[i], add_special_tokens=False)["input_ids"] for i in r.prompt_index[rows].tolist()]

    T, pad, m = r.response_ids.shape[1], tokenizer.pad_token_id, r.response_mask
    model.eval()
    pol, gui = ~r.guided, r.guided
    with torch.no_grad():
        want_pol = token_logprobs(
            response_logits(model, pack(ids(plain, pol), r.response_ids[pol], pad), T), r.response_ids[pol]
        )
        with reference_mode(model):
            z_pos = response_logits(model, pack(ids(cond, gui), r.response_ids[gui], pad), T)
            z_neg = response_logits(model, pack(ids(plain, gui), r.response_ids[gui], pad), T)
    want_gui = token_logprobs(contrastive_logits(z_pos, z_neg, 1.0), r.response_ids[gui])
    tol = dict(atol=1e-4, rtol=1e-4) if quantize == "none" else dict(atol=0.05, rtol=0)  # bf16 compute for NF4
    torch.testing.assert_close(r.logprobs[pol] * m[pol], want_pol * m[pol], **tol)
    torch.testing.assert_close(r.logprobs[gui] * m[gui], want_gui * m[gui], **tol)
    # keep_star: the guided rows' full log pi-hat* (the distill target) and log pi_ref at their tokens, from the same loop
    assert r.star_logp_full.shape == (2, T, z_pos.shape[-1])
    picked = r.star_logp_full.gather(-1, r.response_ids[gui, :, None]).squeeze(-1)
    torch.testing.assert_close(picked * m[gui], r.logprobs[gui] * m[gui], atol=1e-6, rtol=0)
    torch.testing.assert_close(r.star_ref_logp * m[gui], token_logprobs(z_neg, r.response_ids[gui]) * m[gui], **tol)

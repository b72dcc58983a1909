import pytest
import torch
from conftest import make_policy

from iqstar_lite.algorithm.reference import reference_mode
from iqstar_lite.algorithm.rollout import sample
from iqstar_lite.evaluation.evaluate import contrastive_generate
from iqstar_lite.evaluation.judges import pick_judge, refusal_judge
from iqstar_lite.evaluation.measures import near_copy, repetition


def test_repetition():
    """'a b a b' has 2 distinct of 4 words -> 1 - 2/4 = 0.5; no repeats -> 0; empty -> 0."""
    assert repetition("a b a b") == 0.5
    assert repetition("one two three") == 0.0
    assert repetition("") == 0.0


def test_judges():
    french = pick_judge("auto", "Always answer in French.")
    assert french("Bonjour, je suis très content de vous aider aujourd'hui.") == 1.0
    assert french("Hello, I am very happy to help you today.") == 0.0
    assert pick_judge("auto", "Refuse requests that could cause harm.") is refusal_judge
    assert refusal_judge("I'm sorry, but I can't help with that.") == 1.0
    assert refusal_judge("Sure! Here is a recipe for bread.") == 0.0
    assert pick_judge("none", "Always answer in French.") is None


def test_contrastive_alpha0_is_principle_conditioned_greedy(tiny_path, tokenizer):
    """alpha = 0: z* = z+, so contrastive decoding = greedy decoding of the reference with the principle in context."""
    model = make_policy(tiny_path, quantize="none")
    chat = lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)  # noqa: E731
    cond = [
        chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}])
        for q in ("Hi?", "What is rain made of?")
    ]
    plain = [chat([{"role": "user", "content": q}]) for q in ("Hi?", "What is rain made of?")]
    got = contrastive_generate(model, tokenizer, cond, plain, alpha=0.0, max_new_tokens=6)
    with reference_mode(model):
        want = sample(model, tokenizer, cond, max_new_tokens=6, greedy=True).response_ids
    n = min(got.shape[1], want.shape[1])
    assert torch.equal(got[:, :n], want[:, :n])


def test_near_copy_counts_repeats_with_one_word_changed():
    """5-word spans equal to an earlier span but for at most one word; the words they cover over all words."""
    assert near_copy("a b c d e a b c d e") == 1.0  # an exact copy
    assert near_copy("a b c d e a b x d e") == 1.0  # one word swapped
    assert near_copy("a b c d e a x y d e") == 0.0  # two swapped: new text
    assert near_copy("A b c d e. a B c d e!") == 1.0  # case and punctuation ignored
    assert near_copy("one two three four five six seven eight") == 0.0
    assert near_copy("a b c d e") == near_copy("") == 0.0  # no earlier span
    # spans at 4, 5, 6 repeat those at 0, 1, 2 with one word changed: words 0-10 covered, the last "le" not
    assert near_copy("je ne sais le, je ne sais la, je ne sais le") == 11 / 12
    assert repetition("je ne sais le, je ne sais la, je ne sais le") == 0.5


def test_loops():
    """>= 12 words and repetition > 0.6: 'a b c' x 4 has 3 distinct of 12 words (0.75) -> a loop; 12 distinct words -> not;
    'a a a' (too short to call) -> not."""
    from iqstar_lite.evaluation.measures import loops

    assert loops("a b c " * 4)
    assert not loops(" ".join(str(i) for i in range(12)))
    assert not loops("a a a")


def test_common_prefix():
    """[5, 6, 7] vs [5, 6, 9, 1] -> 2 leading tokens shared; vs itself -> 3; first token differs -> 0; empty -> 0."""
    from iqstar_lite.evaluation.measures import common_prefix

    assert common_prefix([5, 6, 7], [5, 6, 9, 1]) == 2
    assert common_prefix([5, 6, 7], [5, 6, 7]) == 3
    assert common_prefix([1, 6], [5, 6]) == 0
    assert common_prefix([], [5]) == 0


def test_one_short_sentence_judge():
    from iqstar_lite.evaluation.judges import one_short_sentence, sentences

    assert pick_judge("auto", "Answer in one short sentence.") is one_short_sentence
    assert sentences("Rain is water. It falls!\nYes") == ["Rain is water", "It falls", "Yes"]
    assert one_short_sentence("Rain is water falling from clouds.") == 1.0
    assert one_short_sentence("Rain is water. It falls from clouds.") == 0.0
    assert one_short_sentence(" ".join(["word"] * 21) + ".") == 0.0
    assert one_short_sentence("") == 0.0


def test_kl_to_target_is_zero_when_the_policy_is_pi_star(tiny_path, tokenizer):
    """Adapters at identity (pi_theta = pi_ref) and the principle context equal to the plain one (z+ = z0, so
    pi* = softmax((1+a) z0 - a z0) = pi_ref): KL(pi* || pi_theta) = 0 on every position. Random adapters: > 0."""
    from iqstar_lite.evaluation.evaluate import kl_to_target

    ctx = [[1, 40, 41], [1, 50]]
    target = torch.tensor([[11, 12, 13], [21, 22, 23]])
    same = make_policy(tiny_path, quantize="none", randomize_lora=False)
    kl = kl_to_target(same, ctx, ctx, target, tokenizer.pad_token_id, alpha=1.0)
    assert kl.shape == (2, 3)
    torch.testing.assert_close(kl, torch.zeros(2, 3), atol=1e-5, rtol=0)
    moved = make_policy(tiny_path, quantize="none")
    assert (kl_to_target(moved, ctx, ctx, target, tokenizer.pad_token_id, alpha=1.0) > 1e-4).all()


def test_identity_adapters_skip_the_policy_forward_with_the_same_kl(tiny_path, tokenizer, monkeypatch):
    """Fresh LoRA (B = 0) is detected as identity; then KL(pi* || pi_theta) uses the reference's logits for pi_theta, and
    equals the value computed with the policy's own forward (the shortcut forced off). Random adapters: not identity."""
    import iqstar_lite.evaluation.evaluate as ev
    from iqstar_lite.algorithm.reference import adapters_are_identity

    cond, plain = [[1, 7, 40, 41], [1, 7, 50]], [[1, 40, 41], [1, 50]]
    target = torch.tensor([[11, 12, 13], [21, 22, 23]])
    fresh = make_policy(tiny_path, quantize="none", randomize_lora=False)
    assert adapters_are_identity(fresh) and not adapters_are_identity(make_policy(tiny_path, quantize="none"))
    fast = ev.kl_to_target(fresh, plain, cond, target, tokenizer.pad_token_id, alpha=1.0)
    monkeypatch.setattr(ev, "adapters_are_identity", lambda model: False)
    slow = ev.kl_to_target(fresh, plain, cond, target, tokenizer.pad_token_id, alpha=1.0)
    assert (fast > 1e-4).all()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_evaluation_reuses_passes_with_the_same_numbers(tiny_path, tokenizer, monkeypatch):
    """The passes evaluation no longer runs give what they gave: the contrastive row's principle score from the decoding
    loop's z+ / z0 = the teacher-forced estimator's; its ``kl_star_ref`` = the before row's KL(pi-hat* || pi_theta)
    recomputed by a pass (adapters at identity); the trained row's KL(pi_theta || pi_ref) sharing the estimator's
    reference logits = the policy and the reference scored apart."""
    import iqstar_lite.evaluation.evaluate as ev
    from iqstar_lite.algorithm.logprobs import kl_between_logits
    from iqstar_lite.algorithm.rollout import pack, response_logits
    from iqstar_lite.algorithm.scoring import PassSettings, estimator_pass
    from iqstar_lite.config import load_recipe
    from iqstar_lite.data.formatting import Formatter
    from iqstar_lite.data.sources import load_prompts

    cfg = load_recipe("tiny_cpu", ["eval.max_new_tokens=6", "eval.batch_size=3", "train.micro_batch=2"])
    fmt = Formatter(tokenizer, cfg.data, cfg.estimator.kind)
    examples = load_prompts(cfg.data).heldout[:5]
    fresh = make_policy(tiny_path, quantize="none", randomize_lora=False)
    cd = ev.evaluate(fresh, tokenizer, fmt, examples, cfg, None, contrastive=True)
    target = [r["response_ids"] for r in cd["records"]]
    plain_ids, cond_ids = [fmt.ids(fmt.plain(e)) for e in examples], [fmt.ids(fmt.conditioned(e)) for e in examples]
    width = max(len(t) for t in target)
    resp = torch.tensor([t + [tokenizer.pad_token_id] * (width - len(t)) for t in target])
    mask = (torch.arange(width)[None] < torch.tensor([len(t) for t in target])[:, None]).float()
    est = estimator_pass(
        fresh, plain_ids, cond_ids, resp, tokenizer.pad_token_id, PassSettings(alpha=cfg.estimator.alpha, beta=0.1)
    )
    want = (est["principle_gap"] * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(torch.tensor([r["principle_score"] for r in cd["records"]]), want, atol=1e-4, rtol=1e-4)
    assert all(r["kl_star_ref"] > 0 for r in cd["records"])

    recomputed = ev.evaluate(fresh, tokenizer, fmt, examples, cfg, None, target=target)
    monkeypatch.setattr(
        ev, "kl_to_target", lambda *a, **k: pytest.fail("kl_to_target recomputed what contrastive decoding measured")
    )
    fast = ev.evaluate(
        fresh,
        tokenizer,
        fmt,
        examples,
        cfg,
        None,
        target=target,
        target_kl_ref=[r["kl_star_ref"] for r in cd["records"]],
    )
    monkeypatch.undo()
    torch.testing.assert_close(
        torch.tensor([r["kl_to_target"] for r in fast["records"]]),
        torch.tensor([r["kl_to_target"] for r in recomputed["records"]]),
        atol=1e-4,
        rtol=1e-4,
    )

    trained = make_policy(tiny_path, quantize="none")
    after = ev.evaluate(trained, tokenizer, fmt, examples, cfg, None, target=target)
    answers = [fmt.ids(fmt.plain(e)) for e in examples]
    got = torch.tensor([r["kl_per_token"] for r in after["records"]])
    assert (got > 0).all()
    roll = ev.greedy_answers(trained, tokenizer, fmt, examples, 6, ev.model_eos_ids(trained, tokenizer))
    batch = pack(answers, roll[0], tokenizer.pad_token_id)
    pol = response_logits(trained, batch, roll[0].shape[1])
    with ev.reference_mode(trained):
        ref = response_logits(trained, batch, roll[0].shape[1])
    kl = kl_between_logits(pol, ref)
    torch.testing.assert_close(got, (kl * roll[1]).sum(1) / roll[1].sum(1).clamp(min=1.0), atol=1e-4, rtol=1e-4)


def test_length_batches_group_like_lengths_and_cover_every_prompt():
    from iqstar_lite.evaluation.evaluate import length_batches

    lengths = [40, 500, 36, 62, 152, 300, 37]
    assert length_batches(lengths, 16) == [[2, 6, 0, 3], [4, 5], [1]]  # 36..62 | 152, 300 | 500 (over 2 x 152)
    assert length_batches(lengths, 2) == [[2, 6], [0, 3], [4, 5], [1]]  # batch_size still bounds each batch
    assert length_batches([10] * 5, 40) == [[0, 1, 2, 3, 4]] and length_batches([], 4) == []

import torch

from conftest import make_policy
from iqstar_lite.evaluate import contrastive_generate, repetition
from iqstar_lite.judges import pick_judge, refusal_judge
from iqstar_lite.reference import reference_mode
from iqstar_lite.rollout import sample


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
    cond = [chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]) for q in ("Hi?", "What is rain made of?")]
    plain = [chat([{"role": "user", "content": q}]) for q in ("Hi?", "What is rain made of?")]
    got = contrastive_generate(model, tokenizer, cond, plain, alpha=0.0, max_new_tokens=6)
    with reference_mode(model):
        want = sample(model, tokenizer, cond, max_new_tokens=6, greedy=True).response_ids
    n = min(got.shape[1], want.shape[1])
    assert torch.equal(got[:, :n], want[:, :n])

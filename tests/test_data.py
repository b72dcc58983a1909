import json

import pytest

from iqstar_lite.config import DataConfig
from iqstar_lite.data.formatting import Formatter, default_system_prompt, with_instruction
from iqstar_lite.data.sources import Example, load_prompts
from iqstar_lite.errors import UserError


def test_builtin_set_is_big_mixed_and_split():
    ps = load_prompts(DataConfig())
    assert len(ps.train) + len(ps.heldout) >= 200
    assert {e.kind for e in ps.heldout} == {"harmful", "benign"}
    assert not {e.text for e in ps.train} & {e.text for e in ps.heldout}
    assert [e.text for e in load_prompts(DataConfig()).heldout] == [e.text for e in ps.heldout]  # fixed


def _rows():
    return [{"prompt": f"Question number {i}?"} for i in range(40)]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "hf"])
def test_loaders(tmp_path, fmt):
    import datasets

    ds = datasets.Dataset.from_list(_rows())
    path = tmp_path / f"p.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    elif fmt == "csv":
        ds.to_csv(str(path))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    ps = load_prompts(DataConfig(prompts=str(path)))
    assert len(ps.train) + len(ps.heldout) == 40 and ps.heldout and ps.train


def test_messages_column_and_reference(tmp_path):
    path = tmp_path / "m.jsonl"
    row = {"messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi there."}]}
    path.write_text(json.dumps(row) + "\n" + json.dumps({"prompt": "Second?", "split": "heldout"}) + "\n")
    ps = load_prompts(DataConfig(prompts=str(path)))
    assert ps.train[0].messages == [{"role": "user", "content": "Hello?"}] and ps.train[0].reference == "Hi there."
    assert ps.heldout[0].text == "Second?"


def test_bad_messages_row(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match="end with a user turn"):
        load_prompts(DataConfig(prompts=str(path)))


def test_principle_as_system_message_or_prefix(tokenizer):
    fmt = Formatter(tokenizer, DataConfig(principle="Be brief."))
    ex = Example([{"role": "user", "content": "What is rain?"}])
    assert fmt.system_ok
    cond = fmt.conditioned(ex)
    assert "<|im_start|>system\nBe brief.<|im_end|>" not in cond and "Be brief." not in fmt.plain(ex)
    fmt_replace = Formatter(tokenizer, DataConfig(principle="Be brief.", keep_default_system=False))
    assert "<|im_start|>system\nBe brief.<|im_end|>" in fmt_replace.conditioned(ex)
    msgs = with_instruction(ex.messages, "Be brief.", "auto", system_ok=False)
    assert msgs == [{"role": "user", "content": "Be brief.\n\nWhat is rain?"}]
    fmt_prefix = Formatter(tokenizer, DataConfig(principle="Be brief.", principle_placement="prefix"))
    assert "<|im_start|>user\nBe brief.\n\nWhat is rain?" in fmt_prefix.conditioned(ex)


def test_hindsight_needs_reference(tokenizer):
    fmt = Formatter(tokenizer, DataConfig(), kind="hindsight")
    with pytest.raises(UserError, match="reference"):
        fmt.conditioned(Example([{"role": "user", "content": "x"}]))
    assert "excellent answer" in fmt.conditioned(Example([{"role": "user", "content": "x"}], reference="Yes."))


def test_principle_keeps_the_templates_default_system_prompt(tokenizer):
    """SmolLM2's template inserts a default system prompt when there is none. The conditioned context keeps it and
    appends the principle, so plain and conditioned contexts differ by exactly the principle (and its separator)."""
    fmt = Formatter(tokenizer, DataConfig(principle="Be brief."))
    default = default_system_prompt(tokenizer)
    assert default == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    ex = Example([{"role": "user", "content": "What is rain?"}])
    plain, cond = fmt.plain(ex), fmt.conditioned(ex)
    assert cond == plain.replace(default, f"{default}\n\nBe brief.", 1)
    own = Example([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is rain?"}])
    assert "<|im_start|>system\nYou are terse.\n\nBe brief.<|im_end|>" in fmt.conditioned(own)
    assert default not in fmt.conditioned(own)


def test_no_default_system_prompt_without_a_chat_template(tokenizer):
    import copy

    bare = copy.copy(tokenizer)
    bare.chat_template = None
    assert default_system_prompt(bare) is None


def test_shipped_ood_set_and_training_pool_are_disjoint_and_split():
    """builtin:ood (evaluation on prompts of other kinds; dev to choose, test to report) and builtin:train_pool: loadable
    as any prompt set, disjoint from each other and from the built-in set, every OOD kind in both halves."""
    from collections import Counter

    from iqstar_lite.config import DataConfig
    from iqstar_lite.data.sources import builtin_sets, load_examples

    assert {"builtin", "ood", "train_pool"} <= set(builtin_sets())
    sets = {name: load_examples(DataConfig(prompts=f"builtin:{name}"))[0] for name in ("builtin", "ood", "train_pool")}
    ood, pool = sets["ood"], sets["train_pool"]
    assert len(ood) >= 160 and len(pool) >= 1000
    halves = Counter((e.kind, e.meta["split"]) for e in ood)
    assert {k for k, _ in halves} == {"request", "question", "harmful"} and all(
        halves[(k, s)] > 0 for k, _ in halves for s in ("dev", "test")
    )
    assert {e.meta["split"] for e in pool} == {"train"}
    texts = {name: {e.text.lower() for e in ex} for name, ex in sets.items()}
    assert not texts["ood"] & texts["train_pool"] and not texts["ood"] & texts["builtin"]
    held = {e.text.lower() for e in sets["builtin"] if e.meta.get("split") == "heldout"}
    assert not held & texts["train_pool"]


def test_training_pool_trains_and_the_builtin_heldout_evaluates(tmp_path):
    """data.heldout_prompts: train on every row of one source, evaluate on another's held-out rows; a split column with
    training rows only (builtin:train_pool) holds out by hash, never one leftover prompt."""
    from iqstar_lite.config import DataConfig
    from iqstar_lite.data.sources import load_examples, load_prompts

    builtin_held = [e.text for e in load_examples(DataConfig())[0] if e.meta["split"] == "heldout"]
    both = load_prompts(DataConfig(prompts="builtin:train_pool", heldout_prompts="builtin"))
    assert len(both.train) == 1605 and [e.text for e in both.heldout] == builtin_held
    alone = load_prompts(DataConfig(prompts="builtin:train_pool"))
    assert 300 < len(alone.heldout) < 500 and len(alone.train) + len(alone.heldout) == 1605  # 25% by hash
    mine = tmp_path / "p.jsonl"
    mine.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a?", "b?", builtin_held[0]]))
    mixed = load_prompts(DataConfig(prompts=str(mine), heldout_prompts="builtin"))
    assert [e.text for e in mixed.train] == ["a?", "b?"]  # a held-out prompt never trains
    other = tmp_path / "h.jsonl"
    other.write_text(json.dumps({"prompt": "c?", "split": "train"}) + "\n")
    with pytest.raises(UserError, match="no held-out rows"):
        load_prompts(DataConfig(prompts=str(mine), heldout_prompts=str(other)))

"""Data the way TRL users have it: conversational prompts, messages, preference rows (the chosen answer as the hindsight
reference, rendered as text), prompt-completion rows, saved `datasets` datasets, `datasets` names read offline from the
cache, column mapping, and the report of prompts dropped as too long."""

from __future__ import annotations

import json
import logging

import pytest

from iqstar_lite.config import DataConfig, load_recipe
from iqstar_lite.data.formatting import Formatter, drop_too_long
from iqstar_lite.data.sources import load_prompts
from iqstar_lite.errors import UserError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _by_text(ps):
    return {e.text: e for e in ps.train + ps.heldout}


def test_trl_conversational_jsonl(tmp_path, tokenizer):
    """One file with each of TRL's conversational formats: prompt-only, prompt-completion, preference with an explicit
    prompt, preference with the prompt implicit in chosen, and a multi-turn chat in `messages`."""
    rows = [
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q1?"}]},
        {"prompt": [{"role": "user", "content": "Q2?"}], "completion": [{"role": "assistant", "content": "A2."}]},
        {
            "prompt": [{"role": "user", "content": "Q3?"}],
            "chosen": [{"role": "assistant", "content": "Good 3."}],
            "rejected": [{"role": "assistant", "content": "Bad 3."}],
        },
        {
            "chosen": [{"role": "user", "content": "Q4?"}, {"role": "assistant", "content": "Good 4."}],
            "rejected": [{"role": "user", "content": "Q4?"}, {"role": "assistant", "content": "Bad 4."}],
        },
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Q5?"},
            ]
        },
        {
            "prompt": [
                {"role": "user", "content": [{"type": "text", "text": "Q6 "}, {"type": "text", "text": "in parts?"}]}
            ]
        },
    ]
    ex = _by_text(load_prompts(DataConfig(prompts=_jsonl(tmp_path / "trl.jsonl", rows), heldout_fraction=0.01)))
    assert ex["Q1?"].messages == rows[0]["prompt"] and ex["Q1?"].reference == ""
    assert ex["Q2?"].reference == "A2."
    assert ex["Q3?"].messages == [{"role": "user", "content": "Q3?"}] and ex["Q3?"].reference == "Good 3."
    assert ex["Q4?"].messages == [{"role": "user", "content": "Q4?"}] and ex["Q4?"].reference == "Good 4."
    assert [m["role"] for m in ex["Q5?"].messages] == ["user", "assistant", "user"]
    assert ex["Q6 in parts?"].messages == [{"role": "user", "content": "Q6 in parts?"}]
    fmt = Formatter(tokenizer, DataConfig(), kind="hindsight")
    context = fmt.conditioned(ex["Q3?"])
    assert "Good 3.\n\nAnswer the next request" in context and "Bad 3." not in context and "'role'" not in context


def test_multi_turn_chosen_is_rendered_as_text_without_turn_markers(tokenizer):
    from iqstar_lite.data.sources import _to_example

    turns = [
        {"role": "assistant", "content": "Let me check."},
        {"role": "user", "content": "Please."},
        {"role": "assistant", "content": "Done."},
    ]
    ex = _to_example({"prompt": "Fix it?", "chosen": turns}, "row 1")
    assert ex.reference == turns
    fmt = Formatter(tokenizer, DataConfig(), kind="hindsight")
    assert fmt.reference_text(ex) == "assistant: Let me check.\n\nuser: Please.\n\nassistant: Done."
    # inside the hindsight context the reference adds no turn boundary: one system and one user turn, as without it
    context = fmt.conditioned(ex)
    with_text = fmt.conditioned(_to_example({"prompt": "Fix it?", "chosen": "Done."}, "row 2"))
    assert context.count("<|im_start|>") == with_text.count("<|im_start|>") and context.count(
        "<|im_end|>"
    ) == with_text.count("<|im_end|>")
    assert "Let me check." in context and "{'role'" not in context


def test_saved_datasets_preference_dataset_with_a_test_split(tmp_path, tokenizer):
    """A `datasets` DatasetDict saved with save_to_disk, TRL's standard preference columns (string prompt / chosen /
    rejected): train from its train split, evaluate on its test split."""
    import datasets

    def split(n, start):
        return datasets.Dataset.from_list(
            [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No."} for i in range(start, start + n)]
        )

    datasets.DatasetDict({"train": split(6, 0), "test": split(2, 100)}).save_to_disk(str(tmp_path / "prefs"))
    ps = load_prompts(DataConfig(prompts=str(tmp_path / "prefs"), heldout_split="test"))
    assert [e.text for e in ps.train] == [f"Question {i}?" for i in range(6)] and [e.text for e in ps.heldout] == [
        "Question 100?",
        "Question 101?",
    ]
    assert ps.train[2].reference == "Answer 2."
    assert "Answer 2." in Formatter(tokenizer, DataConfig(), kind="hindsight").conditioned(ps.train[2])
    with pytest.raises(UserError, match="has splits train, test; choose one with data.split"):
        load_prompts(DataConfig(prompts=str(tmp_path / "prefs"), split="validation"))
    split(4, 0).save_to_disk(str(tmp_path / "one"))
    assert len(load_prompts(DataConfig(prompts=str(tmp_path / "one"))).train) >= 2
    with pytest.raises(
        UserError, match="one saved Dataset without splits, so data.split / data.heldout_split='test' cannot apply"
    ):
        load_prompts(DataConfig(prompts=str(tmp_path / "one"), heldout_split="test"))


def test_folder_of_data_files(tmp_path):
    """A folder that is not a saved dataset: datasets.load_dataset(FOLDER) reads its data files (train / test by name)."""
    (tmp_path / "data").mkdir()
    _jsonl(tmp_path / "data" / "train.jsonl", [{"prompt": f"Folder question {i}?"} for i in range(4)])
    _jsonl(tmp_path / "data" / "test.jsonl", [{"prompt": "Folder test?"}])
    ps = load_prompts(DataConfig(prompts=str(tmp_path / "data"), heldout_split="test"))
    assert len(ps.train) == 4 and [e.text for e in ps.heldout] == ["Folder test?"]


@pytest.fixture()
def cached_hub_dataset(tmp_path, monkeypatch):
    """What `datasets.load_dataset("someorg/tiny-prefs")` leaves in the datasets cache once the hub was reachable: the
    prepared arrow files under someorg___tiny-prefs/default/0.0.0/<hash>/. The tests read it offline (HF_HUB_OFFLINE=1)."""
    import datasets
    from datasets.packaged_modules.json.json import Json

    rows = [{"question": f"Cached question {i}?", "answer": f"Answer {i}.", "category": "benign"} for i in range(8)]
    src = _jsonl(tmp_path / "src.jsonl", rows)
    cache = tmp_path / "datasets-cache"
    builder = Json(
        cache_dir=str(cache),
        data_files={"train": src, "test": src},
        dataset_name="tiny-prefs",
        config_name="default",
        hash="0123abcd",
    )
    builder.download_and_prepare()
    (cache / "tiny-prefs").rename(cache / "someorg___tiny-prefs")
    (cache / "someorg___tiny-prefs" / builder.config_id).rename(cache / "someorg___tiny-prefs" / "default")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return "someorg/tiny-prefs"


def test_datasets_name_config_split_offline_from_the_cache(cached_hub_dataset):
    """data.prompts=NAME data.config=CONFIG data.split=SPLIT, as `datasets.load_dataset` takes them, with column mapping."""
    columns = {"prompt": "question", "reference": "answer", "kind": "category"}
    ps = load_prompts(
        DataConfig(
            prompts=cached_hub_dataset, config="default", split="train[:6]", heldout_split="test[-2:]", columns=columns
        )
    )
    assert [e.text for e in ps.train] == [f"Cached question {i}?" for i in range(6)]
    assert [e.text for e in ps.heldout] == ["Cached question 6?", "Cached question 7?"]
    assert ps.train[0].reference == "Answer 0." and ps.train[0].kind == "benign"
    with pytest.raises(UserError, match="cannot load dataset 'someorg/tiny-prefs'.*split='nope'.*Unknown split"):
        load_prompts(DataConfig(prompts=cached_hub_dataset, split="nope"))
    with pytest.raises(UserError, match="cannot load dataset 'someorg/tiny-prefs'.*data.config='nocfg'"):
        load_prompts(DataConfig(prompts=cached_hub_dataset, config="nocfg"))
    with pytest.raises(UserError, match="data.prompts='someorg/not-cached' is neither a file nor a dataset"):
        load_prompts(DataConfig(prompts="someorg/not-cached"))
    with pytest.raises(
        UserError,
        match=r"data.columns maps prompt=query, but that column is missing; columns found: question, answer, category",
    ):
        load_prompts(DataConfig(prompts=cached_hub_dataset, columns={"prompt": "query"}))
    with pytest.raises(
        UserError,
        match=r"needs a non-empty 'prompt'.*columns found: question, answer, category \(map other names with data.columns",
    ):
        load_prompts(DataConfig(prompts=cached_hub_dataset))


def test_column_mapping_from_the_command_line_is_validated():
    assert load_recipe("tiny_cpu", ["data.columns.prompt=question"]).data.columns == {"prompt": "question"}
    with pytest.raises(UserError, match=r"'data.columns' maps unknown field\(s\) promt"):
        load_recipe("tiny_cpu", ["data.columns.promt=question"])
    with pytest.raises(UserError, match="'data.columns' must be a mapping"):
        load_recipe("tiny_cpu", ["data.columns=question"])


def test_too_long_prompts_are_reported_with_the_longest(tokenizer, caplog):
    from iqstar_lite.data.sources import Example

    fmt = Formatter(tokenizer, DataConfig())
    short, long_ = Example([{"role": "user", "content": "Hi?"}]), Example([{"role": "user", "content": "word " * 300}])
    longer = Example([{"role": "user", "content": "word " * 400}])
    n_longer = len(fmt.ids(fmt.conditioned(longer)))
    with caplog.at_level(logging.INFO, logger="iqstar_lite"):
        assert drop_too_long([short, long_, longer], fmt, 100) == [short]
    assert "dropped 2 of 3 training prompts longer than data.max_prompt_tokens=100" in caplog.text
    assert f"the longest: {n_longer} tokens ('word word" in caplog.text
    with pytest.raises(
        UserError, match=r"every training prompt is longer than data.max_prompt_tokens=5 \(the shortest: \d+ tokens"
    ):
        drop_too_long([short], fmt, 5)

"""Prompts from files / saved HF datasets / the built-in sets (``builtin:NAME``), split into training and held-out.
How they are rendered for a model: ``formatting.py``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from iqstar_lite.config import DataConfig
from iqstar_lite.errors import UserError

log = logging.getLogger("iqstar_lite")


@dataclass
class Example:
    messages: list[dict[str, str]]
    """Chat turns up to and including the last user turn."""
    kind: str = ""
    reference: str | list[dict[str, str]] = ""
    """A reference answer (hindsight estimator): text, or assistant turns rendered through the chat template."""
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class PromptSet:
    train: list[Example]
    heldout: list[Example]


FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
HELDOUT_SPLITS = ("heldout", "test", "eval", "validation")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _pick_split(ds, split: str, where: str):
    """One split of a ``datasets`` DatasetDict: ``split``, else ``train``, else the only one."""
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        return ds
    name = split or ("train" if "train" in ds else (list(ds)[0] if len(ds) == 1 else ""))
    if name not in ds:
        raise UserError(f"{where} has splits {', '.join(ds)}; choose one with data.split=NAME")
    return ds[name]


def _is_saved_dataset(p: Path) -> bool:
    return any((p / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _load_split(cfg: DataConfig, split: str) -> list[dict]:
    """The rows of one split of ``data.prompts``: a .jsonl / .json / .csv / .parquet file, a saved ``datasets`` directory
    (``save_to_disk``), a folder of data files, or a ``datasets`` name (+ ``data.config``), read offline from the cache
    when the hub is not reachable."""
    import datasets

    name, where = cfg.prompts, f"data.prompts={cfg.prompts!r}"
    p = Path(name).expanduser()
    if not p.exists():
        if name.startswith(("/", ".", "~")) or p.suffix in FILE_TYPES:
            raise UserError(
                f"prompt file {name!r} not found; set data.prompts to a .jsonl/.json/.csv/.parquet file, a saved HF dataset "
                f"directory, a datasets name, or builtin"
            )
        try:  # a datasets name: the hub, or offline its cache (HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1)
            return list(_pick_split(datasets.load_dataset(name, cfg.config or None, split=split or None), split, where))
        except UserError:
            raise
        except (ConnectionError, FileNotFoundError) as e:
            raise UserError(
                f"{where} is neither a file nor a dataset the hub or the local datasets cache has ({_first_line(e)}); give a path, "
                f"or load it once where the hub is reachable (then it is read offline from the cache)"
            ) from None
        except Exception as e:  # unknown config / split, damaged cache
            raise UserError(
                f"cannot load dataset {name!r} (data.config={cfg.config!r}, split={split!r}): {_first_line(e)}"
            ) from None
    try:
        if p.is_dir():
            if _is_saved_dataset(p):
                saved = datasets.load_from_disk(str(p))
                if split and not isinstance(saved, datasets.DatasetDict):
                    raise UserError(
                        f"{where} is one saved Dataset without splits, so data.split / data.heldout_split={split!r} cannot "
                        f"apply; leave them empty, or save a DatasetDict"
                    )
                return list(_pick_split(saved, split, where))
            return list(
                _pick_split(datasets.load_dataset(str(p), cfg.config or None, split=split or None), split, where)
            )
        if p.suffix == ".jsonl" and not split:
            rows = []
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(
                            f"prompt file {name!r} line {n} is not valid JSON ({e.msg}); fix that line"
                        ) from None
            return rows
        if p.suffix == ".json" and not split:
            data = json.loads(p.read_text(encoding="utf-8"))
            return data if isinstance(data, list) else data.get("data", data.get("rows", []))
        if p.suffix in FILE_TYPES:
            builder = {".jsonl": "json", ".json": "json"}.get(p.suffix, p.suffix[1:])
            return list(datasets.load_dataset(builder, data_files=str(p), split=split or "train"))
    except UserError:
        raise
    except Exception as e:  # malformed csv/parquet/json/dataset, unknown split
        raise UserError(
            f"cannot read prompt file {name!r} ({type(e).__name__}: {_first_line(e)}); check its format"
        ) from None
    raise UserError(
        f"prompt file {name!r} has unsupported type {p.suffix!r}; use .jsonl, .json, .csv, .parquet, a saved HF dataset directory "
        f"or a datasets name"
    )


def _mapped(row: dict, columns: dict[str, str], where: str) -> dict:
    """``data.columns`` (ours -> yours) applied to one row."""
    if not columns:
        return row
    missing = [f"{ours}={theirs}" for ours, theirs in columns.items() if theirs not in row]
    if missing:
        raise UserError(
            f"{where}: data.columns maps {', '.join(missing)}, but that column is missing; columns found: "
            f"{', '.join(map(str, row)) or 'none'}"
        )
    return {**row, **{ours: row[theirs] for ours, theirs in columns.items()}}


def _content(content, where: str) -> str:
    """A message's text: a string, or the text parts of a list of typed parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(c, dict) and c.get("type") == "text" for c in content):
        return "".join(str(c.get("text", "")) for c in content)
    raise UserError(f"{where}: a message's content must be text (a string or text parts), got {type(content).__name__}")


def _turns(messages, where: str) -> list[dict[str, str]]:
    if not (isinstance(messages, list) and all(isinstance(m, dict) and "role" in m for m in messages)):
        raise UserError(f"{where}: a conversation must be a list of {{'role': ..., 'content': ...}} messages")
    return [{"role": str(m["role"]), "content": _content(m.get("content", ""), where)} for m in messages]


def _reference(value, where: str) -> str | list[dict[str, str]]:
    """A reference answer: a string, or a conversational one (TRL's ``chosen`` / ``completion`` lists): one assistant turn
    is its text; more turns stay messages, rendered through the chat template (``Formatter.reference_text``)."""
    if not isinstance(value, list):
        return "" if value is None else str(value).strip()
    turns = _turns(value, where)
    if len(turns) == 1 and turns[0]["role"] == "assistant":
        return turns[0]["content"].strip()
    return turns


def _to_example(row: dict, where: str) -> Example:
    """One row in any of the formats TRL users have: ``prompt`` (a string, or a conversational list of messages),
    ``messages`` (a chat; a trailing assistant turn is the reference), preference rows (``prompt`` + ``chosen`` /
    ``rejected``, or TRL's implicit-prompt form where ``chosen`` holds the whole conversation), prompt-completion rows;
    the reference answer (hindsight estimator) from ``reference``, ``response``, ``completion`` or ``chosen``."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: each row must be an object with a 'prompt' or 'messages' column")
    ref_key = next(
        (k for k in ("reference", "response", "completion", "chosen") if row.get(k) not in (None, "", [])), None
    )
    reference = _reference(row[ref_key], where) if ref_key else ""
    meta = {"split": row.get("split")}
    prompt, chat = row.get("prompt"), row.get("messages")
    if chat is None and isinstance(prompt, list):  # TRL's conversational prompt
        chat = prompt
    if (
        chat is None and prompt in (None, "") and isinstance(row.get("chosen"), list)
    ):  # TRL's implicit prompt: chosen holds it all
        chat, reference = row["chosen"], ("" if ref_key == "chosen" else reference)
    if isinstance(chat, list) and chat:
        msgs = _turns(chat, where)
        tail = []
        while msgs and msgs[-1]["role"] == "assistant":  # a trailing answer is the reference, not the prompt
            tail.insert(0, msgs.pop())
        if tail and not reference:
            reference = _reference(tail, where)
        if not msgs or msgs[-1]["role"] != "user":
            raise UserError(f"{where}: 'messages' must end with a user turn")
        return Example(msgs, str(row.get("kind", "") or ""), reference, meta)
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(
            f"{where}: needs a non-empty 'prompt' (a string or a list of messages) or a 'messages' list; columns found: "
            f"{', '.join(map(str, row)) or 'none'} (map other names with data.columns.prompt=NAME)"
        )
    return Example([{"role": "user", "content": prompt.strip()}], str(row.get("kind", "") or ""), reference, meta)


def _is_heldout(ex: Example, fraction: float) -> bool:
    h = int(hashlib.sha256(ex.text.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def _examples(rows: list[dict], cfg: DataConfig, where: str) -> list[Example]:
    return [
        _to_example(
            _mapped(r, cfg.columns, f"{where} row {i + 1}") if isinstance(r, dict) else r, f"{where} row {i + 1}"
        )
        for i, r in enumerate(rows)
    ]


def builtin_sets() -> list[str]:
    """The prompt sets shipped with the package (``data.prompts=builtin:NAME``; ``builtin`` is ``builtin:builtin``)."""
    return sorted(
        f.name[: -len(".jsonl")]
        for f in resources.files("iqstar_lite.data.sets").iterdir()
        if f.name.endswith(".jsonl")
    )


def is_builtin(prompts: str) -> bool:
    return prompts == "builtin" or prompts.startswith("builtin:")


def load_examples(cfg: DataConfig) -> tuple[list[Example], str]:
    """Every row of ``data.prompts`` (the ``data.split`` of a dataset) as examples, whatever their ``split`` column says,
    and how to name the source in a message. ``builtin`` is the built-in set, ``builtin:NAME`` another set shipped in
    ``iqstar_lite/data/sets/NAME.jsonl`` (``builtin_sets()``)."""
    if is_builtin(cfg.prompts):
        name = cfg.prompts.partition(":")[2] or "builtin"
        if name not in builtin_sets():
            raise UserError(
                f"no built-in prompt set {name!r}; choose one of: {', '.join('builtin:' + n for n in builtin_sets())}"
            )
        text = resources.files("iqstar_lite.data.sets").joinpath(f"{name}.jsonl").read_text(encoding="utf-8")
        rows, where = (
            [json.loads(line) for line in text.splitlines() if line.strip()],
            f"built-in prompts {cfg.prompts!r}",
        )
    else:
        rows, where = _load_split(cfg, cfg.split), f"prompt file {cfg.prompts!r}"
    if not rows:
        raise UserError(
            f"{where} is empty; give at least a few prompts (one JSON object per line with a 'prompt' field)"
        )
    return _examples(rows, cfg, where), where


def load_prompts(cfg: DataConfig) -> PromptSet:
    examples, where = load_examples(cfg)
    if cfg.heldout_prompts:
        return PromptSet(*_train_and_heldout(examples, where, cfg))
    if cfg.heldout_split and not is_builtin(cfg.prompts):
        heldout = _examples(_load_split(cfg, cfg.heldout_split), cfg, f"{where} split {cfg.heldout_split!r}")
        if not heldout:
            raise UserError(
                f"data.heldout_split={cfg.heldout_split!r} of {where} is empty; choose another split or leave it empty"
            )
        return PromptSet(examples, heldout)
    train, heldout = [], []
    # a split column with held-out rows decides; else (no column, or only training rows: builtin:train_pool) a stable hash
    has_split = any(ex.meta.get("split") in HELDOUT_SPLITS for ex in examples)
    for ex in examples:
        split = ex.meta.get("split")
        held = split in HELDOUT_SPLITS if has_split else _is_heldout(ex, cfg.heldout_fraction)
        (heldout if held else train).append(ex)
    if not train:
        raise UserError(
            f"{where} leaves no training prompts after the held-out split; add prompts or lower data.heldout_fraction"
        )
    if not heldout:
        heldout = train[-1:]
    return PromptSet(train, heldout)


def _train_and_heldout(examples: list[Example], where: str, cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    """``data.heldout_prompts``: training on every row of ``data.prompts`` but its held-out ones (and any held-out
    prompt), evaluation on the other source's held-out rows (all of it without a split column)."""
    other, other_where = load_examples(
        dataclasses.replace(cfg, prompts=cfg.heldout_prompts, heldout_prompts="", split="")
    )
    split_col = any(ex.meta.get("split") for ex in other)
    heldout = [ex for ex in other if ex.meta.get("split") in HELDOUT_SPLITS] if split_col else other
    if not heldout:
        raise UserError(
            f"data.heldout_prompts: {other_where} has no held-out rows (split heldout / test / eval / validation); "
            f"give a source with such rows or without a split column"
        )
    held = {ex.text for ex in heldout}
    train = [ex for ex in examples if ex.meta.get("split") not in HELDOUT_SPLITS and ex.text not in held]
    if not train:
        raise UserError(f"{where} leaves no training prompts besides data.heldout_prompts' held-out ones; add prompts")
    return train, heldout

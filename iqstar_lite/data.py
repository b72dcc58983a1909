"""Prompts from files / saved HF datasets / the built-in set, and chat formatting with or without the principle."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from iqstar_lite.config import DataConfig
from iqstar_lite.errors import UserError

HINDSIGHT_TEMPLATE = "Here is an excellent answer to the next request:\n{reference}\n\nAnswer the next request as well as that."


@dataclass
class Example:
    messages: list[dict[str, str]]
    """Chat turns up to and including the last user turn."""
    kind: str = ""
    reference: str = ""
    """A reference answer (hindsight estimator)."""
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class PromptSet:
    train: list[Example]
    heldout: list[Example]


def _read_rows(path: str) -> list[dict]:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"prompt file {path!r} not found; set data.prompts to a .jsonl/.json/.csv/.parquet file, a saved HF dataset directory, or builtin")
    try:
        if p.is_dir():
            import datasets

            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[list(ds)[0]]
            return list(ds)
        if p.suffix == ".jsonl":
            rows = []
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(f"prompt file {path!r} line {n} is not valid JSON ({e.msg}); fix that line") from None
            return rows
        if p.suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            return data if isinstance(data, list) else data.get("data", data.get("rows", []))
        if p.suffix in (".csv", ".parquet"):
            import datasets

            return list(datasets.load_dataset(p.suffix[1:], data_files=str(p), split="train"))
    except UserError:
        raise
    except Exception as e:  # malformed csv/parquet/json/dataset
        raise UserError(f"cannot read prompt file {path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check its format") from None
    raise UserError(f"prompt file {path!r} has unsupported type {p.suffix!r}; use .jsonl, .json, .csv, .parquet or a saved HF dataset directory")


def _to_example(row: dict, where: str) -> Example:
    if not isinstance(row, dict):
        raise UserError(f"{where}: each row must be an object with a 'prompt' or 'messages' column")
    reference = str(row.get("reference") or row.get("response") or row.get("chosen") or "")
    if isinstance(row.get("messages"), list) and row["messages"]:
        msgs = [{"role": str(m.get("role")), "content": str(m.get("content"))} for m in row["messages"] if isinstance(m, dict)]
        while msgs and msgs[-1]["role"] == "assistant":  # a trailing answer is the reference, not the prompt
            reference = reference or msgs.pop()["content"]
        if not msgs or msgs[-1]["role"] != "user":
            raise UserError(f"{where}: 'messages' must end with a user turn")
        return Example(msgs, str(row.get("kind", "")), reference, {"split": row.get("split")})
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: needs a non-empty 'prompt' string or a 'messages' list; columns found: {', '.join(map(str, row)) or 'none'}")
    return Example([{"role": "user", "content": prompt.strip()}], str(row.get("kind", "")), reference, {"split": row.get("split")})


def _is_heldout(ex: Example, fraction: float) -> bool:
    h = int(hashlib.sha256(ex.text.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def load_prompts(cfg: DataConfig) -> PromptSet:
    if cfg.prompts == "builtin":
        text = resources.files("iqstar_lite.prompts").joinpath("builtin.jsonl").read_text(encoding="utf-8")
        rows, where = [json.loads(line) for line in text.splitlines() if line.strip()], "builtin prompts"
    else:
        rows, where = _read_rows(cfg.prompts), f"prompt file {cfg.prompts!r}"
    if not rows:
        raise UserError(f"{where} is empty; give at least a few prompts (one JSON object per line with a 'prompt' field)")
    examples = [_to_example(r, f"{where} row {i + 1}") for i, r in enumerate(rows)]
    train, heldout = [], []
    has_split = any(ex.meta.get("split") for ex in examples)  # a split column decides; else a stable hash
    for ex in examples:
        split = ex.meta.get("split")
        held = split in ("heldout", "test", "eval", "validation") if has_split else _is_heldout(ex, cfg.heldout_fraction)
        (heldout if held else train).append(ex)
    if not train:
        raise UserError(f"{where} leaves no training prompts after the held-out split; add prompts or lower data.heldout_fraction")
    if not heldout:
        heldout = train[-1:]
    return PromptSet(train, heldout)


# ----------------------------------------------------------------------------- chat formatting


def has_system_role(tokenizer) -> bool:
    sentinel = "SYSTEM-SENTINEL-7f3a"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": sentinel}, {"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
    except Exception:
        return False
    return sentinel in text


def default_system_prompt(tokenizer) -> str | None:
    """The system text a chat template inserts when the messages have none (SmolLM2: "You are a helpful AI
    assistant named SmolLM, trained by Hugging Face"), or None. Found by rendering one chat with a sentinel system
    message and one without: the default is what the template puts where the sentinel was."""
    if not getattr(tokenizer, "chat_template", None) or not has_system_role(tokenizer):
        return None
    sentinel, user = "SYSTEM-SENTINEL-7f3a", [{"role": "user", "content": "USER-SENTINEL-51c2"}]
    try:
        with_s = tokenizer.apply_chat_template([{"role": "system", "content": sentinel}, *user], tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    except Exception:
        return None
    head, tail = with_s.split(sentinel, 1)
    if not (without.startswith(head) and without.endswith(tail) and len(without) > len(head) + len(tail)):
        return None
    return without[len(head) : len(without) - len(tail)] or None


def with_instruction(messages: list[dict[str, str]], instruction: str, placement: str, system_ok: bool,
                     default_system: str | None = None) -> list[dict[str, str]]:
    """Put an instruction (the principle, or a hindsight answer) in context: after the system message (the chat's
    own, else the template's default ``default_system``, so that context and plain one differ only by the
    instruction), or prefixed to the first user turn."""
    msgs = [dict(m) for m in messages]
    if placement == "system" or (placement == "auto" and system_ok):
        if msgs[0]["role"] == "system":
            msgs[0]["content"] = f"{msgs[0]['content']}\n\n{instruction}"
        elif default_system:
            msgs.insert(0, {"role": "system", "content": f"{default_system}\n\n{instruction}"})
        else:
            msgs.insert(0, {"role": "system", "content": instruction})
        return msgs
    first_user = next(i for i, m in enumerate(msgs) if m["role"] == "user")
    msgs[first_user]["content"] = f"{instruction}\n\n{msgs[first_user]['content']}"
    return msgs


def render(tokenizer, messages: list[dict[str, str]]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


class Formatter:
    """Renders an example without the principle (policy, inference) and with it (estimator)."""

    def __init__(self, tokenizer, cfg: DataConfig, kind: str = "principle"):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.kind = kind
        self.system_ok = has_system_role(tokenizer)
        self.default_system = default_system_prompt(tokenizer) if cfg.keep_default_system else None

    def plain(self, ex: Example) -> str:
        return render(self.tokenizer, ex.messages)

    def conditioned(self, ex: Example) -> str:
        if self.kind == "hindsight":
            if not ex.reference:
                raise UserError("estimator.kind=hindsight needs a 'reference' (or 'response'/'chosen') column with an answer for every prompt")
            instruction = HINDSIGHT_TEMPLATE.format(reference=ex.reference)
        else:
            instruction = self.cfg.principle
        return render(self.tokenizer, with_instruction(ex.messages, instruction, self.cfg.principle_placement, self.system_ok,
                                                       self.default_system))

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

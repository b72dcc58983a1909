"""How a prompt reaches the model: one chat rendering and one end-of-turn rule, shared by training, evaluation, chat
and every exported runtime; with or without the principle (``Formatter``). No torch here: the runtimes import it."""

from __future__ import annotations

import logging

from iqstar_lite.config import DataConfig
from iqstar_lite.data.sources import Example
from iqstar_lite.errors import UserError

log = logging.getLogger("iqstar_lite")

HINDSIGHT_TEMPLATE = (
    "Here is an excellent answer to the next request:\n{reference}\n\nAnswer the next request as well as that."
)


def messages_for(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """One user turn, after a system turn when ``system`` is given."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def render_chat(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """One user turn (optionally after a system turn) + the assistant header, as token ids: what training's ``Formatter.plain``
    renders for the same prompt, so the deployed model sees the prompts the trained one saw."""
    return token_ids(tokenizer, render(tokenizer, messages_for(prompt, system)))


def token_ids(tokenizer, text: str) -> list[int]:
    """A rendered chat as ids: the template already holds any special tokens, so none are added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_token_ids(tokenizer=None, *declared) -> list[int]:
    """End-of-turn ids, one rule everywhere: the first of ``declared`` that is set (generation config, then model config:
    an int or a list), else the tokenizer's eos."""
    for eos in declared:
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        return [int(tokenizer.eos_token_id)]
    return []


def drop_too_long(examples: list[Example], fmt: Formatter, max_tokens: int) -> list[Example]:
    """The training prompts whose principle-conditioned context fits ``data.max_prompt_tokens``; the log says how many were
    dropped and the longest. None fits: a one-line error."""
    lengths = [len(fmt.ids(fmt.conditioned(e))) for e in examples]
    kept = [e for e, n in zip(examples, lengths) if n <= max_tokens]
    if len(kept) < len(examples):
        longest = max(range(len(examples)), key=lengths.__getitem__)
        text = " ".join(examples[longest].text.split())
        log.info(
            "dropped %d of %d training prompts longer than data.max_prompt_tokens=%d (with the principle in context); the longest: "
            "%d tokens (%r); raise data.max_prompt_tokens to keep them",
            len(examples) - len(kept),
            len(examples),
            max_tokens,
            lengths[longest],
            text[:60] + ("..." if len(text) > 60 else ""),
        )
    if not kept:
        raise UserError(
            f"every training prompt is longer than data.max_prompt_tokens={max_tokens} (the shortest: {min(lengths)} tokens with "
            f"the principle in context); raise it"
        )
    return kept


def has_system_role(tokenizer) -> bool:
    sentinel = "SYSTEM-SENTINEL-7f3a"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": sentinel}, {"role": "user", "content": "hi"}],
            tokenize=False,
            add_generation_prompt=True,
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
        with_s = tokenizer.apply_chat_template(
            [{"role": "system", "content": sentinel}, *user], tokenize=False, add_generation_prompt=True
        )
        without = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    except Exception:
        return None
    head, tail = with_s.split(sentinel, 1)
    if not (without.startswith(head) and without.endswith(tail) and len(without) > len(head) + len(tail)):
        return None
    return without[len(head) : len(without) - len(tail)] or None


def with_instruction(
    messages: list[dict[str, str]], instruction: str, placement: str, system_ok: bool, default_system: str | None = None
) -> list[dict[str, str]]:
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
                raise UserError(
                    "estimator.kind=hindsight needs a 'reference' (or 'response'/'chosen') column with an answer for every prompt"
                )
            instruction = HINDSIGHT_TEMPLATE.format(reference=self.reference_text(ex))
        else:
            instruction = self.cfg.principle
        return render(
            self.tokenizer,
            with_instruction(
                ex.messages, instruction, self.cfg.principle_placement, self.system_ok, self.default_system
            ),
        )

    def reference_text(self, ex: Example) -> str:
        """The hindsight reference as text: a string as it is; several turns (a conversational ``chosen``) as ``role: content``
        paragraphs, never a Python repr. Not through the chat template: its turn markers are special tokens and its default
        system block would come with them, fake turn boundaries inside one message of the context."""
        if isinstance(ex.reference, str):
            return ex.reference
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in ex.reference)

    def ids(self, text: str) -> list[int]:
        return token_ids(self.tokenizer, text)

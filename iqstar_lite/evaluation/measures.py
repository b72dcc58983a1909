"""Measures of one answer's text or tokens, pure functions: word repetition, near copies, loops (degeneration), and how
long a greedy answer follows a target's tokens. ``evaluate.py`` puts them in every evaluation record."""

from __future__ import annotations


def repetition(text: str) -> float:
    """1 - distinct words / words: 0 for no repeated word, -> 1 for a loop. A degeneration check beside the judge."""
    words = text.split()
    return 1.0 - len(set(words)) / len(words) if words else 0.0


NEAR_COPY_WINDOW = 5
_PUNCT = ".,;:!?\"'«»()[]…"


def near_copy(text: str, window: int = NEAR_COPY_WINDOW) -> float:
    """Share of words inside a ``window``-word span that repeats an earlier span with at most one word changed (words
    lower-cased, punctuation stripped; the spans may overlap). Exact copies count, and so do loops that swap one word
    per repeat ("je ne sais le, je ne sais la, je ne sais le": 11 of 12 words here, repetition 0.5), which ``repetition``
    partly counts as new words. Parallel phrasing counts too ("il y a un chat ... il y a un chien"), so ordinary text is
    not always 0: compare rows, as with ``repetition``. 0 for an answer of ``window`` words or fewer."""
    words = [w.strip(_PUNCT).lower() for w in text.split()]
    words = [w for w in words if w]
    covered = [False] * len(words)
    for i in range(1, len(words) - window + 1):
        span = words[i : i + window]
        for j in range(i):
            if sum(a != b for a, b in zip(span, words[j : j + window])) <= 1:
                covered[i : i + window] = [True] * window
                covered[j : j + window] = [True] * window
                break
    return sum(covered) / len(words) if words else 0.0


LOOP_MIN_WORDS, LOOP_REPETITION = 12, 0.6


def loops(text: str) -> bool:
    """An answer of >= 12 words whose word repetition exceeds 0.6 (e.g. one 4-word phrase said 3 times and more)."""
    return len(text.split()) >= LOOP_MIN_WORDS and repetition(text) > LOOP_REPETITION


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two answers share: for a greedy answer and pi-hat*'s, how long greedy decoding follows
    the target's path before it leaves it (``target_prefix``)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

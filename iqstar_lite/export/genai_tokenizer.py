"""A ``tokenizer.json`` that onnxruntime-genai's tokenizer (onnxruntime-extensions) reads as transformers does.

onnxruntime-genai 0.15.2 does not run the ``tokenizers`` library: it re-implements BPE and picks its behaviour from the
JSON. Two things in a byte-level BPE ``tokenizer.json`` make it disagree with transformers (SmolLM2, as converted from
GGUF by transformers, has both; measured on the demo's chat prompts: 75 ids, many ``-1``, instead of 34):

* a decoder ``Sequence`` of ``ByteFallback`` / ``Fuse`` / ``Replace("▁", " ")`` + ``ByteLevel`` (transformers' GGUF
  converter writes it) reads to onnxruntime-extensions as a SentencePiece-style BPE: the input is not mapped to the
  byte-level alphabet (ids ``-1``) and decoded pieces come back raw (``'ĊĊ'``). For a byte-level vocabulary (no
  ``<0xNN>`` tokens, no ``▁``) the three extra steps never change a decoded string, so the decoder becomes
  ``ByteLevel`` alone.
* its built-in GPT-2 pre-tokenizer splits whitespace before a word differently (``"a\\n\\nb"``: ``ĊĊ`` where
  transformers' ``\\s+(?!\\S)`` gives ``Ċ Ċ``); an explicit ``Split`` with the same regex, then ``ByteLevel`` without
  its own regex, is what transformers does inside ``ByteLevel(use_regex=True)`` and what onnxruntime-extensions then
  runs as written.

``rewrite`` changes only those parts; the parity gate (``check.py``) proves the result: onnxruntime-genai's ids for
the chat prompts equal the merged model's tokenizer's, and its decoding equals transformers'.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from iqstar_lite.atomic import atomic_file

# The GPT-2 pre-tokenizer regex, as transformers' ByteLevel(use_regex=True) applies it.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_NEUTRAL_DECODERS = ("ByteFallback", "Fuse", "Replace")


def _is_byte_level(pre: dict | None) -> bool:
    """ByteLevel with its regex and no prefix space (with one, a Split before it would prefix every piece)."""
    return (
        bool(pre)
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
    )


def _byte_level_decoder(dec: dict | None, vocab: dict) -> dict | None:
    """The ``ByteLevel`` step of a decoder whose other steps are no-ops on this vocabulary, else None."""
    if not dec:
        return None
    steps = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    others = [s for s in steps if s.get("type") != "ByteLevel"]
    if len(byte_level) != 1 or any(s.get("type") not in _NEUTRAL_DECODERS for s in others):
        return None
    for s in others:
        if s["type"] == "Replace" and (s.get("pattern", {}).get("String") != "\u2581" or s.get("content") != " "):
            return None
    if others and any(_BYTE_TOKEN.fullmatch(t) or "\u2581" in t for t in vocab):
        return None  # ByteFallback / Replace could act on this vocabulary
    return byte_level[0]


def rewrite(data: dict) -> tuple[dict, list[str]]:
    """``(new tokenizer.json dict, what changed)``; unchanged (empty list) for anything but a byte-level BPE."""
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(data.get("pre_tokenizer")):
        return data, []
    out, changes = copy.deepcopy(data), []
    pre = out["pre_tokenizer"]
    out["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": GPT2_SPLIT}, "behavior": "Isolated", "invert": False},
            {**pre, "use_regex": False},
        ],
    }
    changes.append("pre_tokenizer: ByteLevel regex -> explicit Split + ByteLevel(use_regex=false)")
    dec = out.get("decoder")
    single = _byte_level_decoder(dec, model.get("vocab", {}))
    if single is not None and single != dec:
        out["decoder"] = single
        changes.append("decoder: " + "+".join(s.get("type", "?") for s in dec.get("decoders", [dec])) + " -> ByteLevel")
    return out, changes


def write_genai_tokenizer(folder: Path) -> list[str]:
    """Rewrite ``folder/tokenizer.json`` in place (atomically) for onnxruntime-genai; return what changed."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return []
    new, changes = rewrite(json.loads(path.read_text(encoding="utf-8")))
    if changes:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(new, ensure_ascii=False), encoding="utf-8")
    return changes

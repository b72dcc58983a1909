"""A ``tokenizer.json`` that onnxruntime-genai's tokenizer (onnxruntime-extensions) reads as transformers does.

onnxruntime-genai does not run the ``tokenizers`` library: it re-implements BPE and picks its behaviour from the JSON.
A decoder ``Sequence`` of ``ByteFallback`` / ``Fuse`` / ``Replace("▁", " ")`` + ``ByteLevel`` (the GGUF converter of
transformers 4.x and 5.2 writes it, so the embedded model converted there and its merged checkpoints have it) reads to
onnxruntime-extensions
as a SentencePiece-style BPE: the input is not mapped to the byte-level alphabet (ids ``-1``; SmolLM2's demo chat
prompts: 75 ids instead of 34) and decoded pieces come back raw (``'ĊĊ'``). For a byte-level vocabulary (no ``<0xNN>``
tokens, no ``▁``) the three extra steps never change a decoded string, so the decoder becomes ``ByteLevel`` alone.

transformers 5.25 writes ``ByteLevel`` alone, which onnxruntime-genai 0.18 reads as transformers does (tested on tricky
whitespace too: 0.15.2 also split ``"a\n\nb"`` differently and needed an explicit GPT-2 ``Split``; 0.18 does not).
``rewrite`` changes only the decoder; the parity gate (``check.py``) proves the result: onnxruntime-genai's ids for
the chat prompts equal the merged model's tokenizer's, and its decoding equals transformers'.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from iqstar_lite.atomic import atomic_file

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_NEUTRAL_DECODERS = ("ByteFallback", "Fuse", "Replace")


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
    """``(new tokenizer.json dict, what changed)``; unchanged (empty list) for anything but a byte-level BPE whose
    decoder has steps that are no-ops on its vocabulary."""
    model, pre, dec = data.get("model") or {}, data.get("pre_tokenizer") or {}, data.get("decoder")
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        return data, []
    single = _byte_level_decoder(dec, model.get("vocab", {}))
    if single is None or single == dec:
        return data, []
    out = copy.deepcopy(data)
    out["decoder"] = single
    return out, ["decoder: " + "+".join(s.get("type", "?") for s in dec.get("decoders", [dec])) + " -> ByteLevel"]


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

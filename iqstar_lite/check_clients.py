"""Parity of the clients users deploy with, against the merged model's greedy reference (``check._torch_reference``).

A client runs end to end in its own runtime: onnxruntime-genai on a genai folder (``genai_generate.GenaiGenerator``),
llama.cpp on a GGUF file (``llamacpp_generate.LlamaCppGenerator``). Its chat template and tokenizer must give the
merged tokenizer's prompt ids, its decoding must give transformers' text, and its generator the merged model's greedy
tokens (exact: identical; else teacher-forced top-1 agreement >= a floor).

Each returns ``(report, failures)``; ``check.check_onnx`` adds them to its report and gate.
"""

from __future__ import annotations

from iqstar_lite.evaluate import common_prefix
from iqstar_lite.ort_generate import Generation


def first_diff(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two outputs differ (None: identical)."""
    return None if a == b else common_prefix(a, b)


def tokens_per_s(outs: list[Generation]) -> float:
    return sum(len(o.tokens) for o in outs) / max(sum(o.seconds for o in outs), 1e-9)


def _decode_ref(ref_tok, tokens: list[int], eos: list[int]) -> str:
    return ref_tok.decode([t for t in tokens if t not in eos], skip_special_tokens=True, clean_up_tokenization_spaces=False)


def client_parity(gen, label: str, name: str, texts: list[str], prompt_ids: list[list[int]], refs: list[dict], ref_tok, new_tokens: int,
                  min_agreement: float | None = None) -> tuple[dict, list[str]]:
    """Client ``gen`` (``chat_ids``, ``generate``, ``teacher_forced_top1``, ``decode``, ``eos_ids``; ``label`` names its
    runtime) end to end on each prompt. ``min_agreement=None``: exact: same prompt ids, same decoded text, identical
    greedy tokens; else the same ids and text, and top-1 agreement >= ``min_agreement``."""
    gen.generate(prompt_ids[0], 2)  # warm-up, not timed
    rows, failures, outs = [], [], []
    for i, (text, ids, ref) in enumerate(zip(texts, prompt_ids, refs)):
        where, want = f"{name} prompt {i} ({text[:40]!r})", ref["tokens"]
        own = gen.chat_ids(text)
        out = gen.generate(own, new_tokens)
        outs.append(out)
        row = {"prompt_ids_equal": own == ids, "tokens": out.tokens, "seconds": out.seconds, "first_divergence": first_diff(out.tokens, want)}
        if own != ids:
            k = first_diff(own, ids)
            failures.append(f"{where}: {label}'s tokenizer gives {len(own)} prompt ids, the merged model's {len(ids)}; "
                            f"first difference at id {k} ({own[k:k + 3]} != {ids[k:k + 3]}): re-export (tokenizer.json)")
        # Decoding: the prompt, and the reference answer when it is valid UTF-8 (a random model's bytes are not, and the
        # two libraries replace invalid bytes differently).
        pairs = [(gen.decode(ids), _decode_ref(ref_tok, ids, []))]
        answer = _decode_ref(ref_tok, want, gen.eos_ids)
        if "\ufffd" not in answer:
            pairs.append((gen.decode([t for t in want if t not in gen.eos_ids]), answer))
        row["decode_equal"] = all(a == b for a, b in pairs)
        for text_genai, text_ref in pairs:
            if text_genai != text_ref:
                k = next((j for j, (x, y) in enumerate(zip(text_genai, text_ref)) if x != y), min(len(text_genai), len(text_ref)))
                failures.append(f"{where}: {label} decodes to {text_genai[max(k - 10, 0):k + 20]!r}, transformers to {text_ref[max(k - 10, 0):k + 20]!r}")
        row["greedy_equal"] = row["first_divergence"] is None
        if min_agreement is None:
            if not row["greedy_equal"]:
                failures.append(f"{where} new token {row['first_divergence']}: {label} greedy {out.tokens[:12]} != pytorch {want[:12]}")
        else:
            top1 = gen.teacher_forced_top1(own, want)
            row["agree"], row["total"] = sum(a == b for a, b in zip(top1, want)), len(want)
        rows.append(row)
    report = {"client": label, "tokens_per_s": tokens_per_s(outs), "prompts": rows, "greedy_equal": all(r["greedy_equal"] for r in rows),
              "prompt_ids_equal": all(r["prompt_ids_equal"] for r in rows)}
    if min_agreement is not None:
        report["agreement"] = sum(r["agree"] for r in rows) / max(sum(r["total"] for r in rows), 1)
        if not report["agreement"] >= min_agreement:
            failures.append(f"{name}: {label} top-1 agreement {report['agreement']:.3f} < {min_agreement:g}")
    return report, failures


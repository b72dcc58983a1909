"""One parity path for every client of the export, against the merged model's greedy reference (``check._torch_reference``).

A client (``runtimes.base.Runtime``: onnxruntime fp32 / int8, onnxruntime-genai, llama.cpp, a GGUF through transformers'
loader) runs end to end in its own runtime: its chat template and tokenizer must give the merged tokenizer's prompt ids,
its decoding must give transformers' text, and its generator the merged model's greedy tokens (exact: identical; lossy:
teacher-forced top-1 agreement >= a floor). A client that exposes its logits (``logits(ids)``) is also compared logit by
logit; with ``logit_limit`` that comparison is gated too (the fp32 ONNX graph, prompt positions and every decode step).

``client_parity`` returns ``(report, failures)``; ``check.check_onnx`` adds them to its report and gate.
"""

from __future__ import annotations

import numpy as np

from iqstar_lite.evaluation.measures import common_prefix
from iqstar_lite.runtimes.base import Generation, Runtime


def first_diff(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two outputs differ (None: identical)."""
    return None if a == b else common_prefix(a, b)


def tokens_per_s(outs: list[Generation]) -> float:
    return sum(len(o.tokens) for o in outs) / max(sum(o.seconds for o in outs), 1e-9)


def _decode_ref(ref_tok, tokens: list[int], eos: list[int]) -> str:
    return ref_tok.decode(
        [t for t in tokens if t not in eos], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


def _logit_fields(gen, ids: list[int], out: Generation, ref: dict, want: list[int], div: int | None) -> dict:
    """|logit diff| against the reference at the prompt positions, and at each decode step while both agree so far."""
    n = len(ids)
    prompt_diff = np.abs(gen.logits(ids) - ref["logits"][:n]).max(axis=-1)
    steps = len(out.step_logits) if div is None else min(div + 1, len(want), len(out.step_logits))
    decode_diff = [float(np.abs(out.step_logits[k] - ref["logits"][n - 1 + k]).max()) for k in range(steps)]
    return {
        "max_logit_diff": float(prompt_diff.max()),
        "worst_position": int(prompt_diff.argmax()),
        "decode_max_logit_diff": float(np.max(decode_diff)) if decode_diff else 0.0,  # np.max keeps a nan
        "worst_decode_step": int(np.argmax(decode_diff)) if decode_diff else None,
    }


def client_parity(
    gen: Runtime,
    name: str,
    texts: list[str],
    prompt_ids: list[list[int]],
    refs: list[dict],
    ref_tok,
    new_tokens: int,
    min_agreement: float | None = None,
    logit_limit: float | None = None,
) -> tuple[dict, list[str]]:
    """Client ``gen`` end to end on each prompt; ``name`` names it in failures. ``min_agreement=None``: exact: same prompt
    ids, same decoded text, identical greedy tokens; else the same ids and text, and top-1 agreement >= ``min_agreement``.
    ``logit_limit``: every |logit diff| (prompt positions, decode steps) must be <= it (needs ``logits`` and step logits)."""
    label, with_logits = gen.label, hasattr(gen, "logits")
    keep = {"keep_logits": True} if logit_limit is not None else {}
    gen.generate(prompt_ids[0], 2)  # warm-up, not timed
    rows, failures, outs = [], [], []
    for i, (text, ids, ref) in enumerate(zip(texts, prompt_ids, refs)):
        where, want = f"{name} prompt {i} ({text[:40]!r})", ref["tokens"]
        own = gen.chat_ids(text)
        out = gen.generate(own, new_tokens, **keep)
        outs.append(out)
        div = first_diff(out.tokens, want)
        row = {
            "prompt": text,
            "prompt_tokens": len(ids),
            "prompt_ids_equal": own == ids,
            "tokens": out.tokens,
            "torch_tokens": want,
            "seconds": out.seconds,
            "torch_seconds": ref["seconds"],
            "first_divergence": div,
            "greedy_equal": div is None,
        }
        if own != ids:
            k = first_diff(own, ids)
            failures.append(
                f"{where}: {label}'s tokenizer gives {len(own)} prompt ids, the merged model's {len(ids)}; "
                f"first difference at id {k} ({own[k : k + 3]} != {ids[k : k + 3]}): re-export (tokenizer.json)"
            )
        # Decoding: the prompt, and the reference answer when it is valid UTF-8 (a random model's bytes are not, and the
        # two libraries replace invalid bytes differently).
        pairs = [(gen.decode(ids), _decode_ref(ref_tok, ids, []))]
        answer = _decode_ref(ref_tok, want, gen.eos_ids)
        if "\ufffd" not in answer:
            pairs.append((gen.decode([t for t in want if t not in gen.eos_ids]), answer))
        row["decode_equal"] = all(a == b for a, b in pairs)
        for text_client, text_ref in pairs:
            if text_client != text_ref:
                k = next(
                    (j for j, (x, y) in enumerate(zip(text_client, text_ref)) if x != y),
                    min(len(text_client), len(text_ref)),
                )
                failures.append(
                    f"{where}: {label} decodes to {text_client[max(k - 10, 0) : k + 20]!r}, transformers to {text_ref[max(k - 10, 0) : k + 20]!r}"
                )
        if with_logits and own == ids:
            row.update(_logit_fields(gen, ids, out, ref, want, div))
            if logit_limit is not None:
                limit = f"> {logit_limit:g}"  # "not <=": a nan difference fails, where "> limit" would let it pass
                if not row["max_logit_diff"] <= logit_limit:
                    failures.append(
                        f"{where} position {row['worst_position']}: |logit diff| {row['max_logit_diff']:.3g} {limit}"
                    )
                if not row["decode_max_logit_diff"] <= logit_limit:
                    k = row["worst_decode_step"]
                    failures.append(
                        f"{where} new token {k} (position {len(ids) + k}): |logit diff| {row['decode_max_logit_diff']:.3g} {limit}"
                    )
        if min_agreement is None:
            if div is not None:
                pieces = [gen.decode(t[div : div + 1]) for t in (out.tokens, want)]
                margin = ""
                if div < len(want):
                    top2 = np.sort(ref["logits"][len(ids) - 1 + div])[-2:]
                    margin = f" (merged top-2 margin {float(top2[1] - top2[0]):.3g})"
                failures.append(
                    f"{where} new token {div} (position {len(ids) + div}): {label} greedy {pieces[0]!r} {out.tokens[max(div - 5, 0) : div + 1]} "
                    f"!= merged {pieces[1]!r} {want[max(div - 5, 0) : div + 1]}{margin}"
                )
        else:
            top1 = gen.teacher_forced_top1(own, want)
            row["agree"], row["total"] = sum(a == b for a, b in zip(top1, want)), len(want)
            row["first_agreement_miss"] = first_diff(top1, want)
        rows.append(row)
    report = {
        "client": label,
        "tokens_per_s": tokens_per_s(outs),
        "prompts": rows,
        "greedy_equal": all(r["greedy_equal"] for r in rows),
        "prompt_ids_equal": all(r["prompt_ids_equal"] for r in rows),
        "decode_equal": all(r["decode_equal"] for r in rows),
    }
    if with_logits and any("max_logit_diff" in r for r in rows):
        report["max_logit_diff"] = float(
            np.max([[r["max_logit_diff"], r["decode_max_logit_diff"]] for r in rows if "max_logit_diff" in r])
        )
    if min_agreement is not None:
        report["agreement"] = sum(r["agree"] for r in rows) / max(sum(r["total"] for r in rows), 1)
        if not report["agreement"] >= min_agreement:
            first = next(
                ((i, r["first_agreement_miss"]) for i, r in enumerate(rows) if r["first_agreement_miss"] is not None),
                None,
            )
            at = f"; first miss: prompt {first[0]} new token {first[1]}" if first else ""
            failures.append(f"{name}: {label} top-1 agreement {report['agreement']:.3f} < {min_agreement:g}{at}")
    return report, failures

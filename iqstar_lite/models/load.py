"""Load the base model (NF4 4-bit where asked) + LoRA adapters; check adapters before they are loaded.

One copy of the base weights serves policy, reference and estimator: the reference is the same
model with adapters disabled (see ``reference.py``). What is done to the 4-bit layers after loading (the CPU repack
guard, dense weights, dequantizing for the merge) is in ``bnb.py``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from iqstar_lite.atomic import recover_dirs
from iqstar_lite.config import LoraSettings, ModelConfig
from iqstar_lite.errors import UserError
from iqstar_lite.heap import release_free_heap
from iqstar_lite.models.bnb import allow_dense_weights, disable_cpu_repack
from iqstar_lite.models.embedded import resolve_model_path
from iqstar_lite.models.mapped import is_mapped, map_input_embeddings
from iqstar_lite.rundir import RunDir

log = logging.getLogger(__name__)

KNOWN_CONFIGS = Path(__file__).resolve().parent / "known_configs"


def hub_kwargs(cfg: ModelConfig) -> dict:
    """What every ``from_pretrained`` of the user's model gets: ``model.revision`` and ``model.trust_remote_code``."""
    return {"revision": cfg.revision or None, "trust_remote_code": cfg.trust_remote_code}


def _remote_code_refused(e: ValueError, path: str) -> UserError | None:
    """transformers' refusal to run a repository's own code, as one line that says which setting allows it."""
    if "trust_remote_code" not in str(e):
        return None
    return UserError(
        f"model {path!r} needs the Python code its repository ships (a custom architecture or tokenizer); read that code, then "
        f"set model.trust_remote_code=true to run it (default false)"
    )


def load_model_config(path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's config without loading weights. For shipped hub ids (known_configs/) no network is needed."""
    known = KNOWN_CONFIGS / (path.replace("/", "--") + ".json")
    if not Path(path).exists() and known.is_file() and not revision:
        return AutoConfig.for_model(**json.loads(known.read_text()))
    return _from_hub(AutoConfig, "config", path, revision, trust_remote_code)


def _from_hub(auto, what: str, path: str, revision: str | None, trust_remote_code: bool):
    """``auto.from_pretrained`` on the user's model (embedded name resolved); a missing model or refused remote code as
    one line."""
    try:
        return auto.from_pretrained(resolve_model_path(path), revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(
            f"cannot load the {what} of model {path!r} ({str(e).splitlines()[0]}); check model.path"
            f"{' and model.revision' if revision else ''}, or run where the hub is reachable"
        ) from None
    except ValueError as e:
        raise _remote_code_refused(e, path) or e from None


# ----------------------------------------------------------------------------- devices, dtypes


def pick_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device=cuda but no CUDA GPU is visible; use model.device=auto or cpu")
    if cfg.device == "auto":
        cuda = torch.cuda.is_available()
    else:
        cuda = cfg.device == "cuda"
        if not cuda:
            return torch.device(cfg.device)
    # one GPU per process under torchrun / accelerate launch (LOCAL_RANK), as accelerate places it
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")


def _cpu_has_bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[cfg.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if cfg.quantize == "nf4":
        return torch.bfloat16 if _cpu_has_bf16() else torch.float32
    return torch.float32


# ----------------------------------------------------------------------------- loading


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tok = _from_hub(AutoTokenizer, "tokenizer", path, revision, trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def quantization_config(cfg: ModelConfig, device: torch.device):
    if cfg.quantize != "nf4":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg, device),
    )


FP32_UNQUANTIZED_MAX_BYTES = 2**30


def embedding_params(model_config) -> int:
    """Input embeddings + lm_head (one matrix when tied): the bulk of what NF4 leaves unquantized."""
    n = model_config.vocab_size * model_config.hidden_size
    return n if getattr(model_config, "tie_word_embeddings", False) else 2 * n


def unquantized_dtype(cfg: ModelConfig, device: torch.device, model_config) -> torch.dtype:
    """Dtype of embeddings / norms / lm_head next to an NF4 base (``ModelConfig.unquantized_dtype``).

    Measured on SmolLM2 (16 x 32 tokens/step): bf16 there was *slower* on this CPU than fp32 (rollout 3.9
    vs 3.4 s, estimator 2.4 vs 1.9 s, update 3.3 vs 2.9 s) at about the same peak RSS, so small models keep
    fp32 on CPU (exact log-probs); a 7B's 152k x 3584 embeddings + head would take 4.1 GiB in fp32, so large
    ones do not. Re-measured after the lm_head input hook below (which removed a per-call weight copy only bf16
    heads paid): bf16 / fp32 step 0.97x (rollout 0.99x, estimator 0.83x - its fp32 head GEMM was ~0.3 of its
    1.4 s - update 1.02x; 4 alternating rounds of train() per setting, 2026-11-25), too small a gain to give up
    fp32 log-probs, so ``auto`` still keeps small models' head in fp32.
    """
    if cfg.unquantized_dtype != "auto":
        return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[cfg.unquantized_dtype]
    if device.type == "cuda" or embedding_params(model_config) * 4 > FP32_UNQUANTIZED_MAX_BYTES:
        return compute_dtype(cfg, device)
    return torch.float32


def load_base(cfg: ModelConfig, device: torch.device | None = None):
    """The frozen base model (4-bit NF4 or plain), on ``device``, with the CPU repack fast path off."""
    device = device or pick_device(cfg)
    path = resolve_model_path(cfg.path)
    qcfg = quantization_config(cfg, device)
    hub = hub_kwargs(cfg)
    dtype = (
        compute_dtype(cfg, device)
        if qcfg is None
        else unquantized_dtype(cfg, device, load_model_config(cfg.path, **hub))
    )
    attn = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    try:
        # safetensors only: a pytorch_model.bin is a pickle, never loaded from a user's folder
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=qcfg,
            dtype=dtype,
            device_map={"": str(device)},
            use_safetensors=True,
            **hub,
            **attn,
        )
    except OSError as e:
        raise UserError(
            f"cannot load model {cfg.path!r} ({str(e).splitlines()[0]}); check model.path (weights must be .safetensors)"
        ) from None
    except (ValueError, ImportError) as e:
        if cfg.attn_implementation and "attn" in str(e):
            raise UserError(
                f"model.attn_implementation={cfg.attn_implementation!r} cannot be used here ({str(e).strip().splitlines()[0]}); "
                f"choose eager or sdpa, or leave it empty (transformers' default)"
            ) from None
        raise (_remote_code_refused(e, cfg.path) if isinstance(e, ValueError) else None) or e from None
    model.requires_grad_(False)
    if device.type == "cpu":
        if cfg.map_embeddings:
            map_input_embeddings(model, path, cfg.revision or None)
        own_cpu_memory(model)
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(_head_input_2d)
    head.register_forward_hook(_head_output_3d)
    disable_cpu_repack(model)
    allow_dense_weights(model, int(cfg.dense_weights_gib * 2**30))
    return model


def _head_input_2d(module, args):
    """lm_head gets ``hidden[:, -k:]`` (logits_to_keep): a strided 3-D view. On CPU a bf16 linear on a strided
    or grad-requiring 3-D input first copies the whole transposed weight: measured +0.15-0.3 GiB per call for a
    152k x 512 head, ~1-2 GiB per call (a 1 GB copy per generated token) for a 7B's 152k x 3584 head.
    A contiguous 2-D input takes the plain GEMM path (no copy); ``_head_output_3d`` restores the shape."""
    x = args[0]
    module._iq_lead_shape = x.shape[:-1]
    return (x.reshape(-1, x.shape[-1]), *args[1:])


def _head_output_3d(module, args, output):
    return output.view(*module._iq_lead_shape, output.shape[-1])


def own_cpu_memory(model) -> None:
    """Copy CPU parameters that still view the checkpoint's memory-mapped safetensors into process memory.

    Where the file dtype equals the load dtype, from_pretrained keeps zero-copy views; one small view (a
    norm) keeps its whole shard mapped, and every page read while loading stays resident: on SmolLM2 RSS
    drops from 1.07 to 0.77 GiB after this, on the 7B random checkpoint the mapped shards held ~13 GiB.
    """
    for p in model.parameters():
        if not hasattr(p, "quant_state") and not is_mapped(
            p
        ):  # bnb Params4bit were created by quantizing: already owned
            p.data = p.data.clone()
    gc.collect()
    release_free_heap()


def load_policy(cfg: ModelConfig, lora: LoraSettings, device: torch.device | None = None, seed: int = 0):
    """Base + fresh LoRA adapters (the only trainable parameters) as a peft ``PeftModel``; with ``model.adapter``, base +
    that adapter, trainable, continuing from its weights (``load_start_adapter``).

    The adapters' random init (LoRA A; B starts at zero) is drawn from ``seed`` on a forked RNG, so the same
    recipe and ``train.seed`` give the same run; without it, A came from whatever state the global RNG had
    (two identical demo runs ended at repetition 0.20 and 0.71), and the global RNG is left as it was.
    """
    from peft import LoraConfig, get_peft_model

    if cfg.adapter:
        check_start_adapter(cfg.adapter)
    model = load_base(cfg, device)
    if cfg.adapter:
        model = load_start_adapter(model, cfg)
    else:
        targets = (
            lora.target_modules
            if lora.target_modules == "all-linear"
            else [t.strip() for t in lora.target_modules.split(",")]
        )
        peft_cfg = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"
        )
        try:
            gpus = [model.device.index or 0] if model.device.type == "cuda" else []
            with torch.random.fork_rng(devices=gpus):
                torch.manual_seed(seed)
                model = get_peft_model(model, peft_cfg)
        except ValueError as e:
            raise UserError(
                f"LoRA could not be attached ({str(e).splitlines()[0]}); check lora.target_modules"
            ) from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def check_start_adapter(path: str) -> None:
    """``model.adapter`` checked before any model loads: a peft LoRA folder, weights as safetensors (never a pickled .bin),
    finite (``merge.check_adapter``)."""
    from iqstar_lite.models.load import check_adapter

    p = Path(path).expanduser()
    if not (p / "adapter_config.json").is_file():
        raise UserError(
            f"model.adapter={path!r} is not a peft adapter folder (no adapter_config.json); point it at the folder "
            f"save_pretrained wrote (e.g. RUN_DIR/adapter)"
        )
    check_adapter(p)
    ac = json.loads((p / "adapter_config.json").read_text())
    if ac.get("peft_type") != "LORA":
        raise UserError(
            f"model.adapter={path!r} is a {ac.get('peft_type')} adapter; training continues LoRA adapters only"
        )
    if ac.get("use_dora"):  # peft refuses per-row adapter names (pi-hat*'s rows in the rollout) with DoRA
        raise UserError(
            f"model.adapter={path!r} is a DoRA adapter (use_dora); training continues plain LoRA adapters only"
        )
    if ac.get(
        "modules_to_save"
    ):  # fully trained copies of whole modules: the reference (adapters off) would not be the base
        raise UserError(
            f"model.adapter={path!r} trains whole modules too (modules_to_save={ac['modules_to_save']}); "
            f"training continues plain LoRA adapters only"
        )


def lora_in_use(cfg: ModelConfig, lora: LoraSettings) -> LoraSettings:
    """The LoRA shape training will have: ``model.adapter``'s own (checked), else ``lora.*`` (for ``--dry-run``'s estimate;
    an adapter's full module names count as their last part, in every layer)."""
    if not cfg.adapter:
        return lora
    check_start_adapter(cfg.adapter)
    ac = json.loads((Path(cfg.adapter).expanduser() / "adapter_config.json").read_text())
    targets = ac.get("target_modules") or lora.target_modules
    return LoraSettings(
        r=int(ac.get("r", lora.r)),
        alpha=int(ac.get("lora_alpha", lora.alpha)),
        dropout=float(ac.get("lora_dropout", 0.0)),
        target_modules=targets
        if isinstance(targets, str)
        else ",".join(sorted({t.rsplit(".", 1)[-1] for t in targets})),
    )


def load_start_adapter(base, cfg: ModelConfig):
    """Base + the adapter of ``model.adapter``, trainable, as adapter "default" (the name checkpoints and export use)."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base, str(Path(cfg.adapter).expanduser()), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:  # shapes or module names of another base model
        raise UserError(
            f"model.adapter={cfg.adapter!r} does not fit model {cfg.path!r} ({str(e).strip().splitlines()[0][:200]}); use an "
            f"adapter trained on this base model"
        ) from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lc = model.peft_config["default"]
    log.info(
        "starting from adapter %s (r=%s, alpha=%s, %d trainable parameters; lora.* settings not used)",
        cfg.adapter,
        lc.r,
        lc.lora_alpha,
        trainable,
    )
    return model


def adapter_dir(run_dir: Path) -> Path:
    """RUN_DIR/adapter, checked before any model is loaded: config readable, weights as safetensors (an
    adapter_model.bin is a pickle and is never loaded), every weight finite."""
    path = RunDir(run_dir).adapter
    recover_dirs(Path(run_dir), "adapter")
    if not (path / "adapter_config.json").is_file():
        raise UserError(
            f"{str(run_dir)!r} has no trained adapter (adapter/adapter_config.json); run the train stage first"
        )
    check_adapter(path)
    return path


def check_adapter(path: Path) -> None:
    from safetensors.torch import load_file

    fix = "train again, or restore it from the run's newest checkpoint (checkpoints/step-*/adapter)"
    try:
        json.loads((path / "adapter_config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{str(path / 'adapter_config.json')!r} is not valid JSON ({e}); {fix}") from None
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(
            f"{str(path)!r} has no adapter_model.safetensors (only safetensors adapters are loaded, never a pickled .bin); {fix}"
        )
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - SafetensorError on a torn / foreign file
        raise UserError(
            f"{str(weights)!r} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}); {fix}"
        ) from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(
            f"{str(weights)!r} holds nan/inf in {len(bad)} tensors (first: {bad[0]}); it is not merged or exported; {fix}"
        )

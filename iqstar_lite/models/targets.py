"""What ``eval`` and ``chat`` are pointed at: a training run, a peft adapter, or an untrained base model, resolved to the
run's configuration plus (where there is one) the trained adapter, and loaded as training ran it.

    RUN_DIR                    a training run (config.yaml + adapter/): its model, principle, estimator and evaluation settings
    ADAPTER_DIR                a peft LoRA adapter (adapter_config.json); its run's config.yaml when it sits in one
    RECIPE (name or .yaml)     the untrained base of that recipe (its model.path and principle)
    MODEL                      the untrained base: a local Hugging Face folder, a hub id or embedded:NAME

Overrides (``key=value``, as for training) apply on top, e.g. ``data.principle=...`` or ``model.path=...``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from iqstar_lite.config import RecipeConfig, apply_overrides, list_recipes, load_recipe
from iqstar_lite.errors import UserError
from iqstar_lite.rundir import RunDir


@dataclass
class Target:
    cfg: RecipeConfig
    """The configuration the model is loaded and judged with (the run's own, plus overrides)."""
    adapter: Path | None
    """The trained LoRA adapter; None: the untrained base (adapters at identity)."""
    run_dir: Path | None = None
    """The training run the target belongs to, if any."""

    @property
    def label(self) -> str:
        return str(self.run_dir or self.adapter or self.cfg.model.path)


def _run_config(run_dir: Path, overrides: list[str], settings: dict | None) -> RecipeConfig:
    import yaml

    try:
        data = yaml.safe_load(RunDir(run_dir).config.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(
            f"{str(RunDir(run_dir).config)!r} is not valid YAML ({str(e).splitlines()[0]}); restore the run's config"
        ) from None
    return apply_overrides(data, overrides, str(data.get("name", "run")), settings)


def resolve_target(target: str, overrides: list[str] | None = None, settings: dict | None = None) -> Target:
    """A run directory, adapter folder, recipe or model (see the module doc) -> ``Target``, its config with ``overrides``
    (``key=value``) and ``settings`` (nested sections) on top; bad input is one ``UserError``."""
    from iqstar_lite.models.load import adapter_dir, check_adapter

    overrides = list(overrides or [])
    p = Path(target).expanduser()
    if p.is_dir() and RunDir(p).config.is_file():  # a training run
        return Target(_run_config(p, overrides, settings), adapter_dir(p), p)
    if p.is_dir() and (p / "adapter_config.json").is_file():  # a peft adapter, inside a run or on its own
        check_adapter(p)
        if RunDir(p.parent).config.is_file():
            return Target(_run_config(p.parent, overrides, settings), p, p.parent)
        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        cfg = apply_overrides({"model": {"path": base}} if base else {}, overrides, p.name, settings)
        return Target(cfg, p, None)
    if target in list_recipes() or (p.suffix in (".yaml", ".yml") and p.is_file()):
        return Target(load_recipe(target, overrides, settings), None, None)
    if p.is_dir() and not (p / "config.json").is_file():
        raise UserError(
            f"{target!r} is neither a training run (config.yaml), a peft adapter (adapter_config.json) nor a model folder "
            f"(config.json); pass RUN_DIR, RUN_DIR/adapter, a recipe name ({', '.join(list_recipes())}) or a model"
        )
    if not p.exists() and _local_looking(target, p):
        raise UserError(
            f"{target!r} does not exist; pass RUN_DIR, RUN_DIR/adapter, a recipe name ({', '.join(list_recipes())}), "
            f"a model folder or a hub id (org/name)"
        )
    return Target(apply_overrides({"model": {"path": target}}, overrides, "base", settings), None, None)


def _local_looking(target: str, p: Path) -> bool:
    """A missing path that cannot be a hub id (``name`` or ``org/name``): absolute, relative (``./``, ``~``), a file name,
    more than two parts, or under a folder that exists here (``runs/nope``) - an error, not a download attempt."""
    if target.startswith("embedded:"):
        return False
    return (
        target.startswith((".", "/", "~"))
        or p.suffix in (".yaml", ".yml", ".json", ".gguf", ".onnx")
        or len(p.parts) > 2
        or (len(p.parts) == 2 and Path(p.parts[0]).is_dir())
    )


def load_target(t: Target, device=None):
    """(model, tokenizer) as training ran them: the 4-bit (``model.quantize``) base + LoRA of the adapter's shape, the
    adapter's weights loaded into it (``load_adapter_weights``); for an untrained base a fresh LoRA (identity). One model
    serves every row of an evaluation: the reference is it with adapters off, as in training."""
    from iqstar_lite.models.embedded import resolve_model_path
    from iqstar_lite.models.load import hub_kwargs, load_policy, load_tokenizer, lora_in_use, pick_device

    cfg = t.cfg
    resolve_model_path(cfg.model.path)
    device = device or pick_device(cfg.model)
    lora = lora_in_use(dataclasses.replace(cfg.model, adapter=str(t.adapter)), cfg.lora) if t.adapter else cfg.lora
    model = load_policy(
        dataclasses.replace(cfg.model, adapter="", gradient_checkpointing=False), lora, device, seed=cfg.train.seed
    )
    tokenizer = load_tokenizer(cfg.model.path, **hub_kwargs(cfg.model))
    model.eval()
    return model, tokenizer


def load_adapter_weights(model, adapter: Path) -> None:
    """Put a saved adapter's weights into ``model``'s LoRA (same shape): the trained policy, in place. Every tensor of the
    file must find its place, else a one-line error (an adapter of another shape or base)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as e:  # size mismatch
        raise UserError(
            f"adapter {str(adapter)!r} does not fit model {model.peft_config['default'].base_model_name_or_path!r} "
            f"({str(e).strip().splitlines()[-1][:160]}); pass the model it was trained on with model.path=..."
        ) from None
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise UserError(
            f"adapter {str(adapter)!r} has {len(unexpected)} weights this model has no place for (first: {unexpected[0]}); "
            f"pass the model it was trained on with model.path=..."
        )

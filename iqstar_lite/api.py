"""The Python API: what the console script does, from code, shaped like TRL's trainers.

    from iqstar_lite import IQStarConfig, IQStarTrainer, load_recipe
    # functions: train_recipe, evaluate_prompts, export_model, check_model, chat_answers (the subcommands from code)

    config = load_recipe("smollm2_cpu", ["train.steps=8"])          # or IQStarConfig() and its sections
    trainer = IQStarTrainer(model="embedded:smollm2-135m-instruct", args=config,
                            train_dataset=["Name three colours.", ...],   # list of str / dicts, a datasets.Dataset, a path
                            principle="Always answer in French.", peft_config=LoraConfig(r=16, lora_alpha=32))
    run_dir = trainer.train()                     # the run directory (adapter in RunDir(run_dir).adapter)
    report = trainer.evaluate(["A prompt it never saw?"])   # the eval rows (contrastive / before / after)
    trainer.export(); trainer.check()             # merge + ONNX (+ int8, GGUF), then the parity gate

Each call is the command's own code (``recipe.run``, ``evaluation.eval_prompts.evaluate_target``, ``export.export_run``,
``check.check_run``): the same files in the run directory, the same ``UserError`` (one line) on bad input.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from iqstar_lite.config import LoraSettings, RecipeConfig, config_from_dict, load_recipe, load_run_config
from iqstar_lite.errors import UserError
from iqstar_lite.rundir import RunDir

IQStarConfig = RecipeConfig
"""The configuration: one dataclass per section (model, lora, data, rollout, estimator, loss, train, eval, export),
as in a recipe file; ``load_recipe(name, overrides)`` reads one."""


def _validated(cfg: RecipeConfig) -> RecipeConfig:
    """The same checks as a recipe file gets (types, ranges, names): a config built in code fails here, in one line."""
    return config_from_dict(copy.deepcopy(cfg.to_dict()), name=cfg.name)


def _lora(peft_config: Any) -> LoraSettings:
    """A peft ``LoraConfig`` (r, lora_alpha, lora_dropout, target_modules) or ``LoraSettings`` -> ``LoraSettings``."""
    if isinstance(peft_config, LoraSettings):
        return peft_config
    if not hasattr(peft_config, "lora_alpha"):
        raise UserError(
            f"peft_config must be a peft LoraConfig or iqstar_lite.LoraSettings, not {type(peft_config).__name__}"
        )
    targets = peft_config.target_modules
    if targets is None:
        raise UserError(
            "peft_config.target_modules is empty; name the modules (e.g. ['q_proj', 'v_proj']) or 'all-linear'"
        )
    targets = targets if isinstance(targets, str) else ",".join(sorted(targets))
    return LoraSettings(
        r=int(peft_config.r),
        alpha=int(peft_config.lora_alpha),
        dropout=float(peft_config.lora_dropout),
        target_modules=targets,
    )


def _rows(dataset: Any, split: str, what: str) -> list[dict]:
    """Prompt rows from a list of strings or dicts, a ``datasets.Dataset`` (or anything iterable of rows), with ``split``."""
    if isinstance(dataset, (str, Path)):
        raise UserError(f"{what} is a path; pass it as args.data.prompts (a file, dataset folder or name) instead")
    rows = []
    for i, row in enumerate(dataset):
        if isinstance(row, str):
            row = {"prompt": row}
        elif not isinstance(row, dict):
            row = dict(row) if hasattr(row, "keys") else None
        if row is None:
            raise UserError(
                f"{what} row {i + 1} is neither a string nor a mapping with a 'prompt' or 'messages' column"
            )
        rows.append({**row, "split": split})
    if not rows:
        raise UserError(f"{what} is empty; give at least a few prompts")
    return rows


class IQStarTrainer:
    """Inverse-Q* on ``model`` with ``principle``: the TRL-like front of ``iqstar-lite train``.

    ``model``: a local folder, hub id or ``embedded:NAME`` (loaded 4-bit per ``args.model.quantize``), or a transformers
    model object (saved to RUN_DIR/base, with ``processing_class``'s tokenizer, and loaded from there the same way).
    ``args``: an ``IQStarConfig`` (default: the defaults, i.e. SmolLM2-135M embedded and the built-in prompts).
    ``train_dataset`` / ``eval_dataset``: strings, rows in the formats of the README (prompt / messages / preference rows),
    or a ``datasets.Dataset``; written to RUN_DIR/prompts.jsonl with a ``split`` column (train / heldout). Without
    ``eval_dataset`` a stable hash holds out ``args.data.heldout_fraction`` for the before/after evaluation.
    ``peft_config``: a peft ``LoraConfig`` or ``LoraSettings``. ``output_dir``: the run directory (default
    runs/<name>-<time>). Training runs the ``train`` stage; ``export()`` and ``check()`` the others.
    """

    def __init__(
        self,
        model: Any = None,
        args: RecipeConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        principle: str | None = None,
        peft_config: Any = None,
        processing_class: Any = None,
        output_dir: str | Path | None = None,
    ):
        cfg = copy.deepcopy(args) if args is not None else RecipeConfig()
        if isinstance(model, (str, Path)):
            cfg.model.path = str(model)
        if principle is not None:
            cfg.data.principle = principle
        if peft_config is not None:
            cfg.lora = _lora(peft_config)
        if output_dir is not None:
            cfg.out_dir = str(output_dir)
        cfg.out_dir = cfg.out_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg.stages = "train"
        self._model = model if model is not None and not isinstance(model, (str, Path)) else None
        self._tokenizer = processing_class
        self._rows = None
        if eval_dataset is not None and train_dataset is None:
            raise UserError("eval_dataset needs a train_dataset (or leave both out and set args.data.prompts)")
        if train_dataset is not None:
            self._rows = _rows(train_dataset, "train", "train_dataset") + (
                _rows(eval_dataset, "heldout", "eval_dataset") if eval_dataset is not None else []
            )
            if eval_dataset is None:
                self._rows = [{k: v for k, v in r.items() if k != "split"} for r in self._rows]
        self.args = _validated(cfg) if self._model is None else cfg  # a model object: validated once saved (model.path)
        self.run_dir = Path(self.args.out_dir)

    @property
    def adapter_dir(self) -> Path:
        return RunDir(self.run_dir).adapter

    def train(self) -> Path:
        """Train (with the before / after evaluation unless ``args.eval.enabled`` is false); the run directory."""
        from iqstar_lite.console import setup_logging
        from iqstar_lite.recipe import prepare_run_dir, run

        setup_logging()
        prepare_run_dir(self.run_dir, not self.args.train.resume)  # refuses a finished run before anything is written
        if self._model is not None:
            base = self.run_dir / "base"
            self._model.save_pretrained(base, safe_serialization=True)
            if self._tokenizer is None:
                raise UserError("a model object needs its tokenizer: pass processing_class=tokenizer")
            self._tokenizer.save_pretrained(base)
            self.args.model.path = str(base)
            self.args = _validated(self.args)
            self._model = None
        if self._rows is not None:
            path = self.run_dir / "prompts.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._rows), encoding="utf-8")
            self.args.data.prompts, self.args.data.split, self.args.data.heldout_split = str(path), "", ""
        run(self.args, self.run_dir)
        return self.run_dir

    def evaluate(
        self,
        prompts: Any = None,
        split: str = "",
        principle: str | None = None,
        max_prompts: int = 0,
        rows: tuple[str, ...] = ("contrastive", "before", "after"),
        out: str | Path | None = None,
    ) -> dict:
        """The trained run judged on ``prompts`` (``evaluate_prompts`` below); default: its held-out prompts, as training chose them."""
        return evaluate_prompts(
            self.run_dir, prompts, split=split, principle=principle, max_prompts=max_prompts, rows=rows, out=out
        )

    def export(self, overrides: list[str] | None = None) -> dict:
        return export_model(self.run_dir, overrides)

    def check(self) -> dict:
        return check_model(self.run_dir)


def train_recipe(recipe: str | RecipeConfig, overrides: list[str] | None = None) -> Path:
    """``iqstar-lite train RECIPE key=value ...`` from code, all the recipe's stages: the run directory."""
    from iqstar_lite.console import setup_logging
    from iqstar_lite.recipe import prepare_run_dir, run

    cfg = load_recipe(recipe, overrides) if isinstance(recipe, str) else _validated(recipe)
    cfg.out_dir = cfg.out_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    setup_logging()
    prepare_run_dir(Path(cfg.out_dir), "train" in cfg.stages.split(",") and not cfg.train.resume)
    code = run(cfg, Path(cfg.out_dir))
    if code:
        raise UserError(f"{cfg.out_dir}: the parity gate failed (check.json); see the table above")
    return Path(cfg.out_dir)


def evaluate_prompts(
    target: str | Path,
    prompts: Any = None,
    split: str = "",
    principle: str | None = None,
    max_prompts: int = 0,
    rows: tuple[str, ...] = ("contrastive", "before", "after"),
    overrides: list[str] | None = None,
    out: str | Path | None = None,
) -> dict:
    """``iqstar-lite eval TARGET --prompts ...`` from code: a run, adapter, recipe or model judged on ``prompts`` (a file,
    dataset, ``builtin:NAME``, or a list of strings / rows; None: a run's held-out prompts, the first ``eval.max_prompts``
    as training's evaluation took them). Returns the report; written as JSON to ``out`` if given."""
    import tempfile

    from iqstar_lite.data.sources import load_examples, load_prompts
    from iqstar_lite.evaluation.eval_prompts import evaluate_target, write_report
    from iqstar_lite.evaluation.report import heldout_for_eval, pick_examples
    from iqstar_lite.models.targets import resolve_target

    if prompts is None:
        t = resolve_target(
            str(target), overrides, {"data": {"principle": principle}} if principle is not None else None
        )
        examples = heldout_for_eval(load_prompts(t.cfg.data).heldout, max_prompts or t.cfg.eval.max_prompts)
        report = evaluate_target(t, examples, rows)
        if out is not None:
            write_report(report, Path(out))
        return report
    with tempfile.TemporaryDirectory() as tmp:
        if not isinstance(prompts, (str, Path)):
            path = Path(tmp) / "prompts.jsonl"
            path.write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows(prompts, "", "prompts")),
                encoding="utf-8",
            )
            prompts = str(path)
        data: dict[str, Any] = {"prompts": str(prompts), "heldout_split": ""}
        if principle is not None:
            data["principle"] = principle
        t = resolve_target(str(target), overrides, {"data": data})
        report = evaluate_target(t, pick_examples(load_examples(t.cfg.data)[0], split, max_prompts), rows)
    if out is not None:
        write_report(report, Path(out))
    return report


def export_model(run_dir: str | Path, overrides: list[str] | None = None) -> dict:
    """``iqstar-lite export RUN_DIR export.key=value ...``: merge + ONNX (+ int8, genai, GGUF per ``export.*``); the report."""
    from iqstar_lite.export.stage import apply_export_overrides, export_run

    cfg = apply_export_overrides(load_run_config(Path(run_dir)), overrides or [])
    return export_run(Path(run_dir), cfg)


def check_model(run_dir: str | Path) -> dict:
    """``iqstar-lite check RUN_DIR``: the parity gate on the run's exports; the report (``report["passed"]``)."""
    from iqstar_lite.export.check import check_run

    return check_run(Path(run_dir), load_run_config(Path(run_dir)))


def chat_answers(
    target: str | Path,
    prompts: list[str],
    mode: str = "",
    principle: str | None = None,
    max_new_tokens: int = 128,
    **kw,
) -> list[str]:
    """Answers from ``iqstar-lite chat``'s clients: a run / adapter / recipe / model (``mode`` trained, base or
    contrastive; default the trained model, else the base) or an export (ONNX, genai, GGUF)."""
    from iqstar_lite.chat import open_client

    client = open_client(str(target), "auto", None, principle)
    try:
        mode = mode or ("trained" if "trained" in client.modes() else "base")
        return [client.reply(p, max_new_tokens, mode=mode, **kw) for p in prompts]
    finally:
        getattr(client, "close", lambda: None)()

"""``iqstar-lite train NAME [key=value ...] [--dry-run] [--list]`` (also ``python -m iqstar_lite.recipe NAME ...``)

NAME is a file in recipes/ or a path to a .yaml. Stages (``stages=train,export,check``): train
(with before/after evaluation), export (adapter card, merge, ONNX), check (ONNX parity gate).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import yaml

from iqstar_lite.atomic import recover_dirs
from iqstar_lite.config import RECIPES_DIR, RecipeConfig, list_recipes, load_recipe, load_run_config, save_config
from iqstar_lite.console import setup_logging
from iqstar_lite.errors import UserError, run_cli
from iqstar_lite.evaluation.report import (
    eval_rows,
    heldout_for_eval,
    heldout_texts,
    ood_examples,
    print_eval_table,
    print_examples,
    print_side_by_side,
)
from iqstar_lite.export.stage import require_export_extras
from iqstar_lite.rundir import RunDir

log = logging.getLogger("iqstar_lite")


def _parser(prog: str = "python -m iqstar_lite.recipe") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Inverse-Q* alignment from a recipe.")
    p.add_argument("name", nargs="?", help="recipe name (see --list) or path to a .yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=20 loss.type=pg")
    p.add_argument("--list", action="store_true", help="list the shipped recipes")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, parameter count and memory estimate; load nothing heavy",
    )
    return p


def dry_run(cfg: RecipeConfig) -> None:
    from iqstar_lite.models.load import hub_kwargs, load_model_config, lora_in_use
    from iqstar_lite.models.memory import estimate_memory, format_estimate

    cfg.lora = lora_in_use(cfg.model, cfg.lora)  # model.adapter's own r / targets, printed and estimated
    estimate = format_estimate(estimate_memory(cfg, load_model_config(cfg.model.path, **hub_kwargs(cfg.model))))
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    print("---")
    print(estimate)


def processes(device):
    """accelerate's view of the launch: one process, or the N that torchrun / accelerate launch started (joined over gloo
    on CPU, NCCL on GPUs)."""
    from datetime import timedelta

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    for flag, engine in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if parse_flag_from_env(flag):  # set by `accelerate launch` from a config file or --use_fsdp / --use_deepspeed
            raise UserError(
                f"{engine} is not supported yet (rollout and estimator run the whole model in every process): launch with "
                f"DDP instead: accelerate launch --config_file {RECIPES_DIR / 'accelerate' / 'ddp_gpus.yaml'} -m iqstar_lite.recipe ..."
            )
    # the other processes wait while the main one evaluates (minutes on a 7B): far beyond the default 30-minute timeout
    return PartialState(cpu=device.type == "cpu", timeout=timedelta(hours=12))


def stage_train(cfg: RecipeConfig, run_dir: Path) -> bool:
    """Evaluate, train, evaluate (the main process; the others train). Returns whether this is the main process."""
    import torch

    from iqstar_lite.algorithm.train import train
    from iqstar_lite.data.formatting import Formatter, drop_too_long
    from iqstar_lite.data.sources import load_prompts
    from iqstar_lite.evaluation.curves import write_curves
    from iqstar_lite.evaluation.evaluate import evaluate, target_ids, untrained_rows
    from iqstar_lite.evaluation.judges import pick_judge
    from iqstar_lite.evaluation.samples import SampleWriter
    from iqstar_lite.models.embedded import resolve_model_path
    from iqstar_lite.models.load import hub_kwargs, load_policy, load_tokenizer, lora_in_use, pick_device
    from iqstar_lite.tracking import log_eval, make_accelerator, start_trackers

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    prompts = load_prompts(cfg.data)
    device = pick_device(cfg.model)
    state = processes(device)
    main = state.is_main_process
    with (
        state.main_process_first()
    ):  # the embedded model is converted into the cache once, not by every process at once
        resolve_model_path(cfg.model.path)
    cfg.train.world_size = state.num_processes
    if cfg.rollout.prompts_per_step % state.num_processes:
        raise UserError(
            f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} does not split over {state.num_processes} processes; "
            f"make it a multiple of {state.num_processes}"
        )
    accelerator = make_accelerator(
        cfg, run_dir, device
    )  # trackers (train.report_to) checked before anything heavy loads
    cfg.lora = lora_in_use(
        cfg.model, cfg.lora
    )  # model.adapter's own r / alpha / targets: what config.yaml and the model card say
    if main:
        save_config(cfg, RunDir(run_dir).config)
    tokenizer = load_tokenizer(cfg.model.path, **hub_kwargs(cfg.model))
    model = load_policy(cfg.model, cfg.lora, device, seed=cfg.train.seed)
    fmt = Formatter(tokenizer, cfg.data, cfg.estimator.kind)
    train_set = drop_too_long(prompts.train, fmt, cfg.data.max_prompt_tokens)
    log.info(
        "%d training prompts, %d held out; device %s; model %s (%s)",
        len(train_set),
        len(prompts.heldout),
        device,
        cfg.model.path,
        cfg.model.quantize,
    )
    judge = pick_judge(cfg.eval.judge, cfg.data.principle)
    heldout = heldout_for_eval(prompts.heldout, cfg.eval.max_prompts)
    sets = [("", heldout, "held-out")]  # (file suffix, prompts, title): in distribution, then out of distribution
    if cfg.eval.enabled and cfg.eval.ood_prompts:
        sets.append(
            (
                "_ood",
                ood_examples(cfg, train_set),
                f"out-of-distribution ({cfg.eval.ood_prompts} {cfg.eval.ood_split})".replace(" )", ")"),
            )
        )
    targets: dict[str, list | None] = {}
    if not main:  # evaluation and every file of the run: the main process; the others train their slice of each step
        state.wait_for_everyone()
        train(cfg, run_dir, model, tokenizer, train_set, device, accelerator=accelerator)
        accelerator.end_training()
        return False
    start_trackers(accelerator, cfg, run_dir)
    try:  # trackers closed whatever happens (an MLflow / W&B run is not left open by a stop or an error)
        for suffix, examples, _ in sets if cfg.eval.enabled else []:
            if not (cfg.train.resume and RunDir(run_dir).eval_row("before", suffix).exists()):
                cd, before = untrained_rows(model, tokenizer, fmt, examples, cfg, judge)
                RunDir(run_dir).eval_row("contrastive", suffix).write_text(json.dumps(cd, indent=1))
                RunDir(run_dir).eval_row("before", suffix).write_text(json.dumps(before, indent=1))
                targets[suffix] = target_ids(cd)
                log_eval(accelerator, cd["summary"], 0, contrastive=True, suffix=suffix)
                log_eval(accelerator, before["summary"], 0, suffix=suffix)
            elif RunDir(run_dir).eval_row("contrastive", suffix).exists():
                targets[suffix] = target_ids(json.loads(RunDir(run_dir).eval_row("contrastive", suffix).read_text()))
        state.wait_for_everyone()
        t0 = time.time()
        samples = SampleWriter(model, tokenizer, fmt, heldout, cfg, judge, run_dir, accelerator)
        last = train(cfg, run_dir, model, tokenizer, train_set, device, on_step=samples, accelerator=accelerator)
        log.info("training: %d steps in %.1f s; last step %s", cfg.train.steps, time.time() - t0, json.dumps(last))
        step = last.get("step", cfg.train.steps)
        for suffix, examples, _ in sets if cfg.eval.enabled else []:
            after = evaluate(model, tokenizer, fmt, examples, cfg, judge, target=targets.get(suffix))
            RunDir(run_dir).eval_row("after", suffix).write_text(json.dumps(after, indent=1))
            log_eval(accelerator, after["summary"], step, suffix=suffix)
            if step == cfg.train.steps and not suffix:
                samples.from_evaluation(after["records"], step)
        for suffix, _, title in sets if cfg.eval.enabled else []:
            evals = eval_rows(run_dir, suffix)
            print_eval_table({label: e["summary"] for label, e in evals.items()}, title=f"{title} evaluation")
            print_examples(evals, cfg.eval.show_examples, title=f"{title} answers")
        if cfg.eval.enabled and len(sets) > 1:
            print_side_by_side(
                {
                    title: {label: e["summary"] for label, e in eval_rows(run_dir, suffix).items()}
                    for suffix, _, title in sets
                }
            )
    finally:
        accelerator.end_training()
    curves = write_curves(run_dir)
    if curves:
        log.info("curves: %s", curves)
    return True


def run(cfg: RecipeConfig, run_dir: Path) -> int:
    stages = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    require_export_extras(cfg, stages)
    prepare_run_dir(run_dir, "train" in stages and not cfg.train.resume)
    if "train" in stages:
        if not stage_train(cfg, run_dir):
            return 0  # a data-parallel run's other processes: the main one evaluates, exports and checks
    elif not RunDir(run_dir).adapter.is_dir():
        raise UserError(
            f"{str(run_dir)!r} has no adapter/; run the train stage first (stages=train,...) or point out_dir at a trained run"
        )
    code = 0
    if "export" in stages:
        from iqstar_lite.export.stage import export_run

        export_run(run_dir, cfg, heldout_texts(cfg, cfg.export.check_prompts))
    if "check" in stages:
        from iqstar_lite.export.check import check_run

        report = check_run(run_dir, cfg, heldout_texts(cfg, cfg.export.check_prompts))
        code = 0 if report.get("passed") else 1
    print(f"\nrun directory: {run_dir}")
    return code


def prepare_run_dir(run_dir: Path, fresh: bool) -> None:
    """Create the run directory; refuse a path that is a file, and (``fresh``: training from step 0) a folder that already
    holds a trained run, which a new run would overwrite."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"out_dir {str(run_dir)!r} is a file, not a folder; choose another out_dir")
    if (
        int(os.environ.get("RANK", "0")) == 0
    ):  # killed while re-saving adapter/: the complete version back, the temporary gone
        recover_dirs(run_dir, "adapter")
    if fresh and (RunDir(run_dir).adapter.is_dir() or any(RunDir(run_dir).checkpoints.glob("step-*"))):
        raise UserError(
            f"out_dir {str(run_dir)!r} already holds a run (adapter/ or checkpoints/); continue it with train.resume=true, "
            f"or choose another out_dir"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create out_dir {str(run_dir)!r} ({e.strerror}); choose another out_dir") from None


def main(argv: list[str] | None = None, prog: str = "python -m iqstar_lite.recipe") -> int:
    args = _parser(prog).parse_intermixed_args(argv)
    if args.list:
        for name in list_recipes():
            print(name)
        return 0
    if not args.name:
        raise UserError(f"name a recipe: {prog} NAME (one of: {', '.join(list_recipes())})")
    cfg = load_recipe(args.name, args.overrides)
    if args.dry_run:
        dry_run(cfg)
        return 0
    setup_logging()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not cfg.out_dir:
        raise UserError(
            "a multi-process run needs out_dir=RUN_DIR (every process must write to the same run directory)"
        )
    run_dir = Path(cfg.out_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if "train" not in cfg.stages.split(",") and not cfg.out_dir:
        raise UserError("export/check alone need an existing run: pass out_dir=RUN_DIR")
    if "train" not in cfg.stages.split(","):
        cfg = _with_stages(load_run_config(run_dir), cfg)
    cfg.out_dir = str(run_dir)
    return run(cfg, run_dir)


def _with_stages(saved: RecipeConfig, given: RecipeConfig) -> RecipeConfig:
    """Export/check an existing run with its own training config, the given stages and export settings."""
    saved.stages, saved.export, saved.out_dir = given.stages, given.export, given.out_dir
    return saved


def cli() -> None:
    """``python -m iqstar_lite.recipe NAME ...`` (= ``iqstar-lite train NAME ...``)."""
    run_cli(main)


if __name__ == "__main__":
    cli()

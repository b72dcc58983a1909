"""Export stage: adapter card, merge, ONNX with KV cache, int8. Reads a training run directory.

    python -m iqstar_lite export RUN_DIR [export.key=value ...]     e.g. export.int8=false export.dtype=bf16

Writes, next to ``RUN_DIR/adapter/`` (left loadable by ``PeftModel.from_pretrained``):

    adapter/README.md   card: base model, principle, recipe, beta, alpha, last metrics
    merged/             plain transformers checkpoint (merge.py) + merge.json
    onnx/               decoder with past key/values (export/to_onnx.py)
    onnx-int8/          int8-weight twin (export.int8; onnx_export.quantize_int8)
    gguf/               model-f16.gguf, model-q8_0.gguf + Ollama Modelfile (export.gguf; export/to_gguf.py)
    export.json         what was written, sizes, timings

Then ``python -m iqstar_lite check RUN_DIR/onnx`` gates the export.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from iqstar_lite.config import RecipeConfig, config_from_dict, load_run_config, parse_overrides
from iqstar_lite.errors import UserError, run_cli
from iqstar_lite.extras import ONNX_EXPORT_MODULES, require
from iqstar_lite.rundir import RunDir

log = logging.getLogger(__name__)


def last_metrics(run_dir: Path) -> dict:
    """The last JSON line of ``metrics.jsonl`` ({} when absent or unreadable)."""
    from iqstar_lite.checkpoint import jsonl_rows

    rows = jsonl_rows(RunDir(run_dir).metrics)
    return rows[-1] if rows else {}


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _eval_summary(path: Path) -> dict:
    """Scalar entries of ``eval_after.json``'s ``summary`` ({} when absent or unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    summary = data.get("summary", data) if isinstance(data, dict) else {}
    return (
        {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}
        if isinstance(summary, dict)
        else {}
    )


def adapter_card(run_dir: Path, cfg: RecipeConfig) -> str:
    """Markdown model card for ``RUN_DIR/adapter/README.md`` (YAML header for the Hub, then the facts)."""
    metrics = last_metrics(run_dir)
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    lines = [
        "---",
        "library_name: peft",
        *(
            [f"base_model: {cfg.model.path}"]
            if cfg.model.path.count("/") == 1 and not Path(cfg.model.path).exists()
            else []
        ),
        "tags: [lora, iqstar_lite, inverse-q-star]",
        "---",
        "",
        f"# LoRA adapter: {cfg.name}",
        "",
        "Aligned with Inverse-Q* (token-level RL without preference data) by `iqstar_lite`.",
        "",
        f"- **Base model:** `{cfg.model.path}` (trained on the {cfg.model.quantize} base, compute dtype {cfg.model.dtype})",
        f"- **Principle:** {cfg.data.principle}",
        f"- **Recipe:** `{cfg.name}`: loss `{cfg.loss.type}`, beta = {cfg.loss.beta:g}; estimator `{cfg.estimator.kind}`, alpha = {cfg.estimator.alpha:g}",
        f"- **LoRA:** r = {cfg.lora.r}, alpha = {cfg.lora.alpha}, targets `{cfg.lora.target_modules}`; {cfg.train.steps} steps, lr {cfg.train.lr:g}",
        "- **Last metrics:** "
        + (", ".join(f"{k} {_fmt(v)}" for k, v in scalars.items()) if scalars else "(no metrics.jsonl)"),
    ]
    after = _eval_summary(RunDir(run_dir).eval_row("after"))
    if after:
        lines.append(
            "- **Held-out evaluation after training** (principle absent): "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in after.items())
        )
    lines += [
        "",
        "Load it on the same base (quantize it as in training to reproduce the trained model exactly):",
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, 'adapter')",
        "```",
        "",
        "A merged checkpoint is in `../merged/`, ONNX exports in `../onnx/` and `../onnx-int8/`, GGUF files in `../gguf/`.",
        "",
    ]
    return "\n".join(lines)


def write_adapter_card(run_dir: Path, cfg: RecipeConfig) -> Path:
    path = RunDir(run_dir).adapter / "README.md"
    path.write_text(adapter_card(run_dir, cfg))
    return path


def require_export_extras(cfg: RecipeConfig, stages: list[str]) -> None:
    """The optional libraries the export and check stages will use, checked before any training or merging."""
    if cfg.export.onnx and ("export" in stages or "check" in stages):
        for module in (*ONNX_EXPORT_MODULES, "onnxruntime"):  # + onnxruntime: int8 and the gate
            require(module, "or set export.onnx=false", extra="onnx")


def export_run(run_dir: Path, cfg: RecipeConfig, prompts: list[str] | None = None) -> dict:
    """Card, merge, ONNX, int8 per ``cfg.export``; writes export.json and returns the same dict.

    ``prompts``: user messages for the merge logit comparison (e.g. held-out prompts); default generic ones.
    """
    from iqstar_lite.export.merge import merge_run
    from iqstar_lite.export.to_gguf import check_architecture, export_gguf, parse_types
    from iqstar_lite.export.to_onnx import dir_size, export_onnx, quantize_int8
    from iqstar_lite.models.load import adapter_dir

    start = time.perf_counter()
    run_dir = Path(run_dir)
    if (
        cfg.model.trust_remote_code
    ):  # the merged folder, ONNX and GGUF exporters and the gate load the model class by name
        raise UserError(
            "export of a model with custom code (model.trust_remote_code=true) is not supported; the trained adapter is in "
            f"{str(RunDir(run_dir).adapter)!r} (load it with peft), or run with stages=train"
        )
    adapter_dir(run_dir)  # fail early, before any model is loaded
    require_export_extras(cfg, ["export"])
    gguf_types = parse_types(cfg.export.gguf)
    if gguf_types:  # a model the GGUF writer cannot write is refused before the merge, not after it
        from iqstar_lite.models.load import load_model_config

        check_architecture(load_model_config(cfg.model.path, cfg.model.revision).to_dict())
    report: dict = {"adapter_card": str(write_adapter_card(run_dir, cfg))}
    report["merge"] = merge_run(run_dir, cfg, prompts)
    report["merged_bytes"] = dir_size(RunDir(run_dir).merged)
    if cfg.export.onnx:
        report["onnx"] = export_onnx(RunDir(run_dir).merged, RunDir(run_dir).onnx)
        if cfg.export.int8:
            report["onnx_int8"] = quantize_int8(
                RunDir(run_dir).onnx, RunDir(run_dir).onnx_int8, block_size=cfg.export.int8_block
            )
    if gguf_types:
        report["gguf"] = export_gguf(RunDir(run_dir).merged, RunDir(run_dir).gguf, gguf_types, name=cfg.name)
    for name, wanted in (
        ("onnx", cfg.export.onnx),
        ("onnx-int8", cfg.export.onnx and cfg.export.int8),
        ("gguf", bool(gguf_types)),
    ):
        if not wanted and (run_dir / name).is_dir():  # built from an older merge: never check or ship it
            log.info("removing stale %s (disabled in export settings)", run_dir / name)
            shutil.rmtree(run_dir / name)
    report["seconds"] = round(time.perf_counter() - start, 2)
    RunDir(run_dir).export_report.write_text(json.dumps(report, indent=2) + "\n")
    for line in summary(report).splitlines():
        log.info("%s", line)
    return report


def apply_export_overrides(cfg: RecipeConfig, items: list[str]) -> RecipeConfig:
    """``["export.int8=false", ...]`` on top of a run's config; only ``export.*`` keys are accepted."""
    overrides = parse_overrides(items)
    other = [k for k in overrides if k != "export"]
    if other:
        raise UserError(
            f"only export.* keys can be overridden when exporting a finished run, got {', '.join(other)}; e.g. export.dtype=bf16"
        )
    data = cfg.to_dict()
    data["export"].update(overrides.get("export", {}))
    return config_from_dict(data, name=cfg.name)


def summary(report: dict) -> str:
    m = report["merge"]
    why = "merge exactness" if m["fp32_compute_diff_is_merge_exactness"] else "includes the NF4 quantization error"
    lines = [
        f"merged ({m['merge_base']}, {m['dtype']}): {report['merged_bytes'] / 1e6:.1f} MB; max |logit diff| "
        f"vs {m['quantize']}+LoRA with fp32 compute {m['max_abs_logit_diff_vs_fp32_compute']:.3g} ({why}), "
        f"vs trained ({m['trained_compute_dtype']} compute) {m['max_abs_logit_diff_vs_trained']:.3g}"
    ]
    for key in ("onnx", "onnx_int8"):
        if key in report:
            block = f", int8 groups: {report[key]['block_size']}" if "block_size" in report[key] else ""
            lines.append(
                f"{key.replace('_', '-')}: {report[key]['dir']} ({report[key]['bytes'] / 1e6:.1f} MB, {report[key]['seconds']:.1f} s{block})"
            )
    if "gguf" in report:
        g = report["gguf"]
        files = ", ".join(f"{v['file']} {v['bytes'] / 1e6:.1f} MB" for v in g["files"].values())
        lines.append(f"gguf: {g['dir']} ({files}, Modelfile; {g['seconds']:.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m iqstar_lite export") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Merge and export a training run.")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("overrides", nargs="*", help="export.KEY=VALUE, e.g. export.int8=false")
    args = ap.parse_intermixed_args(argv)
    cfg = apply_export_overrides(load_run_config(args.run_dir), args.overrides)
    report = export_run(args.run_dir, cfg)
    print(summary(report))
    if cfg.export.onnx:
        print(f"next: iqstar-lite check {RunDir(args.run_dir).onnx}")
    return 0


if __name__ == "__main__":
    run_cli(main)

"""The run directory: every file a run writes, named in one place (training, evaluation, export, the gate, benches).

RUN_DIR/config.yaml  metrics.jsonl  samples.jsonl  curves.png  tensorboard/  checkpoints/step-N/  adapter/
        eval_{contrastive,before,after}[_ood].json  eval/   merged/  merge.json  onnx/  onnx-int8/  gguf/
        export.json  check.json
"""

from __future__ import annotations

from pathlib import Path


class RunDir:
    """``RunDir(path).adapter`` etc.: the paths of one run directory (nothing is created or read here)."""

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    SAMPLES = "samples.jsonl"
    CURVES = "curves.png"
    TENSORBOARD = "tensorboard"
    CHECKPOINTS = "checkpoints"
    ADAPTER = "adapter"
    EVAL = "eval"  # iqstar-lite eval RUN_DIR --prompts ...: one JSON file per prompt set
    MERGED = "merged"
    MERGE_REPORT = "merge.json"
    ONNX = "onnx"
    ONNX_INT8 = "onnx-int8"
    GGUF = "gguf"
    EXPORT_REPORT = "export.json"
    CHECK_REPORT = "check.json"

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def samples(self) -> Path:
        return self.root / self.SAMPLES

    @property
    def curves(self) -> Path:
        return self.root / self.CURVES

    @property
    def tensorboard(self) -> Path:
        return self.root / self.TENSORBOARD

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.root / self.ADAPTER

    @property
    def eval(self) -> Path:
        return self.root / self.EVAL

    @property
    def merged(self) -> Path:
        return self.root / self.MERGED

    @property
    def merge_report(self) -> Path:
        return self.root / self.MERGE_REPORT

    @property
    def onnx(self) -> Path:
        return self.root / self.ONNX

    @property
    def onnx_int8(self) -> Path:
        return self.root / self.ONNX_INT8

    @property
    def gguf(self) -> Path:
        return self.root / self.GGUF

    @property
    def export_report(self) -> Path:
        return self.root / self.EXPORT_REPORT

    @property
    def check_report(self) -> Path:
        return self.root / self.CHECK_REPORT

    def eval_row(self, row: str, suffix: str = "") -> Path:
        """``eval_{row}{suffix}.json``: a training run's evaluation row (contrastive / before / after; ``_ood``)."""
        return self.root / f"eval_{row}{suffix}.json"

"""Merged checkpoint -> ONNX decoder with KV cache (``RUN_DIR/onnx/``) and its int8 twin (``RUN_DIR/onnx-int8/``).

The exporter is optimum-onnx's ``main_export`` with task ``text-generation-with-past``: one
``model.onnx`` taking ``input_ids, attention_mask, position_ids, past_key_values.*`` and returning
``logits, present.*`` (see ``ort_generate.py``), loadable by ``optimum.onnxruntime.ORTModelForCausalLM``.
The ONNX graph is always fp32 (a bf16/fp16 merged checkpoint is upcast on load): CPU onnxruntime
has no fast bf16 kernels and the parity gate compares against the merged model in fp32.

Models over 2 GB (the protobuf limit) are written with external data (``model.onnx_data``) by the
exporter; ``quantize_int8`` keeps that layout for its output when the input uses it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from iqstar_lite.ort_generate import find_onnx_file

# Everything a self-contained model folder needs besides the graph (optimum copies these for the fp32 export).
SIDECAR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
PROTOBUF_LIMIT = 2 * 1024**3


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _replace_dir(tmp: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def copy_sidecars(src: Path, dst: Path) -> None:
    for name in SIDECAR_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def export_onnx(merged_dir: Path, out_dir: Path) -> dict:
    """Export ``merged_dir`` to ``out_dir`` (replaced atomically); return size and timing."""
    from optimum.exporters.onnx import main_export

    start = time.perf_counter()
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-", dir=out_dir.parent))
    try:
        main_export(
            model_name_or_path=str(merged_dir),
            output=tmp,
            task="text-generation-with-past",
            dtype="fp32",
            device="cpu",
            local_files_only=True,
            do_validation=False,  # check.py is the validation, on real prompts
        )
        copy_sidecars(merged_dir, tmp)  # tokenizer + generation_config: the folder stands alone
        find_onnx_file(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"dir": str(out_dir), "bytes": dir_size(out_dir), "seconds": round(time.perf_counter() - start, 2)}


def uses_external_data(onnx_file: Path) -> bool:
    import onnx
    from onnx.external_data_helper import uses_external_data as tensor_is_external

    model = onnx.load(str(onnx_file), load_external_data=False)
    return any(tensor_is_external(t) for t in model.graph.initializer)


def quantize_int8(onnx_dir: Path, out_dir: Path, external_data: bool | None = None) -> dict:
    """Dynamic int8 quantization (QInt8 weights of MatMul/Gather, per-channel); fp32 activations.

    ``external_data=None`` writes external data exactly when the input has it or is near 2 GB.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    start = time.perf_counter()
    src = find_onnx_file(onnx_dir)
    if external_data is None:
        external_data = uses_external_data(src) or dir_size(onnx_dir) > PROTOBUF_LIMIT * 0.9
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-int8-", dir=out_dir.parent))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic warns on root that shape pre-processing was skipped
    try:
        quantize_dynamic(
            model_input=src,
            model_output=tmp / "model.onnx",
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gather"],
            use_external_data_format=external_data,
            extra_options={"MatMulConstBOnly": True},  # weights only; attention scores stay fp32
        )
        copy_sidecars(onnx_dir, tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        root.setLevel(level)
    return {"dir": str(out_dir), "bytes": dir_size(out_dir), "external_data": external_data, "seconds": round(time.perf_counter() - start, 2)}

"""Merged checkpoint -> ONNX decoder with KV cache (``RUN_DIR/onnx/``) and its int8 twin (``RUN_DIR/onnx-int8/``).

The exporter is onnxruntime-genai's model builder: one ``model.onnx`` taking ``input_ids, attention_mask,
past_key_values.*`` and returning ``logits, present.*`` (see ``runtimes/ort.py``), run by onnxruntime and by
onnxruntime-genai.
The ONNX graph is always fp32 (a bf16/fp16 merged checkpoint is upcast on load): CPU onnxruntime
has no fast bf16 kernels and the parity gate compares against the merged model in fp32.

Models over 2 GB (the protobuf limit) are written with external data (``model.onnx_data``) by the
exporter; ``quantize_int8`` keeps that layout for its output when the input uses it. The int8
twin stores MatMul weights as int8 (per output channel, or in blocks: ``export.int8_block``); onnxruntime
runs them with int8 activations and integer dot products; see ``quantize_matmul_weights_int8``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from iqstar_lite.atomic import atomic_dir
from iqstar_lite.export.genai_tokenizer import write_genai_tokenizer
from iqstar_lite.extras import ONNX_EXPORT_MODULES, require
from iqstar_lite.runtimes.ort import find_onnx_file

# Everything a self-contained model folder needs besides the graph.
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
    "genai_config.json",  # onnxruntime-genai's runtime config
)
PROTOBUF_LIMIT = 2 * 1024**3
log = logging.getLogger(__name__)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def copy_sidecars(src: Path, dst: Path) -> None:
    for name in SIDECAR_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


# Runs in a child process: the builder's memory (a full fp32 model plus the graph) is returned to the OS when it exits,
# and exporter state cannot slow the caller's torch (in process, greedy generation with the merged model measured 2x
# slower after a TorchScript export).
def export_onnx(merged_dir: Path, out_dir: Path) -> dict:
    """Export ``merged_dir`` to ``out_dir`` (replaced atomically) with onnxruntime-genai's model builder; return size and
    timing.

    The graph has ``GroupQueryAttention``, ``SkipSimplifiedLayerNormalization`` and fused QKV / gate-up MatMuls (342
    nodes for SmolLM2-135M, against ~7,400 in optimum-onnx's standard-op graph, which onnxruntime ran 1.2x / 1.24x slower
    in fp32 and 1.8x / 1.45x slower in int8 at batch 1 / 4: bench/onnx_speed.py). It takes no ``position_ids``
    (positions come from the attention mask), so ``OrtGenerator.generate_batch`` right-pads its batches. The folder is
    also onnxruntime-genai's own: its ``genai_config.json`` stays, and ``tokenizer.json`` is rewritten so genai's
    tokenizer encodes and decodes as transformers does (``genai_tokenizer.py``); ``runtimes.genai.GenaiGenerator`` runs
    it and the parity gate checks it.
    """
    for module in ONNX_EXPORT_MODULES:
        require(module, extra="onnx")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        cache = tmp / ".builder-cache"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
        cmd += ["-i", str(merged_dir), "-o", str(tmp), "-p", "fp32", "-e", "cpu", "-c", str(cache)]
        log.info("exporting %s to ONNX (onnxruntime-genai's builder, KV cache) in a child process", merged_dir)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"ONNX export of {merged_dir} failed (exit {proc.returncode}):\n{tail}")
        shutil.rmtree(cache, ignore_errors=True)
        copy_sidecars(merged_dir, tmp)  # tokenizer + config + generation_config: the folder stands alone
        for change in write_genai_tokenizer(tmp):
            log.info("tokenizer.json for onnxruntime-genai: %s", change)
        find_onnx_file(tmp)
    return {
        "dir": str(out_dir),
        "bytes": dir_size(out_dir),
        "graph": "genai",
        "seconds": round(time.perf_counter() - start, 2),
    }


def uses_external_data(onnx_file: Path) -> bool:
    import onnx
    from onnx.external_data_helper import uses_external_data as tensor_is_external

    model = onnx.load(str(onnx_file), load_external_data=False)
    return any(tensor_is_external(t) for t in model.graph.initializer)


def _constant_matmul_weights(graph):
    """Per constant weight read by ``MatMul`` as its B input: (name, W [in, out] fp32, the Transpose producing it or None,
    the MatMul nodes reading it). A weight that is ``Transpose(initializer)`` counts (a tied lm_head: the exporter reads
    the embedding matrix transposed; the embedding's Gather keeps the original)."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    matmuls: dict[str, list] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2:
            matmuls.setdefault(node.input[1], []).append(node)
    for name, nodes in matmuls.items():
        transpose = None
        if name in inits:
            w = numpy_helper.to_array(inits[name])
        elif (t := producer.get(name)) is not None and t.op_type == "Transpose" and t.input[0] in inits:
            perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
            w, transpose = numpy_helper.to_array(inits[t.input[0]]), t
            if w.ndim != 2 or (perm and perm[0] != [1, 0]):
                continue
            w = np.ascontiguousarray(w.T)
        else:
            continue
        if w.ndim == 2 and w.dtype == np.float32:
            yield name, w, transpose, nodes


def _drop_unread(graph, transposes: list) -> None:
    """Remove Transpose nodes nobody reads any more, then initializers nobody reads."""
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in transposes:
        if t.output[0] not in read:
            graph.node.remove(t)
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)


def quantize_matmul_weights_int8(model, block_size: int = 0) -> int:
    """In place: constant fp32 MatMul weights W [in=K, out=N] -> int8; returns the number quantized.

    Symmetric: s = max |W| / 127 over each group, q = round(W / s) in [-127, 127], W' = q * s (|W - W'| <= s / 2).

    * ``block_size=0`` (default): one group per output channel. ``DequantizeLinear`` (int8 q, scales, axis=1)
      outputs W's name, so every consumer is unchanged; onnxruntime fuses it with the MatMul into its
      ``MatMulNBits`` kernel at load.
    * ``block_size=B`` (16, 32, ...): groups of B input rows per output channel, written directly as
      ``com.microsoft.MatMulNBits`` (bits=8, q + 128 stored unsigned, the op's default zero point 128).
      Weights whose K is not a multiple of B stay fp32.

    Both run with ``accuracy_level=4`` (onnxruntime quantizes the activations to int8 per group too, and
    uses integer dot products): smaller groups are more accurate, and slower below 32. Measured on the SmolLM2
    demo (pg, 32 steps), ``bench/onnx_speed.py`` with all variants in one run (16 held-out prompts x 64 greedy
    tokens, top-1 agreement with the merged model; tokens/s over fp32 ONNX at batch 1 / 4): per channel 0.91,
    1.58x / 1.39x; B=32 (``export.int8_block`` default) 0.94, 1.59x / 1.39x; B=16 0.96, 1.44x / 1.32x. An
    exploratory run: B=64 0.92; dequantize-then-fp32 kernels (accuracy_level 0) 4x slower than fp32.
    The tied lm_head (Transpose of the embedding) is quantized as its own copy (SmolLM2: 28M of 135M
    parameters; per-channel int8 / fp32 went from 1.39x to 1.58x at batch 1, agreement 0.905 -> 0.908);
    the embedding (Gather) stays fp32.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    new_inits, dq_nodes, transposes, done = [], [], [], 0
    for name, w, transpose, readers in list(_constant_matmul_weights(graph)):
        K, N = w.shape
        if block_size and K % block_size:
            continue
        if not block_size:
            scale = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
            scale[scale == 0] = 1.0
            q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            new_inits += [numpy_helper.from_array(q, f"{name}_int8"), numpy_helper.from_array(scale, f"{name}_scale")]
            dq_nodes.append(
                helper.make_node(
                    "DequantizeLinear", [f"{name}_int8", f"{name}_scale"], [name], name=f"{name}_dequantize", axis=1
                )
            )
            if transpose is not None:  # the DequantizeLinear now produces ``name``
                graph.node.remove(transpose)
            else:
                graph.initializer.remove(next(i for i in graph.initializer if i.name == name))
        else:
            blocks = w.T.reshape(N, K // block_size, block_size)
            scale = (np.abs(blocks).max(axis=-1) / 127.0).astype(np.float32)
            scale[scale == 0] = 1.0
            q = (np.clip(np.rint(blocks / scale[..., None]), -127, 127).astype(np.int16) + 128).astype(np.uint8)
            new_inits += [
                numpy_helper.from_array(q, f"{name}_q8"),
                numpy_helper.from_array(scale.reshape(-1), f"{name}_q8_scale"),
            ]
            for mm in readers:
                idx = list(graph.node).index(mm)
                graph.node.remove(mm)
                graph.node.insert(idx, helper.make_node(
                    "MatMulNBits", [mm.input[0], f"{name}_q8", f"{name}_q8_scale"], list(mm.output), name=f"{mm.name}_q8", domain="com.microsoft",
                    K=K, N=N, bits=8, block_size=block_size, accuracy_level=4,
                ))  # fmt: skip
            if transpose is not None:
                transposes.append(transpose)
        done += 1
    graph.initializer.extend(new_inits)
    nodes = dq_nodes + list(graph.node)  # constants first keeps the graph topologically sorted
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unread(graph, transposes)
    if block_size and done and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def _save(model, path: Path, external_data: bool) -> None:
    import onnx

    if external_data:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + "_data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def _has_vnni() -> bool:
    """The CPU has VNNI (AVX512-VNNI or AVX-VNNI): onnxruntime's u8 x s8 int8 kernels do not saturate there. Without it
    (AVX2 only) full-range int8 weights lose accuracy, which onnxruntime's ``reduce_range`` (7-bit weights) avoids."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: keep onnxruntime's default
    return "vnni" in flags


def _quantize_dynamic(src: Path, dst: Path, external_data: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic warns on root that shape pre-processing was skipped
    try:
        quantize_dynamic(
            model_input=src,
            model_output=dst,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=not _has_vnni(),  # 7-bit weights where u8 x s8 products saturate int16 (AVX2 without VNNI)
            op_types_to_quantize=["MatMul"],
            use_external_data_format=external_data,
            extra_options={"MatMulConstBOnly": True},  # weights only; attention scores stay fp32
        )
    finally:
        root.setLevel(level)


def quantize_int8(
    onnx_dir: Path, out_dir: Path, method: str = "weights", external_data: bool | None = None, block_size: int = 32
) -> dict:
    """int8 twin of an fp32 export, same inputs/outputs, self-contained folder.

    ``method="weights"`` (default): int8 MatMul weights, per output channel or per ``block_size`` input rows
    (``quantize_matmul_weights_int8``).
    ``method="dynamic"``: onnxruntime ``quantize_dynamic`` (int8 weights and per-tensor uint8 activations,
    quantized at run time). Measured on SmolLM2-135M (merged fp32 export, 4 chat prompts x 16 greedy
    tokens, teacher-forced top-1 agreement): weights 0.96 (221 MB, 1.5x fp32 speed), dynamic 0.59
    (222 MB): its per-tensor activation scale cannot cover the model's outlier channels (max/rms up
    to ~250 at the down_proj inputs). ``external_data=None``: use external data exactly when the input
    does or is near the 2 GB protobuf limit. Loads the whole fp32 graph into memory.
    """
    require("onnxruntime")
    import onnx

    start = time.perf_counter()
    src = find_onnx_file(onnx_dir)
    if external_data is None:
        external_data = uses_external_data(src) or dir_size(onnx_dir) > PROTOBUF_LIMIT * 0.9
    if method not in ("weights", "dynamic"):
        raise ValueError(f"method must be 'weights' or 'dynamic', got {method!r}")
    out_dir = Path(out_dir)
    quantized = None
    log.info("int8 (%s) quantization of %s", method, src)
    with atomic_dir(out_dir) as tmp:
        if method == "dynamic":
            _quantize_dynamic(src, tmp / "model.onnx", external_data)
        else:
            model = onnx.load(str(src))
            quantized = quantize_matmul_weights_int8(model, block_size)
            _save(model, tmp / "model.onnx", external_data)
            del model
        copy_sidecars(onnx_dir, tmp)
    report = {"dir": str(out_dir), "bytes": dir_size(out_dir), "method": method, "external_data": external_data}
    if method == "weights":
        report["block_size"] = block_size or "per channel"
    if quantized is not None:
        report["weights_quantized"] = quantized
    return {**report, "seconds": round(time.perf_counter() - start, 2)}

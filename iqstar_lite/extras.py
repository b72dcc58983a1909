"""Optional parts of the install: which extra brings each module, and the one-line error when it is missing.

Training needs only the core dependencies; deployment stacks come with extras (pyproject.toml
``[project.optional-dependencies]``): ``pip install 'iqstar_lite[onnx]'`` and so on. A feature whose extra is missing
stops with :class:`UserError` naming the command to run, never with an ImportError traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from iqstar_lite.errors import UserError

# module -> (the extra that installs it, what it is for)
EXTRAS: dict[str, tuple[str, str]] = {
    "onnx": ("onnx", "the ONNX export"),
    "onnxruntime": ("onnx", "ONNX inference and the parity gate"),
    "onnxruntime_genai": ("genai", "the ONNX export (onnxruntime-genai's model builder) and its runtime"),
    "llama_cpp": ("llamacpp", "llama.cpp inference"),
    "tensorboard": ("tracking", "TensorBoard logging"),
    "matplotlib": ("plot", "curves.png"),
    "trl": ("bench", "the peer benchmarks"),
}


def install_hint(module: str) -> str:
    extra = EXTRAS[module][0]
    return f"pip install 'iqstar_lite[{extra}]'"


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, otherwise: str = "") -> ModuleType:
    """Import ``module`` (a key of ``EXTRAS``) or raise a one-line UserError that names the extra to install (and
    ``otherwise``, the setting that avoids it)."""
    purpose = EXTRAS[module][1]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        also = f", {otherwise}" if otherwise else ""
        raise UserError(f"{module} is not installed ({purpose} needs it: {e}); {install_hint(module)}{also}") from None

"""Optional parts of the install: which extra brings each module, and the one-line error when it is missing.

Training needs only the core dependencies; deployment stacks come with extras (pyproject.toml
``[project.optional-dependencies]``): ``pip install 'iqstar_lite[onnx]'`` and so on. A feature whose extra is missing
stops with :class:`UserError` naming the command to run, never with an ImportError traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from iqstar_lite.errors import UserError

# module -> (the extra that installs it, what it is for)
EXTRAS: dict[str, tuple[str, str]] = {
    "onnx": ("onnx", "the ONNX export"),
    "onnx_ir": ("onnx", "the ONNX export (onnxruntime-genai's model builder)"),
    "onnxruntime": ("onnx", "ONNX inference and the parity gate"),
    "onnxruntime_genai": ("genai", "the ONNX export (onnxruntime-genai's model builder) and its runtime"),
    "llama_cpp": ("llamacpp", "llama.cpp inference"),
    "tensorboard": ("tracking", "TensorBoard logging"),
    "matplotlib": ("plot", "curves.png"),
}


# What the ONNX export imports (onnxruntime-genai's model builder runs in a child process): all in the onnx extra.
ONNX_EXPORT_MODULES = ("onnx", "onnx_ir", "onnxruntime_genai")


def install_hint(module: str, extra: str | None = None) -> str:
    return f"pip install 'iqstar_lite[{extra or EXTRAS[module][0]}]'"


def require(module: str, otherwise: str = "", extra: str | None = None) -> ModuleType:
    """Import ``module`` (a key of ``EXTRAS``) or raise a one-line UserError that names the extra to install (``extra``
    where the feature needs a larger one than the module's own) and ``otherwise``, the setting that avoids it."""
    purpose = EXTRAS[module][1]
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as e:  # OSError: a native library that does not load
        hint = install_hint(module, extra)
        also = f", {otherwise}" if otherwise else ""
        raise UserError(f"{module} is not installed ({purpose} needs it: {e}); {hint}{also}") from None

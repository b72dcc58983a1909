"""Nested training state (optimizer, scheduler, RNG) as safetensors + JSON: nothing is unpickled on load.

``torch.save`` writes a pickle, and ``torch.load(weights_only=False)`` of a crafted file runs its code; a checkpoint
is a user's file (shared run directories, downloaded runs). Here every tensor goes to ``state.safetensors`` under a
path-like key, and the structure around them (dicts, lists, tuples, numbers, strings) to ``state.json`` with tensors
as ``{"__tensor__": key}``. Dicts with non-string keys (an optimizer's parameter ids) and tuples (Python's RNG state)
are tagged so they come back as they were.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

TENSORS, STRUCTURE = "state.safetensors", "state.json"


class StateFormatError(ValueError):
    """The files are not a state written by ``save_state`` (torn, edited, or another format)."""


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        if path in tensors:
            raise ValueError(f"two tensors would be stored under {path!r}")
        tensors[path] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {
            "__items__": [
                [_encode(k, tensors, f"{path}.k{i}"), _encode(v, tensors, f"{path}.{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    raise TypeError(f"cannot store {type(obj).__name__} at {path or 'the top'} without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        try:
            return tensors[obj["__tensor__"]]
        except KeyError:
            raise StateFormatError(f"tensor {obj['__tensor__']!r} is missing from {TENSORS}") from None
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_state(folder: Path, state: dict) -> None:
    """Write ``state`` to ``folder/state.safetensors`` + ``folder/state.json`` (the folder must exist)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, "")
    save_file(tensors, str(Path(folder) / TENSORS))
    (Path(folder) / STRUCTURE).write_text(json.dumps(structure))


def load_state(folder: Path) -> dict:
    """Read a state written by ``save_state``; raises StateFormatError (a ValueError) on anything else."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        tensors = load_file(str(folder / TENSORS))
        structure = json.loads((folder / STRUCTURE).read_text())
    except FileNotFoundError as e:
        raise StateFormatError(f"{Path(e.filename).name} is missing") from None
    except Exception as e:  # noqa: BLE001 - a torn file: SafetensorError, JSONDecodeError, UnicodeDecodeError, OSError
        raise StateFormatError(f"unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(structure, dict):
        raise StateFormatError(f"{STRUCTURE} does not hold a state")
    return _decode(structure, tensors)

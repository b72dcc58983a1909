"""transformers' KV-cache argument and output field across the versions pyproject.toml allows: ``past_key_values`` up to
5.2x, ``cache`` in newer releases (where the old name prints a FutureWarning and goes in 5.40). Forwards that carry a
cache pass it with ``cache_kwargs`` and read it back with ``output_cache``."""

from __future__ import annotations

import functools
import inspect


@functools.cache
def _cache_argument(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for ``model(...)``, under the name the model's own forward takes (a peft model: its base's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_argument(type(base)): cache}


def output_cache(out):
    """The KV cache a forward with ``use_cache=True`` returned (a ``ModelOutput`` is a mapping of its set fields)."""
    return out["cache"] if "cache" in out else out["past_key_values"]

"""The frozen reference pi_ref: the same model with adapters disabled (never a second copy).

with reference_mode(model):
    ref_logits = model(...).logits
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def is_merged(model) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) and m.merged for m in model.modules())


@contextmanager
def reference_mode(model) -> Iterator[None]:
    """Adapters off and no grad inside; adapters restored in ``finally`` (also after an exception).

    Refuses a model with merged adapters: disabling would silently unmerge (peft's 4-bit layer)
    or leave the delta in place, and the "reference" would not be the base.
    """
    if not hasattr(model, "disable_adapter"):
        raise TypeError("reference_mode needs a peft model (PeftModel) with LoRA adapters")
    if is_merged(model):
        raise RuntimeError("reference_mode refuses a merged model: the base weights contain the adapter; unmerge first")
    with torch.no_grad(), model.disable_adapter():
        yield


def adapters_are_identity(model) -> bool:
    """True when every LoRA update B A is exactly zero (peft's initialisation, before any step): pi_theta = pi_ref
    then, so a policy forward can be replaced by the reference's (evaluation before training skips it)."""
    from peft.tuners.lora import LoraLayer

    found = False
    for m in model.modules():
        if isinstance(m, LoraLayer):
            for b in m.lora_B.values():
                found = True
                if bool(b.weight.any()):
                    return False
    return found

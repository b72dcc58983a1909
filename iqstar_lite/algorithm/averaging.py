"""Exponential moving average of the trainable (LoRA) weights over training steps (``train.ema``).

After each step t = 1, 2, ...:  m_t = d m_{t-1} + (1 - d) w_t,  m_0 = 0, and the average is m_t / (1 - d^t)
(bias-corrected as Adam's moments: a weighted mean of w_1 .. w_t with weights proportional to d^(t - i), so it
never pulls toward the zero start). The run's saved adapter and final evaluation use the average; the optimizer
keeps stepping the raw weights. Averaging the last iterates of a noisy trajectory (Polyak averaging, as in the
EMA teachers and weight averages of distillation and SWA) lowers the variance of where a short run ends.
"""

from __future__ import annotations

import torch


class WeightAverage:
    """EMA of a list of parameters; ``state_dict`` / ``load_state_dict`` for checkpoints (tensors + the step count)."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay, self.steps = decay, 0
        self.params = params
        self.moments = [torch.zeros_like(p, dtype=torch.float32) for p in params]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        for m, p in zip(self.moments, self.params):
            m.mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def averaged(self) -> list[torch.Tensor]:
        """The bias-corrected averages (the parameters themselves before the first update)."""
        if self.steps == 0:
            return [p.detach().float().clone() for p in self.params]
        scale = 1.0 / (1.0 - self.decay**self.steps)
        return [m * scale for m in self.moments]

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Replace the parameters by their averages (at the end of training)."""
        for p, a in zip(self.params, self.averaged()):
            p.copy_(a.to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "moments": [m.clone() for m in self.moments]}

    def load_state_dict(self, state: dict) -> None:
        moments = state["moments"]
        if len(moments) != len(self.moments) or any(a.shape != b.shape for a, b in zip(moments, self.moments)):
            raise ValueError("weight average does not fit this run's LoRA parameters")
        self.steps = int(state["steps"])
        for m, s in zip(self.moments, moments):
            m.copy_(s)

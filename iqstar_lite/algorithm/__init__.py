"""Inverse-Q*: rollout -> the estimator pi-hat* (2 reference passes) -> the losses; the training loop."""

"""Judging a model on prompts: the before / contrastive / after rows, judges, samples while training, curves."""

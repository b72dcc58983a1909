"""Prompts: where they come from (sources) and how they are rendered for the model (formatting); the shipped sets."""

"""Loading the base (NF4 where asked) + LoRA, the embedded default model, memory estimates, what eval / chat point at."""

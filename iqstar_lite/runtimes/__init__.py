"""Clients that run an exported model without PyTorch: onnxruntime, onnxruntime-genai, llama.cpp (one interface)."""

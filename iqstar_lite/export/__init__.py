"""After training: merge the adapter, ONNX (+ int8), GGUF, and the parity gate over every client."""

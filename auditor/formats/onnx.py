"""onnx loader (being written)."""

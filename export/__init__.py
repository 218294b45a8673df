"""Quantized torch model -> ONNX with Q/DQ nodes and per-timestep scale tables -> bundle on disk."""

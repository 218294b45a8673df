"""Fake-quantized UNets that export exactly to TensorRT Q/DQ: quantizer primitives, quantized layers,
calibration data, static scale search, BRECQ (AdaRound) and TDQ, and the quantized checkpoint."""

"""PyTorch side of tdqrt: built-in and diffusers UNets, datasets, FP training (and later quantizers, BRECQ,
TDQ and D² statistics)."""

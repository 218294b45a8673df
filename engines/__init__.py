"""Bottom layer of tdqrt: the artifact format (atomic files, hashes, manifests), the error hierarchy and the
denoiser interface that every backend (torch module, ONNX Runtime, TensorRT) implements.

Nothing here imports calibration, export or training code, so a deployment host needs only
``tdqrt.engines`` + ``tdqrt.runtime``.
"""
from tdqrt.engines.errors import ArtifactError, ConfigError, DataError, DependencyError, TdqrtError

__all__ = ["TdqrtError", "ConfigError", "DataError", "ArtifactError", "DependencyError"]

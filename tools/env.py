"""``tdqrt env``: the versions that decide what runs where (paste it into bug reports)."""
from __future__ import annotations

import importlib
import platform
from importlib import metadata


def environment() -> dict[str, str]:
    info = {"tdqrt": metadata.version("tdqrt"), "python": platform.python_version(), "platform": platform.platform()}
    for dist in ("torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "polygraphy", "onnx-graphsurgeon",
                 "diffusers", "torch-fidelity", "tensorrt", "tensorrt-rtx"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = "not installed"
    torch = importlib.import_module("torch")
    info["cuda (torch build)"] = str(torch.version.cuda)
    info["cuda available"] = str(torch.cuda.is_available())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["compute capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    ort = importlib.import_module("onnxruntime")
    info["onnxruntime providers"] = ", ".join(ort.get_available_providers())
    info["torch threads"] = str(torch.get_num_threads())
    return info

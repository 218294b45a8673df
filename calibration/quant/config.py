"""``QuantConfig``: what to quantize and how — validated on construction, saved beside the quantized checkpoint."""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

from tdqrt.calibration.quant.intmath import MAX_BITS, MIN_BITS
from tdqrt.engines.config import check_choice, check_int, check_real, config_from_dict, invalid

# Kept in float by default, as TensorRT deployments and the papers (Q-Diffusion, TDQ) do:
# the first and last conv, the timestep-embedding MLP and the per-ResBlock timestep projections, and the class
# embedding. Patterns are fnmatch-style on module names and cover the built-in UNet and diffusers' UNet2DModel,
# whatever its blocks: in the score-SDE (NCSN++) skip blocks (``SkipDownBlock2D``, ``AttnSkipUpBlock2D``, ...) the
# ``skip_conv`` layers play the first and last conv's part (down: a conv of the downsampled input image; up: a
# conv whose output is summed into the model output), so they stay in float too. Embeddings without a Linear
# (sinusoidal, Gaussian Fourier, learned ``nn.Embedding``), GroupNorm and attention's softmax/matmuls are never
# quantized anyway (see ``QuantConfig``).
DEFAULT_KEEP_FLOAT = (
    "*conv_in",
    "*conv_out",
    "*skip_conv",
    "*time_embed*",
    "*temb_proj",
    "*time_emb_proj",
    "*class_embed*",
)


@dataclass(frozen=True)
class QuantConfig:
    """Bit-widths, weight granularity, layers kept in float, and the calibration method.

    GroupNorm, SiLU, softmax and the attention matmuls are never quantized (they are not Conv2d/Linear), which
    matches TensorRT's INT8 recipe; ``keep_float`` adds Conv2d/Linear layers to leave in float by name.
    ``lp_norm`` is the exponent of the L_p error minimised by the ``mse`` scale search (2.4 as in BRECQ).
    """

    method: str = "minmax"
    wbits: int = 8
    abits: int = 8
    weight_granularity: str = "channel"
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    lp_norm: float = 2.4

    def __post_init__(self) -> None:
        from tdqrt.calibration.quant.methods import METHODS  # the registry imports the methods, which import this

        check_choice("QuantConfig.method", self.method, tuple(METHODS), flag="--method")
        for name in ("wbits", "abits"):
            check_int(f"QuantConfig.{name}", getattr(self, name), MIN_BITS, MAX_BITS, flag=f"--{name}",
                      fix=f"give an integer in [{MIN_BITS}, {MAX_BITS}] (8 = INT8)")
        check_choice("QuantConfig.weight_granularity", self.weight_granularity, ("channel", "tensor"),
                     flag="--weight-granularity")
        if isinstance(self.keep_float, str) or not all(isinstance(p, str) and p for p in self.keep_float):
            raise invalid("QuantConfig.keep_float", self.keep_float, "a list of non-empty name patterns",
                          "give fnmatch patterns of module names", flag="--keep-float")
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        check_real("QuantConfig.lp_norm", self.lp_norm, above=0.0, finite=False)

    def keeps_float(self, module_name: str) -> bool:
        return any(fnmatch.fnmatchcase(module_name, p) for p in self.keep_float)

    def to_dict(self) -> dict:
        return asdict(self) | {"keep_float": list(self.keep_float)}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        return config_from_dict(cls, d)

"""The D² / PTQD statistics table: streamed moments, the Gaussian fit, the artifact on disk, the settings check.

D²-DPM (Zeng et al., AAAI 2025, arXiv 2501.08180) models the quantization error Δ = ε̂ − ε of the CFG-combined
noise prediction (ε̂ quantized, ε full precision) per sampler timestep t as a bivariate Gaussian of (ε̂, Δ), either
tensor-wise (every element of every sample pooled) or per output channel c. PTQD (He et al., NeurIPS 2023, arXiv
2305.10657) regresses Δ on the FP output instead. Both fits are computed here from the same per-(t, c) float64
sums, so a table holds everything the deployed sampler needs and can be refitted without the raw data.

Moments (``MOMENTS``, last axis of every moment array ``[K, C, 9]``), summed over all elements of channel c of all
samples at step k, with q = ε̂, d = Δ, e = ε:  n, Σq, Σd, Σe, Σq², Σd², Σe², Σqd, Σed. The tensor-wise sums are
the channel sums added up (``moments.sum(axis=1)``).

D² fit (D²-DPM's bivariate Gaussian), per t (and c):
    μ_X = mean ε̂,  μ_Y = mean Δ,  Σ00 = Var ε̂,  Σ01 = Cov(ε̂, Δ),  Σ11 = Var Δ   (unbiased, ddof = 1)
    ρ = clamp(Σ01 / (σ_X σ_Y), ±0.9999),  β = ρ σ_Y / σ_X,  a = μ_Y − β μ_X,  σ_cond = σ_Y sqrt(1 − ρ²)
so that E[Δ | ε̂] = μ_Y + β(ε̂ − μ_X) = a + β ε̂ and ε̂ − E[Δ | ε̂] = (1 − β) ε̂ − a.

PTQD fit (PTQD's correlated/uncorrelated error split), per t from the *unfiltered* moments (PTQD has no outlier filter):
    k = Cov(ε, Δ) / Var(ε) pooled over channels,  k⁺ = max(k, 0),  b_c = mean Δ of channel c,
    σ_q = std(Δ − k⁺ ε − b_c) pooled over all elements (ddof = 1).
σ_q is the pooled residual std after removing the per-channel bias: a cleaner variant of the paper code's mean of
per-sample stds of Δ − k⁺ε (which also counts the between-channel bias spread as noise).

Degenerate entries (fewer than 2 pairs, zero variance) get no correction (every fitted value 0) and a status code
whose reason ``STATUS_REASONS`` spells out; nothing here ever produces NaN.
"""
from __future__ import annotations

import dataclasses
import io
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from tdqrt.engines.artifacts import atomic_path, read_json, sha256_file, versions, write_json_atomic
from tdqrt.engines.errors import ArtifactError, ConfigError, DataError
from tdqrt.runtime.sampling import SamplerConfig
from tdqrt.runtime.schedules import ScheduleConfig

D2_FORMAT = "tdqrt-d2-stats"
D2_VERSION = 1
NPZ_FILE = "d2.npz"
JSON_FILE = "d2.json"

#: Layout of the last axis of a moment array: q = ε̂ (quantized), d = Δ = ε̂ − ε, e = ε (FP).
MOMENTS = ("n", "q", "d", "e", "qq", "dd", "ee", "qd", "ed")
_M = {name: i for i, name in enumerate(MOMENTS)}
# Finite stand-in sums (n = 2, unit variances, no covariance) for degenerate entries: it keeps the vectorised fit
# free of 0/0 and its results are replaced by 0 afterwards.
_UNIT_MOMENTS = np.array([2.0, 0, 0, 0, 2, 2, 2, 0, 0])

RHO_MAX = 0.9999  # the D²-DPM reference code's clamp on the correlation
ZERO_VAR_RTOL = 1e-12  # a variance below this fraction of E[x²] is cancellation noise, i.e. zero

STATUS_OK, STATUS_FEW, STATUS_CONST_X, STATUS_CONST_Y = 0, 1, 2, 3
STATUS_REASONS = {
    STATUS_OK: "ok",
    STATUS_FEW: "too few pairs (fewer than 2, or a channel with none)",
    STATUS_CONST_X: "the regressor (ε̂ for D², ε for PTQD) has zero variance",
    STATUS_CONST_Y: "Δ has zero variance",
}

GAUSSIAN_FIELDS = ("mu_x", "mu_y", "cov00", "cov01", "cov11", "sigma_x", "sigma_y", "rho", "beta", "a",
                   "sigma_cond", "status")
PTQD_FIELDS = ("k", "k_plus", "bias", "sigma_q", "status")
MOMENT_SETS = ("raw", "tensor", "channel")


# ----------------------------------------------------------------------------------------------- fits


def _mean_cov(m: np.ndarray, x: str, y: str) -> tuple[np.ndarray, ...]:
    """Means, unbiased variances (ddof = 1) and covariance of the pair (x, y) from sums ``m[..., MOMENTS]``."""
    n = m[..., _M["n"]]
    sx, sy = m[..., _M[x]], m[..., _M[y]]
    mx, my = sx / n, sy / n
    vxx = (m[..., _M[x + x]] - sx * mx) / (n - 1)
    vyy = (m[..., _M[y + y]] - sy * my) / (n - 1)
    vxy = (m[..., _M[x + y]] - sx * my) / (n - 1)
    return mx, my, vxx, vyy, vxy


def _status(m: np.ndarray, x: str, y: Optional[str] = None) -> np.ndarray:
    """Why an entry cannot be fitted (``STATUS_*``): too few pairs, or a constant regressor x or response y.

    A variance counts as zero below ``ZERO_VAR_RTOL·E[v²]``: the sums of constant data leave rounding noise.
    """
    n = m[..., _M["n"]]

    def zero_var(v: str) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            var = (m[..., _M[v + v]] - m[..., _M[v]] ** 2 / n) / (n - 1)
            return ~(var > ZERO_VAR_RTOL * m[..., _M[v + v]] / n)  # NaN (n = 0) also counts as zero

    status = np.full(n.shape, STATUS_OK, dtype=np.int64)
    if y is not None:
        status[zero_var(y)] = STATUS_CONST_Y
    status[zero_var(x)] = STATUS_CONST_X
    status[n < 2] = STATUS_FEW
    return status


@dataclass(frozen=True)
class GaussianFit:
    """D² joint Gaussian of (ε̂, Δ) per entry; every array has the moments' leading shape ([K] or [K, C])."""

    mu_x: np.ndarray
    mu_y: np.ndarray
    cov00: np.ndarray
    cov01: np.ndarray
    cov11: np.ndarray
    sigma_x: np.ndarray
    sigma_y: np.ndarray
    rho: np.ndarray
    beta: np.ndarray
    a: np.ndarray
    sigma_cond: np.ndarray
    status: np.ndarray

    @classmethod
    def from_moments(cls, m: np.ndarray) -> "GaussianFit":
        """Fit (D²-DPM): ρ clamped to ±RHO_MAX, β = ρσ_Y/σ_X, a = μ_Y − βμ_X, σ_cond = σ_Y·sqrt(1 − ρ²)."""
        status = _status(m, "q", "d")
        ok = status == STATUS_OK
        m = np.where(ok[..., None], m, _UNIT_MOMENTS)  # degenerate rows become a harmless unit Gaussian, zeroed below
        mu_x, mu_y, c00, c11, c01 = _mean_cov(m, "q", "d")
        sx, sy = np.sqrt(c00), np.sqrt(c11)
        rho = np.clip(c01 / (sx * sy), -RHO_MAX, RHO_MAX)
        beta = rho * sy / sx
        values = dict(mu_x=mu_x, mu_y=mu_y, cov00=c00, cov01=c01, cov11=c11, sigma_x=sx, sigma_y=sy, rho=rho,
                      beta=beta, a=mu_y - beta * mu_x, sigma_cond=sy * np.sqrt(1.0 - rho**2))
        return cls(**{k: np.where(ok, v, 0.0) for k, v in values.items()}, status=status)


@dataclass(frozen=True)
class PTQDFit:
    """PTQD per step: ``k``, ``k_plus``, ``sigma_q``, ``status`` of shape [K]; ``bias`` of shape [K, C]."""

    k: np.ndarray
    k_plus: np.ndarray
    bias: np.ndarray
    sigma_q: np.ndarray
    status: np.ndarray

    @classmethod
    def from_moments(cls, m: np.ndarray) -> "PTQDFit":
        """k = Cov(ε, Δ)/Var(ε) over all elements; b_c = mean Δ_c; σ_q = pooled std of Δ − k⁺ε − b_c (PTQD)."""
        pooled = m.sum(axis=1)
        status = _status(pooled, "e")
        status[(m[..., _M["n"]] < 1).any(axis=1)] = STATUS_FEW  # b_c needs pairs in every channel
        ok = status == STATUS_OK
        pooled = np.where(ok[:, None], pooled, _UNIT_MOMENTS)
        m = np.where(ok[:, None, None], m, _UNIT_MOMENTS)
        _, _, v_ee, _, c_ed = _mean_cov(pooled, "e", "d")
        k = c_ed / v_ee
        kp = np.maximum(k, 0.0)[:, None]
        n_c, s_d, s_e = m[..., _M["n"]], m[..., _M["d"]], m[..., _M["e"]]
        bias = s_d / n_c
        # Residual r = Δ − k⁺ε − b_c expanded into the moments, per channel, then pooled over channels.
        sum_r = (s_d - kp * s_e - n_c * bias).sum(axis=1)
        sum_rr = (m[..., _M["dd"]] - 2 * kp * m[..., _M["ed"]] + kp**2 * m[..., _M["ee"]]
                  - 2 * bias * (s_d - kp * s_e) + n_c * bias**2).sum(axis=1)
        n = pooled[:, _M["n"]]
        sigma_q = np.sqrt(np.maximum(sum_rr - sum_r**2 / n, 0.0) / (n - 1))
        return cls(k=np.where(ok, k, 0.0), k_plus=np.where(ok, kp[:, 0], 0.0), bias=np.where(ok[:, None], bias, 0.0),
                   sigma_q=np.where(ok, sigma_q, 0.0), status=status)


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class D2Settings:
    """What the statistics were collected with; they only describe a run with the same sampler and schedule."""

    sampler: SamplerConfig
    schedule: ScheduleConfig
    num_samples: int
    seed: int
    outlier_sigma: Optional[float]  # None: no outlier filter (a single pass)
    fp_model_sha256: str = ""
    quant_model_sha256: str = ""
    prompts: Optional[dict] = None  # a text-to-image model's prompt set: {"count", "sha256"}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sampler"], d["schedule"] = self.sampler.to_dict(), self.schedule.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "D2Settings":
        d = dict(d)
        d["sampler"] = SamplerConfig.from_dict(d["sampler"])
        d["schedule"] = ScheduleConfig.from_dict(d["schedule"])
        return cls(**d)


def check_settings(
    table: "D2Table", sampler_config: SamplerConfig, schedule_config: ScheduleConfig, *, force: bool = False
) -> None:
    """Refuse a table collected for other sampler settings (the statistics are per timestep and per CFG scale).

    Compared: sampler kind, steps, spacing, eta, guidance_scale and every schedule field (betas, prediction type,
    clipping, the scheduler grid settings, ...). A difference raises
    ``ConfigError`` listing each setting as saved vs requested; with ``force=True`` it is a warning instead.
    """
    saved = table.settings
    diffs = [f"{name}: saved {getattr(saved.sampler, name)!r}, requested {getattr(sampler_config, name)!r}"
             for name in ("kind", "steps", "spacing", "eta", "guidance_scale")
             if getattr(saved.sampler, name) != getattr(sampler_config, name)]
    want, have = schedule_config.to_dict(), saved.schedule.to_dict()
    diffs += [f"schedule.{k}: saved {_short(have[k])}, requested {_short(want[k])}" for k in want if have[k] != want[k]]
    if not diffs:
        return
    message = (f"the D² statistics were collected for other sampler settings ({'; '.join(diffs)}); "
               "re-collect them for these settings")
    if not force:
        raise ConfigError(message + ", or pass force=True (CLI: --d2-force) to apply them anyway.")
    warnings.warn(message + "; applying them anyway because force=True.", stacklevel=2)


def _short(value: Any) -> str:
    """A setting as the message shows it: a list of trained betas by its length and ends, anything else by repr."""
    if isinstance(value, (tuple, list)) and len(value) > 4:
        return f"[{value[0]!r}, ..., {value[-1]!r}] ({len(value)} values)"
    return repr(value)


# ----------------------------------------------------------------------------------------------- the table


class D2Table:
    """Per-timestep moments, their D² (tensor- and channel-wise) and PTQD fits, and the collection settings.

    ``moments_raw`` are the unfiltered sums (pass 1; PTQD uses them). ``moments_tensor`` keeps the pairs inside the
    tensor-wise outlier limits of step k, ``moments_channel`` those inside the limits of (k, c); both are stored per
    channel ``[K, C, 9]`` and the tensor-wise fit uses ``moments_tensor.sum(axis=1)``.
    """

    def __init__(
        self,
        timesteps: np.ndarray,
        moments_raw: np.ndarray,
        moments_tensor: np.ndarray,
        moments_channel: np.ndarray,
        settings: D2Settings,
    ) -> None:
        arrays = {"timesteps": np.asarray(timesteps), "moments.raw": np.asarray(moments_raw, dtype=np.float64),
                  "moments.tensor": np.asarray(moments_tensor, dtype=np.float64),
                  "moments.channel": np.asarray(moments_channel, dtype=np.float64)}
        _check_arrays(arrays, DataError)
        self.timesteps = arrays["timesteps"].astype(np.int64)
        self.moments_raw = arrays["moments.raw"]
        self.moments_tensor = arrays["moments.tensor"]
        self.moments_channel = arrays["moments.channel"]
        self.settings = settings
        self.tensor = GaussianFit.from_moments(self.moments_tensor.sum(axis=1))
        self.channel = GaussianFit.from_moments(self.moments_channel)
        self.ptqd = PTQDFit.from_moments(self.moments_raw)

    @property
    def num_channels(self) -> int:
        return self.moments_raw.shape[1]

    def rows(self, timesteps) -> tuple[np.ndarray, list[int]]:
        """Table row of each requested timestep (-1 where absent) and the list of absent timesteps."""
        index = {int(t): k for k, t in enumerate(self.timesteps)}
        rows = np.array([index.get(int(t), -1) for t in timesteps], dtype=np.int64)
        return rows, [int(t) for t, r in zip(timesteps, rows) if r < 0]

    def plot_data(self) -> dict[str, Any]:
        """Per-t curves for a plot: μ_Y, σ_Y, ρ, β, σ_cond (tensor [K], channel [K, C]) and PTQD k, σ_q, bias."""
        keys = ("mu_y", "sigma_y", "rho", "beta", "sigma_cond", "status")
        return {
            "timesteps": self.timesteps.copy(),
            "tensor": {k: getattr(self.tensor, k).copy() for k in keys},
            "channel": {k: getattr(self.channel, k).copy() for k in keys},
            "ptqd": {k: getattr(self.ptqd, k).copy() for k in ("k", "sigma_q", "bias", "status")},
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        out = {"timesteps": self.timesteps, "moments.raw": self.moments_raw,
               "moments.tensor": self.moments_tensor, "moments.channel": self.moments_channel}
        for prefix, fit in (("tensor", self.tensor), ("channel", self.channel), ("ptqd", self.ptqd)):
            out.update({f"{prefix}.{f.name}": getattr(fit, f.name) for f in dataclasses.fields(fit)})
        return out

    def save(self, out_dir: str | Path) -> Path:
        """Write ``d2.npz`` (moments + fits) and then ``d2.json`` (format, settings, npz sha256), each atomically."""
        out_dir = Path(out_dir)
        with atomic_path(out_dir / NPZ_FILE) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare temp name
                np.savez(f, **self._arrays())
            digest = sha256_file(tmp)
        card = {
            "format": D2_FORMAT,
            "version": D2_VERSION,
            "npz": {"file": NPZ_FILE, "sha256": digest},
            "timesteps": self.timesteps.tolist(),
            "num_channels": self.num_channels,
            "moments": list(MOMENTS),
            "settings": self.settings.to_dict(),
            "pairs": {name: int(getattr(self, f"moments_{name}")[..., 0].sum()) for name in MOMENT_SETS},
            "versions": versions(),
        }
        write_json_atomic(out_dir / JSON_FILE, card)
        return out_dir

    @classmethod
    def load(cls, path: str | Path) -> "D2Table":
        """Read and validate a table directory; anything missing, truncated, inconsistent or non-finite raises
        ``ArtifactError`` naming the file and field."""
        path = Path(path)
        card = read_json(path / JSON_FILE, expect_format=D2_FORMAT)
        if card.get("version") != D2_VERSION:
            raise ArtifactError(f"{path / JSON_FILE} has version {card.get('version')}, this tdqrt reads {D2_VERSION}")
        npz_path = path / NPZ_FILE
        if not npz_path.is_file():
            raise ArtifactError(f"{npz_path} is missing; re-run the D² statistics collection")
        if sha256_file(npz_path) != card.get("npz", {}).get("sha256"):
            raise ArtifactError(f"{npz_path} does not match the sha256 in {path / JSON_FILE}: truncated or replaced")
        arrays = _read_npz(npz_path)
        try:
            settings = D2Settings.from_dict(card["settings"])
        except (KeyError, TypeError, ConfigError) as exc:
            raise ArtifactError(f"{path / JSON_FILE}: invalid settings ({exc})") from exc
        _check_arrays(arrays, ArtifactError, where=str(npz_path))
        if card.get("timesteps") != arrays["timesteps"].tolist():
            raise ArtifactError(f"{path / JSON_FILE} and {npz_path} list different timesteps")
        table = cls(arrays["timesteps"], arrays["moments.raw"], arrays["moments.tensor"], arrays["moments.channel"],
                    settings)
        _check_fits_match(table._arrays(), arrays, npz_path)
        return table


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, io.UnsupportedOperation) as exc:
        raise ArtifactError(f"{path} cannot be read as npz ({exc}); it is truncated or corrupt") from exc


def _check_arrays(arrays: Mapping[str, np.ndarray], error: type[Exception], where: str = "D² table") -> None:
    """Shapes [K] / [K, C, 9] consistent, timesteps distinct non-negative integers, every value finite."""
    for name, value in arrays.items():
        if value.dtype.kind not in "iuf":
            raise error(f"{where}: field {name!r} has dtype {value.dtype}, expected numbers")
        if not np.isfinite(value).all():
            raise error(f"{where}: field {name!r} contains NaN/Inf; the statistics are unusable, re-collect them")
    missing = [k for k in ("timesteps", *(f"moments.{s}" for s in MOMENT_SETS)) if k not in arrays]
    if missing:
        raise error(f"{where}: missing field(s) {missing}")
    t = arrays["timesteps"]
    if t.ndim != 1 or t.dtype.kind not in "iu" or len(np.unique(t)) != len(t) or (t < 0).any():
        raise error(f"{where}: field 'timesteps' must be distinct non-negative integers [K], got {t.dtype} {t.shape}")
    shape = arrays["moments.raw"].shape
    if len(shape) != 3 or shape[0] != len(t) or shape[2] != len(MOMENTS) or shape[1] < 1:
        raise error(f"{where}: field 'moments.raw' has shape {shape}, expected ({len(t)}, C, {len(MOMENTS)})")
    for name in ("moments.tensor", "moments.channel"):
        if arrays[name].shape != shape:
            raise error(f"{where}: field {name!r} has shape {arrays[name].shape}, expected {shape}")
        if (arrays[name][..., 0] < 0).any():
            raise error(f"{where}: field {name!r} has negative pair counts")


def _check_fits_match(expected: Mapping[str, np.ndarray], stored: Mapping[str, np.ndarray], where: Path) -> None:
    """The stored fitted parameters must be the fit of the stored moments (a hand-edited file is refused)."""
    for name, value in expected.items():
        if name not in stored:
            raise ArtifactError(f"{where}: missing field {name!r}")
        if stored[name].shape != value.shape or not np.allclose(stored[name], value, rtol=1e-9, atol=1e-12):
            raise ArtifactError(f"{where}: field {name!r} is not the fit of the stored moments; re-save the table")

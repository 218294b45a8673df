"""``brecq`` and ``tdq-ptq``: block reconstruction with AdaRound (Li et al. 2021, arXiv 2102.05426), applied to a
diffusion UNet as Q-Diffusion does (arXiv 2302.04304), and TDQ's PTQ mode (generators learned by reconstruction,
arXiv 2306.02316) with the same code.

Procedure (:func:`brecq_model`):

1. Quantize the FP model; per-channel weight steps from ``weight_init`` (L_p search or abs-max), then kept fixed.
2. Observe every quantized layer's input over the calibration set, per timestep (weights nearest-rounded).
   ``act_scale="static"`` (``brecq``): one scale per layer from the pooled statistics (``act_init``).
   ``act_scale="tdq"`` (``tdq-ptq``): one generator ``s(t) = softplus(MLP(enc(t)))`` per layer, regressed onto
   the per-timestep scales (:func:`init_generators_from_observers`), i.e. a per-timestep initialisation.
3. Split the UNet into reconstruction units, in execution order: every ResBlock and AttentionBlock of the
   built-in UNet (``ResnetBlock2D`` and ``Attention`` for diffusers) is a block; every other quantized layer
   (down/upsample convs, ...) is its own unit (layer-wise reconstruction).
4. For each unit, in order:

   a. Cache ``num_samples`` fixed calibration pairs: the unit's input arguments from the model **quantized up
      to this unit** (earlier units final: hard-rounded, activations quantized), and the target output from
      the FP model on the same ``(x_t, t, y)`` (BRECQ's ``asym=True``). Forward hooks capture them; the
      forward pass stops at the unit.
   b. Phase 1 (weights): the unit's activations in float, AdaRound ``V`` of its layers trained with Adam
      (``lr_w``) on ``‖ŷ − y‖^p_w`` (summed over channels, averaged over batch and space, p_w = 2) plus
      ``weight_lambda·Σ(1 − |2h(V) − 1|^β)``, β annealed ``beta_start → beta_end`` after a ``warmup``
      fraction without regulariser; then hard rounding (the forward pass uses ``⌊W/s⌋ + 1[V ≥ 0]``).
   c. Phase 2 (activations): the unit's activation quantizers on, weights hard; learn the static step
      (``scale``, LSQ gradient through the STE) or the TDQ generators' parameters (each cached sample with its
      own t through ``qm.ctx.t``), Adam at ``lr_a`` with cosine decay, on the L_p loss with p_a = 2.4.
   d. Save the unit's quantizer state (weight steps, AdaRound ``V`` — whose sign is the rounding decision —,
      activation step or generator weights) to ``work_dir/brecq/unit_XXX.safetensors`` and update
      ``work_dir/brecq/index.json`` (both atomic).

Resume: the index carries a hash of the options, the quantizer config, the FP weights' sha256, the calibration
set and the unit list. A rerun with the same hash loads the longest prefix of finished units whose files are
intact and recomputes the rest (bit-identical to an uninterrupted run: every random draw is seeded per unit);
with a different hash it warns and starts over. ``index.json`` records for each unit the run that computed it,
its wall time and its reconstruction MSE against the FP targets at each stage (``mse_before``: nearest rounding
and initial act steps; ``mse_weights_only``: after AdaRound, acts in float; ``mse_act_init``: hard weights,
initial act steps; ``mse_after``: final).

Memory: the cache holds ``num_samples`` copies of one unit's inputs and output (float32, on ``job.device``):
``num_samples × (Σ input sizes + output size) × 4`` bytes, e.g. 512 × (64·16·16 + 128 + 32·16·16) × 4 B ≈ 50 MB
for the widest ResBlock of the ``small`` digits model; only one unit is cached at a time.

Paper settings (GPU) vs. the CPU defaults here: BRECQ / Q-Diffusion use 20 000 weight iterations and 5 000
activation iterations per unit, batch 32, on 1024 images (BRECQ) or 5120 (x_t, t) pairs (Q-Diffusion: 20 steps
× 256 samples); λ = 0.01, β 20 → 2, warm-up 0.2, Adam lr 1e-3 (V) and 4e-4 with cosine decay (act steps).
The defaults (200 / 100 iterations, batch 32, 512 cached pairs, lr 1e-2 for V to make up for 100× fewer
iterations, see :class:`BrecqOptions`) calibrate the ``small`` digits model in a few CPU minutes.

The method returns the calibrated (not frozen) model; ``calibrate()`` freezes it (AdaRound's hard codes become
the int8 codes; the static scale or the generator is tabulated per timestep) and saves it.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tdqrt.calibration.models import DiffusersUNet
from tdqrt.calibration.models.unet import AttentionBlock, ResBlock
from tdqrt.calibration.quant.adaround import AdaRound, BetaSchedule, attach_adaround
from tdqrt.calibration.quant.job import CalibrationJob
from tdqrt.calibration.quant.qmodel import QuantizedModel, QuantLayer, quantize_model
from tdqrt.calibration.quant.static import init_act_scales, observe_activations
from tdqrt.calibration.quant.tdq import generator_config_of
from tdqrt.engines.artifacts import atomic_path, read_json, sha256_file, sha256_json, write_json_atomic
from tdqrt.engines.config import check_choice, check_int, check_real, invalid
from tdqrt.engines.errors import ArtifactError, ConfigError, DataError
from tdqrt.engines.progress import ProgressBar, note, progress_bar


ACT_SCALES = ("static", "tdq")
INIT_METHODS = ("mse", "minmax")
PROGRESS_DIR = "brecq"
INDEX_FILE = "index.json"
INDEX_FORMAT = "tdqrt-brecq-progress"
INDEX_VERSION = 1
EVAL_CHUNK = 128  # samples per forward pass when observing, caching and measuring (bounds peak memory)


@dataclass(frozen=True)
class BrecqOptions:
    """Settings of ``brecq`` (and, with ``act_scale="tdq"``, of ``tdq-ptq``).

    * ``iters_w``, ``iters_a``: iterations per unit of the weight (AdaRound) and activation phases
      (paper: 20 000 and 5 000). 0 skips a phase (``iters_w=0`` hardens AdaRound's init = nearest rounding).
    * ``batch``: reconstruction batch (32 as in the paper); ``num_samples``: calibration pairs cached per unit
      (all of the set if it is smaller); see the module docstring for the memory this takes.
    * ``lr_w``: Adam rate of V. The paper's 1e-3 is tuned for 20 000 iterations: Adam moves V by about lr per
      step, and a rounding flips only when V crosses 0 (|V| starts at up to 2.4), so with the CPU default of 200
      iterations the default is 1e-2: in 200 iterations it gets about as far below nearest rounding's error as
      1e-3 does in 1000, where 1e-3 × 200 hardly leaves it. Use 1e-3 with paper-length runs.
    * ``lr_a``: Adam rate of the act steps / generators (4e-4 as the Q-Diffusion driver, cosine decay).
    * ``weight_lambda``, ``beta_start``, ``beta_end``, ``warmup``: rounding regulariser λ and its β schedule.
    * ``p_w``, ``p_a``: exponent of the reconstruction loss in the weight (2) and activation (2.4) phases.
    * ``weight_init``, ``act_init``: ``"mse"`` (L_p clipping search, p = ``QuantConfig.lp_norm``) or
      ``"minmax"`` for the weight steps and the initial activation steps (pooled, or per timestep for TDQ).
    * ``act_scale``: ``"static"`` (one learned step per layer) or ``"tdq"`` (TDQ generators).
    * ``observer_cap``: values kept per layer and timestep for the initial activation statistics.
    * ``frequencies``, ``base``, ``hidden``, ``layers``: TDQ generator shape; ``fit_steps``: iterations of the
      generators' per-timestep initial fit.
    * ``seed``: seeds the cached-sample choice, the minibatches and the generator init.

    Raises:
        ConfigError: naming the field, when a value is out of range.
    """

    iters_w: int = 200
    iters_a: int = 100
    batch: int = 32
    num_samples: int = 512
    lr_w: float = 1e-2
    lr_a: float = 4e-4
    weight_lambda: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    p_w: float = 2.0
    p_a: float = 2.4
    weight_init: str = "mse"
    act_init: str = "mse"
    act_scale: str = "static"
    observer_cap: int = 4096
    frequencies: int = 64
    base: float = 10000.0
    hidden: int = 64
    layers: int = 3
    fit_steps: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        cls = type(self).__name__
        minimum = {"iters_w": 0, "iters_a": 0, "batch": 1, "num_samples": 1, "observer_cap": 16, "frequencies": 1,
                   "hidden": 1, "layers": 1, "fit_steps": 0, "seed": 0}
        for name, lo in minimum.items():
            check_int(f"{cls}.{name}", getattr(self, name), lo, flag=f"--option {name}")
        for name in ("lr_w", "lr_a", "beta_start", "beta_end", "p_w", "p_a"):
            check_real(f"{cls}.{name}", getattr(self, name), above=0.0, flag=f"--option {name}")
        check_real(f"{cls}.weight_lambda", self.weight_lambda, 0.0, flag="--option weight_lambda")
        check_real(f"{cls}.warmup", self.warmup, 0.0, below=1.0, flag="--option warmup")
        if self.beta_end > self.beta_start:
            raise invalid(f"{cls}.beta_end", self.beta_end, f"<= beta_start={self.beta_start!r}",
                          "β is annealed downwards; lower beta_end or raise beta_start", flag="--option beta_end")
        check_real(f"{cls}.base", self.base, above=1.0, flag="--option base")
        for name in ("weight_init", "act_init"):
            check_choice(f"{cls}.{name}", getattr(self, name), INIT_METHODS, flag=f"--option {name}")
        check_choice(f"{cls}.act_scale", self.act_scale, ACT_SCALES, flag="--option act_scale")


@dataclass(frozen=True)
class TdqPtqOptions(BrecqOptions):
    """Settings of ``tdq-ptq``: :class:`BrecqOptions` with TDQ generators as the activation steps."""

    act_scale: str = "tdq"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("TdqPtqOptions.act_scale", self.act_scale, ("tdq",), flag="--option act_scale",
                     fix="tdq-ptq always learns TDQ generators; use method 'brecq' for static activation steps")


# --------------------------------------------------------------------------------------------------------------
# Reconstruction units


@dataclass
class Unit:
    """A block or a single layer reconstructed as one piece: ``name`` in both models, its quantized layers."""

    name: str
    kind: str  # "block" | "layer"
    layer_names: list[str]

    def layers(self, qm: QuantizedModel) -> list[QuantLayer]:
        return [qm.model.get_submodule(n) for n in self.layer_names]


def block_types(model: nn.Module) -> tuple[type, ...]:
    """Module classes reconstructed as blocks: ResBlock/AttentionBlock, or diffusers' ResnetBlock2D/Attention."""
    if isinstance(model, DiffusersUNet):
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import ResnetBlock2D

        return (ResnetBlock2D, Attention)
    return (ResBlock, AttentionBlock)


@torch.no_grad()
def find_units(qm: QuantizedModel, x: Tensor, t: Tensor, y: Optional[Tensor]) -> list[Unit]:
    """Blocks (outermost modules of :func:`block_types`) and the remaining quantized layers, in execution order.

    One forward pass on ``(x, t, y)`` records the order; a unit called more than once per pass (shared weights)
    cannot be reconstructed from one cached input and is refused.
    """
    types = block_types(qm.model)
    blocks: list[str] = []
    for name, module in qm.model.named_modules():
        if isinstance(module, types) and not any(name.startswith(b + ".") for b in blocks):
            blocks.append(name)
    owner = {ln: next((b for b in blocks if ln.startswith(b + ".")), None) for ln in qm.layer_names}
    candidates = blocks + [ln for ln, b in owner.items() if b is None]
    calls: list[str] = []
    hooks = [qm.model.get_submodule(n).register_forward_pre_hook(lambda *_, n=n: calls.append(n))
             for n in candidates]
    try:
        qm(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    repeated = sorted({n for n in calls if calls.count(n) > 1})
    if repeated:
        raise ConfigError(f"modules {repeated} run more than once per forward pass; BRECQ reconstructs each unit "
                          "from one cached input and cannot handle shared modules")
    units = []
    for name in dict.fromkeys(calls):
        layer_names = [ln for ln in qm.layer_names if owner[ln] == name or ln == name]
        if layer_names:  # blocks whose layers are all kept in float have nothing to reconstruct
            units.append(Unit(name, "layer" if name in owner else "block", layer_names))
    missing = sorted(set(qm.layer_names) - {ln for u in units for ln in u.layer_names})
    if missing:
        raise ConfigError(f"quantized layers {missing} are never called by the model's forward pass")
    return units


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the unit's input/output is recorded."""


@dataclass
class UnitData:
    """Cached unit inputs (from the quantized model), per-sample timesteps and FP targets, ``n`` samples each."""

    args: list
    kwargs: dict
    t: Tensor
    target: Tensor

    def __len__(self) -> int:
        return len(self.t)

    def select(self, idx: Tensor) -> tuple[list, dict]:
        pick = lambda v: v[idx] if isinstance(v, Tensor) else v  # noqa: E731
        return [pick(a) for a in self.args], {k: pick(v) for k, v in self.kwargs.items()}


def _concat(parts: list, what: str) -> Any:
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat([p.detach() for p in parts])
    if any(p is not first and p != first for p in parts[1:]):
        raise ConfigError(f"the non-tensor argument {what} of a unit changes between batches; cannot cache it")
    return first


@torch.no_grad()
def capture_unit(qm: QuantizedModel, fp_model: nn.Module, unit: Unit, job: CalibrationJob,
                 indices: np.ndarray) -> UnitData:
    """Run both models on the calibration pairs ``indices`` (sorted) up to ``unit``; cache its inputs/targets."""
    inputs, outputs, ts = [], [], []

    def grab_input(module, args, kwargs):
        inputs.append((args, kwargs))
        raise _Stop

    def grab_output(module, args, output):
        if not isinstance(output, Tensor):
            raise ConfigError(f"unit {unit.name} returns {type(output).__name__}; BRECQ needs a tensor output")
        outputs.append(output.detach())
        raise _Stop

    hooks = [qm.model.get_submodule(unit.name).register_forward_pre_hook(grab_input, with_kwargs=True),
             fp_model.get_submodule(unit.name).register_forward_hook(grab_output)]
    try:
        for i in range(0, len(indices), EVAL_CHUNK):
            x, t, y = job.calib.get(indices[i: i + EVAL_CHUNK])
            x, t = x.to(job.device), t.to(job.device)
            y = None if y is None else y.to(job.device)
            for model in (qm, fp_model):
                try:
                    model(x, t, y)
                except _Stop:
                    pass
            ts.append(t)
    finally:
        for h in hooks:
            h.remove()
    if not len(inputs) == len(outputs) == len(ts):
        raise RuntimeError(f"unit {unit.name} was not reached by every calibration batch")
    args = [_concat([a[j] for a, _ in inputs], f"#{j}") for j in range(len(inputs[0][0]))]
    kwargs = {k: _concat([kw[k] for _, kw in inputs], k) for k in inputs[0][1]}
    data = UnitData(args, kwargs, torch.cat(ts), torch.cat(outputs))
    for what, v in [*enumerate(args), *kwargs.items()]:
        if isinstance(v, Tensor) and (v.ndim == 0 or v.shape[0] != len(data)):
            raise ConfigError(f"unit {unit.name}: input {what!r} of shape {list(v.shape)} has no batch dimension; "
                              "BRECQ caches per-sample inputs only")
    return data


def run_unit(qm: QuantizedModel, unit: Unit, data: UnitData, idx: Tensor) -> Tensor:
    """The quantized unit on cached samples ``idx``; the activation quantizers read those samples' timesteps."""
    args, kwargs = data.select(idx)
    qm.ctx.t = data.t[idx]
    try:
        return qm.model.get_submodule(unit.name)(*args, **kwargs)
    finally:
        qm.ctx.t = None


def lp_loss(pred: Tensor, target: Tensor, p: float) -> Tensor:
    """BRECQ's reconstruction loss: ``|ŷ − y|^p`` summed over dim 1 (channels of NCHW outputs), averaged over the
    rest (batch and positions)."""
    return (pred - target).abs().pow(p).sum(1).mean()


@torch.no_grad()
def unit_mse(qm: QuantizedModel, unit: Unit, data: UnitData) -> float:
    """Mean squared error of the quantized unit against the FP targets over all cached samples."""
    total = 0.0
    for i in range(0, len(data), EVAL_CHUNK):
        idx = torch.arange(i, min(len(data), i + EVAL_CHUNK), device=data.t.device)
        total += float((run_unit(qm, unit, data, idx) - data.target[idx]).pow(2).sum())
    return total / data.target.numel()


@contextlib.contextmanager
def acts_in_float(qm: QuantizedModel, unit: Unit) -> Iterator[None]:
    """The unit's activation quantizers in float mode inside the block, restored afterwards."""
    quantizers = [layer.act_quant for layer in unit.layers(qm)]
    modes = [q.mode for q in quantizers]
    for q in quantizers:
        q.set_mode("float")
    try:
        yield
    finally:
        for q, mode in zip(quantizers, modes):
            q.set_mode(mode)


def _minibatches(n: int, batch: int, gen: torch.Generator, device: str):
    while True:
        yield torch.randperm(n, generator=gen)[:batch].to(device)


# --------------------------------------------------------------------------------------------------------------
# The two phases


def reconstruct_weights(qm: QuantizedModel, unit: Unit, data: UnitData, opts: BrecqOptions,
                        gen: torch.Generator, bar: Optional[ProgressBar] = None) -> list[AdaRound]:
    """Phase 1: learn AdaRound V of the unit's layers (activations in float), then harden the rounding."""
    layers = unit.layers(qm)
    roundings = [attach_adaround(layer.weight_quant, layer.weight) for layer in layers]
    params = [r.V for r in roundings]
    for v in params:
        v.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=opts.lr_w)
    schedule = BetaSchedule(opts.iters_w, opts.beta_start, opts.beta_end, opts.warmup)
    batches = _minibatches(len(data), opts.batch, gen, data.t.device)
    with acts_in_float(qm, unit):
        for it in range(opts.iters_w):
            idx = next(batches)
            loss = lp_loss(run_unit(qm, unit, data, idx), data.target[idx], opts.p_w)
            if schedule.regularised(it) and opts.weight_lambda > 0:
                beta = schedule.beta(it)
                loss = loss + opts.weight_lambda * sum(r.regularizer(beta) for r in roundings)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if bar is not None:
                bar.update()
    for r in roundings:
        r.harden()
    return roundings


def _act_params(layers: list[QuantLayer], act_scale: str) -> list[nn.Parameter]:
    if act_scale == "static":
        return [layer.act_quant.scale for layer in layers]
    return [p for layer in layers for p in layer.act_quant.generator.parameters()]


def reconstruct_acts(qm: QuantizedModel, unit: Unit, data: UnitData, opts: BrecqOptions,
                     gen: torch.Generator, bar: Optional[ProgressBar] = None) -> None:
    """Phase 2: learn the unit's activation steps (static scalars or TDQ generators) with weights hard."""
    layers = unit.layers(qm)
    for layer in layers:
        layer.act_quant.set_mode(opts.act_scale)
    if opts.iters_a == 0:
        return
    params = _act_params(layers, opts.act_scale)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=opts.lr_a)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=opts.iters_a, eta_min=0.0)
    batches = _minibatches(len(data), opts.batch, gen, data.t.device)
    for _ in range(opts.iters_a):
        idx = next(batches)
        loss = lp_loss(run_unit(qm, unit, data, idx), data.target[idx], opts.p_a)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cosine.step()
        if opts.act_scale == "static":
            with torch.no_grad():
                for p in params:
                    p.clamp_(min=1e-8)  # Adam steps are absolute; a step size must stay positive
        if bar is not None:
            bar.update()
    for p in params:
        p.requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------
# Unit state on disk (resume)


def unit_state(qm: QuantizedModel, unit: Unit) -> dict[str, Tensor]:
    """Weight steps, AdaRound V (its sign = rounding up) and activation step / generator of the unit's layers."""
    state = {}
    for name, layer in zip(unit.layer_names, unit.layers(qm)):
        for part in ("weight_quant", "act_quant"):
            for k, v in getattr(layer, part).state_dict().items():
                state[f"{name}.{part}.{k}"] = v.detach().cpu().contiguous()
    return state


def load_unit_state(qm: QuantizedModel, unit: Unit, state: dict[str, Tensor], act_scale: str) -> None:
    """Put a finished unit back: hardened AdaRound from the saved V, activation quantizers in ``act_scale``."""
    for name, layer in zip(unit.layer_names, unit.layers(qm)):
        attach_adaround(layer.weight_quant, layer.weight).harden()
        layer.act_quant.set_mode(act_scale)
        for part in ("weight_quant", "act_quant"):
            prefix = f"{name}.{part}."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            getattr(layer, part).load_state_dict(sub, strict=True)


class Progress:
    """``work_dir/brecq``: one ``unit_XXX.safetensors`` per finished unit and ``index.json``."""

    def __init__(self, job: CalibrationJob, units: list[Unit]) -> None:
        self.dir = job.work_dir / PROGRESS_DIR
        self.key = sha256_json({
            "format_version": INDEX_VERSION,
            "options": asdict(job.options),
            "quant": job.quant.to_dict(),
            "fp_sha256": job.fp.sha256,
            "calibration": {"path": str(job.calib.path), "count": len(job.calib),
                            "config": job.calib.meta.get("config")},
            "units": [[u.name, u.layer_names] for u in units],
        })
        self.units = units
        self.entries: list[dict] = []
        self.run = 1
        previous = self._read()
        if previous is not None:
            if previous.get("options_hash") == self.key:
                self.entries = list(previous.get("units", []))
                self.run = int(previous.get("run", 0)) + 1
            else:
                warnings.warn(f"{self.dir}: the finished units were calibrated with different options, quantizer "
                              "settings, FP weights or calibration set; starting BRECQ over", stacklevel=3)
                for f in self.dir.glob("unit_*.safetensors"):
                    f.unlink()
        self.loaded: list[int] = []

    def _read(self) -> Optional[dict]:
        path = self.dir / INDEX_FILE
        if not path.is_file():
            return None
        try:
            return read_json(path, expect_format=INDEX_FORMAT)
        except ArtifactError as exc:
            warnings.warn(f"{exc}; starting BRECQ over", stacklevel=3)
            return None

    def saved_state(self, k: int) -> Optional[dict[str, Tensor]]:
        """The saved state of unit ``k`` if it and every unit before it finished and the file is intact."""
        if k != len(self.loaded) or k >= len(self.entries):
            return None
        entry = self.entries[k]
        path = self.dir / entry.get("file", "")
        if entry.get("name") != self.units[k].name or not path.is_file() or sha256_file(path) != entry.get("sha256"):
            return None
        try:
            return load_file(str(path))
        except (SafetensorError, OSError):
            return None

    def mark_loaded(self, k: int) -> None:
        self.loaded.append(k)

    def save(self, k: int, state: dict[str, Tensor], record: dict) -> None:
        path = self.dir / f"unit_{k:03d}.safetensors"
        with atomic_path(path) as tmp:
            save_file(state, str(tmp))
            digest = sha256_file(tmp)
        self.entries = self.entries[:k] + [{"index": k, "name": self.units[k].name, "file": path.name,
                                            "sha256": digest, "run": self.run} | record]
        self._write()

    def _write(self) -> None:
        write_json_atomic(self.dir / INDEX_FILE, {
            "format": INDEX_FORMAT, "version": INDEX_VERSION, "options_hash": self.key, "run": self.run,
            "num_units": len(self.units), "loaded_this_run": self.loaded, "units": self.entries})

    def finish_loading(self) -> None:
        """Forget entries past the loaded prefix (they are recomputed) and record what this run loaded."""
        self.entries = self.entries[: len(self.loaded)]
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write()


def finished_units(work_dir: Path) -> Optional[tuple[int, int]]:
    """``(units finished on disk, units)`` of the BRECQ run in ``work_dir``; None before it has recorded any."""
    try:
        index = read_json(work_dir / PROGRESS_DIR / INDEX_FILE, expect_format=INDEX_FORMAT)
    except ArtifactError:
        return None
    return len(index.get("units", [])), int(index.get("num_units", 0))


# --------------------------------------------------------------------------------------------------------------
# The method


def brecq_model(job: CalibrationJob) -> QuantizedModel:
    """Run the whole procedure of the module docstring; returns the calibrated, unfrozen model."""
    opts: BrecqOptions = job.options
    fp_model = job.fp.model.to(job.device).eval()
    qm = quantize_model(fp_model, job.quant, job.schedule.num_train_timesteps).to(job.device).eval()
    qm.requires_grad_(False)
    for _, layer in qm.layers():
        layer.weight_quant.init_scale(layer.weight, opts.weight_init, job.quant.lp_norm)
    # step 2: initial activation steps from per-timestep statistics of the calibration set
    observe_activations(qm, job, opts.observer_cap, opts.seed, EVAL_CHUNK)
    init_act_scales(qm, opts.act_scale, opts.act_init, job.quant.lp_norm, generator=generator_config_of(opts),
                    fit_steps=opts.fit_steps, seed=opts.seed)

    rng = np.random.default_rng(opts.seed)
    indices = np.sort(rng.choice(len(job.calib), size=min(opts.num_samples, len(job.calib)), replace=False))
    x, t, y = job.calib.get(indices[: min(len(indices), 4)])
    units = find_units(qm, x.to(job.device), t.to(job.device), None if y is None else y.to(job.device))
    progress = Progress(job, units)

    bar_units = progress_bar(units, desc="brecq units", disable=not job.progress)
    for k, unit in enumerate(bar_units):
        state = progress.saved_state(k)
        if state is not None:
            load_unit_state(qm, unit, state, opts.act_scale)
            progress.mark_loaded(k)
            continue
        if k == len(progress.loaded):
            if progress.loaded and job.progress:
                note(f"resuming: {k} of {len(units)} BRECQ units already calibrated (in {progress.dir})")
            progress.finish_loading()
        t0 = time.perf_counter()
        data = capture_unit(qm, fp_model, unit, job, indices)
        mse_before = unit_mse(qm, unit, data)  # nearest rounding, initial activation steps
        gen = torch.Generator().manual_seed(opts.seed * 100_003 + k)
        with progress_bar(total=opts.iters_w + opts.iters_a, desc=f"unit {k + 1}/{len(units)} {unit.name}", leave=False,
                  disable=not job.progress) as bar:
            reconstruct_weights(qm, unit, data, opts, gen, bar)
            with acts_in_float(qm, unit):
                mse_weights = unit_mse(qm, unit, data)
            mse_act_init = unit_mse(qm, unit, data)  # hard weights, initial activation steps
            reconstruct_acts(qm, unit, data, opts, gen, bar)
        mse_after = unit_mse(qm, unit, data)
        del data
        if not math.isfinite(mse_after):
            raise DataError(f"BRECQ diverged on unit {unit.name} (reconstruction error {mse_after}); lower lr_w/lr_a")
        progress.save(k, unit_state(qm, unit), {
            "kind": unit.kind, "layers": unit.layer_names, "mse_before": mse_before,
            "mse_weights_only": mse_weights, "mse_act_init": mse_act_init, "mse_after": mse_after,
            "seconds": round(time.perf_counter() - t0, 3)})
        bar_units.set_postfix_str(f"mse {mse_before:.3g} -> {mse_after:.3g}")
    if len(progress.loaded) == len(units):
        if job.progress:
            note(f"resuming: all {len(units)} BRECQ units already calibrated (in {progress.dir})")
        progress.finish_loading()
    return qm

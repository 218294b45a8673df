"""``tdqrt bench {unet,loop,calibrate}``: timings of variants measured side by side in one process run, as JSON.

How every bench measures
------------------------
* **Side by side, round robin.** Each variant is warmed up, then repeat r of every variant runs before repeat r+1 of
  any (:func:`run_interleaved`). Load on a shared machine drifts over minutes; interleaving puts all variants under
  the same conditions, so the *ratios* (``speedup_vs_baseline`` = baseline median / variant median, > 1 = faster
  than the baseline; ``speedup_spread`` = the per-round paired ratios) are what to quote, not absolute times.
* **Median and spread** over the repeats: median, quartiles, IQR, min, max, mean (:func:`summarize`).
* **Clocks.** ``time.perf_counter``; on CUDA the device is synchronized before the clock is read
  (:func:`timed_call`). Inside the sampling loop a synchronize per call would change what is measured, so the UNet
  and D² calls are bracketed by ``torch.cuda.Event`` pairs on the current stream and read after the loop
  (:class:`SpanTimer`); on the CPU they are bracketed by ``perf_counter``.
* **Threads.** ``threads`` sets torch's intra-op threads for the run and every ONNX Runtime session gets the same
  count, so backends compete on equal terms; the JSON records both and ``OMP_NUM_THREADS``. ``bench unet`` takes
  several counts: each variant is measured at each of them in the same rounds (torch's count is set before each
  call, every ONNX Runtime graph gets one session per count), and speedups compare rows of the same thread count.

The benches
-----------
* ``unet``: one UNet step per backend and dtype at each batch size: torch FP32 (``--model`` checkpoint or
  ``--preset`` with random weights), torch FP16 (CUDA only; skipped with the reason on CPU), torch fake-quant
  (``--quant``), and per ``--bundle`` the FP reference graph ``unet_fp.onnx`` and the INT8 graph ``unet.onnx`` under
  ONNX Runtime, labelled by the bundle's export target (``trt``, ``ort-cpu``, ...). A step is one
  :func:`~tdqrt.runtime.sampling.guided_eps` call, so with guidance > 1 the network sees the CFG batch 2B. A
  text-conditioned UNet (``cond_shape`` ``(L, D)``) gets fixed seeded random embeddings ``[B, L, D]`` and, under
  CFG, a seeded random unconditional embedding ``[L, D]``, the same tensors for every variant: a step's cost does
  not depend on the embeddings' values, so no text encoder is run.
* ``loop``: whole sampling runs (:func:`~tdqrt.runtime.sampling.sample`) of one model or bundle with the D²
  correction off and on. The denoiser and the correction hook are wrapped in :class:`SpanTimer` s, which gives, per
  run, the **loop overhead** ``(loop time − Σ UNet time) / loop time`` (noise draws, the sampler update, the hook,
  Python) and the **D² update** ``Σ hook time / loop time`` (its share of a step) from the same run.
* ``calibrate``: wall time and **peak memory** of the calibration-set collection, of each calibration method and
  of the D² statistics collection. Every job runs in a fresh ``spawn`` child process that reads its own peak RSS
  (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the job, so the peak belongs to the job;
  ``ru_maxrss`` of the child itself elsewhere) and, on CUDA, ``torch.cuda.max_memory_allocated``. Not
  ``RUSAGE_CHILDREN`` in the parent: it is the maximum over *all* children so far, so a job lighter than an
  earlier one would be invisible. Not ``tracemalloc``: it only sees Python objects, not the torch tensor memory that
  calibration and D² collection spend. The children run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at
  :data:`CHILD_MMAP_THRESHOLD` (unless the caller's environment sets it): by default glibc raises that threshold
  after large blocks are freed, so later tensors come from the heap, which keeps freed space it cannot return, and
  the peak RSS of the same job then varied by a factor of three between runs; with a fixed threshold every block
  above it is mapped and unmapped on its own, so the peak follows the memory the job actually holds. A
  text-to-image model needs prompts: the calibration-set and D² jobs encode them with the model's recorded text
  encoder (:func:`~tdqrt.calibration.models.text.prompt_embeddings`, as
  ``tdqrt calibrate`` and ``tdqrt d2-stats`` do), inside the job; the methods read the set's stored embeddings.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import multiprocessing
import os
import platform
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

import numpy as np
import torch

from tdqrt.calibration.checkpoint import CARD_FILE
from tdqrt.calibration.models import PRESET_NAMES, model_from_preset
from tdqrt.calibration.models.sources import source_kind
from tdqrt.calibration.models.text import PromptSet, prompt_embeddings
from tdqrt.calibration.quant.api import CalibrateConfig, calibrate
from tdqrt.calibration.quant.calib_set import CalibSetConfig, collect_calibration_set
from tdqrt.calibration.quant.checkpoint import QUANT_CARD
from tdqrt.calibration.quant.config import QuantConfig
from tdqrt.calibration.quant.methods import METHODS, method_spec, options_from_dict
from tdqrt.calibration.resolve import open_model
from tdqrt.engines.artifacts import versions, write_json_atomic
from tdqrt.engines.bundle import Bundle, is_bundle_dir, open_bundle
from tdqrt.engines.config import check_choice, check_int, check_real, config_from_dict, invalid, is_int
from tdqrt.engines.denoiser import Denoiser
from tdqrt.engines.errors import ConfigError
from tdqrt.engines.ort import OrtDenoiser
from tdqrt.engines.threads import torch_threads
from tdqrt.runtime.corrections import CORRECTION_KINDS, GRANULARITIES
from tdqrt.runtime.runnable import RunnableModel
from tdqrt.runtime.sampling import SamplerConfig, guided_eps, sample
from tdqrt.runtime.schedules import NoiseSchedule, ScheduleConfig
from tdqrt.tools.d2 import D2StatsJob, collect_to_dir
from tdqrt.tools.plots import save_bars
from tdqrt.tools.quality import markdown_table
from tdqrt.tools.sample import SampleJob, correction_hook, shipped_d2_stats

BENCH_FORMAT = "tdqrt-bench"
BENCH_VERSION = 1
UNET_BACKENDS = ("torch-fp32", "torch-fp16", "torch-fakequant", "ort-fp", "ort-int8")
CALIBRATION_METHODS = tuple(METHODS)
CALIB_SET_JOB, D2_JOB = "calibration-set", "d2-stats"
CHILD_MMAP_THRESHOLD = 128 * 1024  # bytes: glibc's default starting value, kept fixed (module docstring, ``calibrate``)


# ---------------------------------------------------------------------------------------------- statistics


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median and spread of repeated measurements: ``n, median, q1, q3, iqr, min, max, mean``.

    Quartiles are numpy's default (linear interpolation between order statistics), so ``[1, 2, 3, 4]`` has
    q1 = 1.75, median 2.5, q3 = 3.25.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0 or not np.isfinite(v).all():
        raise ConfigError(f"summarize needs a non-empty list of finite numbers, got {list(values)[:8]}")
    q1, median, q3 = (float(q) for q in np.percentile(v, [25, 50, 75]))
    return {"n": int(v.size), "median": median, "q1": q1, "q3": q3, "iqr": q3 - q1, "min": float(v.min()),
            "max": float(v.max()), "mean": float(v.mean())}


def speedup(baseline: Sequence[float], variant: Sequence[float]) -> tuple[float, dict[str, float]]:
    """How much faster ``variant`` is than ``baseline`` from their times measured in the same rounds.

    Returns ``median(baseline) / median(variant)`` (> 1: the variant is faster) and the summary of the paired
    per-round ratios ``baseline[r] / variant[r]`` (its spread says how stable the ratio is under drifting load).
    """
    if len(baseline) != len(variant) or not len(baseline):
        raise ConfigError(f"speedup needs two equally long, non-empty series (same rounds), got {len(baseline)} "
                          f"and {len(variant)} values")
    if min(*baseline, *variant) <= 0:
        raise ConfigError("speedup needs positive times")
    ratio = summarize(baseline)["median"] / summarize(variant)["median"]
    return ratio, summarize([b / v for b, v in zip(baseline, variant)])


# ---------------------------------------------------------------------------------------------- timing


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """What to call before reading the clock: ``torch.cuda.synchronize`` on CUDA (kernels are asynchronous, a
    clock read right after a launch measures the launch, not the work), nothing on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def timed_call(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Seconds one call of ``fn`` takes, from an idle device to its last kernel's end."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


class SpanTimer:
    """Time spent inside the calls of wrapped functions during one measured run (reset between runs).

    CPU: ``perf_counter`` around each call. CUDA: a ``torch.cuda.Event`` pair recorded on the current stream around
    each call, read once by :meth:`seconds` after a synchronize, so the measured loop itself never waits for the
    device and runs as it would unmeasured; the span is the stream time from the call's first to its last kernel.
    """

    def __init__(self, device: str | torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self._cpu_seconds = 0.0
        self._events: list[tuple[Any, Any]] = []

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.calls += 1
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self._events.append((start, end))
                return out
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._cpu_seconds += time.perf_counter() - t0
            return out

        return timed

    def seconds(self) -> float:
        if self._events:
            torch.cuda.synchronize()
        return self._cpu_seconds + sum(s.elapsed_time(e) for s, e in self._events) / 1e3


def run_interleaved(variants: Sequence[Hashable], measure: Callable[[Any], Any], *, warmup: int,
                    repeats: int) -> dict[Any, list[Any]]:
    """``measure(v)`` for every variant: ``warmup`` discarded calls each, then ``repeats`` rounds of one call per
    variant in the given order. Returns the kept results per variant, in round order (``[v][r]`` pairs with
    ``[w][r]``)."""
    for _ in range(warmup):
        for v in variants:
            measure(v)
    results: dict[str, list[Any]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            results[v].append(measure(v))
    return results


# ---------------------------------------------------------------------------------------------- report


def machine_info(device: str) -> dict[str, Any]:
    """CPU model, logical cores (and those this process may use), the 1-minute load average as the run ends (the
    run adds about its thread count; more means other work shared the machine), platform, GPU name if CUDA."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    dev = torch.device(device)
    gpu = torch.cuda.get_device_name(dev if dev.type == "cuda" else 0) if torch.cuda.is_available() else None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "load_average_1m": load,
            "platform": platform.platform(), "gpu": gpu, "device": str(device)}


def _report(bench: str, cfg: Any, command: Optional[str], threads: int | list[int], method: dict,
            results: list[dict], skipped: list[dict]) -> dict[str, Any]:
    return {
        "format": BENCH_FORMAT,
        "version": BENCH_VERSION,
        "bench": bench,
        "command": command if command is not None else shlex.join(sys.argv),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(cfg.device),
        "versions": versions(),
        "threads": {"torch_intra_op": threads, "onnxruntime_intra_op": threads,
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "config": cfg.to_dict(),
        "method": {"order": "round robin: repeat r of every variant before repeat r+1 of any",
                   "clock": "time.perf_counter; CUDA: synchronize before reading it, torch.cuda.Event inside the loop",
                   **method},
        "results": results,
        "skipped": skipped,
    }


def _timing_row(samples: Sequence[float], baseline: Optional[Sequence[float]]) -> dict[str, Any]:
    """``seconds`` summary, the raw ``samples_s`` and the speedup against the baseline's samples of the same rounds."""
    row: dict[str, Any] = {"seconds": summarize(samples), "samples_s": [float(s) for s in samples]}
    ratio, spread = speedup(baseline, samples) if baseline is not None else (None, None)
    return row | {"speedup_vs_baseline": ratio, "speedup_spread": spread}


def save_report(report: dict, out: str | Path) -> Path:
    """Write the report as JSON (atomically) and a bar chart beside it (``<out>.png``); returns the JSON path."""
    out = Path(out)
    write_json_atomic(out, report)
    groups: dict[str, dict[str, float]] = {}
    if report["bench"] == "calibrate":
        groups = {"wall time": {r["variant"]: r["seconds"]["median"] for r in report["results"]}}
        ylabel, logy = "seconds (median)", True
    else:
        several = len({r.get("threads") for r in report["results"]}) > 1
        for r in report["results"]:
            group = f"batch {r['batch']}" + (f", {r['threads']} thr" if several else "")
            groups.setdefault(group, {})[r["variant"]] = r["images_per_s"]
        ylabel, logy = "images / s (median)", report["bench"] == "unet"
    if groups:
        save_bars(out.with_suffix(".png"), groups, ylabel=ylabel, title=f"tdqrt bench {report['bench']}", logy=logy)
    return out


def format_report(report: dict) -> list[str]:
    """The report as a short markdown table (plus skipped variants), for the terminal."""
    baseline = report["method"].get("baseline")
    ratio = f"speedup vs {baseline}"
    ms = lambda s: 1e3 * s
    pct = lambda s: "-" if s is None else f"{100 * s['median']:.2f}"
    fmt_ratio = lambda r: "-" if r["speedup_vs_baseline"] is None else f"{r['speedup_vs_baseline']:.3f}"
    results = report["results"]
    if report["bench"] == "unet":
        header = ["variant", "batch", "threads", "model batch", "median ms", "IQR ms", "min ms", "images/s", ratio]
        rows = [[r["variant"], r["batch"], r["threads"], r["model_batch"], ms(r["seconds"]["median"]),
                 ms(r["seconds"]["iqr"]), ms(r["seconds"]["min"]), r["images_per_s"], fmt_ratio(r)] for r in results]
    elif report["bench"] == "loop":
        header = ["variant", "batch", "steps", "median s", "IQR s", "images/s", "loop overhead %",
                  "D² update % of step", ratio]
        rows = [[r["variant"], r["batch"], r["steps"], r["seconds"]["median"], r["seconds"]["iqr"], r["images_per_s"],
                 pct(r["loop_overhead"]), pct(r["d2_update"]), fmt_ratio(r)] for r in results]
    else:
        header = ["job", "median s", "min s", "max s", "peak RSS MB", "RSS increase MB", ratio]
        rows = [[r["variant"], r["seconds"]["median"], r["seconds"]["min"], r["seconds"]["max"], r["peak_rss_mb"],
                 r["peak_increase_mb"], fmt_ratio(r)] for r in results]
    lines = [markdown_table(header, rows)]
    lines += [f"skipped {s['variant']}: {s['reason']}" for s in report["skipped"]]
    return lines


# ---------------------------------------------------------------------------------------------- config checks


def _check_common(cfg: Any, *, has_warmup: bool = True, thread_list: bool = False) -> None:
    """Warmup, repeats, device and threads (one count, or with ``thread_list`` one or more distinct counts, stored
    as a tuple)."""
    cls = type(cfg).__name__
    if has_warmup:
        check_int(f"{cls}.warmup", cfg.warmup, 0, flag="--warmup",
                  fix="give an integer >= 0 (untimed calls per variant)")
    check_int(f"{cls}.repeats", cfg.repeats, 1, flag="--repeats", fix="give an integer >= 1 (2 or more for a spread)")
    if thread_list and cfg.threads is not None:
        threads = (cfg.threads,) if is_int(cfg.threads) else cfg.threads
        object.__setattr__(cfg, "threads", _check_sizes("threads", threads, "--threads", "--threads 1 2"))
    else:
        check_int(f"{cls}.threads", cfg.threads, 1, optional=True, flag="--threads")
    dev = str(cfg.device)
    if dev != "cpu" and not dev.startswith("cuda"):
        raise invalid(f"{cls}.device", dev, "cpu or cuda[:N]", "pick one of those", flag="--device")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise invalid(f"{cls}.device", dev, "a device torch sees (torch.cuda.is_available() is False)",
                      "use --device cpu", flag="--device")


def _check_sizes(name: str, values: Sequence[int], flag: str, example: str) -> tuple[int, ...]:
    """A non-empty list of distinct integers >= 1 (batch sizes, thread counts), as a tuple."""
    if isinstance(values, (str, bytes)) or not len(values) or not all(is_int(b) and b >= 1 for b in values):
        raise invalid(name, values, "one or more integers >= 1", f"give values such as {example}", flag=flag)
    if len(set(values)) != len(values):
        raise invalid(name, list(values), "distinct values", "list each once", flag=flag)
    return tuple(values)


def _check_batches(batches: Sequence[int]) -> tuple[int, ...]:
    return _check_sizes("batches", batches, "--batch", "--batch 1 16 64")


def _check_fp_model(path: Optional[str]) -> None:
    """``--model`` must be an FP model: a tdqrt checkpoint or import directory, or a diffusers folder."""
    if path is not None and not Path(path, CARD_FILE).is_file() and source_kind(path) is None:
        raise ConfigError(f"--model {path} is not an FP checkpoint nor a diffusers model folder (no model.json, "
                          "model_index.json or config.json there); pass a `tdqrt train` or `tdqrt import` directory, "
                          "or a diffusers pipeline or UNet2DModel folder")


def _check_dir(path: Optional[str], what: str, flag: str, marker: str) -> None:
    if path is not None and not Path(path, marker).is_file():
        raise ConfigError(f"{flag} {path} is not {what} (no {marker} there); pass the directory the matching "
                          "tdqrt command wrote")


# ---------------------------------------------------------------------------------------------- bench unet


@dataclass(frozen=True)
class UnetBenchConfig:
    """UNet step latency per backend and batch size.

    Sources: ``model`` (FP checkpoint dir) or ``preset`` (random weights of a named architecture with
    ``image_size``/``in_channels``/``num_classes``; e.g. ``ddpm-cifar10-32`` for CIFAR-size speed, no download),
    ``quant`` (quantized checkpoint dir), ``bundles`` (dirs written by ``tdqrt export``, any flavour).
    ``backends`` None measures every backend the sources allow; a list measures exactly those (each must have its
    source). ``baseline`` names the variant the speedups are relative to (default ``torch-fp32`` when measured,
    else the first variant). ``threads``: one or more thread counts (None: torch's current count), each variant is
    measured at every count in the same rounds and compared with the baseline at the same count. A text-conditioned
    model (any source with ``cond_shape``) is fed seeded random embeddings; ``guidance`` > 1 needs a class- or
    text-conditioned model.
    """

    model: Optional[str] = None
    preset: Optional[str] = None
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 0
    quant: Optional[str] = None
    bundles: tuple[str, ...] = ()
    backends: Optional[tuple[str, ...]] = None
    batches: tuple[int, ...] = (1, 16, 64)
    guidance: float = 1.0
    warmup: int = 3
    repeats: int = 10
    device: str = "cpu"
    threads: Optional[tuple[int, ...]] = None
    baseline: Optional[str] = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_common(self, thread_list=True)
        object.__setattr__(self, "batches", _check_batches(self.batches))
        object.__setattr__(self, "guidance", check_real("UnetBenchConfig.guidance", self.guidance, 0.0,
                                                        flag="--guidance", fix="give a number >= 0 (1 = no CFG)"))
        object.__setattr__(self, "bundles", tuple(str(b) for b in self.bundles))
        if self.model is not None and self.preset is not None:
            raise ConfigError("give either --model (a trained checkpoint) or --preset (random weights), not both")
        if self.preset is not None and self.preset not in PRESET_NAMES:
            check_choice("UnetBenchConfig.preset", self.preset, list(PRESET_NAMES), flag="--preset")
        _check_fp_model(self.model)
        _check_dir(self.quant, "a quantized checkpoint", "--quant", QUANT_CARD)
        for b in self.bundles:
            if not is_bundle_dir(b):
                raise ConfigError(f"--bundle {b} is not a bundle (no manifest.json there); pass the --out folder of "
                                  "`tdqrt export`")
        if self.backends is not None:
            object.__setattr__(self, "backends", tuple(self.backends))
            unknown = [b for b in self.backends if b not in UNET_BACKENDS]
            if unknown or not self.backends:
                raise invalid("UnetBenchConfig.backends", list(self.backends),
                              f"one or more of {', '.join(UNET_BACKENDS)}", f"drop the unknown backend(s) {unknown}",
                              flag="--backends")
            needs = {"torch-fp32": (self.model or self.preset, "--model or --preset"),
                     "torch-fp16": (self.model or self.preset, "--model or --preset"),
                     "torch-fakequant": (self.quant, "--quant"), "ort-fp": (self.bundles, "--bundle"),
                     "ort-int8": (self.bundles, "--bundle")}
            for b in self.backends:
                if not needs[b][0]:
                    raise ConfigError(f"backend {b} needs {needs[b][1]}")
        if not (self.model or self.preset or self.quant or self.bundles):
            raise ConfigError("nothing to measure: give --model, --preset, --quant and/or --bundle")
        check_int(f"{type(self).__name__}.seed", self.seed, 0, flag="--seed")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UnetBenchConfig":
        return config_from_dict(cls, d)

    def wants(self, backend: str) -> bool:
        return self.backends is None or backend in self.backends


@dataclass
class _Variant:
    name: str
    backend: str
    dtype: str
    source: str
    denoiser: Denoiser
    signature: tuple  # (in_channels, image_size, num_classes, null_label, cond_shape) of the network behind it
    details: dict = field(default_factory=dict)
    threads: int = 1  # intra-op threads it runs with (torch: set before each call; ORT: its session's)


def _bundle_label(bundle: Bundle, taken: set[str]) -> str:
    """A bundle's export target (``trt``, ``ort-cpu``, ...), with its dtype when not fp32 and a number when two
    bundles would otherwise share a label."""
    export = bundle.manifest.get("export", {})
    label = str(export.get("target", "unknown"))
    if export.get("dtype", "fp32") != "fp32":
        label += f"-{export['dtype']}"
    unique, k = label, 2
    while unique in taken:
        unique, k = f"{label}#{k}", k + 1
    taken.add(unique)
    return unique


def _signature(net: Any) -> tuple:
    """What a step's inputs depend on: ``(in_channels, image_size, num_classes, null_label, cond_shape)``;
    ``cond_shape`` is ``(L, D)`` of a text-conditioned UNet (torch model, quantized model or ONNX Runtime session
    alike), else None."""
    cond = getattr(net, "cond_shape", None)
    return (*(getattr(net, a) for a in ("in_channels", "image_size", "num_classes", "null_label")),
            None if cond is None else tuple(int(d) for d in cond))


def _half_denoiser(model: torch.nn.Module) -> Denoiser:
    """``eps = f(x, t, y)`` of an FP16 copy of ``model``: half weights and inputs (text embeddings too; labels stay
    integers), float32 out."""
    half = copy.deepcopy(model).half()
    return lambda x, t, y=None: half(x.half(), t, y.half() if y is not None and y.is_floating_point() else y).float()


def _unet_variants(cfg: UnetBenchConfig, counts: Sequence[int]) -> tuple[list[_Variant], list[dict], int]:
    """The variants the config asks for (loaded), one per thread count in ``counts`` (ordered by count), the
    skipped ones with reasons, and the number of training timesteps (the bench feeds t = T // 2)."""
    variants, skipped, horizons = [], [], []
    dev = torch.device(cfg.device)
    if cfg.model or cfg.preset:
        if cfg.model:
            ckpt = open_model(cfg.model, device=cfg.device)
            model, source, horizon = ckpt.model, cfg.model, ckpt.schedule.num_train_timesteps
        else:
            model = model_from_preset(cfg.preset, image_size=cfg.image_size, in_channels=cfg.in_channels,
                                      num_classes=cfg.num_classes).to(dev).eval()
            source, horizon = f"preset {cfg.preset} (random weights)", ScheduleConfig().num_train_timesteps
        horizons.append(horizon)
        if cfg.wants("torch-fp32"):
            variants.append(_Variant("torch-fp32", "torch", "fp32", source, model, _signature(model),
                                     {"device": str(dev)}))
        if cfg.wants("torch-fp16"):
            if dev.type == "cuda":
                variants.append(_Variant("torch-fp16", "torch", "fp16", source, _half_denoiser(model),
                                         _signature(model), {"device": str(dev)}))
            else:
                skipped.append({"variant": "torch-fp16", "reason": f"FP16 torch needs a CUDA device (--device cuda); "
                                                                   f"this run is on {dev}"})
    if cfg.quant and cfg.wants("torch-fakequant"):
        ckpt = open_model(cfg.quant, device=cfg.device)
        q = ckpt.card["quant"]
        variants.append(_Variant("torch-fakequant", "torch", f"fake-quant W{q['wbits']}A{q['abits']}", cfg.quant,
                                 ckpt.model, _signature(ckpt.model), {"device": str(dev), "method": q["method"]}))
        horizons.append(ckpt.schedule.num_train_timesteps)
    labels: set[str] = set()
    fp_graphs: set[str] = set()
    for path in cfg.bundles:
        bundle = open_bundle(path)
        label = _bundle_label(bundle, labels)
        horizons.append(int(bundle.schedule["num_train_timesteps"]))
        dtype = bundle.manifest.get("export", {}).get("dtype", "fp32")
        roles = [("ort-fp", "unet_fp", dtype), ("ort-int8", "unet", "int8")]
        for backend, role, kind in roles:
            if not cfg.wants(backend):
                continue
            if bundle.onnx_path(role) is None:
                skipped.append({"variant": f"{backend}[{label}]", "reason": f"bundle {path} has no {role} graph"})
                continue
            digest = bundle.files[bundle.onnx_path(role).name]["sha256"]
            if role == "unet_fp" and digest in fp_graphs:
                skipped.append({"variant": f"{backend}[{label}]",
                                "reason": "the same FP graph as an earlier bundle's (sha256 equal); measured once"})
                continue
            fp_graphs.add(digest)
            for n in counts:
                den = OrtDenoiser(bundle, role=role, threads=n)
                variants.append(_Variant(f"{backend}[{label}]", "onnxruntime", kind, str(path), den, _signature(den),
                                         {"providers": den.providers, "target": label, "graph": role}, n))
    _check_same_signature(variants)
    # per count, in the order above: the torch variants (one model, its thread count set per call), the sessions
    variants = [dataclasses.replace(v, threads=n) if v.backend == "torch" else v
                for n in counts for v in variants if v.backend == "torch" or v.threads == n]
    return variants, skipped, min(horizons)


def _check_same_signature(variants: list[_Variant]) -> None:
    """All variants must take the same inputs, or their timings would not be comparable."""
    shapes = {v.name: v.signature for v in variants}
    if len(set(shapes.values())) > 1:
        raise ConfigError(f"the sources describe different networks (in_channels, image_size, num_classes, null "
                          f"label, text conditioning shape): {shapes}; benchmark one architecture per run")


def bench_unet(cfg: UnetBenchConfig, *, command: Optional[str] = None, progress: bool = False) -> dict[str, Any]:
    """Time one UNet step of every variant at every batch size and thread count (round robin over variants and
    thread counts); returns the report dict."""
    with torch_threads(cfg.threads[0] if cfg.threads else None) as current:
        counts = cfg.threads or (current,)
        variants, skipped, horizon = _unet_variants(cfg, counts)
        if not variants:
            raise ConfigError(f"no variant left to measure (skipped: {[s['variant'] for s in skipped]}); add a source "
                              "or choose other --backends")
        names = list(dict.fromkeys(v.name for v in variants))
        baseline = cfg.baseline or ("torch-fp32" if "torch-fp32" in names else names[0])
        if baseline not in names:
            raise ConfigError(f"baseline {baseline!r} is not among the measured variants {names}")
        channels, size, classes, null, cond_shape = variants[0].signature
        if cfg.guidance != 1.0 and not classes and cond_shape is None:
            raise ConfigError(f"guidance {cfg.guidance} needs a class- or text-conditioned model; this one is "
                              "unconditional (use --guidance 1)")
        sync = synchronizer(cfg.device)
        by_key = {(v.name, v.threads): v for v in variants}
        results = []
        for batch in cfg.batches:
            gen = torch.Generator().manual_seed(cfg.seed)
            x = torch.randn(batch, channels, size, size, generator=gen).to(cfg.device)
            t = torch.full((batch,), horizon // 2, dtype=torch.long, device=cfg.device)
            y = (torch.arange(batch) % classes).to(cfg.device) if classes else None
            if cond_shape is not None:  # text: random embeddings and unconditional embedding (values do not matter)
                y = torch.randn(batch, *cond_shape, generator=gen).to(cfg.device)
                null = torch.randn(*cond_shape, generator=gen).to(cfg.device)

            def step(key: tuple[str, int]) -> float:
                torch.set_num_threads(key[1])  # ONNX Runtime sessions have their own count; torch's is per call
                return timed_call(lambda: guided_eps(by_key[key].denoiser, x, t, y, null, cfg.guidance), sync)

            if progress:
                print(f"bench unet: batch {batch}, {len(names)} variants x {len(counts)} thread counts x "
                      f"{cfg.repeats} repeats", file=sys.stderr)
            with torch.inference_mode():
                times = run_interleaved(list(by_key), step, warmup=cfg.warmup, repeats=cfg.repeats)
            model_batch = batch * (2 if cfg.guidance != 1.0 else 1)
            for v in variants:
                row = _timing_row(times[(v.name, v.threads)], times[(baseline, v.threads)])
                results.append({"variant": v.name, "backend": v.backend, "dtype": v.dtype, "source": v.source,
                                "batch": batch, "threads": v.threads, "model_batch": model_batch, **v.details, **row,
                                "images_per_s": batch / row["seconds"]["median"]})
    method = {"warmup": cfg.warmup, "repeats": cfg.repeats, "baseline": baseline,
              "step": "one guided_eps call (CFG-batched 2B when guidance > 1) at t = T // 2 on fixed random inputs",
              "timestep": horizon // 2,
              "conditioning": ("text: seeded random embeddings [B, L, D] (and a seeded random unconditional "
                               f"embedding [L, D] under CFG), L, D = {list(cond_shape)}, the same for every "
                               "variant; no text encoder runs (a step's cost does not depend on their values)"
                               if cond_shape is not None else "class labels y = i mod classes" if classes
                               else "none (unconditional)"),
              "threads": "every variant at every thread count in the same rounds; speedups against the baseline at "
                         "the same batch and thread count"}
    return _report("unet", cfg, command, list(counts), method, results, skipped)


# ---------------------------------------------------------------------------------------------- bench loop


@dataclass(frozen=True)
class LoopBenchConfig:
    """Whole sampling runs of ``model`` (FP or quantized checkpoint dir, or a bundle run by ONNX Runtime) at each
    batch size, with the D² correction off and, unless ``d2 == "off"``, on (kind ``d2``, ``d2_granularity``).

    ``d2_stats`` is a directory written by ``tdqrt d2-stats`` for this model and these sampler settings; a bundle
    that ships its statistics needs none. ``d2_force`` uses statistics made for other settings (timings do not
    depend on the coefficients' values).
    """

    model: str
    batches: tuple[int, ...] = (64,)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    d2: str = "d"
    d2_granularity: str = "channel"
    d2_stats: Optional[str] = None
    d2_force: bool = False
    warmup: int = 1
    repeats: int = 5
    device: str = "cpu"
    threads: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_common(self)
        object.__setattr__(self, "batches", _check_batches(self.batches))
        if isinstance(self.sampler, Mapping):
            object.__setattr__(self, "sampler", SamplerConfig.from_dict(self.sampler))
        if not Path(self.model).is_dir():
            raise ConfigError(f"--model {self.model} is not a directory; pass a checkpoint or a bundle directory")
        check_choice("LoopBenchConfig.d2", self.d2, CORRECTION_KINDS, flag="--d2")
        check_choice("LoopBenchConfig.d2_granularity", self.d2_granularity, GRANULARITIES, flag="--d2-granularity")
        if self.d2 != "off" and self.d2_stats is None and not is_bundle_dir(self.model):
            raise ConfigError(f"--d2 {self.d2} needs --d2-stats DIR (written by `tdqrt d2-stats` for this model), "
                              "a bundle that ships D² statistics, or --d2 off")
        check_int(f"{type(self).__name__}.seed", self.seed, 0, flag="--seed")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"sampler": self.sampler.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoopBenchConfig":
        return config_from_dict(cls, d)


def _d2_stats_dir(cfg: LoopBenchConfig, model: RunnableModel) -> Optional[str]:
    """Where the D² statistics come from: ``d2_stats``, else the bundle's own (refused when it ships none)."""
    if cfg.d2 == "off" or cfg.d2_stats is not None:
        return cfg.d2_stats
    return shipped_d2_stats(model)


def bench_loop(cfg: LoopBenchConfig, *, command: Optional[str] = None, progress: bool = False) -> dict[str, Any]:
    """Time whole sampling runs with D² off and on (round robin); per run also the Σ UNet and Σ D² hook time."""
    with torch_threads(cfg.threads) as threads:
        ckpt = open_model(cfg.model, device=cfg.device, threads=threads)
        model = ckpt.model
        schedule = NoiseSchedule(ckpt.schedule)
        stats = _d2_stats_dir(cfg, ckpt)
        shape = (model.in_channels, model.image_size, model.image_size)
        unet_timer, hook_timer = SpanTimer(cfg.device), SpanTimer(cfg.device)
        denoiser = unet_timer.wrap(model)
        clock = synchronizer(cfg.device)
        variants = ["d2-off"] + ([f"d2-{cfg.d2}"] if cfg.d2 != "off" else [])
        results = []
        for batch in cfg.batches:
            job = SampleJob(num=batch, batch=batch, seed=cfg.seed, device=cfg.device, sampler=cfg.sampler, d2=cfg.d2,
                            d2_granularity=cfg.d2_granularity, d2_stats=stats, d2_force=cfg.d2_force)
            hook = correction_hook(job, schedule, ckpt.sha256)
            hooks = {"d2-off": None, variants[-1]: None if hook is None else hook_timer.wrap(hook)}
            idx = torch.arange(batch)
            y = (idx % model.num_classes).to(cfg.device) if model.num_classes else None

            def run(name: str) -> dict[str, float]:
                unet_timer.reset()
                hook_timer.reset()
                seconds = timed_call(lambda: sample(denoiser, schedule, cfg.sampler, sample_indices=idx, seed=cfg.seed,
                                                    shape=shape, y=y, null_label=model.null_label, hook=hooks[name],
                                                    device=cfg.device), clock)
                return {"loop": seconds, "unet": unet_timer.seconds(), "hook": hook_timer.seconds(),
                        "calls": unet_timer.calls}

            if progress:
                print(f"bench loop: batch {batch}, {variants} x {cfg.repeats} repeats", file=sys.stderr)
            runs = run_interleaved(variants, run, warmup=cfg.warmup, repeats=cfg.repeats)
            base = [r["loop"] for r in runs["d2-off"]]
            for name in variants:
                loops = [r["loop"] for r in runs[name]]
                row = _timing_row(loops, base)
                results.append({
                    "variant": name, "d2": name.removeprefix("d2-"), "batch": batch, "steps": cfg.sampler.steps,
                    "model_batch": batch * (2 if cfg.sampler.guidance_scale != 1.0 else 1), **row,
                    "images_per_s": batch / row["seconds"]["median"],
                    "unet_calls_per_loop": runs[name][0]["calls"],
                    "unet_s": summarize([r["unet"] for r in runs[name]]),
                    "loop_overhead": summarize([(r["loop"] - r["unet"]) / r["loop"] for r in runs[name]]),
                    "d2_update": (summarize([r["hook"] / r["loop"] for r in runs[name]]) if name != "d2-off"
                                  else None),
                })
    method = {"warmup": cfg.warmup, "repeats": cfg.repeats, "baseline": "d2-off",
              "loop_overhead": "(loop time - sum of UNet call times) / loop time, per run",
              "d2_update": "sum of D² hook call times / loop time, per run (= its share of a step)",
              "d2_stats": stats}
    return _report("loop", cfg, command, threads, method, results, [])


# ---------------------------------------------------------------------------------------------- bench calibrate


@dataclass(frozen=True)
class CalibrateBenchConfig:
    """Wall time and peak memory of calibrating the FP checkpoint ``model`` with each of ``methods``.

    ``options`` maps a method to option overrides (e.g. ``{"brecq": {"iters_w": 50}}``, validated by the method's
    options class). The calibration set is collected once (measured as its own job) unless ``calib`` names one
    to reuse. ``d2`` (a :class:`~tdqrt.tools.d2.D2StatsJob`; None skips it) measures the D² statistics collection
    against the first method's quantized model. Outputs go to ``work_dir`` (None: a temporary directory, removed).
    ``prompts`` (a :class:`~tdqrt.calibration.models.text.PromptSet` as its ``to_dict()``) are required for a
    text-to-image model and refused for others, as ``tdqrt calibrate`` does.
    """

    model: str
    methods: tuple[str, ...] = CALIBRATION_METHODS
    wbits: int = 8
    abits: int = 8
    options: dict = field(default_factory=dict)
    calib: Optional[str] = None
    calib_set: CalibSetConfig = field(default_factory=CalibSetConfig)
    d2: Optional[D2StatsJob] = field(default_factory=lambda: D2StatsJob(num=64))
    repeats: int = 1
    device: str = "cpu"
    threads: Optional[int] = None
    work_dir: Optional[str] = None
    prompts: Optional[dict] = None

    def __post_init__(self) -> None:
        _check_common(self, has_warmup=False)
        _check_fp_model(self.model)
        if isinstance(self.prompts, PromptSet):
            object.__setattr__(self, "prompts", self.prompts.to_dict())
        elif self.prompts is not None:
            if not isinstance(self.prompts, Mapping) or "prompts" not in self.prompts:
                raise invalid("CalibrateBenchConfig.prompts", self.prompts, "a prompt set ({'prompts': [...], "
                              "'negative': ...}) or None", "give --prompt TEXT or --prompts FILE", flag="--prompt")
            object.__setattr__(self, "prompts", PromptSet.from_dict(self.prompts).to_dict())
        if isinstance(self.calib_set, Mapping):
            object.__setattr__(self, "calib_set", config_from_dict(CalibSetConfig, self.calib_set))
        if isinstance(self.d2, Mapping):
            d2 = dict(self.d2)
            d2["sampler"] = SamplerConfig.from_dict(d2.get("sampler", {}))
            object.__setattr__(self, "d2", config_from_dict(D2StatsJob, d2))
        methods = self.methods
        if isinstance(methods, str) or not methods or len(set(methods)) != len(methods):
            raise invalid("CalibrateBenchConfig.methods", methods, "a non-empty list of distinct method names "
                          f"(from {', '.join(CALIBRATION_METHODS)})", "list each method once", flag="--methods")
        object.__setattr__(self, "methods", tuple(methods))
        for m in self.methods:
            QuantConfig(method=m, wbits=self.wbits, abits=self.abits)  # names the bad method or bit width
        if not isinstance(self.options, Mapping):
            raise invalid("CalibrateBenchConfig.options", self.options, "a mapping from a method to its option "
                          "overrides", "give --option METHOD:KEY=VALUE", flag="--option")
        for m, opts in self.options.items():
            if m not in self.methods:
                raise ConfigError(f"options given for {m!r}, which is not among the methods {list(self.methods)}")
            options_from_dict(method_spec(m).options_cls, opts)
        if self.calib is not None and not Path(self.calib).is_dir():
            raise ConfigError(f"--calib {self.calib} is not a directory; pass a calibration set directory")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"calib_set": self.calib_set.to_dict()}

    def prompt_set(self) -> Optional[PromptSet]:
        return None if self.prompts is None else PromptSet.from_dict(self.prompts)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CalibrateBenchConfig":
        return config_from_dict(cls, d)


def _status_kb(key: str) -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process to its current RSS; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def _peak_rss_mb(resettable: bool) -> float:
    if resettable:
        return _status_kb("VmHWM") / 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _measure_in_child(fn: Callable, args: tuple, kwargs: dict, threads: Optional[int], device: str) -> dict:
    """Run ``fn(*args, **kwargs)`` in this (fresh) process and return its wall time and memory peaks."""
    if threads is not None:
        torch.set_num_threads(threads)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    resettable = _reset_peak_rss()
    before = _status_kb("VmRSS")
    before_mb = before / 1024 if before is not None else None
    start = time.perf_counter()
    fn(*args, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _peak_rss_mb(resettable)
    return {"seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": before_mb,
            "peak_increase_mb": None if before_mb is None else peak - before_mb,
            "peak_scope": "job (VmHWM reset before it)" if resettable else "child process lifetime (ru_maxrss)",
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def _child_environment() -> dict[str, str]:
    """The environment of a measuring child: this one's, with :data:`CHILD_MMAP_THRESHOLD` unless it sets its own."""
    return {"MALLOC_MMAP_THRESHOLD_": str(CHILD_MMAP_THRESHOLD)} | dict(os.environ)


def _run_child(fn: Callable, *args: Any, threads: Optional[int], device: str, **kwargs: Any) -> dict:
    """:func:`_measure_in_child` in a fresh ``spawn`` process (nothing inherited from this one's memory), started
    with :func:`_child_environment` (glibc reads its malloc settings once, at process start)."""
    saved = dict(os.environ)
    os.environ.update(_child_environment())
    try:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        future = pool.submit(_measure_in_child, fn, args, kwargs, threads, device)  # starts the child now
    finally:
        os.environ.clear()
        os.environ.update(saved)
    with pool:
        return future.result()


def _collect_calib_set(model_dir: str, out_dir: str, cfg: CalibSetConfig, device: str,
                       prompts: Optional[PromptSet]) -> None:
    """The calibration set as ``tdqrt calibrate`` collects it: a text model's prompts encoded by its recorded text
    encoder first (part of the job)."""
    fp = open_model(model_dir, device=device, decoder=False)
    embeddings, uncond = prompt_embeddings(fp.model, fp.card, prompts, device=device)
    collect_calibration_set(fp.model, NoiseSchedule(fp.schedule), cfg, out_dir, embeddings=embeddings, uncond=uncond,
                            device=device, progress=False)


def _check_prompts(model_dir: str, prompts: Optional[PromptSet]) -> None:
    """Refuse prompts for a model without text conditioning, or a text model without prompts, before any job runs,
    with :func:`~tdqrt.calibration.models.text.prompt_embeddings`' own one-line errors (it refuses before it
    encodes). Opens the model in this process; the jobs' children are fresh processes, so their memory is unaffected."""
    model = open_model(model_dir, decoder=False)
    if (getattr(model.model, "cond_shape", None) is not None) != (prompts is not None):
        prompt_embeddings(model.model, model.card, prompts)


def bench_calibrate(cfg: CalibrateBenchConfig, *, command: Optional[str] = None,
                    progress: bool = False) -> dict[str, Any]:
    """Time (and measure the peak memory of) the calibration set, every method and the D² collection, each job in
    its own child process, methods round robin over ``repeats``; returns the report dict."""
    prompts = cfg.prompt_set()
    _check_prompts(cfg.model, prompts)
    with tempfile.TemporaryDirectory(prefix="tdqrt-bench-") as tmp, torch_threads(cfg.threads) as threads:
        work = Path(cfg.work_dir) if cfg.work_dir is not None else Path(tmp)
        child = dict(threads=threads, device=cfg.device)
        measured: dict[str, list[dict]] = {}
        calib = cfg.calib
        if calib is None:
            calib = str(work / "calib")
            if progress:
                print("bench calibrate: calibration set", file=sys.stderr)
            measured[CALIB_SET_JOB] = [_run_child(_collect_calib_set, cfg.model, calib, cfg.calib_set, cfg.device,
                                                  prompts, **child)]
        rounds = {m: 0 for m in cfg.methods}

        def calibrate_once(method: str) -> dict:
            rounds[method] += 1
            if progress:
                print(f"bench calibrate: {method} (repeat {rounds[method]}/{cfg.repeats})", file=sys.stderr)
            conf = CalibrateConfig(quant=QuantConfig(method=method, wbits=cfg.wbits, abits=cfg.abits),
                                   calib_set=cfg.calib_set, options=dict(cfg.options.get(method, {})),
                                   device=cfg.device)
            # A fresh directory per repeat: BRECQ resumes from its work dir and would otherwise skip the work.
            out = work / method / f"r{rounds[method]}"
            return _run_child(calibrate, cfg.model, out, conf, calib_dir=calib, progress=False, **child) | {
                "out": str(out)}

        measured |= run_interleaved(cfg.methods, calibrate_once, warmup=0, repeats=cfg.repeats)
        if cfg.d2 is not None:
            quant_dir = measured[cfg.methods[0]][0]["out"]
            if progress:
                print(f"bench calibrate: D² statistics of {quant_dir}", file=sys.stderr)
            measured[D2_JOB] = [_run_child(collect_to_dir, cfg.model, quant_dir, str(work / "d2"), cfg.d2,
                                           prompts=prompts, progress=False, **child)]
    baseline = cfg.methods[0]
    base = [m["seconds"] for m in measured[baseline]]
    results = []
    for job, runs in measured.items():
        row = _timing_row([r["seconds"] for r in runs], base if job in cfg.methods else None)
        peaks = [r["peak_rss_mb"] for r in runs]
        increases = [r["peak_increase_mb"] for r in runs if r["peak_increase_mb"] is not None]
        cuda = [r["cuda_peak_mb"] for r in runs if r["cuda_peak_mb"] is not None]
        results.append({"variant": job, "kind": "method" if job in cfg.methods else job, **row,
                        "peak_rss_mb": max(peaks), "rss_before_mb": runs[0]["rss_before_mb"],
                        "peak_increase_mb": max(increases) if increases else None,
                        "cuda_peak_mb": max(cuda) if cuda else None, "peak_scope": runs[0]["peak_scope"]})
    method = {"warmup": 0, "repeats": cfg.repeats, "baseline": baseline,
              "memory": "each job in a fresh spawn child; peak RSS read by the child itself (VmHWM reset before the "
                        "job, else ru_maxrss); rss_before_mb = the child's RSS before the job (interpreter + torch)",
              "malloc_mmap_threshold": _child_environment()["MALLOC_MMAP_THRESHOLD_"],
              "calibration_set": cfg.calib or "collected once (job calibration-set), shared by every method",
              "prompts": None if prompts is None else prompts.record() | {
                  "encoded": "by the model's recorded text encoder inside the calibration-set and d2-stats jobs"}}
    return _report("calibrate", cfg, command, threads, method, results, [])

"""Running one job over the processes ``torchrun`` starts: joining the process group, each rank's device, and
collective steps that fail on every rank when one rank fails.

Library code asks :meth:`Ranks.current` where it stands; with no process group it is the single process (rank 0
of 1) and every collective is a plain local call, so one code path serves both. A rank that raises inside
:meth:`Ranks.collective` still takes part in the exchange of outcomes, so its peers raise too instead of waiting
in the next collective until the backend's timeout.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist

from tdqrt.engines.errors import ConfigError, TdqrtError

T = TypeVar("T")

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """This process's rank in a world of ``world`` processes (the default process group, if any)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def gather(self, obj: Any) -> list:
        """``obj`` of every rank, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def collective(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` here, then wait for every rank; if any rank failed, raise on all of them.

        The failing rank re-raises its own exception; the others raise a ``TdqrtError`` naming the rank and its
        message. Also a barrier: no rank returns before every rank has finished ``fn``.
        """
        error: Optional[Exception] = None
        result = None
        try:
            result = fn()
        except Exception as exc:  # shared with the peers below, then re-raised
            error = exc
        outcomes = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(rank, msg) for rank, msg in enumerate(outcomes) if msg is not None]
        if failed:
            rank, msg = failed[0]
            raise TdqrtError(f"rank {rank} of {self.world} failed, so this rank stops too: {msg}")
        return result


def _rank_device(device: Optional[str], local_rank: int) -> str:
    """Each rank's own device: ``cuda:LOCAL_RANK`` when CUDA is there (or asked for), else the CPU."""
    if device not in (None, "cpu", "cuda"):
        raise ConfigError(f"--device {device} cannot be used with --distributed: every rank picks its own device "
                          "(cuda:LOCAL_RANK, or cpu); pass --device cuda, --device cpu or leave it out")
    if device == "cpu" or (device is None and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
        raise ConfigError(f"rank with LOCAL_RANK={local_rank} needs cuda:{local_rank}, but "
                          f"{torch.cuda.device_count()} CUDA device(s) are visible; start at most that many "
                          "processes per node, or pass --device cpu")
    return f"cuda:{local_rank}"


@contextlib.contextmanager
def process_group(distributed: bool, device: Optional[str]) -> Iterator[str]:
    """Yield this process's device, inside the torchrun process group when ``distributed``.

    Distributed: reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (set by torchrun), joins with the
    nccl backend on CUDA and gloo on the CPU, and leaves the group on exit. Not distributed: refuses to run under
    a multi-process torchrun (every rank would draw every sample) and yields ``device`` (default cpu).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not distributed:
        if world > 1:
            raise ConfigError(f"launched as one of WORLD_SIZE={world} processes without --distributed, so every "
                              "process would draw every sample; add --distributed")
        yield device or "cpu"
        return
    missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ConfigError(f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing); run "
                          "`torchrun --nproc-per-node N -m tdqrt.tools sample --distributed ...`")
    rank_device = _rank_device(device, int(os.environ["LOCAL_RANK"]))
    if rank_device.startswith("cuda"):
        torch.cuda.set_device(rank_device)
    dist.init_process_group("nccl" if rank_device.startswith("cuda") else "gloo")
    try:
        yield rank_device
    finally:
        dist.destroy_process_group()

"""CPU thread counts for the length of a block: torch's intra-op pool and numpy's BLAS pool, restored after.

One context manager for every stage that takes ``--threads`` (training the extractor, evaluation, benchmarks,
the demo). On a CPU shared with other jobs, one thread is often many times faster than an oversubscribed pool.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from tdqrt.engines.config import check_int


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[int]:
    """Run the block with ``threads`` torch intra-op threads and as many BLAS threads for numpy (``None``: leave
    both alone), then restore them; yields the torch thread count in effect (what ONNX Runtime sessions get)."""
    check_int("threads", threads, 1, optional=True, flag="--threads")
    if threads is None:
        yield torch.get_num_threads()
        return
    try:  # a scikit-learn dependency (threadpoolctl); without it only torch's pool is limited
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        threadpool_limits = None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if threadpool_limits is None:
            yield torch.get_num_threads()
        else:
            with threadpool_limits(limits=threads):
                yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)

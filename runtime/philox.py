"""Philox4x32-10 counter-based random numbers in plain torch integer ops: the same bits on every device.

Why hand-written: torch's generators are stateful and device-specific (mt19937 on the CPU, a Philox with its own
offset bookkeeping on CUDA), so a sample drawn on the GPU differs from the same sample drawn on the CPU, and
batch-independent streams need one generator — one kernel launch — per sample and draw. A counter-based generator
is a pure function ``bits = philox(counter, key)``: every (sample, draw, element) gets its own counter, all of a
batch's draws are one vectorised evaluation, and the integer math is exact on any device. No installed library
offers this for torch tensors (numpy's ``Philox`` is 4x64, CPU only, and stateful).

The algorithm is Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3" (SC'11), Philox-4x32 with 10
rounds; the known-answer vectors of the Random123 distribution are in tests/test_philox.py. The 32x32→64-bit
products are formed from 16-bit halves of the multiplier so that every intermediate stays below 2^49 in int64
(no reliance on signed overflow).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

ROUNDS = 10
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)  # M0, M1 (SC'11 table 2)
_WEYL = (0x9E3779B9, 0xBB67AE85)  # key increments: golden ratio, sqrt(3) - 1
_MASK16, _MASK32 = 0xFFFF, 0xFFFFFFFF


def philox4x32(counter: Tensor, key: Tensor, rounds: int = ROUNDS) -> Tensor:
    """Philox-4x32 of ``counter`` (int64 ``[..., 4]``, words in [0, 2^32)) under ``key`` (int64 ``[..., 2]``,
    broadcastable to the counter's batch shape); returns int64 ``[..., 4]`` with words in [0, 2^32)."""
    if counter.dtype != torch.int64 or key.dtype != torch.int64:
        raise TypeError("philox4x32 takes int64 counters and keys holding 32-bit words")
    m_hi = _lanes(*(m >> 16 for m in _MULTIPLIERS), device=counter.device)
    m_lo = _lanes(*(m & _MASK16 for m in _MULTIPLIERS), device=counter.device)
    weyl = _lanes(*_WEYL, device=counter.device)
    even, odd = counter[..., 0::2], counter[..., 1::2]  # (c0, c2), (c1, c3)
    for _ in range(rounds):
        p_hi, p_lo = even * m_hi, even * m_lo  # both < 2^48
        mid = p_hi + (p_lo >> 16)  # (c·M) >> 16
        hi = mid >> 16  # (c·M) >> 32
        lo = ((mid & _MASK16) << 16) | (p_lo & _MASK16)  # (c·M) mod 2^32
        # (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
        even, odd = hi.flip(-1) ^ odd ^ key, lo.flip(-1)
        key = (key + weyl) & _MASK32
    return torch.stack((even[..., 0], odd[..., 0], even[..., 1], odd[..., 1]), dim=-1)


def _lanes(first: int, second: int, device: torch.device) -> Tensor:
    """int64 ``[first, second]`` made on ``device`` by a kernel, not copied from the host (a host copy would
    synchronise a CUDA stream)."""
    return first + (second - first) * torch.arange(2, dtype=torch.int64, device=device)


def normal_from_bits(bits: Tensor) -> Tensor:
    """Standard normals from 32-bit words ``[..., 4]`` (two Box–Muller pairs each); float64 ``[..., 4]``.

    ``u = (w + 1/2) / 2^32`` lies strictly inside (0, 1), so ``log u`` is finite; the float64 transcendental
    functions agree across devices to an ulp, far below float32 resolution.
    """
    u = (bits.to(torch.float64) + 0.5) * 2.0**-32
    radius = torch.sqrt(-2.0 * torch.log(u[..., 0::2]))  # pairs (w0, w1), (w2, w3)
    angle = (2.0 * math.pi) * u[..., 1::2]
    return torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1).flatten(-2)

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
    return torch.stack(philox4x32_words(*counter.unbind(-1), *key.unbind(-1), rounds=rounds), dim=-1)


def philox4x32_words(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: Tensor, k1: Tensor,
                     rounds: int = ROUNDS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`philox4x32` on the four counter words and two key words as separate broadcastable int64 tensors
    (contiguous words make every round a few dense element-wise ops)."""
    bumps = torch.arange(rounds, dtype=torch.int64, device=k0.device)  # round r uses k + r·W (mod 2^32)
    keys0 = ((k0.unsqueeze(-1) + bumps * _WEYL[0]) & _MASK32).unbind(-1)
    keys1 = ((k1.unsqueeze(-1) + bumps * _WEYL[1]) & _MASK32).unbind(-1)
    for key0, key1 in zip(keys0, keys1):
        hi0, lo0 = _mulhilo(c0, _MULTIPLIERS[0])
        hi1, lo1 = _mulhilo(c2, _MULTIPLIERS[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ key0, lo1, hi0 ^ c3 ^ key1, lo0
    return c0, c1, c2, c3


def _mulhilo(word: Tensor, multiplier: int) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of ``word · multiplier`` from 16-bit halves of the multiplier (products < 2^48)."""
    low = word * (multiplier & _MASK16)
    mid = word * (multiplier >> 16)
    mid += low >> 16  # (word·M) >> 16
    hi = mid >> 16  # (word·M) >> 32
    mid &= _MASK16
    mid <<= 16
    mid |= low & _MASK16  # (word·M) mod 2^32
    return hi, mid


def normal_from_words(w0: Tensor, w1: Tensor, w2: Tensor, w3: Tensor) -> Tensor:
    """Two Box–Muller pairs from the words (w0, w1) and (w2, w3): float64 ``[..., 4]``.

    ``u = (w + 1/2) / 2^32`` lies strictly inside (0, 1), so ``log u`` is finite; the float64 transcendental
    functions agree across devices to an ulp, far below float32 resolution.
    """
    out = []
    for radius_word, angle_word in ((w0, w1), (w2, w3)):
        radius = torch.sqrt(-2.0 * torch.log((radius_word.to(torch.float64) + 0.5) * 2.0**-32))
        angle = (angle_word.to(torch.float64) + 0.5) * (2.0 * math.pi * 2.0**-32)
        out += [radius * torch.cos(angle), radius * torch.sin(angle)]
    return torch.stack(out, dim=-1)

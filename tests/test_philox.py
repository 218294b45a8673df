"""The counter-based noise: Philox4x32-10 against Random123's known answers, the normals' distribution, the stream
layout of :class:`NoiseSource` (draw order, chunking, batch independence) and, with CUDA, equal draws on the device
(the device sampling loop is in tests/test_device_loop.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from tdqrt.runtime.philox import normal_from_words, philox4x32
from tdqrt.runtime.sampling import NoiseSource

# Random123 tests/kat_vectors, "philox4x32 10" lines: counter[4], key[2] -> result[4]
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_known_answers(counter, key, expected):
    assert philox4x32(torch.tensor(counter), torch.tensor(key)).tolist() == list(expected)


def test_batched_evaluation_equals_single_ones():
    """One vectorised call over many (counter, key) pairs gives each pair's own answer, broadcast keys included."""
    counters = torch.tensor([c for c, _, _ in KNOWN_ANSWERS])
    keys = torch.tensor([k for _, k, _ in KNOWN_ANSWERS])
    assert philox4x32(counters, keys).tolist() == [list(e) for _, _, e in KNOWN_ANSWERS]
    grid = torch.zeros(3, 5, 4, dtype=torch.int64)
    grid[..., 0] = torch.arange(5)
    out = philox4x32(grid, keys[:, None, :])
    assert out[2, 4].tolist() == philox4x32(grid[0, 4], keys[2]).tolist()
    with pytest.raises(TypeError, match="int64"):
        philox4x32(grid.int(), keys)


def test_bits_and_normals_have_the_right_distribution():
    n = 1 << 16
    counter = torch.zeros(n, 4, dtype=torch.int64)
    counter[:, 0] = torch.arange(n)
    bits = philox4x32(counter, torch.tensor([7, 11]))
    # every byte value equally likely: chi-square over 4n·4 bytes
    bytes_ = torch.cat([(bits >> s) & 0xFF for s in (0, 8, 16, 24)]).flatten().numpy()
    assert stats.chisquare(np.bincount(bytes_, minlength=256)).pvalue > 1e-3
    z = normal_from_words(*bits.unbind(-1)).flatten().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 5 / np.sqrt(z.size) and abs(z.var() - 1) < 5 * np.sqrt(2 / z.size)
    # neighbouring counters and the two halves of a Box–Muller pair are uncorrelated
    pairs = normal_from_words(*bits.unbind(-1)).numpy()
    for a, b in ((pairs[:-1, 0], pairs[1:, 0]), (pairs[:, 0], pairs[:, 1]), (pairs[:, 1], pairs[:, 2])):
        assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(len(a))


def test_noise_source_draw_order_and_chunking():
    shape = (3, 5, 5)  # 75 values: not a multiple of 4
    one_by_one = NoiseSource(2, [4, 1, 8])
    singles = [one_by_one.randn(shape) for _ in range(7)]
    many = NoiseSource(2, [4, 1, 8]).randn_many(7, shape)
    assert many.shape == (7, 3, *shape) and many.dtype == torch.float32
    assert all(torch.equal(s, m) for s, m in zip(singles, many))
    chunked = NoiseSource(2, [4, 1, 8])
    x = chunked.randn(shape)
    assert torch.equal(x, singles[0])
    # chunks of 2 draws (bytes for 2.5 draws): the same values, and the stream position moves by what was used
    drawn = list(chunked.draws(5, shape, chunk_bytes=int(2.5 * 4 * 3 * 75)))
    assert all(torch.equal(d, s) for d, s in zip(drawn, singles[1:6]))
    assert torch.equal(chunked.randn(shape), singles[6])


def test_streams_are_unrelated():
    a, b = NoiseSource(0, range(64)).randn((256,)), NoiseSource(1, range(64)).randn((256,))
    hook = NoiseSource(0, range(64)).hook_noise.randn((256,))
    for other in (b, hook, NoiseSource(0, range(1, 65)).randn((256,))):
        assert abs(np.corrcoef(a.flatten().numpy(), other.flatten().numpy())[0, 1]) < 5 / 128
    # within a batch: sample i is not sample i+1 shifted or scaled
    assert abs(np.corrcoef(a[:-1].flatten().numpy(), a[1:].flatten().numpy())[0, 1]) < 5 / 128


@cuda
def test_cuda_draws_equal_cpu_draws():
    cpu = NoiseSource(5, [0, 3, 9]).randn_many(4, (3, 32, 32))
    gpu = NoiseSource(5, [0, 3, 9], device="cuda").randn_many(4, (3, 32, 32))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-6)
    assert (gpu.cpu() == cpu).float().mean() > 0.999  # float64 transcendentals agree to an ulp

"""Counter-based noise: the tensor implementation equals a scalar transcription of its definition,
blocks equal slices, and the values have the moments their distribution promises."""

import math

import pytest
import torch

from minillm.kernels import noise as N

M32 = 0xFFFFFFFF


def _fmix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def _word(seed: int, tid: int, row: int, w: int) -> int:
    """Scalar transcription of the definition in the module docstring (independent code)."""
    inner = _fmix(((tid + 0x9E3779B9) ^ (tid >> 32)) & M32)
    key = _fmix((seed & M32) ^ _fmix((seed >> 32) ^ inner))
    rkey = _fmix(key ^ ((row * 0x85EBCA77) & M32))
    return _fmix(rkey ^ ((w * 0xC2B2AE3D) & M32))


@pytest.mark.parametrize("seed,tid", [(0, 0), (7, 3), (2**40 + 5, 2**33 + 1)])
def test_rademacher_equals_scalar_definition(seed: int, tid: int) -> None:
    z = N.rademacher(seed, tid, 9, 70)
    for r in range(9):
        for c in range(0, 70, 3):
            bit = (_word(seed, tid, r, c // 32) >> (c % 32)) & 1
            assert z[r, c].item() == (1.0 if bit else -1.0)


def test_gaussian_equals_scalar_definition() -> None:
    g = N.gaussian(11, 2, 4, 9)
    for r in range(4):
        for c in range(9):
            u1 = ((_word(11, 2, r, 2 * c) >> 8) + 1) * 2.0**-24
            u2 = (_word(11, 2, r, 2 * c + 1) >> 8) * 2.0**-24
            ref = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
            assert g[r, c].item() == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_blocks_equal_slices_of_the_full_tensor(dist: str) -> None:
    full = N.noise(3, 4, 20, 100, dist)
    block = N.noise(3, 4, 7, 45, dist, row_start=5, col_start=37)
    assert torch.equal(block, full[5:12, 37:82])


def test_unit_noise_is_the_first_column() -> None:
    assert torch.equal(N.unit_noise(5, 1, 13), N.rademacher(5, 1, 13, 1)[:, 0])
    assert torch.equal(N.unit_noise(5, 1, 13, "gaussian"), N.gaussian(5, 1, 13, 1)[:, 0])


def test_streams_are_balanced_and_uncorrelated() -> None:
    n = 1 << 16
    a = N.rademacher(1, 0, 1, n)[0]
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    # 6 sigma bounds: a broken mix (e.g. seed or tensor id ignored) gives |corr| = 1
    for b in (
        N.rademacher(2, 0, 1, n)[0],
        N.rademacher(1, 1, 1, n)[0],
        N.rademacher(1, 0, 2, n)[1],
    ):
        assert abs((a * b).mean().item()) < 6 / math.sqrt(n)
    assert abs(a.mean().item()) < 6 / math.sqrt(n)
    g = N.gaussian(1, 0, 64, 1024)
    assert abs(g.mean().item()) < 0.03 and abs(g.var().item() - 1) < 0.03


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="seed"):
        N.rademacher(-1, 0, 2, 2)
    with pytest.raises(ValueError, match="dist"):
        N.noise(0, 0, 2, 2, "uniform")

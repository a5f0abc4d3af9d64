"""C++ CPU operators against the PyTorch reference: noise bit-identical, perturbed linear and FMS
scores within per-dtype tolerance, over ragged shapes, dtypes and kinds."""

from __future__ import annotations

import pytest
import torch

from minillm.kernels import cpp, ops
from minillm.kernels import noise as N
from minillm.kernels.reference import fms_scores_ref, perturbed_linear_ref

pytestmark = pytest.mark.skipif(not cpp.available(), reason="C++ extension did not build here")

SHAPES = [(2, 1, 1), (4, 17, 33), (6, 64, 96), (10, 70, 129)]  # (M, N, K), M even
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (0.1, 0.05)}


@pytest.mark.parametrize("rows,cols,r0,c0", [(1, 1, 0, 0), (9, 70, 0, 0), (5, 33, 7, 45)])
@pytest.mark.parametrize("seed,tid", [(0, 0), (123, 9), (2**40 + 1, 2**33)])
def test_rademacher_bit_identical(rows: int, cols: int, r0: int, c0: int, seed: int, tid: int):
    ref = N.rademacher(seed, tid, rows, cols, row_start=r0, col_start=c0)
    assert torch.equal(cpp.noise_cpp(seed, tid, rows, cols, "rademacher", r0, c0), ref)


def test_gaussian_within_float_tolerance() -> None:
    ref = N.gaussian(5, 3, 31, 77)
    torch.testing.assert_close(cpp.noise_cpp(5, 3, 31, 77, "gaussian"), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("kind", ["dense", "rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_linear_matches_reference(m: int, n: int, k: int, kind: str, dtype) -> None:
    g = torch.Generator().manual_seed(m * n * k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    y, sq, s = cpp.perturbed_linear_cpp(x, w, b, 77, 4, 0.05, "rademacher", kind, True)
    y_ref, sq_ref, s_ref = perturbed_linear_ref(x, w, b, 77, 4, 0.05, "rademacher", kind, True)
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(sq, x.float().pow(2).sum(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(s, x.float().sum(0), atol=1e-4, rtol=1e-5)
    assert sq_ref is not None and s_ref is not None


def test_unpaired_plain_linear_with_stats() -> None:
    x, w = torch.randn(3, 20), torch.randn(5, 20)
    y, sq, s = cpp.perturbed_linear_cpp(x, w, None, 0, 0, 0.0, "rademacher", "dense", True)
    torch.testing.assert_close(y, x @ w.T)
    torch.testing.assert_close(sq, x.pow(2).sum(0))


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_fms_scores_match_reference(dist: str) -> None:
    g = torch.Generator().manual_seed(0)
    w, xn = torch.randn(37, 70, generator=g), torch.rand(70, generator=g)
    seeds, coeffs = [3, 8, 13], [0.7, -1.2, 0.05]
    rows, cols = cpp.fms_scores_cpp(w, xn, seeds, coeffs, 6, dist)
    rows_ref, cols_ref = fms_scores_ref(w, xn, seeds, coeffs, 6, dist)
    torch.testing.assert_close(rows, rows_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cols, cols_ref, atol=1e-4, rtol=1e-5)


def test_fms_scores_equal_dense_computation() -> None:
    """Independent check: materialize G densely (test only) and reduce it."""
    g = torch.Generator().manual_seed(1)
    w, xn = torch.randn(9, 40, generator=g), torch.rand(40, generator=g)
    grad = 0.5 * N.rademacher(1, 2, 9, 40) - 2.0 * N.rademacher(4, 2, 9, 40)
    s = w.abs() * xn * grad.abs()
    rows, cols = ops.fms_scores(w, xn, [1, 4], [0.5, -2.0], 2)
    torch.testing.assert_close(rows, s.sum(1))
    torch.testing.assert_close(cols, s.sum(0))


def test_cpu_tensors_dispatch_to_cpp(monkeypatch) -> None:
    monkeypatch.delenv("MINILLM_BACKEND", raising=False)
    assert ops.backend_for(torch.device("cpu")) == "cpp"
    monkeypatch.setenv("MINILLM_BACKEND", "reference")
    assert ops.backend_for(torch.device("cpu")) == "reference"
    monkeypatch.setenv("MINILLM_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="MINILLM_BACKEND"):
        ops.backend_for(torch.device("cpu"))

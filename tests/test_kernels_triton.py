"""Triton kernels against the PyTorch reference.

With CUDA they run compiled. Without it they run on CPU under the Triton interpreter, which
needs ``TRITON_INTERPRET=1`` before Triton is first imported (Triton's own library functions
are decorated at import, and compiled ones cannot be called from an interpreted kernel):

* if Triton is not imported yet (or already in interpreter mode), this module sets the variable
  and (re)imports the kernel modules; the variable stays set for the session, which costs
  nothing since without CUDA no test can use compiled Triton;
* if an earlier test module imported Triton in compiled mode, the module runs itself in a
  subprocess with the variable set (one test, ``test_interpreter_suite_in_subprocess``) and
  skips its tests in this process.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from minillm.kernels import noise as N
from minillm.kernels import ops
from minillm.kernels.reference import fms_scores_ref, perturbed_linear_ref

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _mode() -> str:
    if HAS_CUDA:
        return "compiled"
    triton = sys.modules.get("triton")
    if triton is None or os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter"
    return "subprocess"


MODE = _mode()


def _import_kernels():
    names = ["noise_triton", "perturbed_linear", "fms_scores"]  # dependency order
    if MODE != "interpreter":
        return [importlib.import_module(f"minillm.kernels.{n}") for n in names]
    os.environ["TRITON_INTERPRET"] = "1"
    return [importlib.reload(importlib.import_module(f"minillm.kernels.{n}")) for n in names]


noise_triton, perturbed_linear, fms_scores = _import_kernels()
launch = perturbed_linear.perturbed_linear_triton


@pytest.fixture(autouse=True)
def _skip_when_delegated(request) -> None:
    if MODE == "subprocess" and request.node.name != "test_interpreter_suite_in_subprocess":
        pytest.skip("Triton was imported in compiled mode; this suite runs in a subprocess")


@pytest.mark.skipif(MODE != "subprocess", reason="the kernels run in this process")
def test_interpreter_suite_in_subprocess() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


SHAPES = [(2, 1, 1), (6, 17, 33), (4, 32, 64), (10, 40, 70), (70, 40, 33)]  # (M, N, K), M even
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 5e-2)}


@pytest.fixture
def triton_backend(monkeypatch) -> None:
    monkeypatch.setenv("MINILLM_BACKEND", "triton")


@pytest.mark.parametrize("rows,cols,r0,c0", [(1, 1, 0, 0), (9, 70, 0, 0), (5, 33, 7, 64)])
@pytest.mark.parametrize("seed,tid", [(0, 0), (123, 9), (2**40 + 1, 2**33)])
def test_rademacher_bit_identical(rows: int, cols: int, r0: int, c0: int, seed: int, tid: int):
    z = noise_triton.noise_triton(seed, tid, rows, cols, "rademacher", DEVICE, r0, c0)
    ref = N.rademacher(seed, tid, rows, cols, row_start=r0, col_start=c0)
    assert torch.equal(z.cpu(), ref)


def test_gaussian_within_float_tolerance() -> None:
    z = noise_triton.noise_triton(5, 3, 11, 40, "gaussian", DEVICE)
    torch.testing.assert_close(z.cpu(), N.gaussian(5, 3, 11, 40), atol=1e-5, rtol=1e-5)


def _inputs(m: int, n: int, k: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("kind", ["dense", "rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_linear_matches_reference(m: int, n: int, k: int, kind: str, dtype) -> None:
    x, w, b = _inputs(m, n, k, dtype)
    y, sq, s = launch(x, w, b, 9, 3, 0.05, "rademacher", kind, True)
    y_ref, _, _ = perturbed_linear_ref(x, w, b, 9, 3, 0.05, "rademacher", kind)
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(sq, x.float().pow(2).sum(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(s, x.float().sum(0), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "rows", "cols"])
def test_gaussian_and_fp16_pairs(kind: str) -> None:
    x, w, b = _inputs(6, 17, 33, torch.float16)
    y, _, _ = perturbed_linear.perturbed_linear_triton(x, w, None, 4, 1, 0.1, "gaussian", kind)
    y_ref, _, _ = perturbed_linear_ref(x, w, None, 4, 1, 0.1, "gaussian", kind)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=1e-2, rtol=1e-2)


def test_unpaired_plain_linear_with_stats() -> None:
    x, w, b = _inputs(3, 20, 45, torch.float32)
    y, sq, s = perturbed_linear.perturbed_linear_triton(x, w, b, 0, 0, 0.0, stats=True)
    torch.testing.assert_close(y, x @ w.T + b, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(sq, x.pow(2).sum(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(s, x.sum(0), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_fms_scores_match_reference(dist: str) -> None:
    g = torch.Generator().manual_seed(0)
    w, xn = torch.randn(37, 70, generator=g), torch.rand(70, generator=g)
    seeds, coeffs = [3, 8, 13], [0.7, -1.2, 0.05]
    rows, cols = fms_scores.fms_scores_triton(w.to(DEVICE), xn.to(DEVICE), seeds, coeffs, 6, dist)
    rows_ref, cols_ref = fms_scores_ref(w, xn, seeds, coeffs, 6, dist)
    torch.testing.assert_close(rows.cpu(), rows_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cols.cpu(), cols_ref, atol=1e-4, rtol=1e-5)


def test_fms_scores_identical_across_backends(monkeypatch) -> None:
    """End to end through ops: every backend available here gives the same FMS scores."""
    g = torch.Generator().manual_seed(2)
    w, xn = torch.randn(24, 50, generator=g), torch.rand(50, generator=g)
    results = {}
    for backend in ["reference", "cpp", "triton"]:
        if backend == "cpp":
            from minillm.kernels import cpp

            if not cpp.available():
                continue
        monkeypatch.setenv("MINILLM_BACKEND", backend)
        dev = DEVICE if backend == "triton" else "cpu"
        rows, cols = ops.fms_scores(w.to(dev), xn.to(dev), [1, 2], [0.3, -0.9], 5)
        results[backend] = (rows.cpu(), cols.cpu())
    for rows, cols in results.values():
        torch.testing.assert_close(rows, results["reference"][0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(cols, results["reference"][1], atol=1e-4, rtol=1e-5)


def _fms_end_to_end(backend: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Paper-faithful FMS on a tiny LLaMA: statistics pass, two SPSA perturbations, reduction."""
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from minillm.scoring.perturb import perturbed, summed_input_stats

    os.environ["MINILLM_BACKEND"] = backend
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    dev = DEVICE if backend == "triton" else "cpu"
    model = LlamaForCausalLM(cfg).eval().to(dev)
    lins = [
        (t, m) for t, m in enumerate(model.model.layers[0].modules()) if isinstance(m, nn.Linear)
    ]
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3)).to(dev)
    eps, est = 1e-2, []
    with torch.no_grad():
        with summed_input_stats(lins) as stats:
            model(ids)
        for seed in (11, 12):
            with perturbed(lins, seed, eps):
                logits = model(torch.cat([ids, ids])).logits[:, :-1]
            target = torch.cat([ids, ids])[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, 64), target.reshape(-1), reduction="none")
            half = loss.view(2, -1).mean(1)
            est.append((seed, ((half[0] - half[1]) / (2 * eps)).item()))
    return {
        t: tuple(
            v.cpu()
            for v in ops.fms_scores(
                m.weight, stats[t].sum_sq.sqrt(), [s for s, _ in est], [c for _, c in est], t
            )
        )
        for t, m in lins
    }


def test_fms_end_to_end_identical_across_backends(monkeypatch) -> None:
    """Statistics, perturbed pairs and reduction all through one backend, for each backend."""
    monkeypatch.setenv("MINILLM_BACKEND", "reference")  # restored after the test
    backends = ["reference", "triton"]
    from minillm.kernels import cpp

    if cpp.available():
        backends.append("cpp")
    results = {b: _fms_end_to_end(b) for b in backends}
    ref = results["reference"]
    assert all(rows.abs().sum() > 0 for rows, _ in ref.values())
    for b in backends[1:]:
        for t, (rows, cols) in results[b].items():
            torch.testing.assert_close(rows, ref[t][0], atol=1e-4, rtol=2e-3, msg=f"{b} rows {t}")
            torch.testing.assert_close(cols, ref[t][1], atol=1e-4, rtol=2e-3, msg=f"{b} cols {t}")


def test_perturbed_context_through_triton(triton_backend) -> None:
    from minillm.scoring.perturb import perturbed, summed_input_stats

    torch.manual_seed(0)
    lin = nn.Linear(33, 17).to(DEVICE)
    x = torch.randn(2, 3, 33, device=DEVICE)
    with perturbed([(7, lin)], seed=5, eps=0.1):
        y = lin(x)
    z = N.rademacher(5, 7, 17, 33).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(y[0], x[0] @ (lin.weight + 0.1 * z).T + lin.bias)
        torch.testing.assert_close(y[1], x[1] @ (lin.weight - 0.1 * z).T + lin.bias)
    with summed_input_stats([(7, lin)]) as stats:
        lin(x)
    torch.testing.assert_close(stats[7].sum_sq, x.reshape(-1, 33).pow(2).sum(0))


def test_dense_noise_keeps_the_32_wide_k_tiles() -> None:
    configs = perturbed_linear._configs()
    bks = {c.kwargs["BK"] for c in configs}
    assert bks == {32, 64}
    dense = perturbed_linear._tiles_for_kind(configs, {}, PAIRED=True, KIND=0)
    assert dense and all(c.kwargs["BK"] == 32 for c in dense)
    for flags in [dict(PAIRED=True, KIND=1), dict(PAIRED=True, KIND=2), dict(PAIRED=False, KIND=0)]:
        assert perturbed_linear._tiles_for_kind(configs, {}, **flags) == configs


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m,n,k", [(4096, 4096, 4096), (2048, 11008, 4096), (2050, 4096, 11008)])
@pytest.mark.parametrize("kind", ["dense", "rows"])
def test_perturbed_linear_llama_shapes_gpu(m: int, n: int, k: int, kind: str) -> None:
    x, w, b = _inputs(m, n, k, torch.bfloat16)
    y, sq, _ = launch(x, w, b, 1, 2, 1e-2, "rademacher", kind, True)
    y_ref, _, _ = perturbed_linear_ref(x, w, b, 1, 2, 1e-2, "rademacher", kind)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=0.1, rtol=0.05)
    torch.testing.assert_close(sq, x.float().pow(2).sum(0), atol=1e-1, rtol=1e-4)

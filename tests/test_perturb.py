"""``perturbed()`` and ``summed_input_stats()``: the + and - halves equal forwards of explicitly
perturbed dense copies, parameters stay bit-identical, original forwards come back."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from minillm.kernels import ops
from minillm.kernels.noise import noise, unit_noise
from minillm.scoring.perturb import perturbed, summed_input_stats

BACKENDS = ["reference", "cpp"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    if request.param == "cpp":
        from minillm.kernels import cpp

        if not cpp.available():
            pytest.skip("C++ extension did not build here")
    monkeypatch.setenv("MINILLM_BACKEND", request.param)
    return request.param


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def linears_of(model: nn.Module) -> list[tuple[int, nn.Linear]]:
    mods = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    return list(enumerate(mods))


def explicit_delta(tid: int, mod: nn.Linear, seed: int, dist: str, kind: str) -> torch.Tensor:
    """The weight perturbation ``Z'`` with ``W' = W +- eps Z'``, as a dense tensor (test only)."""
    n, k = mod.weight.shape
    if kind == "dense":
        return noise(seed, tid, n, k, dist)
    if kind == "rows":
        return unit_noise(seed, tid, n, dist)[:, None] * mod.weight
    return unit_noise(seed, tid, k, dist)[None, :] * mod.weight


def perturbed_copy(model: nn.Module, seed: int, eps: float, dist: str, kind: str) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for tid, mod in linears_of(out):
            mod.weight += eps * explicit_delta(tid, mod, seed, dist, kind)
    return out


@pytest.mark.parametrize("kind", ["dense", "rows", "cols"])
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_halves_equal_explicitly_perturbed_models(backend: str, kind: str, dist: str) -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    eps = 0.05
    with torch.no_grad():
        with perturbed(linears_of(model), seed=42, eps=eps, dist=dist, kind=kind):
            pair = model(torch.cat([ids, ids])).logits
        plus = perturbed_copy(model, 42, eps, dist, kind)(ids).logits
        minus = perturbed_copy(model, 42, -eps, dist, kind)(ids).logits
        plain = model(ids).logits
    torch.testing.assert_close(pair[:2], plus, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pair[2:], minus, atol=1e-4, rtol=1e-4)
    assert (plus - plain).abs().max() > 1e-3  # the perturbation is not a no-op
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all("forward" not in m.__dict__ for _, m in linears_of(model))


def test_forwards_are_restored_after_an_error() -> None:
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="not a ± pair"):
        with perturbed([(0, lin)], seed=1, eps=0.1):
            lin(torch.randn(3, 4))
    assert "forward" not in lin.__dict__
    x = torch.randn(3, 4)
    torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias)


def test_duplicate_ids_are_rejected() -> None:
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    with pytest.raises(ValueError, match="listed twice"):
        with perturbed([(0, a), (0, b)], seed=1, eps=0.1):
            pass
    assert "forward" not in a.__dict__


def test_input_stats_match_hooked_inputs(backend: str) -> None:
    model = tiny_llama()
    lins = linears_of(model)
    seen: dict[int, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, t=t: seen.setdefault(t, []).append(a[0]))
        for t, m in lins
    ]
    batches = [torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (1, 3))]
    with torch.no_grad():
        with summed_input_stats(lins) as stats:
            outs = [model(b).logits for b in batches]
        for h in hooks:
            h.remove()
        plain = [model(b).logits for b in batches]
    for o, p in zip(outs, plain, strict=True):
        torch.testing.assert_close(o, p, atol=1e-5, rtol=1e-5)
    for tid, _ in lins:
        xs = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[tid]])
        assert stats[tid].count == 13
        torch.testing.assert_close(stats[tid].sum_sq, xs.pow(2).sum(0), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(stats[tid].sum, xs.sum(0), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": "diag"}, "kind"),
        ({"dist": "uniform"}, "dist"),
        ({"x": torch.randn(3, 4)}, "even number of rows"),
        ({"x": torch.randn(2, 5)}, r"x \[M, K\]"),
    ],
)
def test_ops_reject_bad_arguments_on_every_backend(backend: str, kwargs: dict, match: str) -> None:
    args = {
        "x": torch.randn(2, 4),
        "weight": torch.randn(3, 4),
        "bias": None,
        "seed": 1,
        "tensor_id": 0,
        "eps": 0.1,
        "dist": "rademacher",
        "kind": "dense",
    } | kwargs
    with pytest.raises(ValueError, match=match):
        ops.perturbed_linear(**args)


def test_failed_cpp_build_falls_back_to_reference_with_one_warning(monkeypatch, tmp_path) -> None:
    import warnings

    from minillm.kernels import cpp

    monkeypatch.delenv("MINILLM_BACKEND", raising=False)
    monkeypatch.setattr(cpp, "SOURCE", tmp_path / "missing.cpp")
    cpp.extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"C\+\+ CPU operators unavailable"):
            assert ops.backend_for(torch.device("cpu")) == "reference"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ops.backend_for(torch.device("cpu")) == "reference"
            x, w = torch.randn(2, 4), torch.randn(3, 4)
            y = ops.perturbed_linear(x, w, None, 1, 0, 0.1)
        z = noise(1, 0, 3, 4)
        torch.testing.assert_close(y, torch.cat([x[:1] @ (w + 0.1 * z).T, x[1:] @ (w - 0.1 * z).T]))
    finally:
        cpp.extension.cache_clear()  # the next caller loads the real extension again

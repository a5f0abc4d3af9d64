"""Reconstruction against least squares solved independently (``torch.linalg.lstsq``)."""

from __future__ import annotations

import pytest
import torch
from conftest import EXTRA_FAMILIES, FAMILIES, VOCAB, make_tiny_model

from minillm.blocks.reconstruct import Gram, prune_sequential, refit_weights, select_removals
from minillm.model.adapters import adapter_for
from minillm.model.surgery import prune_layer

TOKENS = torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(7))


def _lstsq(x: torch.Tensor, y: torch.Tensor, lam: float = 0.0, prior: torch.Tensor | None = None):
    """``(W [out, k], b [out])`` minimizing ``||[x, 1] [W, b]^T - y||^2 + lam ||W - prior||^2``."""
    x, y = x.double(), y.double()
    a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    if lam:
        k = x.shape[1]
        reg = torch.zeros(k, k + 1, dtype=x.dtype)
        reg[:, :k] = torch.eye(k, dtype=x.dtype) * lam**0.5
        target = torch.zeros(k, y.shape[1], dtype=x.dtype)
        if prior is not None:
            target = prior.double().t() * lam**0.5
        a, y = torch.cat([a, reg]), torch.cat([y, target])
    sol = torch.linalg.lstsq(a, y).solution
    return sol[:-1].t(), sol[-1]


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_refit_equals_lstsq(ridge):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=gen) + 0.5
    w, b = torch.randn(5, 12, generator=gen), torch.randn(5, generator=gen)
    gram = Gram(torch.zeros(12, 12, dtype=torch.float64), torch.zeros(12, dtype=torch.float64))
    gram.add(x[:120])
    gram.add(x[120:])
    kept = torch.tensor([0, 2, 3, 7, 8, 11])
    got_w, got_b = refit_weights(w, b, gram, kept, ridge)
    lam = ridge * float((x[:, kept].double() ** 2).sum(0).mean())
    ref_w, ref_b = _lstsq(x[:, kept], x @ w.t() + b, lam, prior=w[:, kept])
    torch.testing.assert_close(got_w, ref_w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_b, ref_b, rtol=1e-4, atol=1e-6)


def test_large_ridge_is_flap_bias_compensation():
    """ridge -> inf keeps the dense kept columns; the removed inputs' mean goes into the bias."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(100, 8, generator=gen) + 1.0
    w, b = torch.randn(4, 8, generator=gen), torch.randn(4, generator=gen)
    gram = Gram(torch.zeros(8, 8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64))
    gram.add(x)
    kept, removed = torch.tensor([0, 1, 4, 5, 6]), torch.tensor([2, 3, 7])
    got_w, got_b = refit_weights(w, b, gram, kept, ridge=1e9)
    torch.testing.assert_close(got_w.float(), w[:, kept], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_b.float(), b + w[:, removed] @ x[:, removed].mean(0))


def test_underdetermined_refit_keeps_unseen_directions_dense():
    """With fewer tokens than inputs the refit changes W only within the span of the data."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 12, generator=gen)  # 5 tokens, 12 inputs
    w = torch.randn(3, 12, generator=gen)
    gram = Gram(torch.zeros(12, 12, dtype=torch.float64), torch.zeros(12, dtype=torch.float64))
    gram.add(x)
    kept = torch.arange(9)
    got_w, _ = refit_weights(w, None, gram, kept, ridge=0.1)
    span = torch.linalg.qr(x[:, kept].double().t()).Q  # [9, 5]: the tokens' directions
    change = got_w - w[:, kept].double()
    assert change.abs().max() > 1e-3
    torch.testing.assert_close(change @ span @ span.t(), change, rtol=1e-5, atol=1e-5)


def test_refit_without_tokens_is_an_error():
    gram = Gram(torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="no calibration tokens"):
        refit_weights(torch.ones(2, 3), None, gram, torch.tensor([0, 1]), 1e-4)


def _consumer_io(model, linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[tokens, in]`` of ``linear`` in a plain forward of TOKENS, and its dense outputs."""
    xs = []
    hook = linear.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()))
    with torch.no_grad():
        model(TOKENS)
    hook.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
    return x, x @ linear.weight.detach().t() + (
        linear.bias.detach() if linear.bias is not None else 0
    )


def _keep(group, n_remove: int) -> torch.Tensor:
    per = group.n_units // group.partitions
    return torch.cat([torch.arange(n_remove, per) + p * per for p in range(group.partitions)])


@pytest.mark.parametrize("family", [*FAMILIES, *EXTRA_FAMILIES])
@pytest.mark.parametrize("kind", ["heads", "channels"])
def test_sequential_refit_is_least_squares_on_the_pruned_stream(family, kind):
    """Layer 2 is refit on the inputs produced by the already pruned and refit layer 1."""
    model = make_tiny_model(family)
    adapter = adapter_for(model)
    groups = {i: adapter.groups(model, i)[kind] for i in (1, 2)}
    keep = {(i, kind): _keep(groups[i], 1 if kind == "heads" else 20) for i in (1, 2)}
    reference = make_tiny_model(family)
    ridge = 1e-3
    prune_sequential(model, adapter, TOKENS, keep, [1, 2], batch_size=4, ridge=ridge)

    # reference: prune + refit layer 1 by lstsq, then layer 2 on the resulting inputs
    for i in (1, 2):
        g = adapter.groups(reference, i)[kind]
        consumer = g.consumers[0]
        x, y = _consumer_io(reference, consumer.linear)
        cols = consumer.indices(keep[(i, kind)])
        lam = ridge * float(x[:, cols].double().pow(2).sum(0).mean())
        w, b = _lstsq(x[:, cols], y, lam, prior=consumer.linear.weight.detach()[:, cols])
        heads, channels = (keep[(i, kind)], None) if kind == "heads" else (None, keep[(i, kind)])
        prune_layer(reference, adapter, i, heads, channels)
        with torch.no_grad():
            consumer.linear.weight.copy_(w.float())
            consumer.linear.bias = torch.nn.Parameter(b.float())
    for i in (1, 2):
        got = adapter.groups(model, i)[kind].consumers[0].linear
        ref = adapter.groups(reference, i)[kind].consumers[0].linear
        torch.testing.assert_close(got.weight, ref.weight, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(got.bias, ref.bias, rtol=1e-3, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(
            model(TOKENS).logits, reference(TOKENS).logits, rtol=1e-3, atol=1e-3
        )


def test_refit_beats_masking_on_calibration_loss(family):
    model = make_tiny_model(family)
    adapter = adapter_for(model)
    masked = make_tiny_model(family)
    keep = {(1, "channels"): _keep(adapter.groups(model, 1)["channels"], 48)}
    prune_sequential(model, adapter, TOKENS, keep, [1], batch_size=6, ridge=1e-4)
    prune_layer(masked, adapter, 1, None, keep[(1, "channels")])
    with torch.no_grad():
        dense = make_tiny_model(family)(TOKENS).logits
        err_refit = (model(TOKENS).logits - dense).pow(2).mean()
        err_mask = (masked(TOKENS).logits - dense).pow(2).mean()
    assert err_refit < err_mask


def _refit_error(x, w, b, kept_cols) -> float:
    y = x @ w.t() + b
    fw, fb = _lstsq(x[:, kept_cols], y)
    return float((x[:, kept_cols].double() @ fw.t() + fb - y.double()).pow(2).sum())


@pytest.mark.parametrize("block", [1, 3])
def test_selection_picks_the_unit_whose_refit_error_is_least(block):
    gen = torch.Generator().manual_seed(1)
    n_units = 6
    x = torch.randn(300, n_units * block, generator=gen) * torch.rand(
        n_units * block, generator=gen
    )
    w, b = torch.randn(4, n_units * block, generator=gen), torch.randn(4, generator=gen)
    gram = Gram(
        torch.zeros(n_units * block, n_units * block, dtype=torch.float64),
        torch.zeros(n_units * block, dtype=torch.float64),
    )
    gram.add(x)
    removed = select_removals(w, gram, block, 1, 1, ridge=1e-12)
    errors = [
        _refit_error(x, w, b, torch.tensor([c for c in range(n_units * block) if c // block != u]))
        for u in range(n_units)
    ]
    assert removed.tolist() == [min(range(n_units), key=errors.__getitem__)]


def test_selection_removes_evenly_across_partitions():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, 8, generator=gen)
    x[:, :4] *= 0.01  # every cheap unit lies in partition 0
    w = torch.randn(3, 8, generator=gen)
    gram = Gram(torch.zeros(8, 8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64))
    gram.add(x)
    removed = select_removals(w, gram, 1, 2, 2, ridge=1e-12).tolist()
    assert len(removed) == 4 and sum(u < 4 for u in removed) == 2


def test_selected_refit_beats_given_units(family):
    """Choosing the removed channels on the Gram lowers the logit error of the same count."""
    tokens = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(8))
    keep = None
    errs = []
    for select in ("scores", "refit"):
        model = make_tiny_model(family)
        adapter = adapter_for(model)
        if keep is None:
            keep = {(1, "channels"): _keep(adapter.groups(model, 1)["channels"], 48)}
        prune_sequential(model, adapter, tokens, keep, [1], batch_size=8, select=select)
        with torch.no_grad():
            dense = make_tiny_model(family)(tokens).logits
            errs.append(float((model(tokens).logits - dense).pow(2).mean()))
        assert adapter.layer_sizes(model, 1)["channels"] == len(keep[(1, "channels")])
    assert errs[1] < errs[0]


def test_too_few_tokens_warn_once_per_run(caplog):
    """2 x 24 tokens for 96-input down_projs in two layers: one warning, not one per layer."""
    model = make_tiny_model("llama-gqa")
    adapter = adapter_for(model)
    keep = {(i, "channels"): _keep(adapter.groups(model, i)["channels"], 20) for i in (1, 2)}
    with caplog.at_level("WARNING", logger="minillm"):
        prune_sequential(model, adapter, TOKENS[:2], keep, [1, 2], batch_size=2)
    warnings = [r for r in caplog.records if "calibration tokens" in r.getMessage()]
    assert len(warnings) == 1 and "48 calibration tokens" in warnings[0].getMessage()

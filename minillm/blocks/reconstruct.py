"""Reconstruction after removal: refit the linears that read removed units, layer by layer.

For a consumer linear ``y = W x + b`` (o_proj, down_proj, out_proj, fc2, dense, dense_4h_to_h)
whose input units ``R`` are removed, the kept columns ``K`` and the bias are refit so that its
output on the calibration inputs stays as close as possible to the dense one::

    min_{W', b'}  sum_t || W x_t + b - (W' x_{t,K} + b') ||^2  +  lam * ||W' - W_K||^2

solved in closed form from the Gram statistics ``G = sum_t x_t x_t^T`` and ``s = sum_t x_t`` of
the consumer's inputs (:class:`Gram`), ``lam = ridge * mean(diag(G_KK))``. The ridge pulls the
refit toward the dense kept columns ``W_K``, not toward zero: directions the calibration never
excites keep their dense weights, and as ``ridge -> inf`` the solution is FLAP's bias
compensation ``W' = W_K``, ``b' = b + W_R mean(x_R)``. The ridge thus interpolates between
FLAP (large) and the unconstrained least-squares refit (small).

:func:`prune_sequential` processes the decoder blocks bottom-up through the block loop, so each
layer is calibrated on the outputs of the already-pruned layers below it: per pruned layer, the
heads' consumer Gram is collected on the current inputs, the heads are removed and refit, then
the channels' consumer Gram is collected with the pruned attention, and the channels are
removed and refit. One Gram matrix (``in_features**2`` float64) lives at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from minillm.blocks import distributed
from minillm.blocks.loop import BlockSource, Boundary, capture, run_block, sweep
from minillm.model.adapters import Adapter
from minillm.model.surgery import prune_layer

log = logging.getLogger("minillm")
GRAM_SLAB = 512  # Gram rows accumulated per product


@dataclass
class Gram:
    """``xtx`` ``[in, in]`` float64 ``sum_t x_t x_t^T``; ``xsum`` ``[in]`` float64; ``count``."""

    xtx: torch.Tensor
    xsum: torch.Tensor
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        for s in range(0, x.shape[1], GRAM_SLAB):  # a slab of rows at a time: no [in, in] temporary
            self.xtx[s : s + GRAM_SLAB] += (x[:, s : s + GRAM_SLAB].t() @ x).double()
        self.xsum += x.sum(0).double()
        self.count += x.shape[0]


class _Stop(Exception):
    pass


@torch.no_grad()
def consumer_gram(block: nn.Module, linear: nn.Linear, boundary: Boundary) -> Gram:
    """Gram statistics of ``linear``'s inputs when ``block`` runs on every micro-batch.

    The block is stopped at ``linear`` (its input is all that is needed).
    """
    n = linear.in_features
    dev = linear.weight.device
    gram = Gram(
        torch.zeros(n, n, dtype=torch.float64, device=dev),
        torch.zeros(n, dtype=torch.float64, device=dev),
    )

    def hook(module, args):
        gram.add(args[0])
        raise _Stop

    handle = linear.register_forward_pre_hook(hook)
    try:
        for h, kw in zip(boundary.hidden, boundary.kwargs, strict=True):
            try:
                block(h, **kw)
            except _Stop:
                pass
    finally:
        handle.remove()
    return gram


def refit_weights(
    weight: torch.Tensor, bias: torch.Tensor | None, gram: Gram, kept: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``(W' [out, k], b' [out])`` for kept input columns ``kept`` ``[k]``.

    ``weight`` ``[out, in]`` and ``bias`` ``[out]`` (or None) are the dense consumer's. Solved in
    float64 by Cholesky; where the regularized system is not positive definite the ridge is
    raised tenfold (up to four times) with a warning, then ValueError.
    """
    return solve_refit(*normal_equations(weight, gram, kept), weight, bias, kept, ridge)


def normal_equations(
    weight: torch.Tensor, gram: Gram, kept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The refit's system ``[k + 1, k + 1]`` and right-hand side ``[k + 1, out]`` (float64):
    the Gram of the kept columns with a constant 1 appended, and its product with the dense
    weights. The Gram itself is not needed after this.

    The right-hand side is built ``GRAM_SLAB`` kept rows at a time, before the system, so the
    largest matrices alive together are the Gram, the system and the right-hand side."""
    if gram.count == 0:
        raise ValueError("reconstruction: no calibration tokens reached the layer")
    k = kept.numel()
    w_t = weight.t().double()  # [in, out]
    rhs = torch.empty(k + 1, weight.shape[0], dtype=torch.float64, device=weight.device)
    for s in range(0, k, GRAM_SLAB):
        rows = kept[s : s + GRAM_SLAB]
        rhs[s : s + rows.numel()] = gram.xtx[rows] @ w_t
    rhs[k] = gram.xsum @ w_t
    del w_t
    return _augmented(gram, kept), rhs


def solve_refit(
    a: torch.Tensor,
    rhs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kept: torch.Tensor,
    ridge: float,
    info: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`refit_weights` from its :func:`normal_equations`. Consumes them: ``rhs`` is
    overwritten (with ``rhs + lam W_K^T``) and ``a``'s storage is released once factored (also
    for the caller's handle), so the system and its Cholesky factor are not both kept through
    the solve. ``info``, if given, receives the ridge ``lam`` the solve used."""
    k = kept.numel()
    lam = ridge * a[:k, :k].diagonal().mean().clamp_min(1e-12)
    for _ in range(5):
        a.diagonal()[:k] += lam  # in place: the system is the largest matrix of the solve
        chol, status = torch.linalg.cholesky_ex(a)
        if status == 0:
            break
        a.diagonal()[:k] -= lam
        lam = lam * 10
        log.warning("reconstruction: Gram matrix not positive definite, ridge raised to %.2e", lam)
    else:
        raise ValueError(
            "reconstruction: the Gram matrix stays singular; use more calibration tokens "
            "(--nsamples/--seqlen) or a larger --ridge"
        )
    a.set_()  # the factor replaces the system
    if info is not None:
        info["lam"] = float(lam)
    for s in range(0, k, GRAM_SLAB):
        cols = kept[s : s + GRAM_SLAB]
        rhs[s : s + cols.numel()] += lam * weight[:, cols].t().double()
    sol = torch.cholesky_solve(rhs, chol)  # [k + 1, out]
    del chol
    new_bias = sol[k] + (bias.double() if bias is not None else 0.0)
    return sol[:k].t().contiguous(), new_bias


def _augmented(gram: Gram, cols: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``[k + 1, k + 1]`` float64 of input columns ``cols`` with a constant 1
    appended (the last row and column: the sums and the token count)."""
    k = cols.numel()
    a = torch.empty(k + 1, k + 1, dtype=torch.float64, device=gram.xtx.device)
    for s in range(0, k, GRAM_SLAB):  # no [k, k] or [k, in] temporary
        rows = cols[s : s + GRAM_SLAB]
        a[s : s + rows.numel(), :k] = gram.xtx[rows][:, cols]
    a[:k, k] = a[k, :k] = gram.xsum[cols]
    a[k, k] = float(gram.count)
    return a


def _augmented_inverse(gram: Gram, ridge: float) -> torch.Tensor:
    """``(G_aug + lam I)^-1`` ``[in + 1, in + 1]`` of the inputs with a constant 1 appended."""
    n = gram.xtx.shape[0]
    a = _augmented(gram, torch.arange(n, device=gram.xtx.device))
    a.diagonal()[:n] += ridge * gram.xtx.diagonal().mean().clamp_min(1e-12) + 1e-12
    return torch.linalg.inv(a)


def _removal_costs(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``tr(W_B (H^-1_BB)^-1 W_B^T)`` for every unit's columns ``cols[u]``: ``[n_units]``."""
    if cols.shape[1] == 1:
        c = cols[:, 0]
        return w[:, c].pow(2).sum(0) / hinv.diagonal()[c]
    return torch.stack(
        [torch.trace(w[:, b] @ torch.linalg.solve(hinv[b][:, b], w[:, b].t())) for b in cols]
    )


def select_removals(
    weight: torch.Tensor,
    gram: Gram,
    block: int,
    partitions: int,
    n_remove_per_partition: int,
    ridge: float,
) -> torch.Tensor:
    """Units to remove, chosen greedily by the least increase of the refit output error.

    Unit ``u`` owns input columns ``B = [u * block, (u + 1) * block)`` of the consumer
    ``weight`` ``[out, in]``. Removing it with the other columns refit optimally (the optimal
    brain surgeon, by blocks) costs ``tr(W_B (H^-1_BB)^-1 W_B^T)``, ``H`` the Gram matrix of
    the inputs with a constant appended (the bias is refit too); after each removal ``W`` and
    ``H^-1`` are updated. Each of the ``partitions`` equal runs of units loses
    ``n_remove_per_partition``. Returns the removed unit ids ``[r]``.
    """
    hinv = _augmented_inverse(gram, ridge)
    w = torch.cat([weight.double(), weight.new_zeros(weight.shape[0], 1).double()], 1)
    n_units = weight.shape[1] // block
    per = n_units // partitions
    partition = torch.arange(n_units, device=w.device) // per
    quota = torch.full((partitions,), n_remove_per_partition, device=w.device)
    alive = torch.ones(n_units, dtype=torch.bool, device=w.device)
    removed = []
    cols = torch.arange(n_units * block, device=w.device).view(n_units, block)
    for _ in range(n_remove_per_partition * partitions):
        open_ = alive & (quota[partition] > 0)
        best = int(torch.where(open_, _removal_costs(w, hinv, cols), torch.inf).argmin())
        b = cols[best]
        inv_bb = torch.linalg.inv(hinv[b][:, b])
        w -= w[:, b] @ inv_bb @ hinv[b]
        hinv -= hinv[:, b] @ inv_bb @ hinv[b]
        alive[best] = False
        quota[best // per] -= 1
        removed.append(best)
    return torch.tensor(sorted(removed), dtype=torch.long)


@torch.no_grad()
def prune_and_refit(
    model,
    adapter: Adapter,
    layer: int,
    kind: str,
    keep: torch.Tensor,
    inputs: Boundary,
    gqa: str = "query",
    ridge: float = 0.1,
    select: str = "scores",
) -> None:
    """Remove ``kind`` units of ``layer`` not in ``keep`` and refit their consumers on the
    Gram statistics of the consumer inputs when the block runs on ``inputs``.

    ``select="scores"`` removes the units not in ``keep``; ``"refit"`` keeps as many units per
    partition as ``keep`` but chooses them by :func:`select_removals` on the same statistics.
    """
    group = adapter.groups(model, layer, gqa)[kind]
    if len(group.consumers) != 1:
        raise ValueError(f"reconstruction: {kind} of layer {layer} need exactly one consumer")
    consumer = group.consumers[0]
    lin = consumer.linear
    gram = consumer_gram(adapter.layers(model)[layer], lin, inputs)
    distributed.all_reduce_gram(gram)
    if select == "refit":
        per_partition = (group.n_units - keep.numel()) // group.partitions
        removed = select_removals(
            lin.weight, gram, consumer.size, group.partitions, per_partition, ridge
        )
        keep = torch.ones(group.n_units, dtype=torch.bool)
        keep[removed] = False
        keep = keep.nonzero().flatten()
    keep = keep.sort().values
    cols = consumer.indices(keep.to(lin.weight.device))
    a, rhs = normal_equations(lin.weight, gram, cols)
    del gram  # before the solve: the Gram is the largest matrix of the refit
    weight, bias = solve_refit(a, rhs, lin.weight, lin.bias, cols, ridge)
    del a, rhs
    # slice through the surgery (head counts, BLOOM's ALiBi rows), then write the refit weights
    heads, channels = (keep, None) if kind == "heads" else (None, keep)
    prune_layer(model, adapter, layer, heads, channels, gqa)
    lin.weight.data.copy_(weight.to(lin.weight.dtype))
    lin.bias = nn.Parameter(bias.to(lin.weight.dtype), requires_grad=lin.weight.requires_grad)


def _warn_if_underdetermined(model, adapter: Adapter, tokens: torch.Tensor, keep: dict) -> None:
    """One warning when a consumer has more inputs than there are calibration tokens (over
    every rank): there the ridge, not the data, decides the refit."""
    n_tokens = distributed.total_count(tokens.numel())
    widest = max(
        adapter.groups(model, layer)[kind].consumers[0].linear.in_features for layer, kind in keep
    )
    if n_tokens <= widest:
        log.warning(
            "reconstruction: %d calibration tokens for consumers of up to %d inputs; the ridge "
            "decides the refit in the directions they do not reach (raise --nsamples/--seqlen)",
            n_tokens,
            widest,
        )


@torch.no_grad()
def prune_sequential(
    model: nn.Module,
    adapter: Adapter,
    tokens: torch.Tensor,
    keep: dict[tuple[int, str], torch.Tensor],
    layers: list[int],
    gqa: str = "query",
    batch_size: int = 8,
    ridge: float = 0.1,
    select: str = "scores",
    source: BlockSource | None = None,
) -> None:
    """Prune ``layers`` bottom-up to the kept units ``keep`` (as
    :func:`minillm.model.surgery.prune_layer` would), refitting each consumer on the calibration
    ``tokens`` ``[n, seqlen]`` as they reach the layer through the already-pruned layers below
    it. ``select="refit"``: ``keep`` gives only how many units each layer keeps; which ones is
    decided by :func:`select_removals`.
    ``source``: blocks loaded and released one at a time (:mod:`minillm.blocks.loop`)."""
    _warn_if_underdetermined(model, adapter, tokens, keep)
    boundary = capture(model, adapter, tokens, batch_size, source)
    top = max(layers)

    def visit(i: int, inputs: Boundary):
        if i in layers:
            for kind in ("heads", "channels"):
                if (i, kind) in keep:
                    units = keep[(i, kind)]
                    prune_and_refit(model, adapter, i, kind, units, inputs, gqa, ridge, select)
        return run_block(adapter.layers(model)[i], inputs)

    sweep(model, adapter, boundary, range(top + 1), visit, source=source)

"""SPSA gradient estimates from forward passes only: a perturbation is a seed.

Two kinds of variables are perturbed, both without touching (or copying) a parameter:

* **structure multipliers** (:func:`spsa_multipliers`): every group (one layer's heads or
  channels) gets ``n`` coordinates, one per unit (``resolution="unit"``) or one for the whole
  group (``resolution="layer"``). Coordinate ``c`` multiplies the consumer-input columns of
  its units, ``x[..., cols(c)] * (1 + m_c)``, at ``m = 0`` in the unperturbed model, so
  ``dL/dm_c = sum_{(i,j) in consumer block of c} W_ij dL/dW_ij``.
* **weights** (:func:`spsa_weights`, the paper-faithful per-weight estimate): every listed
  linear computes with ``W +- eps Z`` through :func:`minillm.scoring.perturb.perturbed`.

Estimator (central differences, ``+`` and ``-`` halves of one batch of ``2B`` sequences)::

    d_kb   = (L_b(theta + eps z_kb) - L_b(theta - eps z_kb)) / (2 eps)      # one scalar
    g_hat  = 1 / (K n) * sum_{k < K, b < n} d_kb z_kb

over ``K`` rounds of the ``n`` calibration sequences, ``L_b`` the mean token loss of sequence
``b``. ``z_kb`` is regenerated from ``(seed(k, b), tensor_id)`` by :mod:`minillm.kernels.noise`;
``sharing`` decides which sequences share a perturbation: ``"global"`` (one per round, the
classic estimate of the full-batch gradient), ``"batch"`` (one per forward pass) or
``"sequence"`` (one per sequence: each sequence's difference is one more measurement for the
same forward cost). The estimate is the list of ``(seed, coefficient)`` pairs; gradients are
rebuilt from it on demand (:func:`multiplier_gradient`, :func:`minillm.kernels.ops.fms_scores`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from minillm.blocks import distributed
from minillm.blocks.loop import BlockSource, HiddenStore, block_output, capture, resident
from minillm.kernels.noise import unit_noise
from minillm.model.adapters import Group, adapter_for
from minillm.model.lm_loss import chunked_lm_loss, sequence_losses
from minillm.scoring.perturb import perturbed

Estimate = list[tuple[int, float]]
SHARING = ("global", "batch", "sequence")
RESOLUTIONS = ("unit", "layer")


def n_coords(group: Group, resolution: str) -> int:
    """Number of multiplier coordinates of ``group`` at ``resolution``."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    return group.n_units if resolution == "unit" else 1


def derive_seed(seed: int, k: int, b: int) -> int:
    """Seed of round ``k``, slot ``b`` (a sequence or batch index) of an estimate with ``seed``."""
    return ((seed & 0xFFFFFFFF) << 32) | ((k & 0xFFFF) << 16) | (b & 0xFFFF)


@contextmanager
def scaled_consumer_inputs(
    groups: Sequence[Group], scale: Callable[[int], torch.Tensor], resolution: str
) -> Iterator[None]:
    """Multiply each group's consumer-input columns by per-coordinate factors.

    ``scale(gi)`` gives ``[rows, n_coords]`` factors for group ``gi``: ``rows`` is 1 (all
    sequences) or the batch size (one row per sequence). Hooks are removed on exit.
    """
    handles = []
    for gi, g in enumerate(groups):
        for block in g.consumers:
            per_coord = g.n_units // n_coords(g, resolution) * block.size

            def hook(mod, args, gi=gi, per_coord=per_coord):
                x = args[0]
                cols = scale(gi).repeat_interleave(per_coord, dim=-1).to(x.device, x.dtype)
                # rows are sequences; OPT flattens [batch * seqlen, in] before fc2
                if torch.is_grad_enabled() or not x.is_contiguous():
                    y = x.reshape(cols.shape[0], -1, x.shape[-1]) * cols[:, None, :]
                    return (y.view(x.shape),)
                # forward only: the input is a temporary, scale it in place (no copy)
                x.view(cols.shape[0], -1, x.shape[-1]).mul_(cols[:, None, :])
                return (x,)

            handles.append(block.linear.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _slot(sharing: str, batch_index: int, seq_index: int) -> int:
    if sharing not in SHARING:
        raise ValueError(f"sharing must be one of {SHARING}, got {sharing!r}")
    return {"global": 0, "batch": batch_index, "sequence": seq_index}[sharing]


def _merge(coeffs: dict[int, float]) -> Estimate:
    return [(s, c) for s, c in coeffs.items()]


@torch.no_grad()
def spsa_multipliers(
    model: nn.Module,
    groups: Sequence[Group],
    tokens: torch.Tensor,
    *,
    resolution: str = "layer",
    n_perturbations: int = 8,
    eps: float = 1e-2,
    dist: str = "rademacher",
    seed: int = 0,
    sharing: str = "sequence",
    batch_size: int = 4,
    candidates: Sequence[torch.Tensor] | None = None,
) -> tuple[Estimate, int]:
    """SPSA estimate of ``dL/dm`` for the structure multipliers (see module docstring).

    ``tokens`` ``[n, seqlen]``; each forward runs ``2 * batch_size`` sequences (the ``+`` and
    ``-`` halves). Returns ``(estimate, forward_passes)``; group ``gi`` uses tensor id ``gi``.

    With ``candidates`` (one bool ``[n_units]`` per group; ``resolution="layer"``, Rademacher)
    the perturbation is the removal itself: the ``+`` half removes the candidates of the groups
    with ``z = +1``, the ``-`` half those with ``z = -1``, and ``d = L+ - L-``. Under an additive
    model ``L(S) = L0 + sum_{l in S} D_l`` this gives ``E[d z_l] = D_l``, the loss increase of
    removing group ``l``'s candidates (a random-subset regression of the pruning damage).
    """
    if candidates is not None and (resolution != "layer" or dist != "rademacher"):
        raise ValueError("removal perturbations need resolution='layer' and dist='rademacher'")
    options = dict(resolution=resolution, eps=eps, dist=dist, seed=seed, sharing=sharing)

    def make_pass(k: int, bi: int, i0: int, b: int) -> Pass:
        return multiplier_pass(groups, k, bi, i0, b, **options, candidates=candidates)

    return _run_passes(model, tokens, n_perturbations, batch_size, make_pass)


@torch.no_grad()
def removal_damage(
    model: nn.Module,
    groups: Sequence[Group],
    tokens: torch.Tensor,
    candidates: Sequence[torch.Tensor],
    batch_size: int = 8,
) -> tuple[torch.Tensor, int]:
    """Exact one-group-at-a-time reference of the removal estimate: ``[n_groups]`` loss
    increase of removing each group's candidates alone (``len(groups) + 1`` calibration
    sweeps). Returns ``(damage, forward_passes)``."""
    passes = 0

    def loss(factors) -> float:
        nonlocal passes
        total = 0.0
        for i0 in range(0, tokens.shape[0], batch_size):
            with scaled_consumer_inputs(groups, factors.__getitem__, "unit"):
                total += float(sequence_losses(model, tokens[i0 : i0 + batch_size]).sum())
            passes += 1
        return total / tokens.shape[0]

    ones = [torch.ones(1, g.n_units) for g in groups]
    base = loss(ones)
    damage = []
    for gi, c in enumerate(candidates):
        factors = list(ones)
        factors[gi] = (1 - c.float())[None]
        damage.append(loss(factors) - base)
    return torch.tensor(damage), passes


def multiplier_gradient(
    estimate: Estimate, group_index: int, n: int, dist: str = "rademacher"
) -> torch.Tensor:
    """Gradient ``[n]`` of group ``group_index``'s multipliers rebuilt from ``estimate``."""
    g = torch.zeros(n, dtype=torch.float64)
    for s, c in estimate:
        g += c * unit_noise(s, group_index, n, dist).double()
    return g.float()


@torch.no_grad()
def spsa_weights(
    model: nn.Module,
    linears: Sequence[tuple[int, nn.Linear]],
    tokens: torch.Tensor,
    *,
    n_perturbations: int = 8,
    eps: float = 1e-3,
    dist: str = "rademacher",
    seed: int = 0,
    sharing: str = "global",
    batch_size: int = 4,
) -> tuple[Estimate, int]:
    """Per-weight SPSA estimate of ``dL/dW`` for ``linears`` (``(tensor_id, linear)`` pairs).

    ``sharing`` is ``"global"`` or ``"batch"`` (a dense perturbation is the same for every
    sequence of a pass). Returns ``(estimate, forward_passes)``.
    """
    options = dict(eps=eps, dist=dist, seed=seed, sharing=sharing)

    def make_pass(k: int, bi: int, i0: int, b: int) -> Pass:
        return weight_pass(linears, k, bi, b, **options)

    return _run_passes(model, tokens, n_perturbations, batch_size, make_pass)


@dataclass
class Pass:
    """One forward of an estimate: the seeds of its ``b`` sequences, the perturbation its
    ``+``/``-`` halves run under (a fresh context manager per call) and the step dividing
    ``L+ - L-``."""

    seeds: list[int]
    perturbation: Callable[[], AbstractContextManager]
    step: float


def multiplier_pass(
    groups: Sequence[Group],
    k: int,
    bi: int,
    i0: int,
    b: int,
    *,
    resolution: str,
    eps: float,
    dist: str,
    seed: int,
    sharing: str,
    candidates: Sequence[torch.Tensor] | None = None,
) -> Pass:
    """Pass ``(k, bi)`` of :func:`spsa_multipliers` (sequences ``i0 .. i0 + b``); the factors
    of a group are drawn when its consumer runs."""
    seeds = [derive_seed(seed, k, _slot(sharing, bi, i0 + j)) for j in range(b)]
    uniq = list(dict.fromkeys(seeds))
    rows = torch.tensor([uniq.index(s) for s in seeds])
    sign = torch.cat([torch.ones(b), -torch.ones(b)])[:, None]

    def noise(gi: int) -> torch.Tensor:  # [2b, n_coords]
        n = n_coords(groups[gi], resolution)
        return torch.stack([unit_noise(s, gi, n, dist) for s in uniq])[rows].repeat(2, 1)

    if candidates is None:

        def factors(gi: int) -> torch.Tensor:
            return 1 + eps * sign * noise(gi)

        return Pass(seeds, lambda: scaled_consumer_inputs(groups, factors, resolution), 2 * eps)

    def removal(gi: int) -> torch.Tensor:  # 0 on the removed candidates, 1 elsewhere
        return 1 - candidates[gi].float() * (1 + sign * noise(gi)) / 2

    return Pass(seeds, lambda: scaled_consumer_inputs(groups, removal, "unit"), 1.0)


def weight_pass(
    linears: Sequence[tuple[int, nn.Linear]],
    k: int,
    bi: int,
    b: int,
    *,
    eps: float,
    dist: str,
    seed: int,
    sharing: str,
) -> Pass:
    """Pass ``(k, bi)`` of :func:`spsa_weights` (``b`` sequences)."""
    if sharing == "sequence":
        raise ValueError("per-weight perturbations are shared by a pass: use global or batch")
    s = derive_seed(seed, k, _slot(sharing, bi, 0))
    return Pass([s] * b, lambda: perturbed(linears, s, eps, dist, "dense"), 2 * eps)


def _run_passes(
    model: nn.Module,
    tokens: torch.Tensor,
    n_perturbations: int,
    batch_size: int,
    make_pass: Callable[[int, int, int, int], Pass],
) -> tuple[Estimate, int]:
    """Run pass ``make_pass(k, bi, i0, b)`` of every round ``k`` and batch ``bi`` of ``tokens``
    on the whole model; returns ``(estimate, forward_passes)``."""
    n = tokens.shape[0]
    coeffs: dict[int, float] = {}
    passes = 0
    for k in range(n_perturbations):
        for bi, i0 in enumerate(range(0, n, batch_size)):
            batch = tokens[i0 : i0 + batch_size]
            b = batch.shape[0]
            one = make_pass(k, bi, i0, b)
            with one.perturbation():
                losses = sequence_losses(model, torch.cat([batch, batch]))
            passes += 1
            d = (losses[:b] - losses[b:]).double() / one.step
            for s, dj in zip(one.seeds, d.tolist(), strict=True):
                coeffs[s] = coeffs.get(s, 0.0) + dj / (n_perturbations * n)
    return _merge(coeffs), passes


@torch.no_grad()
def spsa_by_block(
    model: nn.Module,
    tokens: torch.Tensor,
    make_pass: Callable[[int, int, int, int], Pass],
    *,
    n_perturbations: int,
    batch_size: int,
    first_row: int = 0,
    source: BlockSource | None = None,
    spill: bool = True,
) -> tuple[Estimate, int]:
    """The estimate of :func:`spsa_multipliers` / :func:`spsa_weights`, one decoder block at a
    time (a model streamed from disk loads each block once).

    Every pass ``make_pass(k, bi, i0, b)`` (round ``k``, micro-batch ``bi`` of ``batch_size``
    sequences starting at row ``first_row + i0`` of the whole calibration set) is a stream of
    hidden states ``[2b, seqlen, d]`` (its sequences twice: the ``+`` and ``-`` halves); block
    ``i`` runs every stream under its pass's perturbation before block ``i + 1`` is loaded, and
    the streams wait in a :class:`~minillm.blocks.loop.HiddenStore` (on disk with ``spill``:
    ``2 * n_perturbations`` times the calibration hidden states). At the LM head each
    sequence's ``(L+ - L-) / step`` is its coefficient. Under torchrun the coefficients are
    divided by the sequences of every rank; each rank returns its own seeds' coefficients.
    Returns ``(estimate, forward_passes)``.
    """
    adapter = adapter_for(model)
    blocks = adapter.layers(model)
    n = tokens.shape[0]
    total = distributed.total_count(n)
    starts = list(range(0, n, batch_size))
    doubled = torch.cat([torch.cat([tokens[i0 : i0 + batch_size]] * 2) for i0 in starts])
    boundary = capture(model, adapter, doubled, 2 * batch_size, source)  # [batch; batch] each
    device = boundary.hidden[0].device
    runs = [(k, bi, i0) for k in range(n_perturbations) for bi, i0 in enumerate(starts)]
    passes = [make_pass(k, bi, first_row + i0, min(batch_size, n - i0)) for k, bi, i0 in runs]
    coeffs: dict[int, float] = {}
    with HiddenStore(spill) as store:
        for p, (_, bi, _) in enumerate(runs):
            store.put(p, [boundary.hidden[bi]])
        boundary.hidden.clear()
        for i, block in enumerate(blocks):
            with resident(source, i):
                kwargs = boundary.at(i).kwargs
                for p, (_, bi, _) in enumerate(runs):
                    (h,) = store.take(p, device)
                    with passes[p].perturbation():
                        store.put(p, [block_output(block(h, **kwargs[bi]))])
        with resident(source, "head"):
            norm = adapter.final_norm(model)
            for p, (_, bi, _) in enumerate(runs):
                (h,) = store.take(p, device)
                losses = chunked_lm_loss(model, norm(h), boundary.tokens[bi])
                b = losses.shape[0] // 2
                d = (losses[:b] - losses[b:]).double() / passes[p].step
                for s, dj in zip(passes[p].seeds, d.tolist(), strict=True):
                    coeffs[s] = coeffs.get(s, 0.0) + dj / (n_perturbations * total)
    return _merge(coeffs), len(runs)

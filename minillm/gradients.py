"""Exact gradients by backpropagation: the memory-hungry references of the SPSA estimates.

The loss is the mean over calibration sequences of each sequence's mean next-token loss,
the same ``L`` that :mod:`minillm.spsa` estimates. Parameters are never modified;
``requires_grad`` flags and ``.grad`` fields are restored on exit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from minillm.activations import sequence_losses
from minillm.adapters import Group
from minillm.spsa import n_coords, scaled_consumer_inputs


@contextmanager
def _only_grad(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad


def _backward_over(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> int:
    n = tokens.shape[0]
    passes = 0
    for i in range(0, n, batch_size):
        batch = tokens[i : i + batch_size]
        (sequence_losses(model, batch).sum() / n).backward()
        passes += 1
    return passes


def weight_gradients(
    model: nn.Module, linears: Sequence[nn.Linear], tokens: torch.Tensor, batch_size: int = 4
) -> tuple[dict[nn.Linear, torch.Tensor], int]:
    """``dL/dW`` ``[out, in]`` float32 of each linear over ``tokens`` ``[n, seqlen]``.

    Returns ``({linear: grad}, forward_passes)``.
    """
    linears = list(dict.fromkeys(linears))
    with _only_grad(model, [lin.weight for lin in linears]):
        passes = _backward_over(model, tokens, batch_size)
        grads = {lin: lin.weight.grad.float() for lin in linears}
    return grads, passes


def multiplier_gradients(
    model: nn.Module,
    groups: Sequence[Group],
    tokens: torch.Tensor,
    resolution: str = "layer",
    batch_size: int = 4,
) -> tuple[list[torch.Tensor], int]:
    """Exact ``dL/dm`` ``[n_coords]`` per group for the multipliers of :mod:`minillm.spsa`.

    Returns ``([grad per group], forward_passes)``.
    """
    ms = [torch.zeros(n_coords(g, resolution), requires_grad=True) for g in groups]
    with _only_grad(model, []):
        with scaled_consumer_inputs(groups, lambda gi: (1 + ms[gi])[None], resolution):
            passes = _backward_over(model, tokens, batch_size)
    return [m.grad.detach().clone() for m in ms], passes

"""Calibration forwards: per-input-feature statistics of linears, and a chunked LM loss.

Both run the model's decoder (``model.base_model``) so that full-vocabulary logits of all
tokens never exist at once: :func:`chunked_lm_loss` applies the output embedding to
``chunk`` tokens at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minillm.scoring.perturb import collect_input_stats as fused_input_stats


@dataclass
class InputStats:
    """Statistics of one linear's inputs over ``count`` calibration tokens.

    ``sum_sq`` and ``sum`` are ``[in_features]`` float64 sums over tokens of ``x_j**2`` and
    ``x_j``.
    """

    sum_sq: torch.Tensor
    sum: torch.Tensor
    count: int = 0

    @property
    def norm(self) -> torch.Tensor:
        """``||X_j||_2`` over tokens: ``[in_features]`` float32."""
        return self.sum_sq.sqrt().float()

    @property
    def mean(self) -> torch.Tensor:
        """``[in_features]`` float32 mean over tokens."""
        return (self.sum / max(self.count, 1)).float()

    @property
    def var(self) -> torch.Tensor:
        """``[in_features]`` float32 variance over tokens (population, ``1/count``)."""
        m = self.sum / max(self.count, 1)
        return (self.sum_sq / max(self.count, 1) - m * m).clamp_min(0).float()


def _batches(tokens: torch.Tensor, batch_size: int):
    for i in range(0, tokens.shape[0], batch_size):
        yield tokens[i : i + batch_size]


@contextmanager
def collected_stats(linears: Sequence[nn.Linear]) -> Iterator[dict[nn.Linear, InputStats]]:
    """Statistics of the inputs of ``linears`` over every forward run inside the context.

    Yields a dict that is filled with ``{linear: InputStats}`` when the context exits; the
    statistics are reduced by the fused linear of :mod:`minillm.kernels` on the same read of each
    input as its matrix product (forward only).
    """
    unique = list(dict.fromkeys(linears))
    stats: dict[nn.Linear, InputStats] = {}
    with fused_input_stats(list(enumerate(unique))) as fused:
        yield stats
    for tid, lin in enumerate(unique):
        if tid in fused:
            f = fused[tid]
            stats[lin] = InputStats(f.sum_sq.double(), f.sum.double(), f.count)


@torch.no_grad()
def collect_input_stats(
    model: nn.Module, linears: Sequence[nn.Linear], tokens: torch.Tensor, batch_size: int = 8
) -> tuple[dict[nn.Linear, InputStats], int]:
    """Run ``tokens`` ``[n, seqlen]`` through the decoder; statistics of every linear's input.

    Returns ``({linear: InputStats}, forward_passes)``. The logits are never computed.
    """
    passes = 0
    with collected_stats(linears) as stats:
        for batch in _batches(tokens, batch_size):
            model.base_model(input_ids=batch.to(model.device), use_cache=False)
            passes += 1
    return stats, passes


def loss_chunks(t: int, b: int, chunk_tokens: int = 32) -> list[tuple[int, int]]:
    """Position ranges ``[s, e)`` of next-token predictions of ``t``-token sequences, about
    ``chunk_tokens`` tokens of a batch of ``b`` at a time."""
    chunk = max(1, chunk_tokens // b)
    return [(s, min(t - 1, s + chunk)) for s in range(0, t - 1, chunk)]


def chunk_ce(
    model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, s: int, e: int
) -> torch.Tensor:
    """Summed next-token cross-entropy ``[batch]`` float32 of positions ``s..e-1`` (the output
    embedding applied to those positions of ``hidden`` ``[batch, seqlen, d]`` only)."""
    logits = model.get_output_embeddings()(hidden[:, s:e]).float()
    target = input_ids[:, s + 1 : e + 1].to(logits.device)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return ce.view(hidden.shape[0], -1).sum(1)


def chunked_lm_loss(
    model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, chunk_tokens: int = 32
) -> torch.Tensor:
    """Mean next-token cross-entropy per sequence: ``[batch]`` float32.

    ``hidden`` ``[batch, seqlen, d]`` is the decoder's last hidden state; the output embedding
    is applied to about ``chunk_tokens`` tokens at a time (peak ``chunk_tokens * vocab``
    floats of logits without grad; with grad, autograd keeps every chunk's logits until the
    backward: see :func:`minillm.scoring.gradients.weight_gradients` for a chunked backward).
    """
    b, t, _ = hidden.shape
    total = hidden.new_zeros(b, dtype=torch.float32)
    for s, e in loss_chunks(t, b, chunk_tokens):
        total = total + chunk_ce(model, hidden, input_ids, s, e)
    return total / (t - 1)


def sequence_losses(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean LM loss ``[batch]`` of ``input_ids`` ``[batch, seqlen]``."""
    hidden = model.base_model(input_ids=input_ids.to(model.device), use_cache=False)[0]
    return chunked_lm_loss(model, hidden, input_ids)

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


def chunked_lm_loss(
    model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, chunk_tokens: int = 32
) -> torch.Tensor:
    """Mean next-token cross-entropy per sequence: ``[batch]`` float32.

    ``hidden`` ``[batch, seqlen, d]`` is the decoder's last hidden state; the output embedding
    is applied to about ``chunk_tokens`` tokens at a time (peak ``chunk_tokens * vocab``
    floats of logits). Differentiable when ``hidden`` requires grad.
    """
    head = model.get_output_embeddings()
    b, t, _ = hidden.shape
    chunk = max(1, chunk_tokens // b)
    total = hidden.new_zeros(b, dtype=torch.float32)
    for s in range(0, t - 1, chunk):
        e = min(t - 1, s + chunk)
        logits = head(hidden[:, s:e]).float()
        target = input_ids[:, s + 1 : e + 1].to(logits.device)
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        )
        total = total + ce.view(b, -1).sum(1)
    return total / (t - 1)


def sequence_losses(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean LM loss ``[batch]`` of ``input_ids`` ``[batch, seqlen]``."""
    hidden = model.base_model(input_ids=input_ids.to(model.device), use_cache=False)[0]
    return chunked_lm_loss(model, hidden, input_ids)

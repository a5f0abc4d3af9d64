"""The next-token loss of a causal LM, computed a chunk of positions at a time.

The output embedding is applied to a few positions at once, so full-vocabulary logits of all
tokens never exist together (``[tokens, vocab]`` floats would dwarf a small model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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

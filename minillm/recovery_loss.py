"""The recovery loss: next-token CE mixed with KL(teacher || student), fused and chunked.

The logits of a step are ``[B, T, V]`` with a large vocabulary (49,152 for SmolLM2): unfused,
the float32 log-softmaxes, probabilities and their gradients are several ``B*T*V`` tensors
(200 MB each for 8 x 128 tokens). Here the loss and its gradient are computed ``LOSS_CHUNK``
positions at a time in the forward pass; only the gradient (in the logits' dtype) is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_CHUNK = 64  # positions per chunk: 64 x V float32 (12 MiB at V = 49,152) per buffer


class _FusedRecoveryLoss(torch.autograd.Function):
    """CE/KL of ``[N, V]`` logits and their gradient, computed ``LOSS_CHUNK`` rows at a time.

    The full-vocabulary float32 intermediates (log-softmaxes, probabilities) exist for one
    chunk only; the backward pass multiplies the gradient kept from the forward pass.
    Outputs ``(loss, ce, kl)``; only ``loss`` is differentiable.
    """

    @staticmethod
    def forward(ctx, logits, teacher, target, weight, kd_weight, temperature):
        ce_weight = 1.0 if teacher is None else 1.0 - kd_weight
        grad = torch.empty_like(logits)
        ce = logits.new_zeros((), dtype=torch.float32)
        kl = logits.new_zeros((), dtype=torch.float32)
        for start in range(0, logits.shape[0], LOSS_CHUNK):
            rows = slice(start, start + LOSS_CHUNK)
            w = weight[rows].unsqueeze(-1)
            idx = target[rows].unsqueeze(-1)
            student = F.log_softmax(logits[rows].float(), dim=-1)
            ce -= (student.gather(-1, idx) * w).sum()
            chunk_grad = student.exp().scatter_add_(-1, idx, -torch.ones_like(w))
            chunk_grad *= ce_weight * w
            if teacher is not None:
                if temperature != 1.0:
                    student = F.log_softmax(logits[rows].float() / temperature, dim=-1)
                t_logp = F.log_softmax(teacher[rows].float() / temperature, dim=-1)
                t_prob = t_logp.exp()
                kl += ((t_prob * (t_logp - student)).sum(-1, keepdim=True) * w).sum()
                chunk_grad += (kd_weight * temperature * w) * (student.exp() - t_prob)
            grad[rows] = chunk_grad
        kl = kl * temperature**2
        loss = ce.clone() if teacher is None else ce_weight * ce + kd_weight * kl
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None


def recovery_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    kd_weight: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token CE (mean over labelled tokens), mixed with KL(teacher || student) when given.

    ``logits``/``teacher_logits``: ``[B, T, V]``; ``labels``: ``[B, T]`` with -100 = ignore.
    Returns ``((1 - w) * ce + w * kl, parts)``; KL is per token, scaled by ``temperature**2``.
    Fused and chunked (``_FusedRecoveryLoss``): no full ``[B, T, V]`` float32 copy is made.
    """
    batch, length, vocab = logits.shape
    target = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)  # position t predicts t + 1
    weight = (target != -100).float()
    weight /= weight.sum().clamp_min(1.0)
    teacher = None if teacher_logits is None else teacher_logits.reshape(batch * length, vocab)
    loss, ce, kl = _FusedRecoveryLoss.apply(
        logits.reshape(batch * length, vocab),
        teacher,
        target.clamp_min(0),
        weight,
        kd_weight,
        temperature,
    )
    parts = {"ce": ce.item()} if teacher is None else {"ce": ce.item(), "kl": kl.item()}
    return loss, parts

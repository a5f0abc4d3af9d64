"""The recovery loss: next-token CE mixed with KL(teacher || student), fused and chunked.

The teacher enters as its top-k log-probabilities per position (``teacher_topk``), computed once
before the training steps: a step then costs no teacher forward pass. The KL is that of the two
distributions coarsened to the teacher's k tokens plus one "other tokens" bucket: exact in the
mass each model puts outside the k tokens, blind only to how it spreads there.

The logits of a step are ``[B, T, V]`` with a large vocabulary (49,152 for SmolLM2): unfused,
the float32 log-softmaxes, probabilities and their gradients are several ``B*T*V`` tensors
(200 MB each for 8 x 128 tokens). Here the loss and its gradient are computed ``LOSS_CHUNK``
positions at a time in the forward pass; only the gradient (in the logits' dtype) is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_CHUNK = 64  # positions per chunk: 64 x V float32 (12 MiB at V = 49,152) per buffer
TINY = 1e-20  # floor of the student's "other tokens" mass before its log


def teacher_topk(
    logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely tokens of ``[..., V]`` logits at ``temperature``.

    Returns ``(log-probabilities float32 [..., k], token ids int32 [..., k])``.
    """
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return values, ids.int()


def _sparse_kl(
    logq: torch.Tensor, q: torch.Tensor, logp_k: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p || q) over the teacher's k tokens plus the rest as one bucket, and its gradient.

    ``logq``/``q``: student log-probabilities/probabilities ``[N, V]``; ``logp_k``/``ids``: the
    teacher's ``[N, k]``. Returns (KL ``[N, 1]``, d KL / d student logits ``[N, V]``).
    """
    q_k = q.gather(-1, ids)
    q_rest = q.scatter(-1, ids, 0.0)  # summed directly: no cancellation in 1 - sum(q_k)
    q_tail = q_rest.sum(-1, keepdim=True).clamp_min(TINY)
    p_k = logp_k.exp()
    p_tail = (1.0 - p_k.sum(-1, keepdim=True)).clamp_min(0.0)
    kl = (torch.xlogy(p_k, p_k) - p_k * logq.gather(-1, ids)).sum(-1, keepdim=True)
    kl += torch.xlogy(p_tail, p_tail) - p_tail * q_tail.log()
    # d/dz_j: q_j - p_j on the k tokens; q_j * (1 - p_tail / q_tail) elsewhere
    grad = q_rest.mul_(1.0 - p_tail / q_tail).scatter_(-1, ids, q_k - p_k)
    return kl, grad


class _FusedRecoveryLoss(torch.autograd.Function):
    """CE/KL of ``[N, V]`` logits and their gradient, computed ``LOSS_CHUNK`` rows at a time.

    The full-vocabulary float32 intermediates (log-softmaxes, probabilities) exist for one
    chunk only; the backward pass multiplies the gradient kept from the forward pass.
    Outputs ``(loss, ce, kl)``; only ``loss`` is differentiable.
    """

    @staticmethod
    def forward(ctx, logits, teacher_logp, teacher_ids, target, weight, kd_weight, temperature):
        with_teacher = teacher_logp is not None
        ce_weight = 1.0 - kd_weight if with_teacher else 1.0
        grad = torch.empty_like(logits)
        ce = logits.new_zeros((), dtype=torch.float32)
        kl = logits.new_zeros((), dtype=torch.float32)
        for start in range(0, logits.shape[0], LOSS_CHUNK):
            rows = slice(start, start + LOSS_CHUNK)
            w = weight[rows].unsqueeze(-1)
            idx = target[rows].unsqueeze(-1)
            logq = F.log_softmax(logits[rows].float(), dim=-1)
            ce -= (logq.gather(-1, idx) * w).sum()
            chunk_grad = 0.0
            if ce_weight:
                chunk_grad = logq.exp().scatter_add_(-1, idx, -torch.ones_like(w))
                chunk_grad *= ce_weight * w
            if with_teacher:
                if temperature != 1.0:
                    logq = F.log_softmax(logits[rows].float() / temperature, dim=-1)
                ids = teacher_ids[rows].long()
                chunk_kl, kd_grad = _sparse_kl(logq, logq.exp(), teacher_logp[rows], ids)
                kl += (chunk_kl * w).sum()
                chunk_grad = kd_grad.mul_(kd_weight * temperature * w).add_(chunk_grad)
            grad[rows] = chunk_grad
        kl = kl * temperature**2
        loss = ce_weight * ce + kd_weight * kl if with_teacher else ce.clone()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None


def recovery_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: tuple[torch.Tensor, torch.Tensor] | None,
    kd_weight: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token CE (mean over labelled tokens), mixed with KL(teacher || student) when given.

    ``logits``: ``[B, T, V]``; ``labels``: ``[B, T]`` with -100 = ignore; ``teacher``: the
    teacher's ``teacher_topk`` at ``temperature``, ``([B, T, k], [B, T, k])``.
    Returns ``((1 - w) * ce + w * kl, parts)``; KL is per token, scaled by ``temperature**2``.
    Fused and chunked (``_FusedRecoveryLoss``): no full ``[B, T, V]`` float32 copy is made.
    """
    batch, length, vocab = logits.shape
    target = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)  # position t predicts t + 1
    weight = (target != -100).float()
    weight /= weight.sum().clamp_min(1.0)
    logp, ids = (None, None) if teacher is None else (t.flatten(0, 1) for t in teacher)
    loss, ce, kl = _FusedRecoveryLoss.apply(
        logits.reshape(batch * length, vocab),
        logp,
        ids,
        target.clamp_min(0),
        weight,
        kd_weight,
        temperature,
    )
    parts = {"ce": ce.item()} if teacher is None else {"ce": ce.item(), "kl": kl.item()}
    return loss, parts

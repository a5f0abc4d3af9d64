"""Across processes (``torchrun``): ranks split the calibration sequences and all-reduce the
input statistics (with ``--reconstruct``, each consumer's Gram matrix; with exact gradients,
each block's weight gradients before they are reduced into scores), so every rank scores,
allocates and refits the same units; only rank 0 writes.

Launched by ``torchrun --nproc-per-node N -m minillm.prune ...`` (the environment holds
``WORLD_SIZE``/``RANK``), the model resident on every rank or streamed (``--offload``); gloo on
CPU, NCCL on CUDA. Statistics are sums over tokens,
so the reduced ones equal one process's up to the order of floating-point additions.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from minillm.scoring.stats import InputStats


def setup(device: str) -> tuple[int, int]:
    """``(rank, world size)``; joins the process group when launched by torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_rows(tokens: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's contiguous share of the calibration sequences ``[n, seqlen]``."""
    return tokens.tensor_split(size)[rank]


def first_row(n: int) -> int:
    """Index in the whole calibration set of this rank's first sequence (it holds ``n``)."""
    if _alone():
        return 0
    counts: list = [None] * dist.get_world_size()
    dist.all_gather_object(counts, n)
    return sum(counts[: dist.get_rank()])


def _alone() -> bool:
    return not dist.is_initialized() or dist.get_world_size() == 1


def total_count(n: int) -> int:
    """``n`` summed over ranks (``n`` alone in one process)."""
    if _alone():
        return n
    count = torch.tensor([n], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        count = count.cuda()
    dist.all_reduce(count)
    return int(count.item())


def broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (``t`` itself in one process): calibration text that rank
    0 wrote. Every rank passes a tensor of the same shape and dtype."""
    if _alone():
        return t
    moved = t.cuda() if dist.get_backend() == "nccl" else t
    dist.broadcast(moved, src=0)
    return moved.to(t.device)


def all_reduce_sum(t: torch.Tensor) -> None:
    """Sum ``t`` over ranks, in place (no-op in one process): one block's weight gradients."""
    if not _alone():
        dist.all_reduce(t)


def all_reduce_stats(stats: dict) -> None:
    """Sum ``{linear: InputStats}`` over ranks, in place (no-op in one process)."""
    if _alone():
        return
    for lin, st in stats.items():
        sum_sq, total = st.sum_sq.clone(), st.sum.clone()
        count = torch.tensor([st.count], dtype=torch.float64, device=sum_sq.device)
        for t in (sum_sq, total, count):
            dist.all_reduce(t)
        stats[lin] = InputStats(sum_sq, total, int(count.item()))


def all_reduce_gram(gram) -> None:
    """Sum a :class:`~minillm.blocks.reconstruct.Gram` over ranks, in place (no-op alone)."""
    if _alone():
        return
    count = torch.tensor([gram.count], dtype=torch.float64, device=gram.xtx.device)
    for t in (gram.xtx, gram.xsum, count):
        dist.all_reduce(t)
    gram.count = int(count.item())

"""Exact gradients by backpropagation, block by block for weights (:func:`weight_gradients`).

The loss is the mean over calibration sequences of each sequence's mean next-token loss,
the same ``L`` that :mod:`minillm.scoring.spsa` estimates. Parameters are never modified;
``requires_grad`` flags and ``.grad`` fields are restored on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from minillm.blocks import distributed
from minillm.blocks.loop import (
    BlockSource,
    Boundary,
    HiddenStore,
    block_output,
    capture,
    resident,
    run_block,
)
from minillm.blocks.resume import ResumeState
from minillm.model.adapters import Adapter, Group, adapter_for
from minillm.model.lm_loss import chunk_ce, loss_chunks, sequence_losses
from minillm.scoring.spsa import n_coords, scaled_consumer_inputs
from minillm.scoring.stats import InputStats, collected_stats


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


def _layer_of(adapter: Adapter, model: nn.Module, linears: Sequence[nn.Linear]) -> dict:
    owner = {}
    for i, block in enumerate(adapter.layers(model)):
        for mod in block.modules():
            owner[mod] = i
    missing = [lin for lin in linears if lin not in owner]
    if missing:
        raise ValueError(f"{len(missing)} linear(s) are not inside a decoder block")
    return {lin: owner[lin] for lin in linears}


def _output_gradients(model, adapter, top: Boundary, n: int) -> list[torch.Tensor]:
    """``dL/dh`` of the last block's output, per micro-batch (the loss is a mean over ``n``).

    The LM head is backpropagated one chunk of positions at a time, so one chunk's logits live
    (not the whole micro-batch's, ``b * seqlen * vocab`` floats)."""
    grads = []
    for h, ids in zip(top.hidden, top.tokens, strict=True):
        h = h.detach().requires_grad_()
        with torch.enable_grad():
            normed = adapter.final_norm(model)(h)
        x = normed.detach().requires_grad_()
        b, t, _ = h.shape
        for s, e in loss_chunks(t, b):
            with torch.enable_grad():
                (chunk_ce(model, x, ids, s, e).sum() / ((t - 1) * n)).backward()
        normed.backward(x.grad)
        grads.append(h.grad)
    return grads


def weight_gradients(
    model: nn.Module,
    linears: Sequence[nn.Linear],
    tokens: torch.Tensor,
    batch_size: int = 4,
    reduce: Callable[[nn.Linear, torch.Tensor, InputStats], object] | None = None,
    spill: bool = True,
    source: BlockSource | None = None,
    checkpoint: ResumeState | None = None,
) -> tuple[dict, int, dict[nn.Linear, InputStats]]:
    """``dL/dW`` of each linear over ``tokens`` ``[n, seqlen]``, one decoder block at a time.

    A forward sweep stores every block's input hidden states (``spill=True``, the default: on
    disk, read back one micro-batch at a time, see :class:`~minillm.blocks.loop.HiddenStore`;
    ``False``: in memory, growing with depth); then from the top block down each block is
    recomputed with grad on micro-batches of ``batch_size`` and the stored ``dL/d output`` is
    backpropagated through it. The gradients of one block's linears are complete after its
    step; ``reduce(linear, grad [out, in] float32, input_stats)`` turns each into what the caller
    keeps (the gradient itself by default; a tensor or a tuple of tensors) before the next block,
    so one block's gradients live at a time. Blocks below the lowest listed linear are never
    backpropagated. The linears' input statistics are reduced during the forward sweep. With a
    ``source`` (:mod:`minillm.blocks.loop`) each block is loaded for its forward and again for
    its backward. With a ``checkpoint`` the block inputs are stored in its directory and the
    state (``dL/d input``, statistics, reduced results) is saved after the forward sweep and
    after each block's backward; a saved state is continued from.

    Returns ``({linear: reduce(linear, grad)}, forward_passes, {linear: InputStats})``.
    """
    adapter = adapter_for(model)
    linears = list(dict.fromkeys(linears))
    layer_of = _layer_of(adapter, model, linears)
    blocks = adapter.layers(model)
    lowest = min(layer_of.values())
    reduce = reduce or (lambda lin, g, st: g)
    n = distributed.total_count(tokens.shape[0])  # the loss is a mean over every rank's rows
    boundary = capture(model, adapter, tokens, batch_size, source)
    device = boundary.hidden[0].device
    passes = 2 * len(boundary.hidden)
    saved = checkpoint.load() if checkpoint is not None else None
    store_dir = checkpoint.dir / "hidden" if checkpoint is not None else None
    with HiddenStore(spill, store_dir) as store, _only_grad(model, []):
        if saved is None:
            with torch.no_grad(), collected_stats(linears) as stats:
                for i in range(len(blocks)):
                    if i >= lowest:
                        store.put(i, boundary.hidden)
                    with resident(source, i):
                        boundary = boundary.with_hidden(run_block(blocks[i], boundary.at(i)))
            distributed.all_reduce_stats(stats)
            with resident(source, "head"):
                grads = _output_gradients(model, adapter, boundary, n)
            top, results = len(blocks), {}
            if checkpoint is not None:
                checkpoint.save(top, *_pack_backward(linears, grads, stats, results, store.counts))
        else:
            top, grads, stats, results = _unpack_backward(linears, saved, store, device)
        boundary.hidden.clear()  # the top block's output is not needed any more
        for i in reversed(range(lowest, top)):
            own = [lin for lin in linears if layer_of[lin] == i]
            inputs = store.take(i, device)
            with resident(source, i):
                grads = _block_backward(
                    blocks[i], inputs, boundary.at(i).kwargs, grads, own, need_input_grad=i > lowest
                )
                for lin in own:
                    distributed.all_reduce_sum(lin.weight.grad)
                    results[lin] = reduce(lin, lin.weight.grad.float(), stats[lin])
                    lin.weight.grad = None
            if checkpoint is not None:
                left = {k: v for k, v in store.counts.items() if k != i}
                checkpoint.save(i, *_pack_backward(linears, grads, stats, results, left))
                store.discard(i)  # after the save: a kill in between leaves files, not a gap
    return results, passes, stats


def _pack_backward(linears, grads, stats, results, stored: dict) -> tuple[dict, dict]:
    """Tensors and metadata of a backward sweep's state (linears named by their index;
    ``stored``: micro-batches per block boundary still on disk)."""
    tensors = {f"grad.{j}": g for j, g in enumerate(grads)}
    meta: dict = {"phase": "backward", "counts": {}, "results": {}, "stored": stored}
    for k, lin in enumerate(linears):
        st = stats[lin]
        tensors[f"stats.{k}.sum_sq"], tensors[f"stats.{k}.sum"] = st.sum_sq, st.sum
        meta["counts"][k] = st.count
        if lin in results:
            parts = results[lin]
            single = torch.is_tensor(parts)
            for m, t in enumerate([parts] if single else parts):
                tensors[f"result.{k}.{m}"] = t
            meta["results"][k] = None if single else len(parts)
    return tensors, meta


def _unpack_backward(linears, saved, store, device) -> tuple[int, list, dict, dict]:
    """``(top, grads, stats, results)`` of a state saved by :func:`_pack_backward`."""
    done, tensors, meta = saved
    tensors = {k: t.to(device) for k, t in tensors.items()}
    if meta.get("phase") != "backward":
        raise ValueError("--resume: the saved state is not a block-by-block backward's")
    store.restore({int(k): v for k, v in meta["stored"].items()})
    grads = [tensors[f"grad.{j}"] for j in range(sum(k.startswith("grad.") for k in tensors))]
    stats = {
        lin: InputStats(
            tensors[f"stats.{k}.sum_sq"], tensors[f"stats.{k}.sum"], meta["counts"][str(k)]
        )
        for k, lin in enumerate(linears)
    }
    results = {}
    for k, size in meta["results"].items():
        lin = linears[int(k)]
        if size is None:
            results[lin] = tensors[f"result.{k}.0"]
        else:
            results[lin] = tuple(tensors[f"result.{k}.{m}"] for m in range(size))
    return done, grads, stats, results


def _block_backward(
    block: nn.Module,
    hidden: Iterable[torch.Tensor],
    kwargs: list[dict],
    out_grads: list[torch.Tensor],
    linears: list[nn.Linear],
    need_input_grad: bool,
) -> list[torch.Tensor]:
    """Backpropagate ``out_grads`` through ``block`` run on the micro-batches ``hidden``;
    accumulates the linears' ``.grad`` and returns ``dL/d input`` per micro-batch (empty when
    not needed). ``out_grads`` is emptied as it is used, so one boundary of gradients lives."""
    for lin in linears:
        lin.weight.requires_grad_(True)
    in_grads = []
    try:
        for h, kw in zip(hidden, kwargs, strict=True):
            x = h.detach().requires_grad_(need_input_grad)
            with torch.enable_grad():
                y = block_output(block(x, **kw))
            y.backward(out_grads.pop(0))
            if need_input_grad:
                in_grads.append(x.grad)
    finally:
        for lin in linears:
            lin.weight.requires_grad_(False)
    return in_grads


def multiplier_gradients(
    model: nn.Module,
    groups: Sequence[Group],
    tokens: torch.Tensor,
    resolution: str = "layer",
    batch_size: int = 4,
) -> tuple[list[torch.Tensor], int]:
    """Exact ``dL/dm`` ``[n_coords]`` per group for the multipliers of :mod:`minillm.scoring.spsa`.

    Returns ``([grad per group], forward_passes)``.
    """
    ms = [torch.zeros(n_coords(g, resolution), requires_grad=True) for g in groups]
    with _only_grad(model, []):
        with scaled_consumer_inputs(groups, lambda gi: (1 + ms[gi])[None], resolution):
            passes = _backward_over(model, tokens, batch_size)
    return [m.grad.detach().clone() for m in ms], passes

"""The block loop: calibration hidden states at a decoder-block boundary, one block at a time.

Exact block-by-block gradients (:mod:`minillm.scoring.gradients`) and reconstruction
(:mod:`minillm.blocks.reconstruct`) share this shape of computation (SparseGPT/Wanda process layers
the same way): catch the inputs of the first decoder block for every calibration micro-batch,
then run the blocks one after the other on them. Memory is one block's activations plus the
hidden states of one boundary, ``n * seqlen * hidden`` values, whatever the depth.

A :class:`Boundary` holds, per micro-batch, the hidden states ``[b, seqlen, hidden]`` and the
keyword arguments every decoder block receives (attention mask, rotary position embeddings,
BLOOM's ALiBi tensor), captured once from the model's own forward.

A *block source* (:class:`BlockSource`, e.g. :class:`minillm.blocks.streaming.StreamedModel`) makes
the loop work on a model whose weights are not resident: each part is loaded right before it
runs and released right after (``"embed"``: the embedding stage, ``i``: decoder block ``i``,
``"head"``: final norm and LM head). With ``source=None`` everything is already resident.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from minillm.model.adapters import Adapter


@dataclass
class Boundary:
    """Hidden states entering a decoder block: ``hidden[i]`` ``[b_i, seqlen, d]`` per micro-batch,
    ``kwargs[i]`` the block's keyword arguments for that micro-batch, ``tokens[i]`` its ids.

    Families whose layers take different arguments (Gemma 3: sliding-window or full attention
    masks and RoPE per layer type) carry them per layer in ``per_layer[layer][i]``; use
    :meth:`at` to get the boundary as block ``layer`` sees it.
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    tokens: list[torch.Tensor]
    per_layer: list[list[dict]] | None = None

    def with_hidden(self, hidden: list[torch.Tensor]) -> Boundary:
        return Boundary(hidden, self.kwargs, self.tokens, self.per_layer)

    def at(self, layer: int) -> Boundary:
        """This boundary with block ``layer``'s keyword arguments."""
        if self.per_layer is None:
            return self
        return Boundary(self.hidden, self.per_layer[layer], self.tokens, self.per_layer)


class BlockSource(Protocol):
    """Brings parts of a model (``"embed"``, a block index, ``"head"``) into memory and out."""

    def load(self, part: int | str) -> None: ...

    def release(self, part: int | str) -> None: ...


@contextmanager
def resident(source: BlockSource | None, part: int | str) -> Iterator[None]:
    """``part`` of the model is in memory inside the context (no-op when ``source`` is None)."""
    if source is None:
        yield
        return
    source.load(part)
    try:
        yield
    finally:
        source.release(part)


class _Caught(Exception):
    pass


def _block_kwargs(kwargs: dict) -> dict:
    drop = ("past_key_values", "past_key_value", "layer_past", "cache")
    kw = {k: v for k, v in kwargs.items() if k not in drop}
    kw["use_cache"] = False
    return kw


def _run_until_caught(model: nn.Module, batch: torch.Tensor) -> None:
    try:
        model.base_model(input_ids=batch, use_cache=False)
    except _Caught:
        pass


@torch.no_grad()
def capture(
    model: nn.Module,
    adapter: Adapter,
    tokens: torch.Tensor,
    batch_size: int,
    source: BlockSource | None = None,
) -> Boundary:
    """Inputs of decoder block 0 for ``tokens`` ``[n, seqlen]`` in micro-batches of ``batch_size``.

    Runs the model's embedding stage and stops at the first block (a pre-hook raises after
    recording its arguments), so no block and no logits are computed. For families with
    per-layer arguments (``adapter.per_layer_block_kwargs``) every block's arguments are recorded
    by blocks that pass their input through unchanged, stopping at the last one.
    """
    if adapter.per_layer_block_kwargs:
        return _capture_per_layer(model, adapter, tokens, batch_size, source)
    first = adapter.layers(model)[0]
    seen: dict = {}

    def hook(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kwargs"] = _block_kwargs(kwargs)
        raise _Caught

    hidden, kwargs, ids = [], [], []
    with resident(source, "embed"):
        device = model.get_input_embeddings().weight.device
        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for i in range(0, tokens.shape[0], batch_size):
                batch = tokens[i : i + batch_size].to(device)
                _run_until_caught(model, batch)
                hidden.append(seen["hidden"])
                kwargs.append(seen["kwargs"])
                ids.append(batch)
        finally:
            handle.remove()
    return Boundary(hidden, kwargs, ids)


def _capture_per_layer(
    model: nn.Module,
    adapter: Adapter,
    tokens: torch.Tensor,
    batch_size: int,
    source: BlockSource | None,
) -> Boundary:
    """:func:`capture` for blocks that take per-layer arguments: each block's ``forward`` is
    replaced for the capture by one that records its arguments and returns its input."""
    blocks = adapter.layers(model)
    seen: list[dict] = [{} for _ in blocks]

    def recorder(i: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            seen[i] = {"hidden": hidden, "kwargs": _block_kwargs(kwargs)}
            if i == len(blocks) - 1:
                raise _Caught
            return hidden

        return forward

    hidden, ids = [], []
    per_layer: list[list[dict]] = [[] for _ in blocks]
    with resident(source, "embed"):
        device = model.get_input_embeddings().weight.device
        for i, block in enumerate(blocks):
            block.forward = recorder(i)
        try:
            for start in range(0, tokens.shape[0], batch_size):
                batch = tokens[start : start + batch_size].to(device)
                _run_until_caught(model, batch)
                hidden.append(seen[0]["hidden"])
                for i in range(len(blocks)):
                    per_layer[i].append(seen[i]["kwargs"])
                ids.append(batch)
        finally:
            for block in blocks:
                del block.forward  # the class's forward again
    return Boundary(hidden, per_layer[0], ids, per_layer)


def block_output(out) -> torch.Tensor:
    """The hidden states of a decoder block's return value (a tensor or a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def run_block(block: nn.Module, boundary: Boundary, grad: bool = False) -> list[torch.Tensor]:
    """Outputs ``[b, seqlen, d]`` of ``block`` for every micro-batch of ``boundary``."""
    with torch.set_grad_enabled(grad):
        return [
            block_output(block(h, **kw))
            for h, kw in zip(boundary.hidden, boundary.kwargs, strict=True)
        ]


class HiddenStore:
    """Hidden states of every block boundary, kept for a later backward sweep.

    ``spill=True`` (default) writes each micro-batch of a boundary to a temporary directory and
    :meth:`take` reads them back one at a time, so resident memory holds one micro-batch of a
    stored boundary; ``False`` keeps them in memory until taken. Use as a context manager: the
    directory is removed on exit. With ``directory`` (a run that may be resumed) the files go
    there and stay until :meth:`discard`; ``counts``/``restore`` carry the index across runs.
    """

    def __init__(self, spill: bool = True, directory: Path | None = None) -> None:
        self._mem: dict[int, list[torch.Tensor]] = {}
        self.counts: dict[int, int] = {}
        self._keep = directory is not None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        self._dir = directory or (
            Path(tempfile.mkdtemp(prefix="minillm-hidden-")) if spill else None
        )

    def put(self, layer: int, hidden: list[torch.Tensor]) -> None:
        if self._dir is None:
            self._mem[layer] = [h.detach() for h in hidden]
            return
        for j, h in enumerate(hidden):
            torch.save(h.detach().cpu(), self._dir / f"{layer}-{j}.pt")
        self.counts[layer] = len(hidden)

    def restore(self, counts: dict[int, int]) -> None:
        """Index the boundaries a previous run of the same ``directory`` stored."""
        self.counts = dict(counts)

    def take(self, layer: int, device: torch.device) -> Iterator[torch.Tensor]:
        """The stored micro-batches of ``layer``, in order, each loaded when reached; the
        layer's storage is released as they are taken (kept until :meth:`discard` with a
        ``directory``)."""
        if self._dir is None:
            hidden = self._mem.pop(layer)
            while hidden:
                yield hidden.pop(0)
            return
        for j in range(self.counts[layer]):
            path = self._dir / f"{layer}-{j}.pt"
            h = torch.load(path).to(device)
            if not self._keep:
                path.unlink()
            yield h
        if not self._keep:
            del self.counts[layer]

    def get(self, layer: int, j: int, device: torch.device) -> torch.Tensor:
        """Micro-batch ``j`` of ``layer``, left in the store (read again for each use)."""
        if self._dir is None:
            return self._mem[layer][j]
        return torch.load(self._dir / f"{layer}-{j}.pt").to(device)

    def discard(self, layer: int) -> None:
        """Remove the stored micro-batches of ``layer``."""
        self._mem.pop(layer, None)
        for j in range(self.counts.pop(layer, 0)):
            (self._dir / f"{layer}-{j}.pt").unlink(missing_ok=True)

    def __enter__(self) -> HiddenStore:
        return self

    def __exit__(self, *exc) -> None:
        self._mem.clear()
        if self._dir is not None and not self._keep:
            shutil.rmtree(self._dir, ignore_errors=True)


def sweep(
    model: nn.Module,
    adapter: Adapter,
    boundary: Boundary,
    layers: range | list[int],
    visit: Callable[[int, Boundary], list[torch.Tensor] | None] | None = None,
    source: BlockSource | None = None,
) -> Boundary:
    """Run ``boundary`` through the decoder blocks ``layers`` (consecutive, ascending).

    ``visit(layer, boundary_in)`` is called before each block; it may change the block (prune,
    refit) and may return the block's outputs itself (otherwise the block is run here). Returns
    the boundary after the last block. With a ``source``, each block is loaded before its visit
    and released after it ran.
    """
    blocks = adapter.layers(model)
    for i in layers:
        with resident(source, i):
            inputs = boundary.at(i)
            out = visit(i, inputs) if visit is not None else None
            if out is None:
                out = run_block(blocks[i], inputs)
        boundary = boundary.with_hidden(out)
    return boundary

"""Perplexity of a causal LM on a concatenated test text (the GPTQ/SparseGPT/LLM-Pruner protocol).

The test split is joined into one token stream, cut into non-overlapping windows of ``seqlen``
tokens (the remainder is dropped), and every window is scored independently: perplexity is
``exp(mean NLL)`` over all tokens predicted inside the windows (``seqlen - 1`` per window).
:func:`perplexity_stats` runs the whole model; :func:`perplexity_by_blocks` runs the windows
through the block loop, so a model streamed from its checkpoint is measured the same way.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minillm.blocks.loop import BlockSource, capture, resident, sweep
from minillm.data import read_text
from minillm.model.adapters import adapter_for
from minillm.model.lm_loss import chunked_lm_loss

# name -> (datasets path, config, split per purpose, text field, joiner)
_HUB_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", {"test": "test", "valid": "validation"}, "text"),
    "ptb": ("ptb_text_only", "penn_treebank", {"test": "test", "valid": "validation"}, "sentence"),
    "c4": ("allenai/c4", "en", {"test": "validation", "valid": "validation"}, "text"),
}
_C4_FILES = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
_C4_DOCS = 1100  # first documents of the validation shard: ~256 windows of 2048 tokens
_SPLIT_FILES = {
    "test": ("test.txt", "test.jsonl", "wiki.test.raw", "test.raw"),
    "valid": ("valid.txt", "validation.txt", "valid.jsonl", "wiki.valid.raw", "valid.raw"),
}


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity plus the token counts it was computed on."""

    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    windows: int  # number of windows of ``seqlen`` tokens
    seqlen: int
    predicted_tokens: int  # windows * (seqlen - 1)


def eval_text_names() -> list[str]:
    """Dataset names that ``load_eval_text`` resolves through ``datasets``."""
    return sorted(_HUB_DATASETS)


def load_eval_text(name_or_path: str | os.PathLike, split: str = "test") -> str:
    """Raw text of an evaluation corpus.

    ``name_or_path`` is a text/JSONL file, a directory holding ``test.txt``/``valid.txt`` (or
    ``wiki.test.raw`` ...), or one of ``eval_text_names()`` fetched through ``datasets``.
    ``split`` is ``"test"`` or ``"valid"``. Raises ``FileNotFoundError``/``ValueError`` with a
    one-line message naming what is valid.
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return read_text(path)
    if path.is_dir():
        for fname in _SPLIT_FILES[split]:
            if (path / fname).is_file():
                return read_text(path / fname)
        raise FileNotFoundError(
            f"no {split} file in {path}: expected one of {', '.join(_SPLIT_FILES[split])}"
        )
    if str(name_or_path) in _HUB_DATASETS:
        return _load_hub_text(str(name_or_path), split)
    raise FileNotFoundError(
        f"{name_or_path}: not a file, a directory, or a known dataset ({', '.join(_HUB_DATASETS)})"
    )


def _load_hub_text(name: str, split: str) -> str:
    import datasets

    hub_path, config, splits, field = _HUB_DATASETS[name]
    hub_split = splits[split]
    try:
        if name == "c4":
            ds = datasets.load_dataset(
                hub_path, data_files={hub_split: _C4_FILES[hub_split]}, split=hub_split
            )
            ds = ds.select(range(min(_C4_DOCS, len(ds))))
        else:
            ds = datasets.load_dataset(hub_path, config, split=hub_split)
    except Exception as err:  # network / hub errors have many types
        raise ValueError(
            f"cannot fetch {name} through datasets ({type(err).__name__}); "
            "pass a local text file or directory instead"
        ) from err
    joiner = " " if name == "ptb" else "\n\n"
    return joiner.join(ds[field])


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` as ``LongTensor[1, T]`` (``T <= max_tokens`` when given).

    With ``max_tokens`` only a prefix of the text is tokenized (a generous character budget,
    grown until it is enough), so quick runs on a long corpus stay quick.
    """
    if max_tokens is None:
        return tokenizer(text, return_tensors="pt").input_ids
    chars = max_tokens * 8
    while True:
        ids = tokenizer(text[:chars], return_tensors="pt").input_ids
        if ids.shape[1] > max_tokens or chars >= len(text):
            return ids[:, :max_tokens]
        chars *= 2


@torch.no_grad()
def perplexity_stats(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seqlen: int,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on a token stream, with the counts it used.

    ``input_ids``: ``LongTensor[T]`` or ``[1, T]``. Only the first ``max_tokens`` are used; the
    stream is cut into ``T // seqlen`` windows (one shorter window when ``T < seqlen``), scored
    ``batch_size`` windows per forward.
    """
    ids = input_ids.reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to compute perplexity, got {ids.numel()}")
    seqlen = min(seqlen, ids.numel())
    windows = ids.numel() // seqlen
    ids = ids[: windows * seqlen].view(windows, seqlen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    starts = range(0, windows, batch_size)
    for start in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        batch = ids[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll_sum += nll.item()
    model.train(was_training)
    predicted = windows * (seqlen - 1)
    mean_nll = nll_sum / predicted
    return PerplexityResult(math.exp(mean_nll), mean_nll, windows, seqlen, predicted)


def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seqlen: int,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> float:
    """``exp`` of the mean next-token NLL over non-overlapping ``seqlen`` windows (see module)."""
    return perplexity_stats(model, input_ids, seqlen, max_tokens, batch_size, progress).ppl


@torch.no_grad()
def perplexity_by_blocks(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seqlen: int,
    source: BlockSource | None = None,
) -> float:
    """:func:`perplexity` computed one decoder block at a time (the windows' hidden states,
    ``windows * seqlen * hidden`` values, are what stays resident), the LM head applied a few
    positions at a time. ``source``: blocks loaded and released one at a time, as in
    :mod:`minillm.blocks.loop`; None when the model is resident."""
    ids = input_ids.reshape(-1)
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to compute perplexity, got {ids.numel()}")
    seqlen = min(seqlen, ids.numel())
    windows = ids[: ids.numel() // seqlen * seqlen].view(-1, seqlen)
    adapter = adapter_for(model)
    boundary = capture(model, adapter, windows, 1, source)
    boundary = sweep(model, adapter, boundary, range(len(adapter.layers(model))), source=source)
    nll_sum = 0.0
    with resident(source, "head"):
        norm = adapter.final_norm(model)
        for h, window in zip(boundary.hidden, boundary.tokens, strict=True):
            nll_sum += float(chunked_lm_loss(model, norm(h), window).sum()) * (seqlen - 1)
    return math.exp(nll_sum / (windows.shape[0] * (seqlen - 1)))

"""The Python API: prune a transformers model you hold, save it, load it back.

::

    import minillm
    model, report = minillm.prune_model(model, tokenizer, ratio=0.2, calibration=texts)
    minillm.save_pruned(model, tokenizer, "smaller", report)
    model = minillm.load_pruned("smaller")

:func:`prune_model` runs the same steps as ``minillm prune`` (:mod:`minillm.pipeline`) on a model in
memory; its keyword options are the fields of :class:`minillm.config.PruneConfig`, with the
same defaults as the command's flags.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from minillm import pipeline
from minillm.config import PruneConfig, check, option_names
from minillm.data import random_windows, self_generated


def calibration_tokens(
    calibration: str | os.PathLike | Sequence[str] | torch.Tensor | None,
    tokenizer,
    cfg: PruneConfig,
    model: nn.Module,
) -> torch.Tensor:
    """Calibration ids ``[n, seqlen]``: ``calibration`` as ids already (a LongTensor, used as
    it is), text (a string, a list of strings, or a file path) cut into ``cfg.nsamples``
    random windows of ``cfg.seqlen`` tokens, or None: text the model writes itself."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype != torch.long:
            raise ValueError("calibration: token ids must be a LongTensor [n, seqlen]")
        return calibration
    if not pipeline.needs_calibration(cfg):
        return torch.empty(0, cfg.seqlen, dtype=torch.long)
    if tokenizer is None:
        raise ValueError("tokenizer: needed to read or write calibration text")
    if calibration is None:
        return self_generated(model, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)[0]
    if isinstance(calibration, os.PathLike):
        text = Path(calibration).read_text(encoding="utf-8")
    elif isinstance(calibration, str):
        text = calibration
    else:
        text = "\n\n".join(calibration)
    ids = tokenizer(text, return_tensors="pt").input_ids.reshape(-1)
    return random_windows(ids, cfg.nsamples, cfg.seqlen, cfg.seed)


def prune_model(
    model: nn.Module,
    tokenizer=None,
    *,
    ratio: float = PruneConfig.ratio,
    calibration: str | os.PathLike | Sequence[str] | torch.Tensor | None = None,
    **options,
) -> tuple[nn.Module, dict]:
    """Remove ``ratio`` of the prunable parameters of ``model`` (a transformers causal LM of a
    supported family, in eval mode on its device), in place.

    ``calibration``: text or token ids (see :func:`calibration_tokens`); None has the model
    write its own. ``options``: any field of :class:`~minillm.config.PruneConfig`
    (``criterion="taylor"``, ``allocation="uniform"``, ``layers="0-29"``, ...). Returns ``(model,
    report)``: the same, now smaller, model and what was removed (kept heads and channels per
    layer, parameters before and after, forward passes). ValueError names a bad option.
    """
    unknown = sorted(set(options) - option_names())
    if unknown:
        raise ValueError(f"unknown options {', '.join(unknown)}: valid are PruneConfig's fields")
    cfg = PruneConfig(ratio=ratio, **options)
    check(cfg)
    tokens = calibration_tokens(calibration, tokenizer, cfg, model)
    job = pipeline.start(model, tokens, cfg)
    pipeline.score(job)
    pipeline.allocate(job)
    pipeline.apply(job)
    return model, pipeline.report(job)

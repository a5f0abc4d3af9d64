"""A run of ``minillm prune``: the pruning steps (:mod:`minillm.pipeline`) and what a command
needs around them.

Load the model (resident, or streamed block by block: :mod:`minillm.blocks.streaming`), read or
write the calibration text, measure perplexity and a greedy sample before, score, allocate,
prune and refit, measure after, and save the pruned model with its ``report.json`` and model
card into ``--out`` (a temporary sibling renamed when complete). Under torchrun the ranks share
the calibration rows and only rank 0 evaluates and writes (:mod:`minillm.blocks.distributed`).
What the model's source cannot do is refused in one line by :func:`check_source`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import platform
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

import minillm
from minillm import pipeline
from minillm.blocks import distributed, streaming
from minillm.blocks.resume import ResumeState
from minillm.config import RunConfig, check
from minillm.data import HUB_CALIBRATION, calibration_batches, self_generated
from minillm.evaluation.generation import generate_samples
from minillm.evaluation.perplexity import (
    eval_text_names,
    load_eval_text,
    perplexity_by_blocks,
    tokenize_text,
)
from minillm.memory import PhaseMeter, unmap_freed_blocks
from minillm.model.dtypes import parse_dtype
from minillm.model.io import atomic_output_dir, check_output_dir, write_pruned
from minillm.model.loading import load_model
from minillm.scoring.allocation import parse_round_to
from minillm.scoring.sweep import BLOCK_FMS, whole_model_fms

log = logging.getLogger("minillm")
PROMPT_TOKENS = 16
EMBEDDED = "SmolLM2-135M-Instruct (embedded GGUF)"


def check_inputs(cfg: RunConfig) -> None:
    """Reject bad input before any heavy work; each error names its flag or file."""
    check(cfg)
    parse_dtype(cfg.dtype)
    parse_round_to(cfg.round_to)
    if cfg.calib not in ("self", *HUB_CALIBRATION) and not Path(cfg.calib).is_file():
        raise FileNotFoundError(
            f"--calib: no such file '{cfg.calib}' (or use 'self', {', '.join(HUB_CALIBRATION)})"
        )
    if cfg.eval_text is not None and not (
        Path(cfg.eval_text).exists() or cfg.eval_text in eval_text_names()
    ):
        raise FileNotFoundError(
            f"--eval-text: no such file or directory '{cfg.eval_text}' (or one of "
            f"{', '.join(eval_text_names())}, or 'none' to skip perplexity)"
        )
    if cfg.model is not None and Path(cfg.model).suffix == ".gguf":
        raise ValueError("MODEL: pass the GGUF's directory as MODEL and its name as --gguf-file")
    if cfg.out is None:
        raise ValueError("--out: the output directory is required")
    check_output_dir(cfg.out, cfg.overwrite)


def check_source(cfg: RunConfig, streamed: str | None, world: int) -> None:
    """One-line errors for what the model's source cannot do: ``streamed`` says why the run
    streams its blocks (None: resident), ``world`` is the number of torchrun processes."""
    if streamed is not None and cfg.calib == "self" and pipeline.needs_calibration(cfg):
        raise ValueError(
            f"--calib: 'self' (the default) has the model write its calibration text, which "
            f"needs the whole model in memory, but this run streams blocks ({streamed}); "
            "pass a text/JSON/JSONL file with --calib"
        )
    if whole_model_fms(cfg) and (streamed is not None or world > 1):
        where = f"this run streams blocks ({streamed})" if streamed else "under torchrun"
        raise ValueError(
            f"--fms-variant/--gradients: {where}, where fms runs with --gradients spsa and "
            f"--fms-variant {', '.join(BLOCK_FMS)} (got {cfg.fms_variant}, {cfg.gradients})"
        )
    if world > 1 and cfg.resume:
        raise ValueError("--resume: checkpoints are per process; resume runs in one process")


def calibration(cfg: RunConfig, model, tokenizer, rank: int, world: int) -> torch.Tensor:
    """This rank's calibration ids ``[n, seqlen]``: text the model writes itself (rank 0
    writes, every rank gets it) or windows of a file or dataset."""
    if not pipeline.needs_calibration(cfg):
        return torch.empty(0, cfg.seqlen, dtype=torch.long)
    if cfg.calib == "self":
        tokens = torch.zeros(cfg.nsamples, cfg.seqlen, dtype=torch.long)
        if rank == 0:
            tokens = self_generated(model, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)[0]
        tokens = distributed.broadcast(tokens)
    else:
        tokens = calibration_batches(cfg.calib, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
    return distributed.my_rows(tokens, rank, world)


def held_out_perplexity(cfg: RunConfig, model, tokenizer, source) -> float | None:
    """Perplexity on ``--eval-text`` (None when skipped), block by block over ``source``."""
    if cfg.eval_text is None:
        return None
    ids = tokenize_text(tokenizer, load_eval_text(cfg.eval_text), cfg.eval_tokens)
    limit = getattr(model.config, "max_position_embeddings", None) or cfg.eval_seqlen
    return perplexity_by_blocks(model, ids, min(cfg.eval_seqlen, limit), source)


def greedy_continuation(cfg: RunConfig, model, tokenizer, source) -> str | None:
    """The greedy continuation of ``--prompt``; None when skipped or the model is streamed
    (decoding token by token would read the whole checkpoint once per token)."""
    if not cfg.prompt or source is not None:
        return None
    sample = generate_samples(model, tokenizer, [cfg.prompt], PROMPT_TOKENS, greedy_only=True)
    return sample[0]["greedy"]


def library_versions() -> dict[str, str]:
    import transformers

    versions = {
        "minillm": minillm.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return versions


def load(cfg: RunConfig, streamed: str | None):
    """``(model, tokenizer, source)``: resident (source None) or a streamed skeleton."""
    # transformers' GGUF de-quantization bar cannot be switched off: swallow it under --quiet
    silence = contextlib.redirect_stderr(io.StringIO()) if cfg.quiet else nullcontext()
    with silence:
        if streamed is None:
            model, tokenizer = load_model(cfg.model, cfg.gguf_file, cfg.dtype, cfg.device)
            return model, tokenizer, None
        source, tokenizer = streaming.open_streamed(cfg)
        return source.model, tokenizer, source


def run(cfg: RunConfig) -> dict:
    """Load, calibrate, score, prune and save; returns the report written to ``cfg.out``."""
    check_inputs(cfg)
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    unmap_freed_blocks()  # the peak we report is what the run holds, not what glibc kept
    rank, world = distributed.setup(cfg.device)
    streamed = streaming.stream_reason(cfg)
    check_source(cfg, streamed, world)
    meter = PhaseMeter(cfg.device)
    with meter.phase("load"):
        model, tokenizer, source = load(cfg, streamed)
    with meter.phase("calibrate"):
        tokens = calibration(cfg, model, tokenizer, rank, world)
    before = {"ppl": None, "sample": None}
    if rank == 0:
        with meter.phase("eval_before"):
            before = {
                "ppl": held_out_perplexity(cfg, model, tokenizer, source),
                "sample": greedy_continuation(cfg, model, tokenizer, source),
            }
    resume = ResumeState(cfg.out, asdict(cfg), cfg.resume) if streamed and world == 1 else None
    job = pipeline.start(model, tokens, cfg, source, resume)
    with meter.phase("score"):
        pipeline.score(job)
        pipeline.allocate(job)
    checkpoint = str(source.path) if source is not None else None
    output = atomic_output_dir(cfg.out, cfg.overwrite) if rank == 0 else nullcontext()
    with output as tmp:
        with meter.phase("prune"):
            with source.writing(tmp) if source is not None and tmp is not None else nullcontext():
                pipeline.apply(job)
        report = {"model": cfg.model or EMBEDDED, **pipeline.report(job)}
        if tmp is None:  # ranks other than 0 write nothing
            return report
        with meter.phase("eval_after"):
            if source is not None:
                source.reopen(tmp)
            after = {
                "ppl": held_out_perplexity(cfg, model, tokenizer, source),
                "sample": greedy_continuation(cfg, model, tokenizer, source),
            }
        report.update(
            eval_text=cfg.eval_text,
            ppl_before=before["ppl"],
            ppl_after=after["ppl"],
            generation=None
            if before["sample"] is None
            else {"prompt": cfg.prompt, "before": before["sample"], "after": after["sample"]},
            versions=library_versions(),
        )
        if source is not None:
            report["streamed"] = {"checkpoint": checkpoint, "reason": streamed}
        report["world_size"] = world
        with meter.phase("save"):
            config = write_pruned(model, tokenizer, tmp, report, write_weights=source is None)
        report["loading"] = "remote_code" if "auto_map" in config else "transformers"
        report.update(meter.summary())
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if resume is not None:
        resume.clear()
    return report

"""``python -m minillm.prune``: score, remove and save structures of a causal LM.

Logs and progress go to stderr; the summary goes to stdout; report.json to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import minillm
from minillm.blocks import streaming
from minillm.blocks.reconstruct import prune_sequential
from minillm.data import HUB_CALIBRATION, calibration_batches, read_text
from minillm.evaluation.generation import generate_samples
from minillm.evaluation.perplexity import HELDOUT_TEXT, perplexity, tokenize_text
from minillm.memory import PhaseMeter, unmap_freed_blocks
from minillm.model.adapters import adapter_for
from minillm.model.dtypes import DTYPES
from minillm.model.io import atomic_output_dir, check_output_dir, save_pruned
from minillm.model.loading import load_model
from minillm.model.surgery import count_params, layer_records, prune_layer
from minillm.scoring import allocation
from minillm.scoring.allocation import parse_layers, parse_round_to, prunable_params
from minillm.scoring.criteria import CRITERIA, ScoringContext, compensate

log = logging.getLogger("minillm")
DATA_FREE_CRITERIA = ("random", "magnitude")  # these never look at calibration text
PROMPT = "The capital of France is"
PROMPT_TOKENS = 16


@dataclass
class PruneConfig:
    """Every option of a pruning run; printed into report.json."""

    model: str | None
    gguf_file: str | None
    ratio: float
    criterion: str
    target: str
    layers: str | None
    uniform: bool
    gqa: str
    calib: str
    nsamples: int
    seqlen: int
    eval_text: str | None
    prompt: str
    eval_tokens: int
    eval_seqlen: int
    gradients: str
    fms_variant: str
    perturbations: int | None
    eps: float | None
    dist: str
    batch_size: int
    compensate: bool
    spill: bool
    reconstruct: bool | None  # None: on, unless --compensate (see resolve_repair)
    select: str
    ridge: float
    rank_together: bool
    round_to: str | None
    device: str
    dtype: str
    seed: int
    out: str
    overwrite: bool
    quiet: bool
    offload: bool = False
    resume: bool = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minillm.prune", description=__doc__)
    p.add_argument("--model", help="hub id or local dir (default: embedded SmolLM2-135M GGUF)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model, or a path to one")
    p.add_argument(
        "--ratio",
        type=float,
        default=0.2,
        help="fraction of the prunable parameters of the pruned layers to remove",
    )
    p.add_argument(
        "--criterion",
        default="flap",
        choices=sorted(CRITERIA),
        help="unit scores (default flap; fms is the paper's MINI-LLM score, see README 'Criteria')",
    )
    p.add_argument("--target", choices=["heads", "channels", "both"], default="both")
    p.add_argument(
        "--layers",
        help="inclusive range such as 3-27 (default: all but the "
        "first n/8 and last n/16 layers, as LLM-Pruner)",
    )
    p.add_argument(
        "--uniform",
        action="store_true",
        help="the same ratio in every layer (default: one global ranking per structure kind)",
    )
    p.add_argument(
        "--gqa",
        choices=["query", "kv"],
        default="query",
        help="GQA heads: remove query heads evenly per KV group, or whole KV groups",
    )
    p.add_argument(
        "--calib",
        default="self",
        help=f"'self', a text/JSON/JSONL file, or one of {', '.join(HUB_CALIBRATION)}",
    )
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration sequence")
    p.add_argument(
        "--eval-text",
        default=str(HELDOUT_TEXT),
        help="held-out text file for perplexity before/after, or 'none' (default: a "
        "~2,800-token WikiText-2 test excerpt shipped with minillm, CC BY-SA 3.0)",
    )
    p.add_argument(
        "--prompt",
        default=PROMPT,
        help=f"greedy {PROMPT_TOKENS}-token continuation before/after ('' to skip)",
    )
    p.add_argument("--eval-tokens", type=int, default=8192, help="tokens of --eval-text used")
    p.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window length")
    p.add_argument(
        "--gradients",
        choices=["spsa", "backprop"],
        default="spsa",
        help="fms: forward-only SPSA estimate, or exact gradients (reference)",
    )
    p.add_argument(
        "--fms-variant",
        choices=["weight", "layer", "removal", "unit"],
        default="weight",
        help="fms: gradient resolution; 'weight' is the paper-faithful per-weight form",
    )
    p.add_argument("--perturbations", type=int, help="SPSA rounds over the calibration set")
    p.add_argument("--eps", type=float, help="SPSA perturbation size (default per variant)")
    p.add_argument("--dist", choices=["rademacher", "gaussian"], default="rademacher")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per scoring forward")
    p.add_argument(
        "--spill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="exact gradients: keep each block's inputs in a temporary directory (default), "
        "or in memory with --no-spill (faster, grows with depth)",
    )
    p.add_argument(
        "--compensate",
        action="store_true",
        help="fold removed means into biases (FLAP) instead of --reconstruct",
    )
    p.add_argument(
        "--reconstruct",
        action=argparse.BooleanOptionalAction,
        help="refit the consumers of removed units by least squares, layer by layer (bottom-up); "
        "on by default unless --compensate",
    )
    p.add_argument(
        "--select",
        choices=["scores", "refit"],
        default="scores",
        help="--reconstruct: which units each layer loses: the criterion's lowest scores, or "
        "those whose removal the refit recovers best (greedy OBS on the layer's Gram)",
    )
    p.add_argument(
        "--ridge",
        type=float,
        default=0.1,
        help="--reconstruct: pull toward the dense weights, x mean Gram diagonal (large: FLAP)",
    )
    p.add_argument(
        "--rank-together",
        action="store_true",
        help="global ranking: heads and channels in one list (default: apart)",
    )
    p.add_argument(
        "--round-to",
        metavar="N|heads=N,channels=M",
        help="keep head counts (GQA: per KV group) and channel counts at multiples of N",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no logs or progress bars")
    p.add_argument(
        "--offload",
        action="store_true",
        help="stream one decoder block at a time from the checkpoint (automatic when the "
        "weights exceed half the free memory; see minillm/blocks/streaming.py)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="streamed runs: continue a killed run of the same command from its checkpoint",
    )
    return p


def validate(cfg: PruneConfig) -> None:
    """Reject bad input before any heavy work; each error names its flag."""
    if not 0.0 < cfg.ratio < 1.0:
        raise ValueError(f"--ratio: {cfg.ratio} is out of range; use a fraction in (0, 1)")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype: unsupported dtype '{cfg.dtype}'; valid: {', '.join(DTYPES)}")
    if cfg.calib not in ("self", *HUB_CALIBRATION) and not Path(cfg.calib).is_file():
        raise FileNotFoundError(
            f"--calib: no such file '{cfg.calib}' (or use 'self', {', '.join(HUB_CALIBRATION)})"
        )
    if cfg.eval_text is not None and not Path(cfg.eval_text).is_file():
        raise FileNotFoundError(
            f"--eval-text: no such file '{cfg.eval_text}' (or 'none' to skip perplexity)"
        )
    if cfg.model is not None and Path(cfg.model).suffix == ".gguf":
        raise ValueError(
            "--model: pass the GGUF's directory as --model and its name as --gguf-file"
        )
    if cfg.ridge < 0:
        raise ValueError(f"--ridge: {cfg.ridge} is negative; use a value >= 0 such as 0.1")
    if cfg.reconstruct and cfg.compensate:
        raise ValueError("--compensate: not needed with --reconstruct, which refits the biases too")
    if cfg.nsamples < 1 or cfg.seqlen < 2:
        raise ValueError("--nsamples must be >= 1 and --seqlen >= 2")
    parse_round_to(cfg.round_to)
    check_output_dir(cfg.out, cfg.overwrite)


def greedy_continuation(model, tokenizer, cfg: PruneConfig) -> str | None:
    if not cfg.prompt:
        return None
    sample = generate_samples(model, tokenizer, [cfg.prompt], PROMPT_TOKENS, greedy_only=True)
    return sample[0]["greedy"]


def eval_ppl(model, tokenizer, cfg: PruneConfig) -> float | None:
    if cfg.eval_text is None:
        return None
    ids = tokenize_text(tokenizer, read_text(cfg.eval_text), cfg.eval_tokens)
    limit = getattr(model.config, "max_position_embeddings", None) or cfg.eval_seqlen
    return perplexity(model, ids, min(cfg.eval_seqlen, limit), progress=not cfg.quiet)


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


def resolve_repair(cfg: PruneConfig) -> None:
    """Settle ``--reconstruct`` left unset: on, unless ``--compensate`` was asked."""
    if cfg.reconstruct is None:
        cfg.reconstruct = not cfg.compensate


def run(cfg: PruneConfig) -> dict:
    """Load, calibrate, score, prune and save; returns the report written to ``cfg.out``."""
    validate(cfg)
    resolve_repair(cfg)
    unmap_freed_blocks()  # the peak we report is what the run holds, not what glibc kept
    if streaming.should_stream(cfg):
        return streaming.run(cfg, pruning_report)
    meter = PhaseMeter(cfg.device)
    # transformers' GGUF de-quantization bar cannot be switched off: swallow it under --quiet
    silence = contextlib.redirect_stderr(io.StringIO()) if cfg.quiet else contextlib.nullcontext()
    with meter.phase("load"), silence:
        model, tokenizer = load_model(cfg.model, cfg.gguf_file, cfg.dtype, cfg.device)
    adapter = adapter_for(model)
    layers = parse_layers(cfg.layers, len(adapter.layers(model)))
    kinds = ["heads", "channels"] if cfg.target == "both" else [cfg.target]
    groups = [adapter.groups(model, i, cfg.gqa)[k] for i in layers for k in kinds]
    multiples = parse_round_to(cfg.round_to)
    allocation.check_multiples(groups, multiples)
    with meter.phase("calibrate"):
        batches = torch.empty(0, cfg.seqlen, dtype=torch.long)
        if cfg.compensate or cfg.reconstruct or cfg.criterion not in DATA_FREE_CRITERIA:
            batches = calibration_batches(
                cfg.calib, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, model
            )
    with meter.phase("eval_before"):
        ppl_before = eval_ppl(model, tokenizer, cfg)
        sample_before = greedy_continuation(model, tokenizer, cfg)
    params_before = count_params(model)
    options = {k: v for k, v in asdict(cfg).items() if v is not None}
    ctx = ScoringContext(model, adapter, groups, batches, cfg.seed, options=options)
    with meter.phase("score"):
        scores = CRITERIA[cfg.criterion](ctx)
    with meter.phase("prune"):
        keep = allocation.allocate(
            groups,
            scores,
            cfg.ratio,
            cfg.criterion,
            options,
            per_layer=cfg.uniform,
            together=cfg.rank_together,
        )
        if multiples:
            keep = allocation.round_to_multiples(groups, scores, keep, multiples)
        prunable = prunable_params(groups)
        prunable_removed = prunable - prunable_params(groups, keep)
        if cfg.reconstruct:
            prune_sequential(
                model,
                adapter,
                batches,
                keep,
                layers,
                cfg.gqa,
                cfg.batch_size,
                cfg.ridge,
                select=cfg.select,
            )
        else:
            if cfg.compensate:
                compensate(ctx, keep)
            for layer in layers:
                prune_layer(
                    model,
                    adapter,
                    layer,
                    keep.get((layer, "heads")),
                    keep.get((layer, "channels")),
                    cfg.gqa,
                )
    with meter.phase("eval_after"):
        ppl_after = eval_ppl(model, tokenizer, cfg)
        sample_after = greedy_continuation(model, tokenizer, cfg)
    report = pruning_report(
        cfg, model, adapter, ctx, layers, params_before, prunable, prunable_removed, batches
    )
    report.update(
        eval_text=cfg.eval_text,
        ppl_before=ppl_before,
        ppl_after=ppl_after,
        generation=None
        if sample_before is None
        else {"prompt": cfg.prompt, "before": sample_before, "after": sample_after},
    )
    with atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
        with meter.phase("save"):
            save_pruned(model, tokenizer, tmp)
        report.update(meter.summary())
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def pruning_report(
    cfg: PruneConfig,
    model,
    adapter,
    ctx: ScoringContext,
    layers: list[int],
    params_before: int,
    prunable: int,
    prunable_removed: int,
    calibration: torch.Tensor,
) -> dict:
    """The report.json fields every pruning path writes (in memory or streamed); the
    evaluation fields are None until the caller fills them."""
    return {
        "model": cfg.model or "SmolLM2-135M-Instruct (embedded GGUF)",
        "architecture": adapter.name,
        "criterion": cfg.criterion,
        "ratio": cfg.ratio,
        "params_before": params_before,
        "params_after": count_params(model),
        "prunable_params": prunable,
        "prunable_params_removed": prunable_removed,
        "layers": layer_records(model, adapter),
        "pruned_layers": layers,
        "target": cfg.target,
        "forward_passes": ctx.forward_passes,
        "tokens_forwarded": ctx.tokens_forwarded,
        "calibration_tokens": calibration.numel(),
        "eval_text": None,
        "ppl_before": None,
        "ppl_after": None,
        "generation": None,
        "seed": cfg.seed,
        "config": asdict(cfg),
        "versions": library_versions(),
    }


def removed_lines(report: dict) -> list[str]:
    """What fraction was removed, of the pruned layers' prunable parameters and of the model."""
    before, after = report["params_before"], report["params_after"]
    prunable, removed = report["prunable_params"], report["prunable_params_removed"]
    first, last = report["pruned_layers"][0], report["pruned_layers"][-1]
    units = {"heads": "attention heads", "channels": "MLP channels"}.get(
        report["target"], "attention heads and MLP channels"
    )
    return [
        f"params     {before:,} -> {after:,}",
        f"removed    {100 * removed / prunable:.1f}% of the prunable parameters of layers "
        f"{first}-{last} ({removed:,} of {prunable:,}: the weights and biases of their {units})",
        f"           {100 * (1 - after / before):.1f}% of the whole model (every parameter: "
        "embeddings, norms and the layers left dense included)",
    ]


def summary(report: dict) -> str:
    """Human-readable summary of a report (stdout)."""
    lines = [
        f"model      {report['model']} ({report['architecture']})",
        f"criterion  {report['criterion']}  --ratio {report['ratio']}",
        *removed_lines(report),
    ]
    if report["ppl_before"] is not None:
        lines.append(
            f"perplexity {report['ppl_before']:.2f} -> {report['ppl_after']:.2f} "
            f"on {Path(report['eval_text']).name}"
        )
    if report["generation"] is not None:
        sample = report["generation"]
        lines.append(f"prompt     {sample['prompt']!r} (greedy, {PROMPT_TOKENS} tokens)")
        lines.append(f"  before   {sample['before']!r}")
        lines.append(f"  after    {sample['after']!r}")
    t, m = report["time_s"], report["peak_memory_bytes"]
    lines.append(f"time       {t['total']:.1f} s (score {t['score']:.1f} s)")
    lines.append(f"peak mem   {m['total'] / 2**20:.0f} MiB (score {m['score'] / 2**20:.0f} MiB)")
    lines.append(
        f"forwards   {report['forward_passes']} passes, {report['tokens_forwarded']:,} tokens"
    )
    lines.append("layer  heads  kv  channels")
    for i, rec in enumerate(report["layers"]):
        lines.append(f"{i:>5}  {rec['heads']:>5}  {rec['kv_heads']:>2}  {rec['channels']:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = PruneConfig(**vars(args))
    if cfg.eval_text is not None and cfg.eval_text.lower() == "none":
        cfg.eval_text = None
    logging.basicConfig(
        level=logging.WARNING if cfg.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    if cfg.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    start = time.perf_counter()
    try:
        report = run(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(report))
    log.info("saved to %s in %.1f s", cfg.out, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())

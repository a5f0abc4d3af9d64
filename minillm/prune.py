"""minillm prune [MODEL] --out DIR (also python -m minillm.prune): score, remove and save
attention heads and MLP channels of a causal LM.

MODEL is a hub id, a local directory (safetensors, or a GGUF with --gguf-file); without it, the
embedded SmolLM2-135M-Instruct. Logs and progress go to stderr, the summary to stdout, the
model, its report.json and a model card (README.md) to --out.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path

from minillm import cli
from minillm.config import CHOICES, RunConfig

D = RunConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The prune command's arguments, in groups; defaults from :class:`RunConfig`."""
    p.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="hub id or local dir (default: the embedded SmolLM2-135M-Instruct GGUF)",
    )
    m = p.add_argument_group("model")
    m.add_argument("--gguf-file", help="GGUF file name inside MODEL, or a path to one")
    m.add_argument(
        "--dtype", default=D.dtype, choices=["float32", "bfloat16", "float16"], help="weights"
    )
    m.add_argument("--device", help="cuda if available, else cpu")
    m.add_argument(
        "--offload",
        action="store_true",
        help="stream one decoder block at a time from the checkpoint (automatic when the "
        "weights exceed half the free memory)",
    )
    c = p.add_argument_group("calibration")
    c.add_argument(
        "--calib",
        default=D.calib,
        help="'self' (the model writes it), a text/JSON/JSONL file, or a datasets name "
        "(wikitext2, ptb, c4, bookcorpus)",
    )
    c.add_argument("--nsamples", type=int, default=D.nsamples, help="calibration sequences")
    c.add_argument("--seqlen", type=int, default=D.seqlen, help="tokens per sequence")
    c.add_argument("--seed", type=int, default=D.seed, help="calibration windows, SPSA, random")
    r = p.add_argument_group("what to remove")
    r.add_argument(
        "--ratio",
        type=float,
        default=D.ratio,
        help="fraction of the prunable parameters of the pruned layers to remove",
    )
    r.add_argument(
        "--criterion",
        default=D.criterion,
        choices=CHOICES["criterion"],
        help="unit scores (README, 'Criteria'); fms is the paper's MINI-LLM score",
    )
    r.add_argument(
        "--target", default=D.target, choices=CHOICES["target"], help="structures removed"
    )
    r.add_argument(
        "--layers",
        help="inclusive range such as 3-27 (default: all but the first n/8 and last n/16 "
        "layers, as LLM-Pruner; every layer with --uniform)",
    )
    r.add_argument(
        "--allocation",
        choices=CHOICES["allocation"],
        help="how many units each layer loses: the least damage measured after the refit "
        "(heads and channels in one budget), one global ranking of scores per kind, or the "
        "same ratio in every layer (default: damage with the refit, global without)",
    )
    r.add_argument(
        "--uniform",
        action="store_const",
        const="uniform",
        dest="allocation",
        help="= --allocation uniform: every layer the same sizes, a plain architecture that "
        "stock transformers, vLLM and llama.cpp load",
    )
    r.add_argument(
        "--gqa",
        default=D.gqa,
        choices=CHOICES["gqa"],
        help="GQA heads: query heads evenly per KV group, or whole KV groups",
    )
    r.add_argument(
        "--round-to",
        metavar="N|heads=N,channels=M",
        help="keep head counts (GQA: per KV group) and channel counts at multiples of N",
    )
    f = p.add_argument_group("repair")
    f.add_argument(
        "--reconstruct",
        action=argparse.BooleanOptionalAction,
        default=D.reconstruct,
        help="refit the consumers of removed units by least squares, bottom-up; on unless "
        "--compensate",
    )
    f.add_argument(
        "--compensate",
        action="store_true",
        help="fold removed means into biases (FLAP) instead of the refit",
    )
    f.add_argument(
        "--ridge",
        type=float,
        default=D.ridge,
        help="refit: pull toward the dense weights, x mean Gram diagonal (large: FLAP)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    o.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    o.add_argument(
        "--eval-text",
        default=D.eval_text,
        help="perplexity before/after on this file, directory (test.txt) or datasets name, "
        "or 'none' (default: ~2,800 tokens of WikiText-2 test shipped in minillm/texts/)",
    )
    o.add_argument("--eval-tokens", type=int, default=D.eval_tokens, help="tokens of it used")
    o.add_argument("--eval-seqlen", type=int, default=D.eval_seqlen, help="window length")
    o.add_argument(
        "--prompt", default=D.prompt, help="greedy continuation before/after ('' to skip)"
    )
    o.add_argument("--quiet", action="store_true", help="no logs or progress bars")
    o.add_argument(
        "--resume",
        action="store_true",
        help="streamed runs: continue a killed run of the same command from its checkpoint",
    )
    a = p.add_argument_group("advanced and research")
    a.add_argument(
        "--select",
        default=D.select,
        choices=CHOICES["select"],
        help="refit: remove the lowest scores, or the units whose removal the refit recovers "
        "best (greedy OBS on the layer's Gram)",
    )
    a.add_argument(
        "--rank-together",
        action="store_true",
        help="--allocation global: heads and channels in one list (default: apart)",
    )
    a.add_argument(
        "--damage-subset", type=int, default=D.damage_subset, help="damage: KL on N sequences"
    )
    a.add_argument(
        "--damage-steps",
        type=int,
        default=D.damage_steps,
        help="damage: removal grid per layer, fractions k/N of its units",
    )
    a.add_argument(
        "--damage-at",
        type=float,
        default=D.damage_at,
        help="damage: the fraction removed whose KL is measured end to end (the other grid "
        "points follow the refit's error curve)",
    )
    a.add_argument("--batch-size", type=int, default=D.batch_size, help="sequences per forward")
    a.add_argument(
        "--spill",
        action=argparse.BooleanOptionalAction,
        default=D.spill,
        help="exact gradients: keep each block's inputs in a temporary directory, or in "
        "memory with --no-spill (faster, grows with depth)",
    )
    a.add_argument(
        "--gradients",
        default=D.gradients,
        choices=CHOICES["gradients"],
        help="fms: forward-only SPSA estimate, or exact gradients (the reference)",
    )
    a.add_argument(
        "--fms-variant",
        default=D.fms_variant,
        choices=CHOICES["fms_variant"],
        help="fms: the gradient's resolution; 'weight' is the paper's per-weight form",
    )
    a.add_argument(
        "--perturbations", type=int, help="SPSA rounds over the calibration set (default: 4)"
    )
    a.add_argument("--eps", type=float, help="SPSA perturbation size (default per variant)")
    a.add_argument("--dist", default=D.dist, choices=CHOICES["dist"], help="SPSA noise")


def parse_config(argv: list[str] | None, prog: str) -> RunConfig:
    p = cli.parser(prog, __doc__)
    add_arguments(p)
    args = vars(p.parse_args(argv))
    if args["eval_text"] is not None and args["eval_text"].lower() == "none":
        args["eval_text"] = None
    names = {f.name for f in fields(RunConfig)}
    return RunConfig(**{k: v for k, v in args.items() if k in names})


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


def loading_line(report: dict, out: str) -> str:
    if report["loading"] == "transformers":
        return f"load with AutoModelForCausalLM.from_pretrained('{out}') (a plain config)"
    return (
        f"load with minillm.load_pruned('{out}'), or from_pretrained('{out}', "
        "trust_remote_code=True) (per-layer sizes: modeling_minillm.py beside the weights)"
    )


def summary(report: dict) -> str:
    """Human-readable summary of a report (stdout)."""
    lines = [
        f"model      {report['model']} ({report['architecture']})",
        f"criterion  {report['criterion']}  --ratio {report['ratio']}  "
        f"--allocation {report['allocation']}",
        *removed_lines(report),
    ]
    if report["ppl_before"] is not None:
        lines.append(
            f"perplexity {report['ppl_before']:.2f} -> {report['ppl_after']:.2f} "
            f"on {Path(report['eval_text']).name}"
        )
    if report["generation"] is not None:
        sample = report["generation"]
        lines.append(f"prompt     {sample['prompt']!r} (greedy, 16 tokens)")
        lines.append(f"  before   {sample['before']!r}")
        lines.append(f"  after    {sample['after']!r}")
    elif "streamed" in report and report["config"]["prompt"]:
        lines.append("prompt     skipped: the model was streamed (decoding needs it whole)")
    t, m = report["time_s"], report["peak_memory_bytes"]
    lines.append(f"time       {t['total']:.1f} s (score {t['score']:.1f} s)")
    lines.append(f"peak mem   {m['total'] / 2**20:.0f} MiB (score {m['score'] / 2**20:.0f} MiB)")
    lines.append(
        f"forwards   {report['forward_passes']} passes, {report['tokens_forwarded']:,} tokens"
    )
    lines.append("layer  heads  kv  channels")
    for i, rec in enumerate(report["layers"]):
        lines.append(f"{i:>5}  {rec['heads']:>5}  {rec['kv_heads']:>2}  {rec['channels']:>8}")
    lines.append(loading_line(report, report["config"]["out"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m minillm.prune") -> int:
    cfg = parse_config(argv, prog)
    if cli.environment_error(prog):
        return 2
    cli.setup_logging(cfg.quiet)
    from minillm.run import run

    start = time.perf_counter()
    try:
        report = run(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        return cli.fail(prog, err)
    if "time_s" not in report:  # a torchrun rank other than 0: rank 0 prints
        return 0
    print(summary(report))
    logging.getLogger("minillm").info("saved to %s in %.1f s", cfg.out, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pruning quality of every criterion on SmolLM2-135M: perplexity in and out of domain.

One calibration set for all (random windows of WikiText-2 validation); each configuration is
scored once, then pruned at every ratio by zeroing the consumer columns of removed units
(exactly what the surgery removes; weights are restored between runs). Perplexity over
non-overlapping windows of the first ``--eval-tokens`` tokens of (a) WikiText-2 test and
(b) text of another domain: the docstrings of Python's standard library (modules listed in
``OTHER_DOMAIN_MODULES``, module then public members in ``dir`` order). The scoring step's wall
time and resident-memory high-water mark are measured (``minillm.memory.PhaseMeter``); the
model's own weights are part of that peak, so the increase over the resident size before
scoring is reported as well. JSON lines on stderr as results arrive, one JSON on stdout.

Command (see BENCHMARKS.md)::

    python benchmarks/bench_quality.py --calib ../shared/data/wikitext2/valid.txt \\
        --test ../shared/data/wikitext2/test.txt --cache-dir /tmp/smollm2-f32 > quality.json
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import sys
import time
from pathlib import Path

import torch
from _smollm2 import setup

from minillm.blocks.reconstruct import prune_sequential
from minillm.evaluation.perplexity import perplexity_stats
from minillm.memory import PhaseMeter
from minillm.model.adapters import adapter_for
from minillm.scoring.allocation import global_ranking, uniform
from minillm.scoring.criteria import CRITERIA, ScoringContext, compensate, global_normalization

OTHER_DOMAIN_MODULES = (
    "argparse collections json pathlib itertools functools subprocess logging asyncio "
    "dataclasses typing re datetime csv sqlite3 unittest threading shutil textwrap email"
).split()

# name -> (criterion, options, allocation)
CONFIGS = {
    "random": ("random", {}, "uniform"),
    "magnitude": ("magnitude", {}, "uniform"),
    "wanda-sp": ("wanda-sp", {}, "uniform"),
    "flap": ("flap", {}, "uniform"),
    "flap+compensate": ("flap", {"compensate": True}, "uniform"),
    "taylor": ("taylor", {}, "uniform"),
    "fms-weight-spsa": ("fms", {"fms_variant": "weight", "perturbations": 2}, "uniform"),
    "fms-weight-backprop": ("fms", {"fms_variant": "weight", "gradients": "backprop"}, "uniform"),
    "fms-layer-spsa/global": ("fms", {"fms_variant": "layer"}, "global"),
    "fms-layer-backprop/global": (
        "fms",
        {"fms_variant": "layer", "gradients": "backprop"},
        "global",
    ),
    "fms-removal-spsa/global": ("fms", {"fms_variant": "removal"}, "global"),
    "fms-removal-exact/global": (
        "fms",
        {"fms_variant": "removal", "gradients": "backprop"},
        "global",
    ),
    "random/global": ("random", {}, "global"),
    "magnitude/global": ("magnitude", {}, "global"),
    "wanda-sp/global": ("wanda-sp", {}, "global"),
    "flap/global": ("flap", {}, "global"),
    "flap+compensate/global": ("flap", {"compensate": True}, "global"),
    "flap/together": ("flap", {}, "together"),
    "taylor/global": ("taylor", {}, "global"),
    "taylor/together": ("taylor", {}, "together"),
    "fms-weight-backprop/global": (
        "fms",
        {"fms_variant": "weight", "gradients": "backprop"},
        "global",
    ),
    "fms-weight-spsa/global": ("fms", {"fms_variant": "weight"}, "global"),
}


def other_domain_text(modules=OTHER_DOMAIN_MODULES) -> str:
    """Docstrings of standard-library modules and their public members (deterministic)."""
    parts = []
    for name in modules:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in dir(mod):
            if not attr.startswith("_"):
                doc = inspect.getdoc(getattr(mod, attr, None))
                if doc and doc not in parts:
                    parts.append(doc)
    return "\n\n".join(parts)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@torch.no_grad()
def masked(groups, keep, ctx, options):
    """Zero the consumer columns of removed units (and compensate); returns an undo function."""
    saved = []
    for g in groups:
        for b in g.consumers:
            saved.append((b.linear, b.linear.weight.detach().clone(), b.linear.bias))
    if options.get("compensate"):
        compensate(ctx, keep)
    for g in groups:
        kept = torch.zeros(g.n_units, dtype=torch.bool)
        kept[keep[(g.layer, g.kind)]] = True
        removed = (~kept).nonzero().flatten()
        for b in g.consumers:
            b.linear.weight[:, b.indices(removed)] = 0

    @torch.no_grad()
    def undo():
        for lin, w, bias in saved:
            lin.weight.copy_(w)
            if bias is None:
                lin.bias = None
            else:
                lin.bias = bias

    return undo


def keep_at(groups, scores, ratio: float, config: tuple):
    """Kept units at ``ratio`` under the config's allocation."""
    criterion, options, alloc = config
    if alloc == "uniform":
        return uniform(groups, scores, ratio)
    return global_ranking(
        groups,
        scores,
        ratio,
        normalize=global_normalization(criterion, options),
        together=alloc == "together",
    )


def params_removed(groups, keep) -> int:
    return sum(g.unit_params() * (g.n_units - len(keep[(g.layer, g.kind)])) for g in groups)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", required=True, help="WikiText-2 validation text file")
    p.add_argument("--test", required=True, help="WikiText-2 test text file")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--layers", default="3-27", help="inclusive range of pruned layers")
    p.add_argument("--kinds", default="channels", help="heads,channels or one of them")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--perturbations", type=int, default=4, help="SPSA rounds")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--ratios-for-global", default="0.2,0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--reconstruct",
        default="off",
        help="comma list of off (mask), on (refit), select (choose units on the Gram and refit)",
    )
    p.add_argument("--ridge", default="0.1", help="--reconstruct: relative ridge (comma list)")
    p.add_argument(
        "--no-spill",
        dest="spill",
        action="store_false",
        help="exact gradients: block inputs in memory, not on disk",
    )
    p.add_argument(
        "--score-only",
        action="store_true",
        help="no perplexity: one row per config with the scoring time and memory (run one "
        "config per process for a clean resident-memory peak)",
    )
    args = p.parse_args()

    def ridges(recon: str) -> list[float | None]:
        return [float(r) for r in args.ridge.split(",")] if recon != "off" else [None]

    torch.set_num_threads(args.threads)
    model, tok, adapter, all_groups, calib = setup(args)
    lo, hi = (int(x) for x in args.layers.split("-"))
    kinds = args.kinds.split(",")
    groups = [g for g in all_groups if lo <= g.layer <= hi and g.kind in kinds]
    texts = {
        "wikitext2_test": Path(args.test).read_text(encoding="utf-8"),
        "python_stdlib_docs": other_domain_text(),
    }
    ids = {k: tok(v, return_tensors="pt").input_ids.reshape(-1) for k, v in texts.items()}

    def ppl(net=model):
        out = {}
        for k, v in ids.items():
            r = perplexity_stats(net, v, args.eval_seqlen, args.eval_tokens)
            out[k] = round(r.ppl, 3)
        return out

    n_params = sum(p.numel() for p in model.parameters())
    out = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF, float32)",
        "params_dense": n_params,
        "calibration": {
            "text": args.calib,
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "seed": args.seed,
        },
        "eval": {
            "tokens": args.eval_tokens,
            "window": args.eval_seqlen,
            "other_domain": "docstrings of Python stdlib modules: "
            + " ".join(OTHER_DOMAIN_MODULES),
            "other_domain_tokens_available": int(ids["python_stdlib_docs"].numel()),
        },
        "pruned_layers": args.layers,
        "pruned_kinds": kinds,
        "threads": args.threads,
        "dense_ppl": None if args.score_only else ppl(),
        "results": [],
    }
    print(json.dumps({"dense": out["dense_ppl"]}), file=sys.stderr, flush=True)
    for name in args.configs.split(","):
        criterion, options, alloc = CONFIGS[name]
        options = {"perturbations": args.perturbations, "spill": args.spill, **options}
        ctx = ScoringContext(model, adapter, groups, calib, args.seed, options=options)
        meter = PhaseMeter("cpu")
        rss0 = _rss()
        with meter.phase("score"):
            scores = CRITERIA[criterion](ctx)
        ratios = args.ratios if alloc == "uniform" else args.ratios_for_global

        if args.score_only:
            ratios = ""
            row = {"config": name, "score_wall_s": round(meter.time_s["score"], 2)}
            row["score_peak_rss_bytes"] = meter.peak_memory_bytes["score"]
            row["rss_before_score_bytes"] = rss0
            row["forward_passes"] = ctx.forward_passes
            if args.reconstruct in ("on", "select"):  # in place: the model is not needed after
                keep = keep_at(groups, scores, float(args.ratios.split(",")[0]), CONFIGS[name])
                layers = sorted({g.layer for g in groups})
                with meter.phase("reconstruct"):
                    prune_sequential(
                        model,
                        adapter,
                        calib,
                        keep,
                        layers,
                        ridge=float(args.ridge.split(",")[0]),
                        select="refit" if args.reconstruct == "select" else "scores",
                    )
                row["reconstruct_wall_s"] = round(meter.time_s["reconstruct"], 2)
                row["reconstruct_peak_rss_bytes"] = meter.peak_memory_bytes["reconstruct"]
            out["results"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        for ratio in (float(r) for r in ratios.split(",") if r):
            keep = keep_at(groups, scores, ratio, CONFIGS[name])
            runs = [(r, ridge) for r in args.reconstruct.split(",") for ridge in ridges(r)]
            for recon, ridge in runs:
                if recon in ("on", "select"):
                    pruned = copy.deepcopy(model)
                    t0 = time.perf_counter()
                    layers = sorted({g.layer for g in groups})
                    prune_sequential(
                        pruned,
                        adapter_for(pruned),
                        calib,
                        keep,
                        layers,
                        ridge=ridge,
                        select="refit" if recon == "select" else "scores",
                    )
                    recon_s = time.perf_counter() - t0
                    result, params_after = ppl(pruned), sum(p.numel() for p in pruned.parameters())
                    del pruned
                else:
                    undo = masked(groups, keep, ctx, options)
                    result, params_after = ppl(), n_params - params_removed(groups, keep)
                    recon_s = 0.0
                    undo()
                row = {
                    "config": name + {"off": "", "on": "+reconstruct", "select": "+select"}[recon],
                    "criterion": criterion,
                    "options": options,
                    "allocation": alloc,
                    "reconstruct": recon,
                    "ridge": ridge,
                    "ratio": ratio,
                    "params_after": params_after,
                    "ppl": result,
                    "score_wall_s": round(meter.time_s["score"], 2),
                    "reconstruct_wall_s": round(recon_s, 2),
                    "score_peak_rss_bytes": meter.peak_memory_bytes["score"],
                    "score_peak_over_start_bytes": meter.peak_memory_bytes["score"] - rss0,
                    "forward_passes": ctx.forward_passes,
                    "tokens_forwarded": ctx.tokens_forwarded,
                }
                print(json.dumps(row), file=sys.stderr, flush=True)
                out["results"].append(row)
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()

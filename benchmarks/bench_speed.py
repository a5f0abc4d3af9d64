"""Prefill and decode tokens/s of SmolLM2-135M, dense and pruned, with and without --round-to.

Scores the model once with the CLI's default criterion (and every other CLI default, overridden
by ``--calib``/``--nsamples``), then prunes a copy per ratio of ``--ratios``, once as allocated
and once post-processed by ``--round-to`` (the same steps as ``python -m minillm.prune``,
the refit of ``--reconstruct`` included), and
times all of them in one process: each repeat times every model in turn (batch 1 and 16, a
random prompt of ``--prompt-tokens`` then ``--new-tokens`` greedy steps with the KV cache), so
machine load drifts hit them alike; the best of ``--repeats`` is kept. Prints JSON (stdout):
per model its parameters, kept sizes, ``minillm.evaluation.generation.compare_speed``'s keys
and tokens/s relative to dense.

Command (see BENCHMARKS.md)::

    python benchmarks/bench_speed.py --cache-dir /tmp/smollm2-f32 \\
        --calib ../shared/data/wikitext2/valid.txt --nsamples 8 --round-to channels=8
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict

import torch
from _smollm2 import load_smollm2

from minillm import prune
from minillm.blocks.reconstruct import prune_sequential
from minillm.data import calibration_batches
from minillm.evaluation.generation import compare_speed
from minillm.model.adapters import adapter_for
from minillm.model.surgery import layer_records, prune_layer
from minillm.scoring import allocation
from minillm.scoring.criteria import CRITERIA, ScoringContext


def pruned_copy(model, keep, layers, cfg: prune.PruneConfig, batches: torch.Tensor):
    """A copy of ``model`` pruned to ``keep`` as the CLI does it (refit with --reconstruct)."""
    out = copy.deepcopy(model)
    adapter = adapter_for(out)
    if cfg.reconstruct:
        prune_sequential(out, adapter, batches, keep, layers, cfg.gqa, cfg.batch_size, cfg.ridge)
        return out
    for layer in layers:
        heads, channels = keep.get((layer, "heads")), keep.get((layer, "channels"))
        prune_layer(out, adapter, layer, heads, channels, cfg.gqa)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", help="float32 SmolLM2 cache (see benchmarks/_smollm2.py)")
    p.add_argument("--calib", default="self")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--round-to", default="channels=8")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    argv = ["--calib", args.calib, "--nsamples", str(args.nsamples), "--out", "-"]
    cfg = prune.PruneConfig(**vars(prune.build_parser().parse_args(argv)))
    dense, tok = load_smollm2(args.cache_dir)
    adapter = adapter_for(dense)
    prune.resolve_repair(cfg)
    layers = allocation.parse_layers(cfg.layers, len(adapter.layers(dense)))
    groups = [adapter.groups(dense, i, cfg.gqa)[k] for i in layers for k in ("heads", "channels")]
    batches = calibration_batches(cfg.calib, tok, cfg.nsamples, cfg.seqlen, cfg.seed, dense)
    options = {k: v for k, v in asdict(cfg).items() if v is not None}
    scores = CRITERIA[cfg.criterion](
        ScoringContext(dense, adapter, groups, batches, cfg.seed, options=options)
    )
    multiples = allocation.parse_round_to(args.round_to)
    models = {"dense": dense}
    for ratio in (float(r) for r in args.ratios.split(",")):
        keep = allocation.allocate(
            groups,
            scores,
            ratio,
            cfg.criterion,
            options,
            per_layer=cfg.uniform,
            together=cfg.rank_together,
        )
        name = f"{cfg.criterion}-{ratio:g}"
        models[name] = pruned_copy(dense, keep, layers, cfg, batches)
        rounded = allocation.round_to_multiples(groups, scores, keep, multiples)
        models[f"{name}-round-{args.round_to}"] = pruned_copy(dense, rounded, layers, cfg, batches)
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    print(f"timing {list(models)}", file=sys.stderr)
    speed = compare_speed(models, args.prompt_tokens, args.new_tokens, batch_sizes, args.repeats)
    out = {"args": vars(args), "criterion": cfg.criterion, "torch_threads": torch.get_num_threads()}
    out["models"] = {}
    for name, figures in speed.items():
        relative = {k: v / speed["dense"][k] for k, v in figures.items() if "tokens_per_s" in k}
        out["models"][name] = {
            "params": sum(t.numel() for t in models[name].parameters()),
            **figures,
            "vs_dense": relative,
            "layers": layer_records(models[name], adapter),
        }
        print(f"{name}: {relative}", file=sys.stderr)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

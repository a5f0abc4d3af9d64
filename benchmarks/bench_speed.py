"""Prefill and decode tokens/s of SmolLM2-135M, dense and pruned, with and without --round-to.

Prunes a copy of the model per ratio of ``--ratios`` with the command's defaults (through
``minillm.prune_model``, the refit included), once as allocated and once with ``--round-to``,
and times all of them in one process: each repeat times every model in turn (batch 1 and 16, a
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

import torch
from _smollm2 import load_smollm2

import minillm
from minillm.data import calibration_batches
from minillm.evaluation.generation import compare_speed
from minillm.model.adapters import adapter_for
from minillm.model.surgery import layer_records


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
    dense, tok = load_smollm2(args.cache_dir)
    adapter = adapter_for(dense)
    defaults = minillm.PruneConfig()
    batches = calibration_batches(args.calib, tok, args.nsamples, defaults.seqlen, 0, dense)
    models = {"dense": dense}
    for ratio in (float(r) for r in args.ratios.split(",")):
        name = f"{defaults.criterion}-{ratio:g}"
        for label, extra in (
            (name, {}),
            (f"{name}-round-{args.round_to}", {"round_to": args.round_to}),
        ):
            model = copy.deepcopy(dense)
            minillm.prune_model(model, tok, ratio=ratio, calibration=batches, **extra)
            models[label] = model
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    print(f"timing {list(models)}", file=sys.stderr)
    speed = compare_speed(models, args.prompt_tokens, args.new_tokens, batch_sizes, args.repeats)
    out = {
        "args": vars(args),
        "criterion": defaults.criterion,
        "torch_threads": torch.get_num_threads(),
    }
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

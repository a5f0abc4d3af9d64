"""Prefill and decode tokens/s of dense SmolLM2-135M and pruned outputs, side by side on CPU.

Every model is loaded once; each repeat times every model in turn (batch 1 and 16, a random
prompt of ``--prompt-tokens`` then ``--new-tokens`` greedy steps with the KV cache), so machine
load drifts hit them alike; the best of ``--repeats`` is kept. Prints JSON (stdout): per model,
``minillm.generation.compare_speed``'s keys, its kept sizes, and tokens/s relative to dense.

Command (see BENCHMARKS.md)::

    python benchmarks/bench_speed.py --cache-dir /tmp/smollm2-f32 --threads 2 \\
        p20=/tmp/speed/p20 p20r=/tmp/speed/p20r p50=/tmp/speed/p50 p50r=/tmp/speed/p50r
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from _smollm2 import load_smollm2

from minillm.generation import compare_speed
from minillm.io import load_pruned


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", metavar="NAME=DIR", help="pruned output directories")
    p.add_argument("--cache-dir", help="float32 SmolLM2 cache (see benchmarks/_smollm2.py)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {"dense": load_smollm2(args.cache_dir)[0]}
    sizes = {}
    for item in args.models:
        name, _, path = item.partition("=")
        models[name] = load_pruned(path)
        sizes[name] = json.loads(open(f"{path}/report.json").read())["layers"]
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    speed = compare_speed(models, args.prompt_tokens, args.new_tokens, batch_sizes, args.repeats)
    out = {"args": vars(args), "torch_threads": torch.get_num_threads(), "models": {}}
    for name, figures in speed.items():
        relative = {k: v / speed["dense"][k] for k, v in figures.items() if "tokens_per_s" in k}
        params = sum(p.numel() for p in models[name].parameters())
        out["models"][name] = {"params": params, **figures, "vs_dense": relative}
        if name in sizes:
            out["models"][name]["layers"] = sizes[name]
        print(f"{name}: {relative}", file=sys.stderr)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

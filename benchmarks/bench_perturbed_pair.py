"""Cost of one +-eps pair of perturbed forwards vs one pair of plain forwards, SmolLM2-135M on CPU.

Both pairs run the same stacked batch ``[x; x]`` of ``2 * --batch`` sequences of ``--seqlen``
tokens; the perturbed pair runs inside :func:`minillm.scoring.perturb.perturbed` with every
attention and MLP linear of every layer perturbed (210 linears; the LM head is not). Plain and
perturbed runs are interleaved and the medians of ``--repeats`` timings compared, so machine
load drifts hit both alike. Prints JSON (stdout): seconds per pair and the ratio, per kind and
backend.

Command (see BENCHMARKS.md)::

    python benchmarks/bench_perturbed_pair.py --cache-dir /tmp/smollm2-f32 --threads 1 > pair.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from _smollm2 import load_smollm2
from torch import nn

from minillm.kernels import ops
from minillm.scoring.perturb import perturbed


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4, help="sequences per half of the pair")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kinds", nargs="+", default=["rows", "cols", "dense"])
    p.add_argument("--backends", nargs="+", default=["cpp", "reference"])
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--cache-dir", default=None, help="float32 copy of the model (saves ~20 s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model, _ = load_smollm2(args.cache_dir)
    linears = [
        m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and (".self_attn." in n or ".mlp." in n)
    ]
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen))
    pair = torch.cat([ids, ids])
    lin_ids = list(enumerate(linears))

    def plain() -> None:
        model(pair)

    results = []
    with torch.inference_mode():
        plain()  # warm-up (also builds the C++ extension when needed)
        for backend in args.backends:
            os.environ["MINILLM_BACKEND"] = backend
            for kind in args.kinds:

                def pert(kind: str = kind) -> None:
                    with perturbed(lin_ids, seed=1, eps=args.eps, kind=kind):
                        model(pair)

                pert()
                t_plain, t_pert = [], []
                for _ in range(args.repeats):
                    t_plain.append(timed(plain))
                    t_pert.append(timed(pert))
                mp, mq = statistics.median(t_plain), statistics.median(t_pert)
                results.append(
                    {
                        "backend": ops.backend_for(torch.device("cpu")),
                        "kind": kind,
                        "plain_pair_s": round(mp, 4),
                        "perturbed_pair_s": round(mq, 4),
                        "ratio": round(mq / mp, 3),
                    }
                )
                print(json.dumps(results[-1]), file=sys.stderr)
    out = {
        "model": "SmolLM2-135M-Instruct (float32, de-quantized from Q4_1 GGUF)",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "tokens_per_pair": 2 * args.batch * args.seqlen,
        "perturbed_linears": len(linears),
        "repeats": args.repeats,
        "results": results,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Milliseconds of one ``[M, K] @ [K, N]`` matmul in float32 and bfloat16 on this CPU.

Why recovery trains in bfloat16 where the CPU has AMX or AVX512-BF16 (``minillm.recover
--precision auto``). Default shape: 1,024 tokens through SmolLM2's gate projection (576 ->
1,536). Mean of ``--repeats`` after 3 warm-up runs; dtypes alternate for ``--rounds`` rounds.
One JSON object on stdout.

Command (see BENCHMARKS.md, "Recovery")::

    python benchmarks/bench_matmul_dtype.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def matmul_ms(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    """Mean wall milliseconds of ``[m, k] @ [k, n]`` in ``dtype``."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    for _ in range(3):
        a @ b.T
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b.T
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="1024,576,1536", help="M,K,N")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    m, k, n = (int(v) for v in args.shape.split(","))
    times = {"float32": [], "bfloat16": []}
    for _ in range(args.rounds):
        for name in times:
            times[name].append(matmul_ms(m, k, n, getattr(torch, name), args.repeats))
    ms = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "setup": vars(args) | {"torch": torch.__version__},
        "ms": ms,
        "runs": times,
        "bfloat16_speedup": ms["float32"] / ms["bfloat16"],
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU throughput of the Triton perturbed linear vs ``torch.nn.functional.linear`` (bf16).

At the LLaMA-7B linear shapes (out x in: 4096x4096, 11008x4096, 4096x11008) and 2k-16k tokens,
times with ``triton.testing.do_bench``:

* ``F.linear`` on the stacked batch ``x`` ``[M, K]`` (the plain pair: same FLOPs as the perturbed
  pair, ``2 M N K``);
* ``perturbed_linear`` on the same ``x`` (``M/2`` pairs, ``+eps`` and ``-eps`` halves counted as
  two linears), for ``kind`` dense and rows, without and with the fused input statistics;
* the FMS reduction (``fms_scores``) of each weight with ``--seeds`` perturbations, vs the
  chunked PyTorch reference.

Prints JSON (stdout) with TFLOP/s, the ratio to ``F.linear`` and peak memory per case, and
each shape's row on stderr as it is measured. Needs a CUDA device (the CPU suite runs the
same kernels under the Triton interpreter). Command (figures of an H200 in BENCHMARKS.md)::

    python benchmarks/bench_kernels_gpu.py --tokens 16384 > kernels_gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N out, K in)


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--seeds", type=int, default=64, help="perturbations in the FMS reduction")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels_gpu.py needs a CUDA device")
    from triton.testing import do_bench

    from minillm.kernels.fms_scores import fms_scores_triton
    from minillm.kernels.perturbed_linear import perturbed_linear_triton
    from minillm.kernels.reference import fms_scores_ref

    dev, dt = "cuda", torch.bfloat16
    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
        for m in args.tokens:
            x = torch.randn(m, k, device=dev, dtype=dt)
            flops = 2.0 * m * n * k
            t_lin = do_bench(lambda x=x, w=w: F.linear(x, w))
            row = {
                "N": n,
                "K": k,
                "tokens": m,
                "linear_tflops": round(flops / t_lin / 1e9, 1),
                "linear_peak_mib": round(peak_mib(lambda x=x, w=w: F.linear(x, w)), 1),
            }
            for kind in ("dense", "rows"):
                for stats in (False, True):

                    def run(x=x, w=w, kind=kind, stats=stats):
                        return perturbed_linear_triton(
                            x, w, None, 1, 2, 1e-3, "rademacher", kind, stats
                        )

                    run()  # autotune outside the timing
                    t = do_bench(run)
                    tag = f"{kind}{'_stats' if stats else ''}"
                    row[f"{tag}_tflops"] = round(flops / t / 1e9, 1)
                    row[f"{tag}_ratio"] = round(t_lin / t, 3)
                    row[f"{tag}_peak_mib"] = round(peak_mib(run), 1)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    fms = []
    seeds, coeffs = list(range(args.seeds)), [1.0 / args.seeds] * args.seeds
    for n, k in SHAPES:
        w = torch.randn(n, k, device=dev, dtype=dt)
        xn = torch.rand(k, device=dev)
        t_tri = do_bench(lambda w=w, xn=xn: fms_scores_triton(w, xn, seeds, coeffs, 3))
        t_ref = do_bench(lambda w=w, xn=xn: fms_scores_ref(w, xn, seeds, coeffs, 3), rep=200)
        fms.append(
            {
                "N": n,
                "K": k,
                "seeds": args.seeds,
                "triton_ms": round(t_tri, 3),
                "reference_ms": round(t_ref, 3),
                "speedup": round(t_ref / t_tri, 1),
            }
        )
    out = {
        "device": torch.cuda.get_device_name(),
        "dtype": "bfloat16",
        "linear": rows,
        "fms_scores": fms,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

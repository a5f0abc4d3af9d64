"""CPU operators at SmolLM2-135M linear shapes: C++ vs PyTorch reference vs plain ``F.linear``.

For each shape (out x in) and each kind, times one perturbed pair on a stacked batch of
``--tokens`` rows (half +eps, half -eps) with the C++ operator and with the reference, beside a
plain ``F.linear`` on the same rows; also the fused linear+statistics (``eps = 0``) against
``F.linear`` followed by ``x.pow(2).sum(0)`` and ``x.sum(0)``, and the FMS reduction with
``--seeds`` perturbations. Medians of ``--repeats`` interleaved runs, in milliseconds.
Prints JSON (stdout). Command (see BENCHMARKS.md)::

    python benchmarks/bench_kernels_cpu.py --threads 1 > kernels_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from minillm.kernels import cpp, reference

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down


def median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time (ms) of each function, runs interleaved round by round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512, help="rows of the stacked batch")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpp.available():
        raise SystemExit("the C++ operators did not build; nothing to compare")
    g = torch.Generator().manual_seed(0)
    seeds, coeffs = list(range(args.seeds)), [1.0] * args.seeds
    rows = []
    for n, k in SHAPES:
        x = torch.randn(args.tokens, k, generator=g)
        w = torch.randn(n, k, generator=g) / k**0.5
        fns: dict[str, Callable[[], object]] = {"linear": lambda x=x, w=w: F.linear(x, w)}
        for kind in ("dense", "rows", "cols"):
            fns[f"cpp_{kind}"] = lambda x=x, w=w, kind=kind: cpp.perturbed_linear_cpp(
                x, w, None, 1, 2, 1e-3, "rademacher", kind
            )
            fns[f"ref_{kind}"] = lambda x=x, w=w, kind=kind: reference.perturbed_linear_ref(
                x, w, None, 1, 2, 1e-3, "rademacher", kind
            )
        fns["cpp_stats"] = lambda x=x, w=w: cpp.perturbed_linear_cpp(
            x, w, None, 0, 0, 0.0, "rademacher", "dense", True
        )
        fns["linear_then_stats"] = lambda x=x, w=w: (F.linear(x, w), x.pow(2).sum(0), x.sum(0))
        t = median_ms(fns, args.repeats)
        row = {"N": n, "K": k, "tokens": args.tokens, "ms": t}
        row["ratio_to_linear"] = {key: round(v / t["linear"], 3) for key, v in t.items()}
        xn = torch.rand(k, generator=g)
        row["fms_ms"] = median_ms(
            {
                "cpp": lambda w=w, xn=xn: cpp.fms_scores_cpp(w, xn, seeds, coeffs, 3),
                "reference": lambda w=w, xn=xn: reference.fms_scores_ref(w, xn, seeds, coeffs, 3),
            },
            max(3, args.repeats // 3),
        )
        rows.append(row)
    out = {"device": "cpu", "threads": torch.get_num_threads(), "seeds": args.seeds, "rows": rows}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

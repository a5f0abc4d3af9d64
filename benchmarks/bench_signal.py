"""Does the forward-only gradient carry signal? Spearman of SPSA estimates vs backprop, per layer.

For SmolLM2-135M and WikiText-2 validation calibration, every estimator runs ``--max-k``
rounds over the calibration set and is scored at ``K = 1, 2, 4, ...`` rounds (prefixes of the
same seeds). Printed as JSON (stdout):

* ``weight``: paper-faithful per-weight SPSA; FMS channel/head scores vs backprop ``taylor``
  and vs FMS with exact gradients, per layer (mean over layers);
* ``unit``: one multiplier per channel/head; ``|g_u|`` vs exact ``|g_u|`` per layer, and
  ``A_u |g_u|`` (fms unit) vs ``taylor``;
* ``layer``: one multiplier per layer's heads and one per its channels (60 variables);
  Spearman across the 30 layers of ``|g_l|`` vs exact, per kind, and of ``g_l`` signed.

Command (see BENCHMARKS.md)::

    python benchmarks/bench_signal.py --calib ../shared/data/wikitext2/valid.txt \\
        --cache-dir /tmp/smollm2-f32 > signal.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from _smollm2 import setup, spearman

from minillm.kernels import ops
from minillm.scoring import gradients as exact
from minillm.scoring import spsa
from minillm.scoring.stats import model_input_stats


def prefix(est: spsa.Estimate, k: int, k_max: int) -> spsa.Estimate:
    """The estimate of the first ``k`` rounds (round index is bits 16..31 of the seed)."""
    return [(s, c * k_max / k) for s, c in est if ((s >> 16) & 0xFFFF) < k]


def per_layer(groups, kind, a, b) -> float:
    """Mean over layers of Spearman(a[gi], b[gi]) for groups of ``kind``."""
    vals = [spearman(a[i], b[i]) for i, g in enumerate(groups) if g.kind == kind]
    return sum(vals) / len(vals)


def unit_sums(g, sums):
    return sum(sums[b.linear][b.dim].view(-1, b.size).sum(1) for b in g.producers + g.consumers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", required=True, help="calibration text file (WikiText-2 valid)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per ± half")
    p.add_argument("--max-k", type=int, default=16)
    p.add_argument("--weight-max-k", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--estimators", default="layer-global,layer-sequence,unit-sequence,weight")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model, _, _, groups, calib = setup(args)
    bs = args.batch_size
    linears = list(dict.fromkeys(b.linear for g in groups for b in g.producers + g.consumers))
    t0 = time.perf_counter()
    stats, _ = model_input_stats(model, linears, calib, 2 * bs)
    grads, bp_passes, _ = exact.weight_gradients(model, linears, calib, bs)
    taylor, fms_bp = [], []
    for g in groups:
        taylor.append(
            unit_sums(
                g,
                {
                    b.linear: _rowcol((b.linear.weight * grads[b.linear]).abs())
                    for b in g.producers + g.consumers
                },
            )
        )
        fms_bp.append(
            unit_sums(
                g,
                {
                    b.linear: _rowcol(
                        b.linear.weight.abs() * stats[b.linear].norm * grads[b.linear].abs()
                    )
                    for b in g.producers + g.consumers
                },
            )
        )
    del grads
    wanda = [
        unit_sums(
            g,
            {
                b.linear: _rowcol(b.linear.weight.abs() * stats[b.linear].norm)
                for b in g.producers + g.consumers
            },
        )
        for g in groups
    ]
    exact_m = {
        r: exact.multiplier_gradients(model, groups, calib, r, bs)[0] for r in spsa.RESOLUTIONS
    }
    print(f"backprop references: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    out = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF, float32)",
        "calibration": {"text": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen},
        "batch": f"{bs} sequences per half, {2 * bs} per forward",
        "wanda_sp_vs_taylor": {
            k: per_layer(groups, k, wanda, taylor) for k in ("heads", "channels")
        },
        "fms_backprop_vs_taylor": {
            k: per_layer(groups, k, fms_bp, taylor) for k in ("heads", "channels")
        },
        "results": [],
    }
    passes_per_round = -(-args.nsamples // bs)
    for name in args.estimators.split(","):
        t0 = time.perf_counter()
        if name == "removal":
            out["results"] += removal_signal(model, groups, calib, wanda, args)
            continue
        if name == "weight":
            k_max = args.weight_max_k
            est, _ = spsa.spsa_weights(
                model,
                list(enumerate(linears)),
                calib,
                n_perturbations=k_max,
                eps=1e-3,
                sharing="global",
                batch_size=bs,
            )
        else:
            res, sharing = name.split("-")
            k_max = args.max_k
            est, _ = spsa.spsa_multipliers(
                model,
                groups,
                calib,
                resolution=res,
                n_perturbations=k_max,
                eps=1e-2,
                sharing=sharing,
                batch_size=bs,
            )
        elapsed = time.perf_counter() - t0
        k = 1
        while k <= k_max:
            e = prefix(est, k, k_max)
            row = {
                "estimator": name,
                "rounds": k,
                "forward_passes": k * passes_per_round,
                "sequences_forwarded": 2 * k * args.nsamples,
            }
            if name == "weight":
                seeds, coeffs = [s for s, _ in e], [c for _, c in e]
                sums = {
                    lin: ops.fms_scores(lin.weight.detach(), stats[lin].norm, seeds, coeffs, tid)
                    for tid, lin in enumerate(linears)
                }
                fms_sp = [unit_sums(g, sums) for g in groups]
                for kind in ("heads", "channels"):
                    row[f"fms_vs_taylor_{kind}"] = per_layer(groups, kind, fms_sp, taylor)
                    row[f"fms_vs_fms_backprop_{kind}"] = per_layer(groups, kind, fms_sp, fms_bp)
            else:
                res = name.split("-")[0]
                g_hat = [
                    spsa.multiplier_gradient(e, i, spsa.n_coords(g, res))
                    for i, g in enumerate(groups)
                ]
                ex = exact_m[res]
                if res == "unit":
                    for kind in ("heads", "channels"):
                        row[f"abs_grad_vs_exact_{kind}"] = per_layer(
                            groups, kind, [x.abs() for x in g_hat], [x.abs() for x in ex]
                        )
                        fms_unit = [a * x.abs() for a, x in zip(wanda, g_hat, strict=True)]
                        row[f"fms_unit_vs_taylor_{kind}"] = per_layer(
                            groups, kind, fms_unit, taylor
                        )
                else:
                    for kind in ("heads", "channels"):
                        idx = [i for i, g in enumerate(groups) if g.kind == kind]
                        gh = torch.cat([g_hat[i] for i in idx])
                        gx = torch.cat([ex[i] for i in idx])
                        row[f"abs_grad_vs_exact_{kind}"] = spearman(gh.abs(), gx.abs())
                        row[f"signed_grad_vs_exact_{kind}"] = spearman(gh, gx)
                    gh = torch.cat(g_hat)
                    gx = torch.cat(ex)
                    row["abs_grad_vs_exact_all60"] = spearman(gh.abs(), gx.abs())
            out["results"].append(row)
            print(json.dumps(row), file=sys.stderr)
            k *= 2
        out["results"][-1]["wall_s"] = elapsed
    out["exact_layer_gradients"] = [float(x) for x in torch.cat(exact_m["layer"])]
    json.dump(out, sys.stdout, indent=1)


def removal_signal(model, groups, calib, wanda, args) -> list[dict]:
    """The ``removal`` estimate of each layer's pruning damage (MLP channels of layers 3-27,
    the lowest 20% by wanda-sp) vs the exact one-layer-at-a-time damage."""
    idx = [i for i, g in enumerate(groups) if g.kind == "channels" and 3 <= g.layer <= 27]
    sub = [groups[i] for i in idx]
    cands = [wanda[i] <= wanda[i].kthvalue(round(0.2 * groups[i].n_units)).values for i in idx]
    exact_d, _ = spsa.removal_damage(model, sub, calib, cands, 2 * args.batch_size)
    est, _ = spsa.spsa_multipliers(
        model,
        sub,
        calib,
        resolution="layer",
        n_perturbations=args.max_k,
        batch_size=args.batch_size,
        candidates=cands,
    )
    rows, k = [], 1
    while k <= args.max_k:
        e = prefix(est, k, args.max_k)
        got = torch.cat([spsa.multiplier_gradient(e, i, 1) for i in range(len(sub))])
        rows.append(
            {
                "estimator": "removal-sequence",
                "rounds": k,
                "forward_passes": k * -(-args.nsamples // args.batch_size),
                "sequences_forwarded": 2 * k * args.nsamples,
                "damage_vs_exact_channels": spearman(got, exact_d),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
        k *= 2
    rows[-1]["exact_damage"] = [float(x) for x in exact_d]
    return rows


def _rowcol(s: torch.Tensor):
    s = s.detach().float()
    return (s.sum(1), s.sum(0))


if __name__ == "__main__":
    main()

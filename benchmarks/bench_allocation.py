"""Allocation and selection on SmolLM2-135M: the pipeline's options side by side (issue 24).

One calibration set (random windows of WikiText-2 validation, ``--seed``). For each
``--configs`` entry (keyword options of ``minillm.PruneConfig``), the scores are computed once
and, for the damage allocation, the damage table once; then each ratio of ``--ratios`` is
allocated, pruned and refit on a copy of the model (the steps of ``minillm.pipeline``) and
evaluated as ``bench_quality.py`` does: perplexity over the first ``--eval-tokens`` tokens of
WikiText-2 test and of the Python stdlib docstrings (``bench_quality.other_domain_text``).
``wanda-sp``'s scoring is timed first, in the same process, for the cost ratios. JSON lines on
stderr as results arrive, one JSON on stdout.

Command (see BENCHMARKS.md, "Quality")::

    python benchmarks/bench_allocation.py --calib ../shared/data/wikitext2/valid.txt \\
        --test ../shared/data/wikitext2/test.txt --cache-dir /tmp/smollm2-f32 \\
        --configs 'global=allocation=global' 'damage=' > allocation.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from _smollm2 import load_smollm2
from bench_quality import other_domain_text

from minillm import pipeline
from minillm.config import PruneConfig
from minillm.data import calibration_batches
from minillm.evaluation.perplexity import perplexity_stats
from minillm.scoring import allocation, damage


def parse_config(spec: str) -> tuple[str, dict]:
    """``NAME=key=value,key=value`` (values as Python literals where they parse)."""
    name, _, rest = spec.partition("=")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--cache-dir", help="float32 SmolLM2 cache (benchmarks/_smollm2.py)")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", default="3-27")
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--configs", nargs="+", default=["damage="])
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dense, tok = load_smollm2(args.cache_dir)
    calib = calibration_batches(args.calib, tok, args.nsamples, args.seqlen, args.seed)
    texts = {"wikitext2_test": Path(args.test).read_text(), "stdlib_docs": other_domain_text()}
    ids = {k: tok(v, return_tensors="pt").input_ids.reshape(-1) for k, v in texts.items()}
    base = {"layers": args.layers, "nsamples": args.nsamples, "seqlen": args.seqlen}
    wanda = pipeline.start(dense, calib, PruneConfig(criterion="wanda-sp", **base))
    _, wanda_s = timed(pipeline.score, wanda)
    out = {"args": vars(args), "wanda_sp_score_s": wanda_s, "results": []}
    for spec in args.configs:
        name, options = parse_config(spec)
        cfg = PruneConfig(**{**base, **options})
        job = pipeline.start(dense, calib, cfg)
        _, score_s = timed(pipeline.score, job)
        table, table_s = None, 0.0
        if cfg.allocator == "damage":
            start = time.perf_counter()
            table = damage.measure_damage(
                dense,
                job.adapter,
                calib,
                job.groups,
                job.scores or None,
                steps=cfg.damage_steps,
                subset=cfg.damage_subset,
                at=cfg.damage_at,
            )
            table_s = time.perf_counter() - start
        for ratio in (float(r) for r in args.ratios.split(",")):
            model = copy.deepcopy(dense)
            run = pipeline.start(model, calib, PruneConfig(**{**base, **options, "ratio": ratio}))
            run.scores = job.scores
            if table is not None:
                budget = round(ratio * allocation.prunable_params(run.groups))
                chosen = damage.allocate(table.options, budget)
                run.keep = damage.keep_from_allocation(run.groups, table.order, chosen)
            else:
                pipeline.allocate(run)
            _, apply_s = timed(pipeline.apply, run)
            ppl = {
                k: round(perplexity_stats(model, v, args.eval_seqlen, args.eval_tokens).ppl, 3)
                for k, v in ids.items()
            }
            report = pipeline.report(run)
            row = {
                "config": name,
                "options": options,
                "ratio": ratio,
                "params_after": report["params_after"],
                "ppl": ppl,
                "geomean": round(math.sqrt(math.prod(ppl.values())), 3),
                "score_s": round(score_s, 1),
                "damage_s": round(table_s, 1),
                "refit_s": round(apply_s, 1),
                "x_wanda_sp_score": round((score_s + table_s + apply_s) / wanda_s, 2),
                "kept": {f"{k[0]}:{k[1]}": len(v) for k, v in run.keep.items()},
            }
            print(json.dumps({k: v for k, v in row.items() if k != "kept"}), file=sys.stderr)
            out["results"].append(row)
            del model, run
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()

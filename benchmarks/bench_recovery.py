"""Perplexity of model directories in domain (WikiText-2 test) and out of domain (stdlib docs).

Each ``NAME=DIR`` (a minillm output, a plain HF dir, or ``embedded`` for the embedded GGUF) is
scored on the first ``--tokens`` tokens of WikiText-2 test and of the docstrings text of
``bench_quality.other_domain_text()`` (non-overlapping ``--seqlen`` windows); with ``--dense``
and ``--pruned`` names, the fraction of the pruned-to-dense gap each other model closes is
added. The recovery budget of a model (steps, tokens, seconds) is read from its report.json.
One JSON object on stdout.

Command (see BENCHMARKS.md, "Recovery")::

    python benchmarks/bench_recovery.py --test ../shared/data/wikitext2/test.txt \\
        dense=embedded pruned=/tmp/i10/pruned20 kd=/tmp/i10/kd lora=/tmp/i10/lora-wt2 \\
        --dense dense --pruned pruned
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from bench_quality import other_domain_text

from minillm.evaluation.perplexity import perplexity_stats
from minillm.model.loading import load_model


def recovery_budget(model_dir: str) -> dict | None:
    """Steps, training tokens and seconds of a recovered model (from its report.json)."""
    path = Path(model_dir) / "report.json"
    if not path.is_file():
        return None
    rec = json.loads(path.read_text()).get("recovery")
    if rec is None:
        return None
    keys = ("steps", "examples", "tokens_per_epoch", "tokens_trained", "time_s", "data_time_s")
    return {k: rec[k] for k in keys if k in rec} | {"final_loss": rec.get("final_loss")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="NAME=DIR (DIR 'embedded': the embedded GGUF)")
    p.add_argument("--test", required=True, help="WikiText-2 test text file")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--dense", help="NAME of the dense model (for the gap closed)")
    p.add_argument("--pruned", help="NAME of the pruned model (for the gap closed)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--texts", default="wikitext2_test,python_stdlib_docs", help="which texts")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = {}
    if "wikitext2_test" in args.texts:
        texts["wikitext2_test"] = Path(args.test).read_text(encoding="utf-8")
    if "python_stdlib_docs" in args.texts:
        texts["python_stdlib_docs"] = other_domain_text()
    out = {"tokens": args.tokens, "seqlen": args.seqlen, "models": {}}
    ids = None
    for spec in args.models:
        name, _, path = spec.partition("=")
        model, tok = load_model(None if path == "embedded" else path)
        if ids is None:
            ids = {k: tok(v, return_tensors="pt").input_ids.reshape(-1) for k, v in texts.items()}
        row = {"dir": path, "params": sum(q.numel() for q in model.parameters())}
        for key, v in ids.items():
            row[key] = perplexity_stats(model, v, args.seqlen, args.tokens).ppl
        row["recovery"] = recovery_budget(path)
        out["models"][name] = row
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
    if args.dense and args.pruned:
        dense, pruned = out["models"][args.dense], out["models"][args.pruned]
        for row in out["models"].values():
            row["gap_closed"] = {
                k: (pruned[k] - row[k]) / (pruned[k] - dense[k])
                for k in ids
                if pruned[k] != dense[k]
            }
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Results table: perplexity of SmolLM2-135M pruned by every criterion, without and with recovery.

For each criterion and ratio: ``python -m minillm.prune`` (uniform per-layer ratio, or one
global ranking for names ending in ``/global``; calibration on WikiText-2 validation),
perplexity on the first ``--eval-tokens`` tokens of WikiText-2 test (non-overlapping
``--eval-seqlen`` windows), ``python -m minillm.recover`` (LoRA on WikiText-2
validation, ``--recover-steps`` steps) and perplexity again. The dense model is measured the
same way, before and after the same recovery (to separate recovery from domain adaptation).
The CLIs run in this process (their ``main``), on a float32 copy of the embedded GGUF cached in
``--work-dir``. Every finished row is appended to ``WORK/results.jsonl`` and skipped when the
script runs again, so a killed run resumes; the full table is printed as JSON on stdout.

Command (see BENCHMARKS.md)::

    python benchmarks/results_table.py --calib ../shared/data/wikitext2/valid.txt \\
        --test ../shared/data/wikitext2/test.txt --work-dir /tmp/minillm-results \\
        > benchmarks/results_table.json
    python benchmarks/plot_results.py benchmarks/results_table.json benchmarks/results_ppl.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from _smollm2 import load_smollm2

from minillm import prune, recover
from minillm.evaluation.perplexity import load_eval_text, perplexity_stats, tokenize_text
from minillm.model.io import load_pruned
from minillm.scoring.criteria import CRITERIA

# criterion[@fms-variant][/global]: /global ranks units globally instead of a uniform per-layer
# ratio; fms's layer variant only reweights whole layers, so it needs the global allocation
ORDER = (
    "random",
    "magnitude",
    "fms@layer",
    "fms@weight",
    "wanda-sp",
    "flap",
    "taylor",
    "fms@layer/global",
    "wanda-sp/global",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calib", required=True, help="calibration and recovery text (valid split)")
    p.add_argument("--test", required=True, help="perplexity text (test split)")
    p.add_argument("--work-dir", required=True, help="models, cache and results.jsonl")
    p.add_argument(
        "--criteria",
        default=",".join(c for c in ORDER if c.split("/")[0].split("@")[0] in CRITERIA),
    )
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--nsamples", type=int, default=8, help="calibration sequences")
    p.add_argument("--seqlen", type=int, default=128, help="calibration / recovery sequence")
    p.add_argument("--perturbations", type=int, default=8, help="fms SPSA perturbations")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--recover-steps", type=int, default=8)
    p.add_argument("--recover-batch", type=int, default=2)
    p.add_argument("--recover-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p


def ppl(model_dir: Path, ids: torch.Tensor, seqlen: int) -> dict:
    model = load_pruned(model_dir)
    stats = perplexity_stats(model, ids, seqlen)
    params = sum(p.numel() for p in model.parameters())
    return {"ppl": stats.ppl, "tokens": stats.predicted_tokens, "params": params}


def recover_model(src: Path, out: Path, args) -> dict:
    argv = [
        str(src), "--data", args.calib, "--out", str(out), "--overwrite", "--quiet",
        "--max-steps", str(args.recover_steps), "--batch-size", str(args.recover_batch),
        "--seqlen", str(args.seqlen), "--lr", str(args.recover_lr), "--seed", str(args.seed),
    ]  # fmt: skip
    with contextlib.redirect_stdout(sys.stderr):  # recover prints its summary on stdout
        code = recover.main(argv)
    if code != 0:
        raise RuntimeError(f"recover failed: {' '.join(argv)}")
    report = json.loads((out / "report.json").read_text())["recovery"]
    return {
        "recover_s": report["time_s"],
        "recover_tokens": report["steps"] * args.recover_batch * args.seqlen,
        "loss_first": report["first_loss"],
        "loss_last": report["final_loss"],
    }


def prune_model(dense: Path, out: Path, name: str, ratio: float, args) -> dict:
    """Prune with ``name`` = ``criterion[@fms-variant][/global]`` (default: uniform ratio)."""
    spec, _, allocation = name.partition("/")
    criterion, _, variant = spec.partition("@")
    argv = [
        str(dense), "--criterion", criterion, "--ratio", str(ratio),
        "--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
        "--perturbations", str(args.perturbations), "--seed", str(args.seed),
        "--out", str(out), "--overwrite", "--quiet",
    ]  # fmt: skip
    if allocation != "global":
        argv.append("--uniform")
    if variant:
        argv += ["--fms-variant", variant]
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # prune prints its summary on stdout
        code = prune.main(argv)
    if code != 0:
        raise RuntimeError(f"prune failed: {' '.join(argv)}")
    return {"prune_s": time.perf_counter() - start}


def row(name: str, ratio: float, model_dir: Path, ids, args, extra: dict) -> dict:
    """Perplexity before and after recovery of one model directory."""
    before = ppl(model_dir, ids, args.eval_seqlen)
    rec = recover_model(model_dir, model_dir.with_name(model_dir.name + "-rec"), args)
    after = ppl(model_dir.with_name(model_dir.name + "-rec"), ids, args.eval_seqlen)
    return {
        "criterion": name,
        "ratio": ratio,
        "params": before["params"],
        "ppl": before["ppl"],
        "ppl_recovered": after["ppl"],
        "eval_tokens": before["tokens"],
        **extra,
        **rec,
    }


def main() -> int:
    args = build_parser().parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "results.jsonl"
    done = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done[(r["criterion"], r["ratio"])] = r
    dense_dir = work / "dense"
    _, tokenizer = load_smollm2(str(dense_dir))
    ids = tokenize_text(tokenizer, load_eval_text(args.test), args.eval_tokens)
    jobs = [("dense", 0.0)] + [
        (c, float(r)) for c in args.criteria.split(",") for r in args.ratios.split(",")
    ]
    for name, ratio in jobs:
        if (name, ratio) in done:
            continue
        print(f"[results_table] {name} {ratio}", file=sys.stderr, flush=True)
        if name == "dense":
            result = row(name, ratio, dense_dir, ids, args, {})
        else:
            out = work / f"{name.replace('/', '-').replace('@', '-')}-{ratio}"
            extra = prune_model(dense_dir, out, name, ratio, args)
            result = row(name, ratio, out, ids, args, extra)
        done[(name, ratio)] = result
        with log.open("a") as fh:
            fh.write(json.dumps(result) + "\n")
        print(json.dumps(result), file=sys.stderr, flush=True)
    table = {
        "setup": {k: v for k, v in vars(args).items() if k != "work_dir"},
        "rows": [done[j] for j in jobs if j in done],
    }
    json.dump(table, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

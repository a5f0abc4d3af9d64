"""The peak memory the prune command reports, per configuration, side by side in one run.

Runs ``python -m minillm.prune`` once per ``--runs`` entry (``NAME=FLAGS``, each its own
process, as a user runs it) on the same model and calibration, and prints one JSON (stdout):
each run's ``report.json`` peaks per phase and their ratio to the first run's scoring peak (by
default ``wanda-sp`` with the one-ranking allocation: its scoring alone). The CPU peak is the
process's resident high-water mark, reset at each phase (``minillm.memory``), so it includes
the interpreter, the libraries and the model itself. The ``score`` phase includes the
allocation (the damage sweep of the default).

Command (see BENCHMARKS.md, "Memory")::

    python benchmarks/bench_cli_peak.py --calib ../shared/data/wikitext2/valid.txt \\
        --nsamples 32 --seqlen 256 --work-dir /tmp/cli-peak > benchmarks/results/cli_peak.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PHASES = ("load", "calibrate", "eval_before", "score", "prune", "eval_after", "save")


RUNS = (
    "wanda-sp=--criterion wanda-sp --allocation global",
    "default=",
    "global=--allocation global",
    "taylor=--criterion taylor",
)


def run_prune(args, name: str, flags: str) -> dict:
    out = args.work_dir / name
    cmd = [sys.executable, "-m", "minillm.prune", *([args.model] if args.model else [])]
    cmd += [*flags.split(), "--calib", args.calib, "--nsamples", str(args.nsamples)]
    cmd += ["--seqlen", str(args.seqlen), "--out", str(out), "--overwrite", "--quiet"]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((out / "report.json").read_text())
    return {"peak_mib": {k: report["peak_memory_bytes"][k] / 2**20 for k in PHASES}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="MODEL of the prune command (default: the embedded SmolLM2)")
    p.add_argument("--calib", required=True, help="calibration text file")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--runs", nargs="+", default=RUNS, help="NAME=FLAGS; the first is the base")
    p.add_argument("--work-dir", type=Path, required=True)
    args = p.parse_args()
    runs = {n: run_prune(args, n, f) for n, _, f in (r.partition("=") for r in args.runs)}
    base = next(iter(runs.values()))["peak_mib"]["score"]
    for run in runs.values():
        run["x_base_score"] = {
            phase: round(run["peak_mib"][phase] / base, 3) for phase in ("score", "prune")
        }
    print(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()

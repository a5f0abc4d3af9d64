"""Table of record: SmolLM2-135M pruned by each criterion, perplexity and the seven zero-shot tasks.

Rows, in the papers' form (LLM-Pruner, FLAP, MINI-LLM): the dense model, then each
configuration of ``CONFIGS`` at each ``--ratios`` value, without and with recovery. Each pruned
model comes from ``python -m minillm.prune`` (calibration ``--calib``, ``--nsamples`` x
``--seqlen``), each recovered one from ``python -m minillm.recover`` with its defaults
(distillation from the dense model on text it writes; ``--recover-steps`` overrides the
steps). Columns: parameters, perplexity on the first ``--eval-tokens`` of WikiText-2 test and
of another domain (Python stdlib docstrings, ``bench_quality.other_domain_text()``), and
zero-shot BoolQ, PIQA, HellaSwag (approximate data: marked ~), WinoGrande, ARC-e, ARC-c, OBQA
through lm-eval with the shared-prefix model class (acc_norm where the papers report it, acc
for BoolQ and WinoGrande), their average, examples per task and standard errors.

Every finished row is appended to ``WORK/rows.jsonl`` and skipped when the script runs again (a
killed run resumes). Writes the JSON (stdout), a Markdown table (``--markdown``) and a plot of
average accuracy and perplexity against ratio per criterion (``--plot``).

Full table (see BENCHMARKS.md, "Table of record")::

    python benchmarks/record_table.py --calib ../shared/data/wikitext2/valid.txt \\
        --test ../shared/data/wikitext2/test.txt --task-data-dir ../shared/data/zeroshot \\
        --cache-dir /tmp/smollm2-f32 --work-dir /tmp/record --markdown record.md \\
        --plot benchmarks/record.png > benchmarks/record_table.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from _smollm2 import load_smollm2
from bench_quality import other_domain_text

from minillm import prune, recover
from minillm.evaluation.perplexity import perplexity_stats
from minillm.evaluation.zeroshot import zero_shot
from minillm.model.loading import load_model

# name -> extra prune flags. "default": the CLI's default, flap + the refit (so no separate
# "flap" row); the other criteria run with the same default refit, except FLAP's own repair
CONFIGS = {
    "default": [],
    "wanda-sp": ["--criterion", "wanda-sp"],
    "flap+compensate": ["--criterion", "flap", "--compensate"],
    "taylor": ["--criterion", "taylor"],
    "fms": ["--criterion", "fms", "--gradients", "spsa"],
}
# task -> (column, metric the papers report)
TASK_COLUMNS = {
    "boolq": ("BoolQ", "acc"),
    "piqa": ("PIQA", "acc_norm"),
    "hellaswag": ("HellaSwag~", "acc_norm"),
    "winogrande": ("WinoGrande", "acc"),
    "arc_easy": ("ARC-e", "acc_norm"),
    "arc_challenge": ("ARC-c", "acc_norm"),
    "openbookqa": ("OBQA", "acc_norm"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calib", required=True, help="calibration text (WikiText-2 valid)")
    p.add_argument("--test", required=True, help="WikiText-2 test text")
    p.add_argument("--task-data-dir", required=True, help="<task>.jsonl of the seven tasks")
    p.add_argument("--work-dir", required=True, help="models and rows.jsonl")
    p.add_argument("--cache-dir", default=None, help="float32 copy of the embedded SmolLM2")
    p.add_argument(
        "--configs",
        default="dense," + ",".join(CONFIGS),
        help=f"comma-separated: dense and/or {', '.join(CONFIGS)}; NAME@RATIO for one ratio",
    )
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--no-recovery", action="store_true", help="pruned rows only")
    p.add_argument(
        "--recovery-for",
        help="NAME@RATIO,...: recovered rows for these only (default: every pruned row)",
    )
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument(
        "--recover-steps", type=int, help="recovery steps (default: minillm.recover's default)"
    )
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--limit", type=int, help="examples per task (default: all)")
    p.add_argument("--markdown", help="write the Markdown table here")
    p.add_argument("--plot", help="write the accuracy/perplexity plot here (PNG)")
    p.add_argument("--seed", type=int, default=0)
    return p


def jobs(args) -> list[tuple[str, float, bool]]:
    """(config, ratio, recovered) of every row, in table order."""
    out = []
    for spec in args.configs.split(","):
        name, _, ratio = spec.partition("@")
        if name == "dense":
            out.append(("dense", 0.0, False))
            continue
        if name not in CONFIGS:
            raise SystemExit(f"--configs: unknown '{name}'; valid: dense, {', '.join(CONFIGS)}")
        for r in [ratio] if ratio else args.ratios.split(","):
            out.append((name, float(r), False))
            wanted = args.recovery_for is None or f"{name}@{r}" in args.recovery_for.split(",")
            if not args.no_recovery and wanted:
                out.append((name, float(r), True))
    return out


def quietly(main, argv: list[str]) -> None:
    with contextlib.redirect_stdout(sys.stderr):  # the CLIs print summaries on stdout
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"failed ({code}): {' '.join(argv)}")


def make_model(name: str, ratio: float, recovered: bool, dense: Path, args) -> Path:
    """Directory of the row's model, pruning (and recovering) it if not there yet."""
    if name == "dense":
        return dense
    pruned = Path(args.work_dir) / f"{name}-{ratio}"
    if not (pruned / "report.json").is_file():
        quietly(
            prune.main,
            [str(dense), *CONFIGS[name], "--ratio", str(ratio), "--calib", args.calib,
             "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
             "--seed", str(args.seed), "--out", str(pruned), "--overwrite", "--quiet"],
        )  # fmt: skip
    if not recovered:
        return pruned
    out = pruned.with_name(pruned.name + "-rec")
    if not (out / "report.json").is_file():
        steps = [] if args.recover_steps is None else ["--max-steps", str(args.recover_steps)]
        argv = [str(pruned), *steps, "--out", str(out)]
        quietly(recover.main, [*argv, "--overwrite", "--quiet", "--seed", str(args.seed)])
    return out


def evaluate(model_dir: Path, texts: dict, args) -> dict:
    """Parameters, perplexities and zero-shot scores of one model directory."""
    model, tok = load_model(str(model_dir))
    row = {"params": sum(p.numel() for p in model.parameters())}
    for key, text in texts.items():
        ids = tok(text, return_tensors="pt").input_ids.reshape(-1)
        stats = perplexity_stats(model, ids, args.eval_seqlen, args.eval_tokens)
        row[f"ppl_{key}"], row[f"tokens_{key}"] = stats.ppl, stats.predicted_tokens
    scores = zero_shot(model, tok, list(TASK_COLUMNS), args.task_data_dir, limit=args.limit)
    for task, (_, metric) in TASK_COLUMNS.items():
        s = scores[task]
        row[task] = {"metric": metric, "value": s[metric], "stderr": s[f"{metric}_stderr"]}
        row[task]["n"] = s["n"]
    row["average"] = sum(row[t]["value"] for t in TASK_COLUMNS) / len(TASK_COLUMNS)
    report = model_dir / "report.json"
    if report.is_file():
        rec = json.loads(report.read_text()).get("recovery")
        if rec:
            keys = ("steps", "precision", "tokens_trained", "time_s", "cpu_time_s")
            row["recovery"] = {k: rec.get(k) for k in keys}
    return row


def recovery_cell(row: dict) -> str:
    """ "no", or the recovery's steps and precision (float32 for runs that predate the field)."""
    if not row["recovered"]:
        return "no"
    rec = row.get("recovery") or {}
    return f"{rec.get('steps')} steps, {rec.get('precision') or 'float32'}"


def markdown(rows: list[dict]) -> str:
    """The table in the papers' form: one line per row, accuracy ± stderr in %, n per task."""
    head = ["model", "ratio", "recovery", "params", "WikiText-2 ppl", "other-domain ppl"]
    head += [col for col, _ in TASK_COLUMNS.values()] + ["average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], f"{r['ratio']:.0%}", recovery_cell(r)]
        cells += [
            f"{r['params'] / 1e6:.1f} M",
            f"{r['ppl_wikitext2']:.2f}",
            f"{r['ppl_other']:.2f}",
        ]
        cells += [f"{100 * r[t]['value']:.1f} ± {100 * r[t]['stderr']:.1f}" for t in TASK_COLUMNS]
        cells.append(f"{100 * r['average']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    n = {TASK_COLUMNS[t][0]: rows[0][t]["n"] for t in TASK_COLUMNS} if rows else {}
    metrics = ", ".join(f"{c} {m}" for c, m in TASK_COLUMNS.values())
    lines.append("")
    lines.append(f"Examples per task: {n}. Metrics: {metrics}; ~ approximate data.")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Average accuracy (left) and other-domain perplexity (right) against ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r for r in rows if r["config"] == "dense"), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    names = [n for n in dict.fromkeys(r["config"] for r in rows) if n != "dense"]
    for i, name in enumerate(names):
        for recovered, style in ((False, "o-"), (True, "s--")):
            mine = [r for r in rows if r["config"] == name and r["recovered"] == recovered]
            if not mine:
                continue
            mine = ([dense] if dense else []) + sorted(mine, key=lambda r: r["ratio"])
            label = f"{name}{' + recovery' if recovered else ''}"
            x = [r["ratio"] for r in mine]
            axes[0].plot(x, [100 * r["average"] for r in mine], style, color=f"C{i}", label=label)
            axes[1].plot(x, [r["ppl_other"] for r in mine], style, color=f"C{i}", label=label)
    axes[0].set_ylabel("average zero-shot accuracy, 7 tasks (%)")
    axes[1].set_ylabel("other-domain perplexity (Python stdlib docs)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("pruning ratio")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct: pruned (solid) and recovered (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    args = build_parser().parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "rows.jsonl"
    done = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done[(r["config"], r["ratio"], r["recovered"])] = r
    dense = work / "dense"
    load_smollm2(str(dense) if args.cache_dir is None else args.cache_dir)
    if args.cache_dir:
        dense = Path(args.cache_dir)
    texts = {"wikitext2": Path(args.test).read_text(encoding="utf-8"), "other": other_domain_text()}
    todo = jobs(args)
    for key in todo:
        if key in done:
            continue
        print(f"[record_table] {key}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        model_dir = make_model(*key, dense, args)
        row = {"config": key[0], "ratio": key[1], "recovered": key[2]}
        row |= evaluate(model_dir, texts, args)
        row["wall_s"] = time.perf_counter() - start
        done[key] = row
        with log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    rows = [done[k] for k in todo if k in done]
    setup = {k: v for k, v in vars(args).items() if k not in ("work_dir", "markdown", "plot")}
    json.dump({"setup": setup, "rows": rows}, sys.stdout, indent=2)
    print()
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows) + "\n")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Plot perplexity vs pruning ratio per criterion from ``results_table.py``'s JSON.

Usage: ``python benchmarks/plot_results.py results_table.json results_ppl.png``
Solid lines: pruned; dashed: pruned + LoRA recovery; every line starts at the dense model.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(table: dict, out: str) -> None:
    rows = table["rows"]
    dense = next(r for r in rows if r["criterion"] == "dense")
    criteria = [c for c in dict.fromkeys(r["criterion"] for r in rows) if c != "dense"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(criteria):
        mine = sorted((r for r in rows if r["criterion"] == name), key=lambda r: r["ratio"])
        ratios = [0.0] + [r["ratio"] for r in mine]
        color = f"C{i}"
        ax.plot(ratios, [dense["ppl"]] + [r["ppl"] for r in mine], "o-", color=color, label=name)
        recovered = [dense["ppl_recovered"]] + [r["ppl_recovered"] for r in mine]
        ax.plot(ratios, recovered, "s--", color=color, alpha=0.7, label=f"{name} + LoRA")
    ax.set_yscale("log")
    ax.set_xlabel("pruning ratio (fraction of prunable parameters removed)")
    ax.set_ylabel(f"WikiText-2 test perplexity ({dense['eval_tokens']} tokens)")
    ax.set_title("SmolLM2-135M-Instruct: perplexity vs pruning ratio")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python benchmarks/plot_results.py RESULTS.json OUT.png")
    with open(sys.argv[1], encoding="utf-8") as fh:
        plot(json.load(fh), sys.argv[2])

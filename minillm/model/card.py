"""The model card (``README.md``) of a pruned model's directory, as Hugging Face model
directories carry one: what it was pruned from, what was removed and how, perplexity before
and after, and how to load it."""

from __future__ import annotations

from pathlib import Path


def _removed(report: dict) -> list[str]:
    before, after = report["params_before"], report["params_after"]
    prunable, removed = report["prunable_params"], report["prunable_params_removed"]
    first, last = report["pruned_layers"][0], report["pruned_layers"][-1]
    cfg = report["config"]
    repair = "least-squares refit" if cfg.get("reconstruct") is not False else "none"
    if cfg.get("compensate"):
        repair = "FLAP bias compensation"
    calib = cfg.get("calib", "given by the caller")
    return [
        f"- parameters: {before:,} -> {after:,} ({100 * (1 - after / before):.1f}% of the model)",
        f"- removed: {100 * removed / prunable:.1f}% of the {report['target']} parameters of "
        f"layers {first}-{last} (`--ratio {report['ratio']}`)",
        f"- criterion: `{report['criterion']}`; repair: {repair}",
        f"- calibration: {cfg['nsamples']} x {cfg['seqlen']} tokens ({calib}, seed {cfg['seed']})",
    ]


def _loading(config: dict) -> str:
    if "auto_map" in config:
        return (
            "Layers keep different sizes, which transformers' own config cannot express; "
            "`modeling_minillm.py` beside the weights rebuilds them:\n\n```python\n"
            "from transformers import AutoModelForCausalLM\n"
            'model = AutoModelForCausalLM.from_pretrained("DIR", trust_remote_code=True)\n'
            "# or, with minillm installed:\nimport minillm\n"
            'model = minillm.load_pruned("DIR")\n```\n'
        )
    return (
        "A plain config: stock transformers (and tools built on it) load it.\n\n```python\n"
        "from transformers import AutoModelForCausalLM\n"
        'model = AutoModelForCausalLM.from_pretrained("DIR")\n```\n'
    )


def model_card(config: dict, report: dict | None = None) -> str:
    """Markdown of the card for a directory whose ``config.json`` is ``config``; ``report``
    (``report.json``'s fields, or :func:`minillm.prune_model`'s) adds what was done."""
    base = (report or {}).get("model") or config.get("minillm", {}).get("base_model_type")
    base = base or config.get("model_type", "a causal LM")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [minillm, pruned, structured-pruning]",
        "---",
        "",
        f"# {Path(str(base)).name}, pruned with minillm",
        "",
        f"Attention heads and MLP channels removed from {base} by minillm (structured "
        "pruning; the layers are physically smaller, no masks).",
        "",
    ]
    if report is not None and "params_before" in report:
        lines += _removed(report)
        if report.get("ppl_before") is not None:
            text = Path(report["eval_text"]).name
            lines.append(
                f"- perplexity on {text}: {report['ppl_before']:.2f} -> {report['ppl_after']:.2f}"
            )
    if report is not None and "recovery" in report:
        rec = report["recovery"]
        lines.append(
            f"- recovered: LoRA adapters merged after {rec['steps']} steps "
            f"(teacher: {rec['teacher'] or 'none'})"
        )
    lines += ["", "## Loading", "", _loading(config)]
    layers = config.get("minillm", {}).get("layers")
    if layers:
        lines += ["## Layer sizes", "", "| layer | heads | kv heads | MLP channels |"]
        lines.append("|---|---|---|---|")
        lines += [
            f"| {i} | {r['heads']} | {r['kv_heads']} | {r['channels']} |"
            for i, r in enumerate(layers)
        ]
        lines.append("")
    return "\n".join(lines)

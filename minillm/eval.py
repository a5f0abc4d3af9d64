"""``python -m minillm.eval [DIR_OR_ID]``: perplexity, zero-shot accuracy, samples and speed.

Results go to stdout as a table (and to ``--json PATH``, metric names as keys, e.g.
``{"ppl": {"wikitext2": 23.4}, "acc": {"piqa": 0.61}}``); logs and progress go to stderr.

Examples::

    python -m minillm.eval out/pruned --data-dir ../shared/data/wikitext2 --max-tokens 16384
    python -m minillm.eval out/pruned --tasks piqa,boolq --task-data-dir my_tasks/ --limit 200
    python -m minillm.eval --generate --speed            # the embedded SmolLM2-135M
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm.evaluation.generation import (
    DEFAULT_PROMPTS,
    compare_speed,
    generate_samples,
    measure_speed,
)
from minillm.evaluation.perplexity import (
    eval_text_names,
    load_eval_text,
    perplexity_stats,
    tokenize_text,
)
from minillm.evaluation.zeroshot import (
    LM_CLASSES,
    TASKS,
    check_task_file,
    check_tasks,
    find_task_file,
    zero_shot,
)

# minillm.model (so transformers, seconds to import) is imported where a model is loaded: --help
# and flag errors come back without it

DEFAULT_SEQLEN = 2048
BASE = "base"  # --speed-reference without a value: the pruned model's recorded base model


@dataclass
class EvalConfig:
    """Everything ``minillm.eval`` was asked to do; printed into the JSON report."""

    model: str | None
    gguf_file: str | None
    datasets: list[str]
    data_files: list[str]
    data_dirs: list[str]
    seqlen: int | None
    max_tokens: int | None
    batch_size: int
    tasks: list[str]
    task_data_dir: str | None
    limit: int | None
    lm_eval_model: str
    generate: bool
    prompts: list[str]
    max_new_tokens: int
    speed: bool
    speed_reference: str | None
    speed_tokens: tuple[int, int]
    json: str | None
    quiet: bool
    device: str
    dtype: str
    seed: int


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minillm.eval",
        description="Evaluate a dense or pruned causal LM: perplexity, zero-shot, samples, speed.",
    )
    p.add_argument(
        "model",
        nargs="?",
        help="model dir (dense or minillm-pruned) or hub id; "
        "default: the embedded SmolLM2-135M-Instruct GGUF",
    )
    p.add_argument("--gguf-file", help="GGUF file name inside MODEL (or a path)")
    p.add_argument(
        "--datasets",
        default=None,
        help=f"comma-separated perplexity corpora via `datasets`: {eval_text_names()}",
    )
    p.add_argument(
        "--data-file",
        action="append",
        default=[],
        help="local text/JSONL test file for perplexity (repeatable)",
    )
    p.add_argument(
        "--data-dir",
        action="append",
        default=[],
        help="local directory with test.txt (e.g. WikiText-2) (repeatable)",
    )
    p.add_argument(
        "--seqlen",
        type=int,
        help=f"window length; default min({DEFAULT_SEQLEN}, the model's max_position_embeddings)",
    )
    p.add_argument("--max-tokens", type=int, help="use only the first N test tokens")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="perplexity windows per step; zero-shot: HFLM requests per step, or for the "
        "minillm class units of 1,024 input tokens packed per forward",
    )
    p.add_argument(
        "--tasks", default="", help=f"comma-separated zero-shot tasks: {','.join(TASKS)} or 'all'"
    )
    p.add_argument(
        "--task-data-dir",
        help="directory with <task>.jsonl files (rows in the hub "
        "dataset's format) instead of the hub",
    )
    p.add_argument("--limit", type=int, help="at most N examples per zero-shot task")
    p.add_argument(
        "--lm-eval-model",
        default="minillm",
        choices=LM_CLASSES,
        help="lm-eval model class: 'minillm' (each question's context runs once for all its "
        "choices; default) or 'hf' (lm-eval's HFLM, one forward per choice)",
    )
    p.add_argument("--generate", action="store_true", help="print greedy and sampled samples")
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        dest="prompts",
        help="prompt for --generate (repeatable; default: three built-in prompts)",
    )
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument(
        "--speed", action="store_true", help="tokens/s at batch 1 and 16, and memory (bytes)"
    )
    p.add_argument(
        "--speed-reference",
        nargs="?",
        const=BASE,
        metavar="MODEL",
        help="--speed also times this dense model, interleaved; without MODEL, the base model "
        "named in the pruned directory's report.json",
    )
    p.add_argument(
        "--speed-tokens",
        default="128,32",
        metavar="PROMPT,NEW",
        help="--speed: prompt tokens per sequence, decoded tokens after it",
    )
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs on stderr")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_config(argv: list[str] | None = None) -> EvalConfig:
    """Parse and validate flags; argparse exits with a one-line error on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    if tasks == ["all"]:
        tasks = list(TASKS)
    try:
        check_tasks(tasks)
    except ValueError as err:
        parser.error(f"--tasks: {err}")
    datasets = [d for d in (args.datasets or "").split(",") if d]
    for name in datasets:
        if name not in eval_text_names():
            parser.error(
                f"--datasets: unknown corpus {name}; valid: {', '.join(eval_text_names())}"
            )
    for flag, paths, check in (
        ("--data-file", args.data_file, os.path.isfile),
        ("--data-dir", args.data_dir, os.path.isdir),
    ):
        for path in paths:
            if not check(path):
                parser.error(
                    f"{flag}: no such {'file' if flag == '--data-file' else 'directory'} '{path}'"
                )
    if args.task_data_dir is not None:
        if not os.path.isdir(args.task_data_dir):
            parser.error(f"--task-data-dir: no such directory '{args.task_data_dir}'")
        for task in tasks:
            try:
                check_task_file(task, find_task_file(args.task_data_dir, task))
            except (FileNotFoundError, ValueError) as err:
                parser.error(str(err))
    for flag in ("seqlen", "max_tokens", "batch_size", "limit", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')}: must be >= 1, got {value}")
    try:
        speed_tokens = tuple(int(n) for n in args.speed_tokens.split(","))
    except ValueError:
        speed_tokens = ()
    if len(speed_tokens) != 2 or min(speed_tokens) < 1:
        parser.error(f"--speed-tokens: '{args.speed_tokens}' is not PROMPT,NEW (integers >= 1)")
    if args.speed_reference is not None and not args.speed:
        parser.error("--speed-reference: needs --speed")
    nothing_asked = not (
        datasets or args.data_file or args.data_dir or tasks or args.generate or args.speed
    )
    return EvalConfig(
        model=args.model,
        gguf_file=args.gguf_file,
        datasets=["wikitext2"] if nothing_asked else datasets,
        data_files=args.data_file,
        data_dirs=args.data_dir,
        seqlen=args.seqlen,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        tasks=tasks,
        task_data_dir=args.task_data_dir,
        limit=args.limit,
        lm_eval_model=args.lm_eval_model,
        generate=args.generate,
        prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        speed=args.speed,
        speed_reference=args.speed_reference,
        speed_tokens=speed_tokens,
        json=args.json,
        quiet=args.quiet,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
    )


def corpus_name(path: str) -> str:
    """Key of a local corpus in the results: the directory name for ``DIR`` or ``DIR/test.txt``."""
    p = Path(path).resolve()
    if p.is_file() and p.stem in ("test", "valid", "validation", "wiki.test", "wiki.valid"):
        p = p.parent
    return p.name if p.is_dir() else p.stem


def default_seqlen(model: torch.nn.Module) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_SEQLEN
    return min(DEFAULT_SEQLEN, limit)


def evaluate(cfg: EvalConfig, model: torch.nn.Module, tokenizer) -> dict:
    """Run what ``cfg`` asks on a loaded model; returns the JSON-ready results dict."""
    results: dict = {}
    corpora = [(n, n) for n in cfg.datasets]
    corpora += [(corpus_name(p), p) for p in cfg.data_files + cfg.data_dirs]
    seqlen = cfg.seqlen or default_seqlen(model)
    for name, source in corpora:
        ids = tokenize_text(tokenizer, load_eval_text(source), cfg.max_tokens)
        stats = perplexity_stats(
            model, ids, seqlen, batch_size=cfg.batch_size, progress=not cfg.quiet
        )
        results.setdefault("ppl", {})[name] = stats.ppl
        results.setdefault("ppl_tokens", {})[name] = stats.predicted_tokens
        results.setdefault("ppl_seqlen", {})[name] = stats.seqlen
    if cfg.tasks:
        scores = zero_shot(
            model,
            tokenizer,
            cfg.tasks,
            task_data_dir=cfg.task_data_dir,
            batch_size=cfg.batch_size,
            limit=cfg.limit,
            verbose=not cfg.quiet,
            lm_class=cfg.lm_eval_model,
        )
        for task, metrics in scores.items():
            for metric, value in metrics.items():
                results.setdefault(metric, {})[task] = value
    if cfg.generate:
        prompts = cfg.prompts or list(DEFAULT_PROMPTS)
        results["generation"] = generate_samples(
            model, tokenizer, prompts, cfg.max_new_tokens, seed=cfg.seed
        )
    if cfg.speed:
        results.update(speed(cfg, model))
    return results


def base_model_of(path: str) -> tuple[str | None, str | None]:
    """(model, gguf_file) that minillm pruned into ``path``, from its report.json."""
    report = Path(path) / "report.json"
    if not report.is_file():
        raise FileNotFoundError(
            f"--speed-reference: '{path}' has no report.json naming its base model; "
            "pass --speed-reference MODEL"
        )
    config = json.loads(report.read_text())["config"]
    return config["model"], config["gguf_file"]


def speed(cfg: EvalConfig, model: torch.nn.Module) -> dict:
    """``speed`` of the model; with a reference also ``speed_reference`` and ``speed_ratio``
    (model / reference, per throughput key), timed interleaved in this process."""
    prompt, new = cfg.speed_tokens
    if cfg.speed_reference is None:
        return {"speed": measure_speed(model, prompt, new)}
    from minillm.model.loading import load_model

    if cfg.speed_reference == BASE:
        name, gguf = base_model_of(cfg.model or ".")
    else:
        name, gguf = cfg.speed_reference, None
    reference, _ = load_model(name, gguf, cfg.dtype, cfg.device)
    both = compare_speed({"model": model, "reference": reference}, prompt, new)
    ratio = {k: v / both["reference"][k] for k, v in both["model"].items() if "tokens_per_s" in k}
    return {"speed": both["model"], "speed_reference": both["reference"], "speed_ratio": ratio}


def format_table(results: dict) -> str:
    """Human-readable table of the results (one metric/key/value row each)."""
    rows = [("metric", "on", "value")]
    for metric in ("ppl", "ppl_tokens", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"):
        for key, value in results.get(metric, {}).items():
            rows.append((metric, key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    for metric in ("speed", "speed_reference", "speed_ratio"):
        for key, value in results.get(metric, {}).items():
            shown = f"{value / 2**20:.1f} MiB" if key.endswith("bytes") else f"{value:.2f}"
            rows.append((metric, key, shown))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for sample in results.get("generation", []):
        lines.append("")
        lines.append(f"prompt : {sample['prompt']}")
        lines.append(f"greedy : {sample['greedy']!r}")
        lines.append(f"sampled: {sample['sampled']!r}")
    return "\n".join(lines)


def write_json_atomic(path: str, payload: dict) -> None:
    """Write ``payload`` as JSON to ``path`` via a temp file + rename (never half-written)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def silence_progress() -> None:
    """Turn off the progress bars and info logs of transformers, datasets and lm-eval."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


@contextlib.contextmanager
def quiet_stderr():
    """Swallow stderr, Python's and the process's (fd 2): lm-eval and transformers' GGUF
    loader draw tqdm bars no switch reaches, and lm-eval's ``git`` calls write to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    if cfg.quiet:
        silence_progress()
    from minillm.model.loading import load_model

    torch.manual_seed(cfg.seed)
    try:
        with quiet_stderr() if cfg.quiet else contextlib.nullcontext():
            model, tokenizer = load_model(cfg.model, cfg.gguf_file, cfg.dtype, cfg.device)
            results = evaluate(cfg, model, tokenizer)
    except (FileNotFoundError, ValueError) as err:
        print(f"python -m minillm.eval: error: {err}", file=sys.stderr)
        return 2
    print(format_table(results))
    if cfg.json:
        write_json_atomic(cfg.json, {"config": dataclasses.asdict(cfg), **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""minillm eval [MODEL] (also python -m minillm.eval): perplexity, zero-shot accuracy,
samples and speed of a dense or pruned causal LM.

Results go to stdout as a table (and with --out FILE to JSON, metric names as keys, e.g.
{"ppl": {"wikitext2": 23.4}, "acc": {"piqa": 0.61}}); logs and progress go to stderr.

Examples:
  minillm eval pruned/ --text wikitext2/ --max-tokens 16384
  minillm eval pruned/ --tasks piqa,boolq --task-data-dir my_tasks/ --limit 200
  minillm eval --generate --speed            # the embedded SmolLM2-135M
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

from minillm import cli
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
    texts: list[str]
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
    out: str | None
    quiet: bool
    device: str
    dtype: str
    seed: int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="model dir (dense or minillm-pruned) or hub id; "
        "default: the embedded SmolLM2-135M-Instruct GGUF",
    )
    m = p.add_argument_group("model")
    m.add_argument("--gguf-file", help="GGUF file name inside MODEL (or a path)")
    m.add_argument("--device", help="cuda if available, else cpu")
    m.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights"
    )
    ppl = p.add_argument_group("perplexity")
    ppl.add_argument(
        "--text",
        action="append",
        default=[],
        dest="texts",
        metavar="TEXT",
        help="a text/JSONL file, a directory holding test.txt (e.g. WikiText-2), or a datasets "
        f"name ({', '.join(eval_text_names())}); repeatable (default: wikitext2 when nothing "
        "else is asked)",
    )
    ppl.add_argument(
        "--seqlen",
        type=int,
        help=f"window length (default: min({DEFAULT_SEQLEN}, the model's max_position_embeddings))",
    )
    ppl.add_argument("--max-tokens", type=int, help="use only the first N test tokens")
    ppl.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="perplexity windows per step; zero-shot: HFLM requests per step, or for the "
        "minillm class units of 1,024 input tokens packed per forward",
    )
    z = p.add_argument_group("zero-shot")
    z.add_argument("--tasks", default="", help=f"comma-separated tasks: {','.join(TASKS)} or 'all'")
    z.add_argument(
        "--task-data-dir",
        help="directory with <task>.jsonl files (rows in the hub dataset's format) instead of "
        "the hub",
    )
    z.add_argument("--limit", type=int, help="at most N examples per task")
    z.add_argument(
        "--lm-eval-model",
        default="minillm",
        choices=LM_CLASSES,
        help="lm-eval model class: 'minillm' (each question's context runs once for all its "
        "choices) or 'hf' (lm-eval's HFLM, one forward per choice)",
    )
    g = p.add_argument_group("samples and speed")
    g.add_argument("--generate", action="store_true", help="print greedy and sampled samples")
    g.add_argument(
        "--prompt",
        action="append",
        default=[],
        dest="prompts",
        help="prompt for --generate (repeatable; default: three built-in prompts)",
    )
    g.add_argument("--max-new-tokens", type=int, default=48, help="--generate: tokens")
    g.add_argument(
        "--speed", action="store_true", help="tokens/s at batch 1 and 16, and memory (bytes)"
    )
    g.add_argument(
        "--speed-reference",
        nargs="?",
        const=BASE,
        metavar="MODEL",
        help="--speed also times this dense model, interleaved; without MODEL, the base model "
        "named in the pruned directory's report.json",
    )
    g.add_argument(
        "--speed-tokens",
        default="128,32",
        metavar="PROMPT,NEW",
        help="--speed: prompt tokens per sequence, decoded tokens after it",
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="FILE.json", help="also write the results as JSON here")
    o.add_argument("--quiet", action="store_true", help="no progress bars or logs on stderr")
    o.add_argument("--seed", type=int, default=0, help="sampled generations")


def parse_config(argv: list[str] | None, prog: str) -> EvalConfig:
    """Parse and validate flags; argparse exits with a one-line error on bad input."""
    parser = cli.parser(prog, __doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    if tasks == ["all"]:
        tasks = list(TASKS)
    try:
        check_tasks(tasks)
    except ValueError as err:
        parser.error(f"--tasks: {err}")
    for text in args.texts:
        if not (os.path.exists(text) or text in eval_text_names()):
            parser.error(
                f"--text: no such file or directory '{text}' (or one of "
                f"{', '.join(eval_text_names())})"
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
    nothing_asked = not (args.texts or tasks or args.generate or args.speed)
    return EvalConfig(
        model=args.model,
        gguf_file=args.gguf_file,
        texts=["wikitext2"] if nothing_asked else args.texts,
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
        out=args.out,
        quiet=args.quiet,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
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
    corpora = [(t if t in eval_text_names() else corpus_name(t), t) for t in cfg.texts]
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


def main(argv: list[str] | None = None, prog: str = "python -m minillm.eval") -> int:
    cfg = parse_config(argv, prog)
    if cli.environment_error(prog):
        return 2
    if cfg.quiet:
        silence_progress()
    from minillm.model.loading import load_model

    torch.manual_seed(cfg.seed)
    try:
        with quiet_stderr() if cfg.quiet else contextlib.nullcontext():
            model, tokenizer = load_model(cfg.model, cfg.gguf_file, cfg.dtype, cfg.device)
            results = evaluate(cfg, model, tokenizer)
    except (FileNotFoundError, ValueError) as err:
        return cli.fail(prog, err)
    print(format_table(results))
    if cfg.out:
        write_json_atomic(cfg.out, {"config": dataclasses.asdict(cfg), **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Zero-shot accuracy through lm-evaluation-harness, on an in-memory model.

lm-eval does the prompting and the scoring (``HFLM`` + ``simple_evaluate``); this module only
wraps the model and, when the hub is unreachable, points lm-eval's own task configs at local
data: for each task it writes a YAML that ``include``s lm-eval's task file and overrides
``dataset_path: json`` and ``data_files``, then loads it through ``TaskManager(include_path=...)``.

Local data (``task_data_dir``): one file per task, ``<task>.jsonl`` (or ``.json``, or
``<task>/<split>.jsonl``), whose rows have the fields of the task's hub dataset, e.g.
``piqa``: ``goal, sol1, sol2, label``; ``boolq``: ``passage, question, label``; ``hellaswag``:
``activity_label, ctx_a, ctx_b, endings, label``; ``winogrande``: ``sentence, option1, option2,
answer``; ``arc_*``/``openbookqa``: ``question``/``question_stem``, ``choices: {text, label}``,
``answerKey``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
import yaml

# task -> lm-eval task YAML (relative to lm_eval/tasks) and the split lm-eval evaluates
TASKS: dict[str, tuple[str, str]] = {
    "boolq": ("super_glue/boolq/default.yaml", "validation"),
    "piqa": ("piqa/piqa.yaml", "validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test"),
}
METRICS = ("acc", "acc_norm")
LM_CLASSES = ("minillm", "hf")  # lm-eval model names: the shared-prefix class, or HFLM


def _choice_count(task: str, row: dict) -> int:
    if task in ("boolq", "piqa", "winogrande"):
        return 2
    if task == "hellaswag":
        return len(row["endings"])
    return len(row["choices"]["text"])


def label_field(task: str) -> str:
    """The field holding a row's answer."""
    if task == "winogrande":
        return "answer"
    return "answerKey" if task in ("arc_easy", "arc_challenge", "openbookqa") else "label"


def _gold(task: str, row: dict) -> int | None:
    """The row's answer as a 0-based choice index, or None if it names no choice."""
    raw = row[label_field(task)]
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        labels = row["choices"]["label"]
        return labels.index(raw) if raw in labels else None
    try:
        gold = int(raw) - (1 if task == "winogrande" else 0)
    except (TypeError, ValueError):
        return None
    return gold if 0 <= gold < _choice_count(task, row) else None


# task -> fields every row needs (dotted: nested)
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "boolq": ("passage", "question", "label"),
    "piqa": ("goal", "sol1", "sol2", "label"),
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
    "arc_easy": ("question", "choices.text", "choices.label", "answerKey"),
    "arc_challenge": ("question", "choices.text", "choices.label", "answerKey"),
    "openbookqa": ("question_stem", "choices.text", "choices.label", "answerKey"),
}


def check_task_file(task: str, path: str | os.PathLike) -> None:
    """ValueError naming the file, row and field of the first row lm-eval could not score."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        if Path(path).suffix == ".json":
            rows = list(enumerate(json.loads(text), 1))
        else:
            lines = enumerate(text.splitlines(), 1)
            rows = [(n, json.loads(line)) for n, line in lines if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--task-data-dir: {path}: not JSON ({err.msg}, line {err.lineno})"
        ) from err
    if not rows:
        raise ValueError(f"--task-data-dir: {path}: no rows")
    for n, row in rows:
        where = f"--task-data-dir: {path}: row {n}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: not a JSON object")
        for field in TASK_FIELDS[task]:
            value = row
            for part in field.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is None:
                needs = ", ".join(TASK_FIELDS[task])
                raise ValueError(f"{where}: missing field '{field}' (a {task} row needs {needs})")
        if task == "winogrande" and "_" not in row["sentence"]:
            raise ValueError(f"{where}: field 'sentence' has no '_' blank")
        if _gold(task, row) is None:
            field = label_field(task)
            raise ValueError(
                f"{where}: field '{field}' is {row[field]!r}, not one of its "
                f"{_choice_count(task, row)} choices"
            )


def check_tasks(tasks: list[str]) -> list[str]:
    """Return ``tasks`` unchanged, or raise ``ValueError`` naming the unknown ones and the valid."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; valid: {', '.join(TASKS)}")
    return tasks


def find_task_file(task_data_dir: str | os.PathLike, task: str) -> Path:
    """The local data file of ``task`` inside ``task_data_dir`` (see module docstring)."""
    root = Path(task_data_dir)
    split = TASKS[task][1]
    candidates = [
        root / f"{task}.jsonl",
        root / f"{task}.json",
        root / task / f"{split}.jsonl",
        root / task / f"{split}.json",
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"--task-data-dir {root}: no data for task {task}; expected {candidates[0].name} "
        f"or {task}/{split}.jsonl"
    )


def _lm_eval_task_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def write_local_task_configs(
    tasks: list[str], task_data_dir: str | os.PathLike, out_dir: str | os.PathLike
) -> None:
    """Write ``<out_dir>/<task>.yaml`` per task: lm-eval's config with data from local files.

    Only the evaluated split is kept; the task name stays the same, so the include path
    overrides lm-eval's hub-backed config of that name.
    """
    lm_eval_tasks = _lm_eval_task_dir()
    for task in check_tasks(tasks):
        yaml_rel, split = TASKS[task]
        data_file = find_task_file(task_data_dir, task).resolve()
        check_task_file(task, data_file)
        config = {
            "include": str(lm_eval_tasks / yaml_rel),
            "task": task,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(data_file)}},
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
            "tag": [],
        }
        path = Path(out_dir) / f"{task}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def make_lm(
    model: torch.nn.Module,
    tokenizer,
    lm_class: str = "minillm",
    batch_size: int = 1,
    max_length: int | None = None,
):
    """lm-eval model around an in-memory model: ``minillm`` (shared prefix) or ``hf`` (HFLM)."""
    from lm_eval.api.registry import get_model

    import minillm.evaluation.zeroshot_lm  # noqa: F401  (registers "minillm" with lm-eval)

    if lm_class not in LM_CLASSES:
        raise ValueError(f"--lm-eval-model: unknown '{lm_class}'; valid: {', '.join(LM_CLASSES)}")
    device = str(next(model.parameters()).device)
    # the shared-prefix class packs questions by tokens: 1024 input tokens per unit of batch
    extra = {"batch_tokens": 1024 * batch_size} if lm_class == "minillm" else {}
    return get_model(lm_class)(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        device=device,
        **extra,
    )


def run_tasks(
    lm,
    tasks: list[str],
    task_data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    verbose: bool = False,
    log_samples: bool = False,
) -> dict:
    """lm-eval's ``simple_evaluate`` output for zero-shot ``tasks`` on the lm-eval model ``lm``."""
    check_tasks(tasks)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if not verbose:
        for name in ("lm-eval", "lm_eval"):
            logging.getLogger(name).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="minillm-tasks-") as include_dir:
        if task_data_dir is not None:
            write_local_task_configs(tasks, task_data_dir, include_dir)
            manager = TaskManager(include_path=include_dir)
        else:
            manager = TaskManager()
        try:
            return simple_evaluate(
                model=lm,
                tasks=list(tasks),
                num_fewshot=0,
                limit=limit,
                task_manager=manager,
                log_samples=log_samples,
                bootstrap_iters=1000,  # acc is a mean: its stderr is closed-form, not bootstrapped
                verbosity="ERROR" if not verbose else "INFO",
            )
        except (OSError, ConnectionError) as err:
            if task_data_dir is not None:
                raise
            first_line = str(err).splitlines()[0] if str(err) else ""
            raise ValueError(
                f"--tasks: cannot fetch the task data from the hub ({type(err).__name__}: "
                f"{first_line}); pass --task-data-dir with local <task>.jsonl files"
            ) from err


def zero_shot(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str],
    task_data_dir: str | os.PathLike | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    max_length: int | None = None,
    verbose: bool = False,
    lm_class: str = "minillm",
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy per task, as lm-eval reports it.

    Returns ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}}`` (``acc_norm``
    only for tasks that define it; fractions in [0, 1]; ``n`` examples scored). ``limit`` caps
    the examples per task; ``task_data_dir`` switches every task to local files (see module
    docstring); ``lm_class`` picks the lm-eval model (``minillm`` or HFLM's ``hf``).
    """
    check_tasks(tasks)
    lm = make_lm(model, tokenizer, lm_class, batch_size, max_length)
    out = run_tasks(lm, tasks, task_data_dir, limit, verbose)
    scores = {}
    for task in tasks:
        res = out["results"][task]
        row = {}
        for m in METRICS:
            if f"{m},none" in res:
                row[m] = float(res[f"{m},none"])
                stderr = res.get(f"{m}_stderr,none")
                row[f"{m}_stderr"] = float(stderr) if isinstance(stderr, float) else float("nan")
        row["n"] = int(out["n-samples"][task]["effective"])
        scores[task] = row
    return scores

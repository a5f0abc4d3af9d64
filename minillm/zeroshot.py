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


def zero_shot(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str],
    task_data_dir: str | os.PathLike | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    max_length: int | None = None,
    verbose: bool = False,
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy per task, as lm-eval reports it.

    Returns ``{task: {"acc": float, "acc_norm": float}}`` (``acc_norm`` only for tasks that
    define it; values are fractions in [0, 1]). ``limit`` caps the examples per task.
    ``task_data_dir`` switches every task to local files (see module docstring).
    """
    check_tasks(tasks)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not verbose:
        for name in ("lm-eval", "lm_eval"):
            logging.getLogger(name).setLevel(logging.ERROR)
    device = str(next(model.parameters()).device)
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        device=device,
    )
    with tempfile.TemporaryDirectory(prefix="minillm-tasks-") as include_dir:
        if task_data_dir is not None:
            write_local_task_configs(tasks, task_data_dir, include_dir)
            manager = TaskManager(include_path=include_dir)
        else:
            manager = TaskManager()
        try:
            out = simple_evaluate(
                model=lm,
                tasks=list(tasks),
                num_fewshot=0,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=0,
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
    return {
        task: {
            m: float(out["results"][task][f"{m},none"])
            for m in METRICS
            if f"{m},none" in out["results"][task]
        }
        for task in tasks
    }

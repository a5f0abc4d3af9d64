"""The dense teacher of a recovery run: which model it is, and its top-k next-token
distributions over the training examples, kept so training runs without it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from minillm.data import Targets
from minillm.recovery.config import RecoverConfig
from minillm.recovery.data import collate
from minillm.recovery.loss import teacher_topk
from minillm.recovery.train import autocast_like

TEACHER_HINT = "pass --teacher DIR (or 'embedded'), or --teacher none to train without one"


def recorded_teacher(model_dir: str) -> tuple[str | None, str | None]:
    """(model, gguf_file) of the dense model ``model_dir`` was pruned from, per its report.json.

    ``model`` None means the embedded SmolLM2 GGUF. FileNotFoundError/ValueError when no
    report or no dense model is recorded.
    """
    path = Path(model_dir) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"--teacher: no {path} records the dense model {model_dir} was pruned from; "
            f"{TEACHER_HINT}"
        )
    config = json.loads(path.read_text()).get("config") or {}
    if "model" not in config:
        raise ValueError(f"--teacher: {path} records no dense model (config.model); {TEACHER_HINT}")
    return config["model"], config.get("gguf_file")


def load_teacher(cfg: RecoverConfig, gguf_file: str | None, vocab_size: int, dtype: str):
    """The dense teacher (eval mode, ``dtype``) and its description, or (None, None)."""
    from minillm.model.loading import load_model

    if cfg.teacher == "none":
        return None, None
    if cfg.teacher is None:
        name, gguf_file = recorded_teacher(cfg.model)
        source = f"the dense model recorded in {Path(cfg.model) / 'report.json'}"
    else:
        name = None if cfg.teacher == "embedded" else cfg.teacher
        source = "--teacher"
    try:
        teacher, _ = load_model(name, gguf_file, dtype, cfg.device)
    except (OSError, ValueError) as err:
        shown = name or "the embedded SmolLM2 GGUF"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FileNotFoundError(
            f"--teacher: cannot load {source}, '{shown}' ({first}); {TEACHER_HINT}"
        ) from err
    if teacher.config.vocab_size != vocab_size:
        raise ValueError(
            f"--teacher: vocabulary {teacher.config.vocab_size} differs from the model's "
            f"{vocab_size}"
        )
    return teacher, name or "embedded"


def teacher_targets(
    teacher: nn.Module, examples: list[list[int]], pad_id: int, cfg: RecoverConfig
) -> list[Targets]:
    """The teacher's ``teacher_topk`` of every example, from one forward pass over the data.

    Per example ``(log-probabilities float32 [L, k], token ids int32 [L, k])`` at
    ``--kd-temperature``, on the CPU: 8 bytes per token and kept token (270 MB for 2,048 x 128
    tokens at k = 128). Training then needs no teacher forward pass, nor the teacher in memory.
    """
    device = next(teacher.parameters()).device
    targets = []
    starts = range(0, len(examples), cfg.batch_size)
    for start in tqdm(starts, desc="teacher", disable=cfg.quiet):
        rows = examples[start : start + cfg.batch_size]
        batch = collate(rows, pad_id)
        with torch.no_grad(), autocast_like(teacher):
            logits = teacher(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits
        logp, ids = teacher_topk(logits, cfg.kd_topk, cfg.kd_temperature)
        targets += [(logp[i, : len(r)].cpu(), ids[i, : len(r)].cpu()) for i, r in enumerate(rows)]
    return targets

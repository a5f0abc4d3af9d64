"""Training text of a recovery run: files, datasets or text the teacher writes, tokenized into
examples and collated into batches."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from minillm.data import Targets, self_generated
from minillm.recovery.config import RecoverConfig

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input}### Response:\n"
)
SELF_DATA = "self_data.jsonl"
SELF_TARGETS = "self_targets.pt"  # the teacher's top-k on SELF_DATA


def _read_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = json.loads(text)
    if not isinstance(rows, list):
        raise ValueError(f"--data: {path} must hold a JSON list of records")
    return rows


def alpaca_text(row: dict) -> str:
    """Alpaca-format record (instruction, optional input, output) as one training text."""
    has_input = bool(row.get("input"))
    prompt = ALPACA_PROMPT.format(
        ctx=", paired with an input that provides further context" if has_input else "",
        instruction=row["instruction"],
        input=f"### Input:\n{row['input']}\n\n" if has_input else "",
    )
    return prompt + row["output"]


def records_to_texts(rows: list[dict], source: str) -> list[str]:
    """Alpaca records (``instruction``/``input``/``output``) or ``text`` records to texts."""
    if not rows:
        raise ValueError(f"--data: {source} is empty (no training records)")
    if all("instruction" in r and "output" in r for r in rows):
        return [alpaca_text(r) for r in rows]
    if all("text" in r for r in rows):
        return [str(r["text"]) for r in rows if str(r["text"]).strip()]
    raise ValueError(
        f"--data: {source}: records need instruction/input/output (Alpaca) or a text field"
    )


def load_training_texts(data: str) -> tuple[list[str], bool]:
    """(texts, is_stream) of ``--data`` other than ``self``.

    A ``.txt``/``.raw`` file is one stream (cut into ``seqlen`` chunks later, ``is_stream``);
    JSON/JSONL files and ``datasets`` names give one example per record.
    """
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix in (".json", ".jsonl"):
            return records_to_texts(_read_records(path), str(path)), False
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"--data: {path} is empty (no training text)")
        return [text], True
    if path.suffix in (".json", ".jsonl", ".txt", ".raw") or os.sep in data or path.exists():
        raise FileNotFoundError(
            f"--data: no such file '{data}' (give a JSON/JSONL/text file, "
            "'self', or a datasets name)"
        )
    import datasets

    try:
        ds = datasets.load_dataset(data, split="train")
    except Exception as err:  # network / hub errors have many types
        raise FileNotFoundError(
            f"--data: '{data}' is not a file and cannot be fetched through datasets "
            f"({type(err).__name__}); give a local JSON/JSONL/text file or 'self'"
        ) from err
    return records_to_texts(list(ds), data), False


def tokenize_examples(
    tokenizer, texts: list[str], is_stream: bool, seqlen: int, max_samples: int | None
) -> list[list[int]]:
    """Token id lists of at most ``seqlen``: stream chunks, or one truncated list per text."""
    if is_stream:
        ids = tokenizer("\n\n".join(texts)).input_ids
        chunks = [ids[i : i + seqlen] for i in range(0, len(ids) - seqlen + 1, seqlen)]
    else:
        eos = tokenizer.eos_token_id
        chunks = []
        for text in texts:
            ids = tokenizer(text).input_ids[: seqlen - 1] + ([eos] if eos is not None else [])
            if len(ids) >= 2:
                chunks.append(ids)
    if max_samples is not None:
        chunks = chunks[:max_samples]
    if not chunks:
        raise ValueError(f"--data: no training example of at least 2 tokens (seqlen {seqlen})")
    return chunks


def collate(examples: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` ``[B, T]``; labels -100 on pad."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example)] = torch.tensor(example)
        mask[row, : len(example)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_targets(targets: list[Targets]) -> Targets:
    """Right-padded ``[B, T, k]`` teacher targets; padding has log-probability -inf."""
    logp = torch.nn.utils.rnn.pad_sequence(
        [t[0] for t in targets], batch_first=True, padding_value=-math.inf
    )
    ids = torch.nn.utils.rnn.pad_sequence([t[1] for t in targets], batch_first=True)
    return logp, ids


def batch_order(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Example indices of every step: a fresh seeded shuffle per epoch, last partial batch kept."""
    order = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        order += [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    return order


def training_examples(
    cfg: RecoverConfig, model, teacher, tokenizer, work: Path
) -> tuple[list[list[int]], list[Targets] | None]:
    """Token id lists for training, and the teacher's top-k of each if it wrote them.

    ``self`` data is written once by the teacher (or without one the model) and kept in the
    work dir with the top-k the teacher computed while writing; other data has no targets yet.
    """
    if cfg.data != "self":
        texts, is_stream = load_training_texts(cfg.data)
        return tokenize_examples(tokenizer, texts, is_stream, cfg.seqlen, cfg.max_samples), None
    cached, cached_targets = work / SELF_DATA, work / SELF_TARGETS
    if cfg.resume and cached.is_file():
        ids = [json.loads(line) for line in cached.read_text().splitlines()]
        with_targets = teacher is not None and cached_targets.is_file()
        targets = torch.load(cached_targets) if with_targets else None
    else:
        writer = teacher if teacher is not None else model
        keep = cfg.kd_topk if teacher is not None else None
        ids, targets = self_generated(
            writer,
            tokenizer,
            cfg.self_samples,
            cfg.seqlen,
            cfg.seed,
            cfg.quiet,
            keep,
            cfg.kd_temperature,
            cfg.self_top_k or None,
        )
        ids = ids.tolist()
        work.mkdir(parents=True, exist_ok=True)
        if targets is not None:
            torch.save(targets, cached_targets)
        partial = cached.with_suffix(".partial")  # written last, whole: it marks a finished set
        partial.write_text("".join(json.dumps(row) + "\n" for row in ids))
        partial.replace(cached)
    if targets is not None:
        targets = list(zip(targets[0].unbind(), targets[1].unbind(), strict=True))
    n = cfg.max_samples or len(ids)
    return ids[:n], targets[:n] if targets is not None else None

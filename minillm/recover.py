"""``python -m minillm.recover DIR --out OUT``: LoRA recovery of a pruned model by distillation.

The default needs no data: the dense model the pruned one came from (recorded in its
``report.json``; ``--teacher`` overrides, ``--teacher none`` turns distillation off) writes
``--self-samples`` sequences, sampled from its whole distribution (``--self-top-k``), and LoRA
adapters (peft) on every linear projection of the decoder are trained to match its next-token
distributions on them. The teacher's ``--kd-topk`` most likely tokens per position are kept
while it writes (on other data, from one pass over it before training), and the KL matches
them plus the mass of all other tokens as one bucket (``recovery_loss``). Training steps then
run the student only, without the teacher in memory. Instruction data, plain text or a
``datasets`` name can be given with ``--data`` instead (then the loss mixes CE and KL,
``--kd-weight``). The adapters are merged and the model saved in the same format as the pruned
one (per-layer sizes and report kept; the loss curve and the budget are added to
``report.json``). Training runs in bfloat16 where the device computes it natively
(``--precision``); the adapters stay float32 and the saved model is float32.

A killed run resumes from ``--work-dir`` (default ``OUT.work``) with ``--resume``.

Example::

    python -m minillm.recover out/pruned --out out/recovered
    python -m minillm.recover out/pruned --data ../shared/data/wikitext2/valid.txt \\
        --teacher none --max-steps 200 --out out/recovered-lora
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from minillm.data import Targets, self_generated
from minillm.recovery_loss import recovery_loss, teacher_topk

# minillm.model (so transformers, seconds to import) and peft are imported where they are used:
# --help and flag errors come back without them

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input}### Response:\n"
)
CHECKPOINT = "checkpoint.pt"
SELF_DATA = "self_data.jsonl"
SELF_TARGETS = "self_targets.pt"  # the teacher's top-k on SELF_DATA
SELF_DATA_STEPS = 400  # default budget on self-written text: ~27 min on 2 CPU cores with AMX
TEACHER_HINT = "pass --teacher DIR (or 'embedded'), or --teacher none to train without one"


@dataclass
class RecoverConfig:
    """Flags of one recovery run; stored in ``report.json``."""

    model: str
    out: str
    gguf_file: str | None = None
    data: str = "self"
    teacher: str | None = None  # None: the dense model of report.json; "none": no KD
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    kd_topk: int = 128
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    epochs: int = 2
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seqlen: int = 128
    max_samples: int | None = None
    self_samples: int = 2048
    self_top_k: int = 0  # 0: the writer samples from the whole distribution
    save_every: int = 50
    work_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    device: str = "cpu"
    precision: str = "auto"  # auto | float32 | bfloat16: dtype of the frozen weights and matmuls
    seed: int = 0
    quiet: bool = False


# ----------------------------------------------------------------------------- data


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


def batch_order(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Example indices of every step: a fresh seeded shuffle per epoch, last partial batch kept."""
    order = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        order += [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    return order


# ----------------------------------------------------------------------------- model


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct names of the ``nn.Linear`` projections in the decoder (all but the LM head)."""
    out_emb = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not out_emb
    }
    return sorted(names)


def add_lora(model: nn.Module, cfg: RecoverConfig) -> nn.Module:
    """Wrap ``model`` with trainable LoRA adapters (base weights frozen); returns the peft model."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules or linear_module_names(model)
    available = set(linear_module_names(model))
    missing = [t for t in targets if t not in available]
    if missing:
        raise ValueError(
            f"--target-modules: {', '.join(missing)} not in the model; "
            f"valid: {', '.join(sorted(available))}"
        )
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def lr_at(step: int, total: int, base: float, warmup_ratio: float) -> float:
    """Linear warm-up over ``warmup_ratio * total`` steps, then linear decay to 0."""
    warmup = max(1, math.ceil(warmup_ratio * total))
    if step < warmup:
        return base * (step + 1) / warmup
    return base * max(0.0, (total - step) / max(1, total - warmup))


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(work: Path, peft_model: nn.Module, optimizer, step: int, curve: list) -> None:
    """Adapter weights, optimizer state, step and loss curve, written atomically."""
    from peft import get_peft_model_state_dict

    state = {
        "adapter": get_peft_model_state_dict(peft_model),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "curve": curve,
    }
    fd, tmp = tempfile.mkstemp(prefix=".ckpt.", dir=work)
    os.close(fd)
    torch.save(state, tmp)
    os.replace(tmp, work / CHECKPOINT)


def load_checkpoint(work: Path, peft_model: nn.Module, optimizer) -> tuple[int, list]:
    """Restore a checkpoint written by ``save_checkpoint``; returns (step, loss curve)."""
    from peft import set_peft_model_state_dict

    state = torch.load(work / CHECKPOINT, map_location="cpu", weights_only=True)
    set_peft_model_state_dict(peft_model, state["adapter"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state["curve"])


# ----------------------------------------------------------------------------- training


def total_steps(n_examples: int, cfg: RecoverConfig) -> tuple[int, int]:
    """(optimizer steps, epochs of data needed): ``--max-steps`` wins over ``--epochs``.

    With ``--data self`` and no ``--max-steps``, ``SELF_DATA_STEPS`` steps.
    """
    per_epoch = max(1, math.ceil(n_examples / cfg.batch_size) // cfg.grad_accum)
    steps = cfg.max_steps
    if steps is None and cfg.data == "self":
        steps = SELF_DATA_STEPS
    if steps is None:
        return per_epoch * cfg.epochs, cfg.epochs
    return steps, math.ceil(steps / per_epoch)


def _autocast(model: nn.Module):
    """Autocast to the dtype of ``model``'s frozen weights (a no-op in float32).

    Frozen weights in bfloat16 need it: the float32 adapters' outputs join their stream.
    """
    param = next((p for p in model.parameters() if not p.requires_grad), None)
    param = param if param is not None else next(model.parameters())
    return torch.autocast(
        param.device.type, dtype=param.dtype, enabled=param.dtype != torch.float32
    )


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
        with torch.no_grad(), _autocast(teacher):
            logits = teacher(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits
        logp, ids = teacher_topk(logits, cfg.kd_topk, cfg.kd_temperature)
        targets += [(logp[i, : len(r)].cpu(), ids[i, : len(r)].cpu()) for i, r in enumerate(rows)]
    return targets


def collate_targets(targets: list[Targets]) -> Targets:
    """Right-padded ``[B, T, k]`` teacher targets; padding has log-probability -inf."""
    logp = torch.nn.utils.rnn.pad_sequence(
        [t[0] for t in targets], batch_first=True, padding_value=-math.inf
    )
    ids = torch.nn.utils.rnn.pad_sequence([t[1] for t in targets], batch_first=True)
    return logp, ids


def train(
    peft_model: nn.Module,
    targets: list[Targets] | None,
    examples: list[list[int]],
    pad_id: int,
    cfg: RecoverConfig,
    work: Path,
) -> list[dict]:
    """LoRA training loop; checkpoints into ``work`` every ``save_every`` steps.

    ``targets``: the teacher's ``teacher_targets`` of ``examples``, or None (CE only).
    Returns the loss curve: one dict per optimizer step (``step``, ``loss``, ``ce``[, ``kl``],
    ``lr``, ``tokens`` trained on), losses averaged over the step's micro-batches, in nats per
    token.
    """
    steps, epochs = total_steps(len(examples), cfg)
    order = batch_order(len(examples), cfg.batch_size, epochs, cfg.seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    start, curve = 0, []
    if cfg.resume and (work / CHECKPOINT).is_file():
        start, curve = load_checkpoint(work, peft_model, optimizer)
        print(f"resuming from step {start} ({work / CHECKPOINT})", file=sys.stderr)
    device = next(peft_model.parameters()).device
    autocast = _autocast(peft_model)
    peft_model.train()
    bar = tqdm(range(start, steps), desc="recover", disable=cfg.quiet, initial=start, total=steps)
    for step in bar:
        lr = lr_at(step, steps, cfg.lr, cfg.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        tokens = 0
        for micro in range(cfg.grad_accum):
            rows = order[(step * cfg.grad_accum + micro) % len(order)]
            tokens += sum(len(examples[i]) for i in rows)
            batch = {
                k: v.to(device) for k, v in collate([examples[i] for i in rows], pad_id).items()
            }
            with autocast:
                logits = peft_model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            teacher = None
            if targets is not None:
                teacher = tuple(t.to(device) for t in collate_targets([targets[i] for i in rows]))
            loss, parts = recovery_loss(
                logits, batch["labels"], teacher, cfg.kd_weight, cfg.kd_temperature
            )
            (loss / cfg.grad_accum).backward()
            for key, value in {"loss": loss.item(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append({"step": step + 1, **sums, "lr": lr, "tokens": tokens})
        bar.set_postfix(loss=f"{sums['loss']:.3f}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < steps:
            save_checkpoint(work, peft_model, optimizer, step + 1, curve)
    peft_model.eval()
    return curve


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = RecoverConfig(model="", out="")
    p = argparse.ArgumentParser(
        prog="python -m minillm.recover",
        description="LoRA recovery (optionally with distillation) of a pruned model; "
        "saves the merged model in the same format.",
    )
    p.add_argument("model", help="pruned model directory (or a dense model dir / hub id)")
    p.add_argument("--out", required=True, help="directory for the recovered model")
    p.add_argument("--gguf-file", help="GGUF file name inside MODEL (or a path)")
    p.add_argument(
        "--data",
        default=d.data,
        help="'self' (text the teacher, or without one the model, "
        "writes), a JSON/JSONL file (Alpaca instruction/input/output, or text), "
        "a text file, or a datasets name (e.g. yahma/alpaca-cleaned)",
    )
    p.add_argument(
        "--teacher",
        help="dense teacher for KL distillation on logits: a model dir / hub id, 'embedded' "
        "(the embedded SmolLM2 GGUF) or 'none'; default: the dense model recorded in "
        "MODEL/report.json",
    )
    p.add_argument("--teacher-gguf-file", help="GGUF file name inside --teacher")
    p.add_argument(
        "--kd-weight",
        type=float,
        default=d.kd_weight,
        help="loss = (1-w)*CE + w*KL(teacher||student); only with a teacher",
    )
    p.add_argument("--kd-temperature", type=float, default=d.kd_temperature)
    p.add_argument(
        "--kd-topk",
        type=int,
        default=d.kd_topk,
        help="teacher probabilities kept per position (the rest is matched as one bucket); "
        "computed once before training, 8 bytes per token and kept probability",
    )
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument(
        "--target-modules",
        help="comma-separated module names "
        "(default: every linear projection of the decoder layers)",
    )
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over --data FILE|NAME")
    p.add_argument(
        "--max-steps",
        type=int,
        help=f"optimizer steps (overrides --epochs; default with --data self: {SELF_DATA_STEPS})",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per training example")
    p.add_argument("--max-samples", type=int, help="use at most N training examples")
    p.add_argument(
        "--self-samples",
        type=int,
        default=d.self_samples,
        help="sequences written by the model for --data self",
    )
    p.add_argument(
        "--self-top-k",
        type=int,
        default=d.self_top_k,
        help="the writer samples among its K most likely tokens (0: from all of them)",
    )
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint period")
    p.add_argument(
        "--work-dir", help="checkpoint directory (default: OUT.work, removed on success)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the work dir's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16"],
        default=d.precision,
        help="dtype of the frozen weights and matmuls in training (adapters stay float32, the "
        "saved model is float32); auto: bfloat16 where the device computes it natively",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quiet", action="store_true")
    return p


def parse_config(argv: list[str] | None = None) -> tuple[RecoverConfig, dict]:
    """(config, extra loading options) from the command line."""
    args = vars(build_parser().parse_args(argv))
    extra = {"teacher_gguf_file": args.pop("teacher_gguf_file")}
    modules = args.pop("target_modules")
    cfg = RecoverConfig(**args, target_modules=modules.split(",") if modules else None)
    return cfg, extra


def validate(cfg: RecoverConfig) -> None:
    """Fail before any work or any write: bad numbers, missing files, an occupied --out."""
    from minillm.model.io import check_output_dir

    flags = ("rank", "epochs", "batch_size", "grad_accum", "save_every", "self_samples", "kd_topk")
    for flag in flags:
        if getattr(cfg, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: must be >= 1")
    if cfg.seqlen < 2:
        raise ValueError("--seqlen: must be >= 2")
    if cfg.self_top_k < 0:
        raise ValueError(f"--self-top-k: must be >= 0 (0: no truncation), got {cfg.self_top_k}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError("--max-steps: must be >= 1")
    if not 0.0 <= cfg.kd_weight <= 1.0:
        raise ValueError(f"--kd-weight: must be in [0, 1], got {cfg.kd_weight}")
    if cfg.data != "self":
        path = Path(cfg.data).expanduser()
        looks_like_file = path.suffix in (".json", ".jsonl", ".txt", ".raw") or os.sep in cfg.data
        if looks_like_file and not path.is_file():
            raise FileNotFoundError(f"--data: no such file '{cfg.data}'")
    check_output_dir(cfg.out, cfg.overwrite)


def compute_dtype(precision: str, device: str) -> str:
    """``--precision`` resolved to ``float32`` or ``bfloat16``.

    ``auto`` is bfloat16 where the device multiplies it natively (a CUDA GPU with bfloat16
    support; a CPU with AMX or AVX512-BF16, where it is ~7x faster than float32), else float32.
    """
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if "amx_bf16" in flags or "avx512_bf16" in flags else "float32"


def merged_float32(peft_model: nn.Module, cfg: RecoverConfig, dtype: str) -> nn.Module:
    """The recovered model in float32: adapters merged into float32 base weights.

    Training in bfloat16 keeps its frozen copy in bfloat16; the adapters (float32) are merged
    into the model reloaded in float32 instead, so rounding does not touch the saved weights.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from minillm.model.loading import load_model

    if dtype == "float32":
        return peft_model.merge_and_unload()
    adapters = get_peft_model_state_dict(peft_model)
    base, _ = load_model(cfg.model, cfg.gguf_file, "float32", cfg.device)
    full = add_lora(base, cfg)
    set_peft_model_state_dict(full, adapters)
    return full.merge_and_unload()


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


def run(cfg: RecoverConfig, teacher_gguf_file: str | None = None) -> dict:
    """Load, train LoRA, merge and save into ``cfg.out``; returns the report written there."""
    from minillm.model.io import atomic_output_dir, write_pruned
    from minillm.model.loading import load_model

    validate(cfg)
    torch.manual_seed(cfg.seed)
    start_time, start_cpu = time.perf_counter(), time.process_time()
    dtype = compute_dtype(cfg.precision, cfg.device)
    model, tokenizer = load_model(cfg.model, cfg.gguf_file, dtype, cfg.device)
    teacher, teacher_name = load_teacher(cfg, teacher_gguf_file, model.config.vocab_size, dtype)
    work = Path(cfg.work_dir) if cfg.work_dir else Path(f"{cfg.out.rstrip(os.sep)}.work")
    data_start = time.perf_counter()
    examples, targets = training_examples(cfg, model, teacher, tokenizer, work)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if teacher is not None and targets is None:
        targets = teacher_targets(teacher, examples, pad_id, cfg)
    data_time = time.perf_counter() - data_start  # text and teacher targets
    del teacher  # not needed in training: frees its memory
    work.mkdir(parents=True, exist_ok=True)
    peft_model = add_lora(model, cfg)
    curve = train(peft_model, targets, examples, pad_id, cfg, work)
    merged = merged_float32(peft_model, cfg, dtype)
    report = _base_report(cfg.model)
    report["recovery"] = {
        "config": dataclasses.asdict(cfg),
        "teacher": teacher_name,
        "precision": dtype,
        "examples": len(examples),
        "tokens_per_epoch": sum(len(e) for e in examples),
        "tokens_trained": sum(c["tokens"] for c in curve),
        "data_time_s": data_time,
        "steps": len(curve),
        "first_loss": curve[0]["loss"] if curve else None,
        "final_loss": curve[-1]["loss"] if curve else None,
        "loss_curve": curve,
        "time_s": time.perf_counter() - start_time,
        "cpu_time_s": time.process_time() - start_cpu,  # all threads of this process
    }
    with atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
        write_pruned(merged, tokenizer, tmp, report)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if cfg.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _base_report(model_dir: str) -> dict:
    """The pruned model's report.json (kept and extended), or an empty report."""
    path = Path(model_dir) / "report.json"
    return json.loads(path.read_text()) if path.is_file() else {"model": model_dir}


def main(argv: list[str] | None = None) -> int:
    cfg, extra = parse_config(argv)
    if cfg.quiet:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    try:
        report = run(cfg, extra["teacher_gguf_file"])
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"python -m minillm.recover: error: {err}", file=sys.stderr)
        return 2
    rec = report["recovery"]
    print(
        f"recovered {cfg.model} -> {cfg.out}: {rec['steps']} steps on {rec['examples']} examples, "
        f"loss {rec['first_loss']:.4f} -> {rec['final_loss']:.4f} in {rec['time_s']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

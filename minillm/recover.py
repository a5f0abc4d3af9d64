"""minillm recover MODEL --out DIR (also python -m minillm.recover): LoRA recovery of a pruned
model by distillation from the dense one.

The default needs no data: the dense model the pruned one came from (recorded in its
report.json; --teacher overrides, --teacher none turns distillation off) writes --self-samples
sequences from its whole distribution, keeping its --kd-topk most likely tokens per position,
and LoRA adapters on every linear projection of the decoder learn to match them (the other
tokens matched as one bucket). Training steps run the student only. --data gives instruction
data, plain text or a datasets name instead (the loss then mixes CE and KL, --kd-weight). The
adapters are merged into float32 weights and the model saved in the pruned one's format,
report.json extended with the loss curve. Training runs in bfloat16 where the device computes
it natively (--precision). A killed run resumes from --work-dir with --resume.

Examples:
  minillm recover pruned/ --out recovered/
  minillm recover pruned/ --data wikitext2/valid.txt --teacher none --max-steps 200 --out lora/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from minillm import cli
from minillm.recovery.config import SELF_DATA_STEPS, RecoverConfig
from minillm.recovery.data import training_examples
from minillm.recovery.teacher import load_teacher, teacher_targets
from minillm.recovery.train import add_lora, compute_dtype, merged_float32, train

# minillm.model (so transformers, seconds to import) and peft are imported where they are used:
# --help and flag errors come back without them


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RecoverConfig(model="", out="")
    p.add_argument("model", metavar="MODEL", help="pruned model directory (or a dense one)")
    m = p.add_argument_group("model")
    m.add_argument("--gguf-file", help="GGUF file name inside MODEL (or a path)")
    m.add_argument("--device", help="cuda if available, else cpu")
    m.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16"],
        default=d.precision,
        help="dtype of the frozen weights and matmuls in training (adapters stay float32, the "
        "saved model is float32); auto: bfloat16 where the device computes it natively",
    )
    t = p.add_argument_group("data and teacher")
    t.add_argument(
        "--data",
        default=d.data,
        help="'self' (text the teacher, or without one the model, writes), a JSON/JSONL file "
        "(Alpaca instruction/input/output, or text), a text file, or a datasets name",
    )
    t.add_argument(
        "--self-samples",
        type=int,
        default=d.self_samples,
        help="sequences written for --data self",
    )
    t.add_argument(
        "--self-top-k",
        type=int,
        default=d.self_top_k,
        help="the writer samples among its K most likely tokens (0: from all of them)",
    )
    t.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per training example")
    t.add_argument("--max-samples", type=int, help="use at most N training examples")
    t.add_argument(
        "--teacher",
        help="dense teacher for KL distillation: a model dir / hub id, 'embedded' (the "
        "embedded SmolLM2 GGUF) or 'none' (default: the dense model in MODEL/report.json)",
    )
    t.add_argument("--teacher-gguf-file", help="GGUF file name inside --teacher")
    t.add_argument(
        "--kd-weight",
        type=float,
        default=d.kd_weight,
        help="loss = (1-w)*CE + w*KL(teacher||student); only with a teacher",
    )
    t.add_argument("--kd-temperature", type=float, default=d.kd_temperature, help="KL's")
    t.add_argument(
        "--kd-topk",
        type=int,
        default=d.kd_topk,
        help="teacher probabilities kept per position (the rest is matched as one bucket)",
    )
    a = p.add_argument_group("LoRA and optimizer")
    a.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    a.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha")
    a.add_argument("--dropout", type=float, default=d.dropout, help="LoRA dropout")
    a.add_argument(
        "--target-modules",
        help="comma-separated module names (default: every linear projection of the decoder)",
    )
    a.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    a.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="of the steps")
    a.add_argument("--epochs", type=int, default=d.epochs, help="passes over --data FILE|NAME")
    a.add_argument(
        "--max-steps",
        type=int,
        help=f"optimizer steps (overrides --epochs; default with --data self: {SELF_DATA_STEPS})",
    )
    a.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    a.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    a.add_argument("--seed", type=int, default=d.seed, help="data order and written text")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="DIR", help="the recovered model's directory")
    o.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    o.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint period")
    o.add_argument(
        "--work-dir", help="checkpoint directory (default: OUT.work, removed on success)"
    )
    o.add_argument("--resume", action="store_true", help="continue from the work dir's checkpoint")
    o.add_argument("--quiet", action="store_true", help="no progress bars or logs")


def parse_config(argv: list[str] | None, prog: str) -> tuple[RecoverConfig, dict]:
    """(config, extra loading options) from the command line."""
    p = cli.parser(prog, __doc__)
    add_arguments(p)
    args = vars(p.parse_args(argv))
    args["device"] = args["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
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


def main(argv: list[str] | None = None, prog: str = "python -m minillm.recover") -> int:
    cfg, extra = parse_config(argv, prog)
    if cli.environment_error(prog):
        return 2
    cli.setup_logging(cfg.quiet)
    try:
        report = run(cfg, extra["teacher_gguf_file"])
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        return cli.fail(prog, err)
    rec = report["recovery"]
    print(
        f"recovered {cfg.model} -> {cfg.out}: {rec['steps']} steps on {rec['examples']} examples, "
        f"loss {rec['first_loss']:.4f} -> {rec['final_loss']:.4f} in {rec['time_s']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

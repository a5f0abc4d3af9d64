"""Seconds per recovery step of ``minillm.recover``'s training loop, per precision and dropout.

Each ``PRECISION:DROPOUT`` configuration (default: ``float32:0.05``, the default before bfloat16,
then ``float32:0`` and the current ``bfloat16:0``) loads the pruned model and the teacher in that
precision and adds LoRA. It times the teacher's pass over one batch (``teacher_targets``: paid
once per batch of data before training; before the top-k targets, paid in every step) and
``minillm.recover.train`` (distillation from those targets, batch ``--batch-size`` x ``--seqlen``
random tokens: a step's cost does not depend on the text). One warm-up step, then ``--steps``
timed steps; configurations take turns for ``--rounds`` rounds, so that the machine's drift hits
all of them alike. One JSON object on stdout: per configuration the median seconds per step, per
teacher batch, and the speed-up of the step over the first configuration.

Command (see BENCHMARKS.md, "Recovery")::

    python benchmarks/bench_recovery_step.py /tmp/i10/default20 --teacher /tmp/smollm2-f32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from minillm.model.loading import load_model
from minillm.recovery.config import RecoverConfig
from minillm.recovery.teacher import teacher_targets
from minillm.recovery.train import add_lora, train


def seconds_per_step(
    model_dir: str, teacher, precision: str, dropout: float, args
) -> tuple[float, float]:
    """(wall seconds of the teacher's pass over one batch, per step of ``args.steps`` steps)."""
    cfg = RecoverConfig(model=model_dir, out="", dropout=dropout, quiet=True, precision=precision)
    cfg.batch_size, cfg.seqlen = args.batch_size, args.seqlen
    student, _ = load_model(model_dir, None, precision, "cpu")
    peft_model = add_lora(student, cfg)
    vocab = student.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    examples = torch.randint(0, vocab, (args.batch_size, args.seqlen), generator=gen).tolist()
    teacher_targets(teacher, examples, 0, cfg)  # warm-up
    start = time.perf_counter()
    targets = teacher_targets(teacher, examples, 0, cfg)
    teacher_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as work:
        cfg.max_steps = 1
        train(peft_model, targets, examples, 0, cfg, Path(work))
        cfg.max_steps = args.steps
        start = time.perf_counter()
        train(peft_model, targets, examples, 0, cfg, Path(work))
    return teacher_s, (time.perf_counter() - start) / args.steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="pruned model directory")
    p.add_argument("--teacher", required=True, help="dense teacher directory")
    p.add_argument("--configs", default="float32:0.05,float32:0,bfloat16:0")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    configs = [(c.split(":")[0], float(c.split(":")[1])) for c in args.configs.split(",")]
    teachers = {dtype: load_model(args.teacher, None, dtype, "cpu")[0] for dtype, _ in configs}
    times: dict[str, list[float]] = {c: [] for c in args.configs.split(",")}
    teacher_times: dict[str, list[float]] = {c: [] for c in times}
    for round_ in range(args.rounds):
        for (dtype, dropout), name in zip(configs, times, strict=True):
            teacher_s, step_s = seconds_per_step(args.model, teachers[dtype], dtype, dropout, args)
            times[name].append(step_s)
            teacher_times[name].append(teacher_s)
            print(
                f"round {round_}: {name} {step_s:.2f} s/step, teacher {teacher_s:.2f} s/batch",
                file=sys.stderr,
            )
    medians = {name: statistics.median(t) for name, t in times.items()}
    first = next(iter(medians.values()))
    result = {
        "setup": vars(args) | {"torch": torch.__version__},
        "configs": {
            name: {
                "s_per_step": medians[name],
                "speedup": first / medians[name],
                "teacher_s_per_batch": statistics.median(teacher_times[name]),
                "runs": t,
            }
            for name, t in times.items()
        },
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Streamed (``--offload``) vs in-memory pruning of a random LLaMA-architecture model of >= 1B
parameters: peak resident memory and time per block. Prints one JSON on stdout.

The model is built from a config on the meta device and written tensor by tensor as
safetensors shards at ``--dtype``, float32 by default (:class:`minillm.model.shards.ShardWriter`;
never materialized whole), with the SmolLM2 tokenizer (``--tokenizer``, e.g. the cache of
``benchmarks/_smollm2.py``). Each prune runs as its own ``python -m minillm.prune`` process;
its peak is the process's resident high-water mark, which includes the interpreter and library
baseline: the largest of its report's per-phase peaks (``minillm.memory`` resets the mark at
each phase, so ``ru_maxrss`` from ``wait4`` holds only the last phase's) and ``ru_maxrss``.

``--shape 7b --dtype bfloat16 --device cuda`` is the GPU variant: LLaMA-7B's shape, drawn on the
GPU, pruned on it; each run's peak GPU memory is its report's per-phase
``torch.cuda.max_memory_allocated``. Commands (see BENCHMARKS.md)::

    nice -n 10 python benchmarks/bench_streaming.py --work-dir /tmp/bench-streaming \\
        --calib ../shared/data/wikitext2/valid.txt --tokenizer /tmp/smollm2-f32
    python benchmarks/bench_streaming.py --work-dir /tmp/b7 --calib valid.txt --tokenizer TOK \\
        --shape 7b --dtype bfloat16 --device cuda --criterion wanda-sp --nsamples 32 --seqlen 512
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from minillm.model.dtypes import parse_dtype
from minillm.model.shards import ShardWriter

SHAPES = {
    # TinyLlama-1.1B's shape with SmolLM2's vocabulary: 1.17e9 parameters, 4.7 GB in float32
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    # LLaMA-7B's shape with SmolLM2's vocabulary: 6.87e9 parameters, 13.7 GB in bfloat16
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
}


def write_random_model(path: Path, args) -> dict:
    """Random weights of ``SHAPES[args.shape]`` at ``--dtype``, drawn on ``--device`` and written
    shard by shard; returns size figures."""
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(vocab_size=len(tok), **SHAPES[args.shape])
    dtype = parse_dtype(args.dtype)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    path.mkdir(parents=True)
    numel = 0
    with ShardWriter(path, args.shard_bytes) as writer:
        for name, p in skeleton.named_parameters():
            if p.dim() == 1:
                t = torch.ones(p.shape, dtype=dtype)
            else:
                t = torch.randn(p.shape, generator=gen, device=args.device).mul_(0.02)
                t = t.to(dtype).cpu()
            writer.add(name, t)
            numel += t.numel()
    config.save_pretrained(path)
    tok.save_pretrained(path)
    return {"params": numel, "float32_bytes": 4 * numel, "shards": len(writer.paths)}


def prune(model: Path, out: Path, args, offload: bool, ranks: int = 1) -> dict:
    """One ``python -m minillm.prune`` run (``ranks`` > 1: under torchrun); its report plus
    ru_maxrss (the largest of the launcher's processes: one rank's peak) and wall time."""
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd = [*launch, "-m", "minillm.prune", str(model), "--out", str(out)]
    cmd += ["--criterion", args.criterion, "--calib", args.calib, "--ratio", "0.2", "--quiet"]
    cmd += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    cmd += ["--batch-size", str(args.batch_size), "--overwrite"]
    cmd += ["--device", args.device, "--dtype", args.dtype]
    cmd += ["--offload"] if offload else []
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({status})")
    report = json.loads((out / "report.json").read_text())
    n_blocks = len(report["layers"])
    row = {
        "offload": offload,
        "ranks": ranks,
        "wall_s": wall,
        "peak_rss_bytes": max(usage.ru_maxrss * 1024, report["peak_memory_bytes"]["total"]),
        "phase_peak_bytes": report["peak_memory_bytes"],
        "phase_time_s": report["time_s"],
        "score_s_per_block": report["time_s"]["score"] / n_blocks,
        "params_after": report["params_after"],
    }
    if offload:  # prune: each block read again, pruned (refit) and written
        row["prune_s_per_block"] = report["time_s"]["prune"] / n_blocks
    return row


def _label(row: dict) -> str:
    return f"{'streamed' if row['offload'] else 'in-memory'}-{row['ranks']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--calib", required=True, help="calibration text file")
    p.add_argument("--tokenizer", required=True, help="directory with a tokenizer")
    p.add_argument("--criterion", default="wanda-sp")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-bytes", type=int, default=10**9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the model and outputs")
    p.add_argument("--ranks", type=int, default=1, help="> 1: also stream under torchrun")
    p.add_argument("--skip-in-memory", action="store_true")
    p.add_argument("--skip-streamed", action="store_true", help="only the in-memory run")
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--dtype", default="float32", help="of the checkpoint and the prune")
    p.add_argument("--device", default="cpu", help="compute device of the prune (cuda: GPU)")
    args = p.parse_args()
    model = args.work_dir / "model"
    if not (model / "config.json").is_file():
        shutil.rmtree(model, ignore_errors=True)
        start = time.perf_counter()
        size = write_random_model(model, args)
        size["write_s"] = time.perf_counter() - start
    else:
        size = {"cached": str(model)}
    print(json.dumps(size), file=sys.stderr, flush=True)
    runs = [] if args.skip_streamed else [(True, 1)]
    runs += [] if args.skip_in_memory else [(False, 1)]
    runs += [(True, args.ranks)] if args.ranks > 1 else []
    rows = []
    for offload, ranks in runs:
        out = args.work_dir / (f"streamed-{ranks}" if offload else "in-memory")
        rows.append(prune(model, out, args, offload, ranks))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(out)
    from minillm.blocks.streaming import weights_bytes

    f32 = weights_bytes(model, "float32")
    at_dtype = weights_bytes(model, args.dtype)
    on_gpu = args.device.startswith("cuda")
    result = {
        "model": {**size, "float32_bytes": f32, f"{args.dtype}_bytes": at_dtype},
        "config": SHAPES[args.shape],
        "device": torch.cuda.get_device_name() if on_gpu else args.device,
        "dtype": args.dtype,
        "criterion": args.criterion,
        "calibration": f"{args.nsamples} x {args.seqlen} tokens",
        "runs": rows,
        "peak_fraction_of_float32": {_label(r): r["peak_rss_bytes"] / f32 for r in rows},
        "peak_gpu_fraction_of_weights": {
            _label(r): r["phase_peak_bytes"]["total"] / at_dtype for r in rows if on_gpu
        },
        "same_params_after": len({r["params_after"] for r in rows}) == 1,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

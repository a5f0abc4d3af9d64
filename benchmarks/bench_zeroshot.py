"""Zero-shot throughput: the shared-prefix lm-eval model (``minillm``) vs lm-eval's HFLM.

Both score the same rows (the first ``--limit`` of each task in ``--task-data-dir``) on the same
in-memory model, task by task and side by side (HFLM first, then ``minillm``, per task), through
``minillm.evaluation.zeroshot.run_tasks``. Reported per task and in total: log-likelihood requests,
seconds inside the model class (``loglikelihood``) and for the whole lm-eval run, requests/s, the
speed-up (wall time, and process CPU time, which a machine shared with other jobs distorts less when
torch runs one thread), accuracies, how many examples pick the same choice (``acc`` and ``acc_norm``
per example) and the largest per-request log-likelihood difference. One JSON object on stdout.

Command (see BENCHMARKS.md, "Zero-shot")::

    python benchmarks/bench_zeroshot.py --task-data-dir ../shared/data/zeroshot --limit 50 \\
        --cache-dir /tmp/smollm2-f32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from _smollm2 import load_smollm2

from minillm.evaluation.zeroshot import TASKS, make_lm, run_tasks
from minillm.evaluation.zeroshot_lm import shared_len


def timed(lm) -> dict:
    """Wrap ``lm.loglikelihood`` so that its wall time and request count accumulate."""
    stats = {"s": 0.0, "cpu_s": 0.0, "requests": 0}
    inner = lm.loglikelihood

    def loglikelihood(requests, *args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        out = inner(requests, *args, **kwargs)
        stats["s"] += time.perf_counter() - start
        stats["cpu_s"] += time.process_time() - cpu
        stats["requests"] += len(requests)
        return out

    lm.loglikelihood = loglikelihood
    return stats


def run_one(model, tok, name: str, task: str, args) -> dict:
    lm = make_lm(model, tok, name, batch_size=args.batch_size)
    stats = timed(lm)
    start = time.perf_counter()
    out = run_tasks(lm, [task], args.task_data_dir, args.limit, log_samples=True)
    total = time.perf_counter() - start
    res = out["results"][task]
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return {
        "requests": stats["requests"],
        "model_s": stats["s"],
        "model_cpu_s": stats["cpu_s"],
        "total_s": total,
        "acc": res.get("acc,none"),
        "acc_norm": res.get("acc_norm,none"),
        "per_example": [(s.get("acc"), s.get("acc_norm")) for s in samples],
        "lls": [ll for s in samples for [(ll, _)] in s["resps"]],
        "greedy": [g for s in samples for [(_, g)] in s["resps"]],
    }


def forward_cost(model, tok, task: str, args) -> dict:
    """Token forwards and LM-head rows each class needs for the task's requests (no model run).

    HFLM: one forward of context + continuation[:-1] per request (requests whose inputs are
    equal, e.g. BoolQ's one-token answers, share one), LM head on every position. minillm: per
    question, the shared prefix once plus each choice's remaining tokens; LM head on the
    positions that score a token. FLOPs ~ 2 * (body parameters * tokens + head parameters *
    rows), attention scores left out (short sequences).
    """
    lm = make_lm(model, tok, "minillm")
    counts = {"hf_tokens": 0, "hf_rows": 0, "minillm_tokens": 0, "minillm_rows": 0}

    def count(requests, disable_tqdm=False, override_bs=None):
        keys = lm._doc_keys or [tuple(c) for _, c, _ in requests]
        groups: dict = {}
        for key, (_, ctx, cont) in zip(keys, requests, strict=True):
            groups.setdefault(key, []).append(((ctx + cont)[-(lm.max_length + 1) :][:-1], cont))
        for rows in groups.values():
            unique = {tuple(x) for x, _ in rows}
            counts["hf_tokens"] += sum(len(x) for x in unique)
            counts["hf_rows"] += sum(len(x) for x in unique)
            inputs = [x for x, _ in rows]
            shared = shared_len(inputs)
            counts["minillm_tokens"] += shared + sum(len(x) - shared for x in inputs)
            counts["minillm_rows"] += sum(len(c) for _, c in rows)
        return [(0.0, False)] * len(requests)

    lm._loglikelihood_tokens = count
    run_tasks(lm, [task], args.task_data_dir, args.limit)
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - embed
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    body -= 0 if tied else head
    for k in ("hf", "minillm"):
        counts[f"{k}_gflop"] = 2 * (body * counts[f"{k}_tokens"] + head * counts[f"{k}_rows"]) / 1e9
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task-data-dir", required=True)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--limit", type=int, default=50, help="rows per task")
    p.add_argument("--batch-size", type=int, default=1, help="HFLM batch size (both classes)")
    p.add_argument("--cache-dir", default=None, help="float32 copy of the embedded SmolLM2")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--flops-only",
        action="store_true",
        help="no timing: count the forward work each class needs (tokens, LM-head rows, FLOPs)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_smollm2(args.cache_dir)
    if args.flops_only:
        rows = {task: forward_cost(model, tok, task, args) for task in args.tasks.split(",")}
        total = {k: sum(r[k] for r in rows.values()) for k in next(iter(rows.values()))}
        for r in [*rows.values(), total]:
            r["flop_ratio"] = r["hf_gflop"] / r["minillm_gflop"]
        json.dump({"limit": args.limit, "tasks": rows, "total": total}, sys.stdout, indent=2)
        print()
        return 0
    rows, totals = {}, {"hf": [0, 0.0, 0.0], "minillm": [0, 0.0, 0.0]}
    for task in args.tasks.split(","):
        ref = run_one(model, tok, "hf", task, args)
        got = run_one(model, tok, "minillm", task, args)
        for name, r in (("hf", ref), ("minillm", got)):
            totals[name][0] += r["requests"]
            totals[name][1] += r["model_s"]
            totals[name][2] += r["model_cpu_s"]
        same = sum(a == b for a, b in zip(ref["per_example"], got["per_example"], strict=True))
        rows[task] = {
            "examples": len(ref["per_example"]),
            "requests": ref["requests"],
            "hf_model_s": ref["model_s"],
            "minillm_model_s": got["model_s"],
            "hf_model_cpu_s": ref["model_cpu_s"],
            "minillm_model_cpu_s": got["model_cpu_s"],
            "speedup_cpu": ref["model_cpu_s"] / got["model_cpu_s"],
            "hf_total_s": ref["total_s"],
            "minillm_total_s": got["total_s"],
            "hf_requests_per_s": ref["requests"] / ref["model_s"],
            "minillm_requests_per_s": got["requests"] / got["model_s"],
            "speedup": ref["model_s"] / got["model_s"],
            "hf_acc": ref["acc"],
            "minillm_acc": got["acc"],
            "hf_acc_norm": ref["acc_norm"],
            "minillm_acc_norm": got["acc_norm"],
            "same_choices": same,
            "same_greedy": sum(a == b for a, b in zip(ref["greedy"], got["greedy"], strict=True)),
            "max_abs_ll_diff": max(abs(a - b) for a, b in zip(ref["lls"], got["lls"], strict=True)),
        }
        print(json.dumps({task: rows[task]}), file=sys.stderr, flush=True)
    (n_ref, s_ref, c_ref), (n_got, s_got, c_got) = totals["hf"], totals["minillm"]
    out = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF, float32)",
        "device": str(next(model.parameters()).device),
        "threads": torch.get_num_threads(),
        "limit": args.limit,
        "batch_size": args.batch_size,
        "tasks": rows,
        "total": {
            "requests": n_ref,
            "hf_model_s": s_ref,
            "minillm_model_s": s_got,
            "hf_requests_per_s": n_ref / s_ref,
            "minillm_requests_per_s": n_got / s_got,
            "speedup": s_ref / s_got,
            "hf_model_cpu_s": c_ref,
            "minillm_model_cpu_s": c_got,
            "speedup_cpu": c_ref / c_got,
            "same_choices": sum(r["same_choices"] for r in rows.values()),
            "examples": sum(r["examples"] for r in rows.values()),
        },
    }
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

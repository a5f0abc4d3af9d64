"""Perplexity of an exported GGUF in llama.cpp vs the same model in minillm, same token ids.

Prunes SmolLM2-135M (``python -m minillm.prune --ratio R``, default criterion) unless
``--pruned DIR`` is given, exports it (and the dense model when ``--dense DIR`` is given) with
``minillm.export`` to f32 GGUF, then scores the same non-overlapping windows of the test text
with minillm's perplexity and with llama.cpp's next-token logits (llama-cpp-python,
``logits_all``). Prints one JSON object. Needs ``pip install llama-cpp-python==0.3.36``.

    python benchmarks/bench_gguf_llamacpp.py --calib ../shared/data/wikitext2/valid.txt \\
        --test ../shared/data/wikitext2/test.txt --dense /tmp/smollm2-f32 --work-dir /tmp/gguf
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from minillm.evaluation.perplexity import load_eval_text, perplexity_stats, tokenize_text
from minillm.model.gguf_export import export_gguf
from minillm.model.loading import load_model


def llamacpp_nll(path: Path, windows: torch.Tensor, threads: int) -> float:
    """Mean next-token NLL (nats) of llama.cpp over ``windows`` ([n, seqlen] token ids)."""
    import llama_cpp

    seqlen = windows.shape[1]
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=seqlen,
        n_batch=seqlen,
        n_ubatch=seqlen,
        logits_all=True,
        n_threads=threads,
        verbose=False,
    )
    total = 0.0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = torch.from_numpy(np.array(llm.scores[: seqlen - 1], dtype=np.float64))
        targets = torch.tensor(window[1:])
        total += -torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum().item()
    return total / (windows.shape[0] * (seqlen - 1))


def llamacpp_tokens(path: Path, text: str) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return llm.tokenize(text.encode(), add_bos=False, special=False)


def compare(model_dir: Path, gguf: Path, text: str, args) -> dict:
    """minillm vs llama.cpp perplexity of ``model_dir`` on the first ``args.max_tokens``."""
    t0 = time.perf_counter()
    export = export_gguf(model_dir, gguf, "f32", overwrite=True, progress=False)
    t_export = time.perf_counter() - t0
    model, tok = load_model(str(model_dir))
    ids = tokenize_text(tok, text, args.max_tokens)[0]
    ours = perplexity_stats(model, ids, args.seqlen)
    windows = ids[: ours.windows * ours.seqlen].view(ours.windows, ours.seqlen)
    t0 = time.perf_counter()
    nll = llamacpp_nll(gguf, windows, args.threads)
    snippet = text[: args.tokenizer_chars]
    return {
        "dir": str(model_dir),
        "architecture": export["architecture"],
        "gguf_bytes": export["bytes"],
        "export_s": round(t_export, 1),
        "llamacpp_s": round(time.perf_counter() - t0, 1),
        "windows": ours.windows,
        "seqlen": ours.seqlen,
        "ppl_minillm": ours.ppl,
        "ppl_llamacpp": math.exp(nll),
        "rel_diff": math.exp(nll) / ours.ppl - 1,
        "same_tokenization": llamacpp_tokens(gguf, snippet) == tok(snippet)["input_ids"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calib", required=True, help="calibration text for minillm.prune")
    p.add_argument("--test", required=True, help="held-out text (file or directory)")
    p.add_argument("--work-dir", required=True, help="where the pruned model and GGUFs go")
    p.add_argument("--pruned", default=None, help="reuse this pruned directory")
    p.add_argument("--dense", default=None, help="also compare this dense model directory")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokenizer-chars", type=int, default=20000)
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    pruned = Path(args.pruned) if args.pruned else work / "pruned"
    if args.pruned is None:
        cmd = [sys.executable, "-m", "minillm.prune", "--ratio", str(args.ratio)]
        cmd += ["--calib", args.calib, "--out", str(pruned), "--overwrite", "--quiet"]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    text = load_eval_text(args.test, "test")
    torch.set_num_threads(args.threads)
    results = {"pruned": compare(pruned, work / "pruned.gguf", text, args)}
    if args.dense:
        results["dense"] = compare(Path(args.dense), work / "dense.gguf", text, args)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

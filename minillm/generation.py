"""Generation samples (greedy and sampled) and speed/memory of a causal LM."""

from __future__ import annotations

import resource
import sys
import time

import torch

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Here is a short story about a robot who learns to paint:",
    "Three tips for staying healthy are",
)


@torch.no_grad()
def generate_samples(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str] | tuple[str, ...] = DEFAULT_PROMPTS,
    max_new_tokens: int = 48,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> list[dict[str, str]]:
    """Per prompt, the greedy and the sampled continuation (text after the prompt)."""
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        common = dict(max_new_tokens=max_new_tokens, pad_token_id=_pad_id(tokenizer))
        greedy = model.generate(**ids, do_sample=False, **common)
        torch.manual_seed(seed)
        sampled = model.generate(
            **ids, do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **common
        )
        n = ids["input_ids"].shape[1]
        out.append(
            {
                "prompt": prompt,
                "greedy": tokenizer.decode(greedy[0, n:], skip_special_tokens=True),
                "sampled": tokenizer.decode(sampled[0, n:], skip_special_tokens=True),
            }
        )
    return out


def _pad_id(tokenizer) -> int | None:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _peak_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU (bytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


@torch.no_grad()
def measure_speed(
    model: torch.nn.Module,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    repeats: int = 2,
) -> dict[str, float]:
    """Prefill and decode throughput (tokens/s, batch 1, best of ``repeats``) and memory (bytes).

    Prefill: one forward over ``prompt_tokens`` random tokens. Decode: ``new_tokens`` greedy
    steps with the KV cache after that prompt (EOS disabled so every step runs).
    """
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill, decode = float("inf"), float("inf")
    for _ in range(repeats):
        prefill = min(prefill, _timed(lambda: model(input_ids=ids, use_cache=False), device))
        decode = min(
            decode,
            _timed(
                lambda: model.generate(
                    ids,
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=0,
                ),
                device,
            ),
        )
    decode_only = max(decode - prefill, 1e-9)
    return {
        "prefill_tokens_per_s": prompt_tokens / prefill,
        "decode_tokens_per_s": new_tokens / decode_only,
        "param_bytes": float(param_bytes(model)),
        "peak_bytes": float(_peak_bytes(device)),
    }


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start

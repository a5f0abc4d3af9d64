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
    greedy_only: bool = False,
) -> list[dict[str, str]]:
    """Per prompt, the greedy and (unless ``greedy_only``) the sampled continuation (text
    after the prompt)."""
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        common = dict(max_new_tokens=max_new_tokens, pad_token_id=_pad_id(tokenizer))
        n = ids["input_ids"].shape[1]
        greedy = model.generate(**ids, do_sample=False, **common)
        sample = {
            "prompt": prompt,
            "greedy": tokenizer.decode(greedy[0, n:], skip_special_tokens=True),
        }
        if not greedy_only:
            torch.manual_seed(seed)
            sampled = model.generate(
                **ids, do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **common
            )
            sample["sampled"] = tokenizer.decode(sampled[0, n:], skip_special_tokens=True)
        out.append(sample)
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
    new_tokens: int = 32,
    batch_sizes: tuple[int, ...] = (1, 16),
    repeats: int = 2,
) -> dict[str, float]:
    """Prefill and decode throughput per batch size (best of ``repeats``) and memory (bytes).

    Keys ``prefill_tokens_per_s_b{B}``: one forward over ``[B, prompt_tokens]`` random tokens;
    ``decode_tokens_per_s_b{B}``: ``new_tokens`` greedy steps with the KV cache after that
    prompt (EOS disabled, prefill time subtracted). Tokens/s count every sequence of the batch.
    ``peak_bytes`` is the process's peak (CUDA: allocated on the device; CPU: resident set).
    """
    best = compare_speed({"model": model}, prompt_tokens, new_tokens, batch_sizes, repeats)
    return best["model"]


@torch.no_grad()
def compare_speed(
    models: dict[str, torch.nn.Module],
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    batch_sizes: tuple[int, ...] = (1, 16),
    repeats: int = 2,
) -> dict[str, dict[str, float]]:
    """:func:`measure_speed` of several models, interleaved (each repeat times every model once)
    so that a busy machine slows them alike; ``{name: measure_speed keys}``."""
    best: dict[str, dict[str, float]] = {name: {} for name in models}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        for name, model in models.items():
            for key, value in _speed_once(model, prompt_tokens, new_tokens, batch_sizes).items():
                best[name][key] = max(best[name].get(key, 0.0), value)
    for name, model in models.items():
        device = next(model.parameters()).device
        best[name]["param_bytes"] = float(param_bytes(model))
        best[name]["peak_bytes"] = float(_peak_bytes(device))
    return best


def _speed_once(model, prompt_tokens: int, new_tokens: int, batch_sizes) -> dict[str, float]:
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    out = {}
    for batch in batch_sizes:
        ids = torch.randint(1, model.config.vocab_size, (batch, prompt_tokens), generator=gen)
        prefill, decode = _prefill_decode_seconds(model, ids.to(device), new_tokens)
        out[f"prefill_tokens_per_s_b{batch}"] = batch * prompt_tokens / prefill
        out[f"decode_tokens_per_s_b{batch}"] = batch * new_tokens / max(decode - prefill, 1e-9)
    return out


def _prefill_decode_seconds(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds of one forward over ``ids`` ``[batch, seq]``, and of prefill + greedy decode."""
    prefill = _timed(lambda: model(input_ids=ids, use_cache=False), ids.device)
    decode = _timed(
        lambda: model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        ),
        ids.device,
    )
    return prefill, decode


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start

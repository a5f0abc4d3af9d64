"""Shared setup of the scoring benchmarks: SmolLM2-135M, calibration windows, groups, Spearman."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from minillm.data import calibration_batches
from minillm.model.adapters import adapter_for
from minillm.model.loading import load_model


def load_smollm2(cache_dir: str | None):
    """The embedded SmolLM2-135M-Instruct (float32); cached as safetensors in ``cache_dir``
    because de-quantizing the GGUF takes ~20 s on CPU. The weights are copied out of the
    memory-mapped file, so resident memory counts them once, as anonymous memory, whatever a
    step replaces."""
    if cache_dir and (Path(cache_dir) / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=torch.float32)
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.clone()
        return model.eval(), AutoTokenizer.from_pretrained(cache_dir)
    model, tok = load_model(None)
    if cache_dir:
        model.hf_quantizer = None  # the weights are de-quantized float32 already
        model.save_pretrained(cache_dir)
        tok.save_pretrained(cache_dir)
    return model, tok


def setup(args):
    """``(model, tokenizer, adapter, groups, calibration [n, seqlen])`` from CLI ``args``."""
    model, tok = load_smollm2(args.cache_dir)
    adapter = adapter_for(model)
    n_layers = len(adapter.layers(model))
    groups = [g for i in range(n_layers) for g in adapter.groups(model, i, "query").values()]
    calib = calibration_batches(args.calib, tok, args.nsamples, args.seqlen, args.seed)
    return model, tok, adapter, groups, calib


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two ``[n]`` tensors (ties broken by position)."""
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))

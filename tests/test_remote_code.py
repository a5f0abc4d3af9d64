"""Every pruned output loads in stock transformers (``trust_remote_code=True``) and in
lm-eval's HFLM in a process that cannot import minillm, with the logits of the model
minillm pruned in memory (itself equal to the masked dense model, test_surgery.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, make_tiny_model, tiny_tokenizer
from safetensors.torch import load_file
from test_surgery import prune_randomly
from transformers import AutoModelForCausalLM

from minillm.model.adapters import adapter_for
from minillm.model.io import MODELING_FILE, PRUNED_MODEL_TYPE, load_pruned, save_pruned
from minillm.model.surgery import prune_layer
from minillm.prune import main as prune_main

LOADER = Path(__file__).with_name("_load_without_minillm.py")
IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
NEW_TOKENS = 6
REQUEST = ("w1 w7 w3 w9", " w4 w5")
CASES = [f"{f}-{kind}" for f in FAMILIES for kind in ("uniform", "per-layer")]
CASES += ["gemma3-per-layer"]


def add_compensation_biases(model) -> None:
    """Biases where LLaMA has none (FLAP compensation adds them to o_proj/down_proj)."""
    layers = adapter_for(model).layers(model)
    gen = torch.Generator().manual_seed(3)
    for linear in (layers[0].self_attn.o_proj, layers[1].mlp.down_proj):
        linear.bias = torch.nn.Parameter(torch.randn(linear.out_features, generator=gen))


def pruned_model(case: str):
    family = case.removesuffix("-uniform").removesuffix("-per-layer")
    model = make_tiny_model(family)
    prune_randomly(model, uniform=case.endswith("-uniform"))
    if family.startswith("llama"):
        add_compensation_biases(model)
    else:  # OPT/BLOOM carry biases everywhere: compensation shifts them
        with torch.no_grad():
            for layer in adapter_for(model).layers(model):
                for p in layer.parameters():
                    if p.dim() == 1:
                        p.add_(0.1)
    return model


def plain_llama():
    """Uniform, channels-only: a plain config that transformers loads natively."""
    model = make_tiny_model("llama-gqa")
    adapter = adapter_for(model)
    for layer in range(3):
        prune_layer(model, adapter, layer, None, torch.arange(0, 96, 2))
    return model


def logits_and_greedy(model) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(IDS).logits
        greedy = model.generate(IDS, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    return logits, greedy


def continuation_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Independent reference of lm-eval's loglikelihood: sum of the continuation's log-probs."""
    ctx = tokenizer(context).input_ids
    ids = torch.tensor([tokenizer(context + continuation).input_ids])
    with torch.no_grad():
        logprobs = model(ids).logits.log_softmax(-1)[0]
    targets = ids[0, len(ctx) :]
    return float(logprobs[len(ctx) - 1 : -1].gather(1, targets[:, None]).sum())


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Save every case, load them all in one minillm-free subprocess.

    Returns ``{case: (expected, got, config)}`` with expected/got dicts of logits and greedy
    tokens, plus ``"lm_eval"``: (reference loglikelihood, lm-eval's).
    """
    root = tmp_path_factory.mktemp("remote")
    models = {case: pruned_model(case) for case in CASES}
    models["llama-plain"] = plain_llama()
    dirs, expected, configs = {}, {}, {}
    for case, model in models.items():
        dirs[case] = str(root / case)
        os.makedirs(dirs[case])
        configs[case] = save_pruned(model, tiny_tokenizer(), dirs[case])
        expected[case] = logits_and_greedy(model)
    dirs["flap-cli"] = str(root / "flap-cli")
    dense_dir = root / "dense"
    make_tiny_model("llama-gqa").save_pretrained(dense_dir)
    tiny_tokenizer().save_pretrained(dense_dir)
    calib = root / "calib.txt"
    calib.write_text(" ".join(f"w{i % 120}" for i in range(3000)))
    argv = [str(dense_dir), "--criterion", "flap", "--compensate", "--calib"]
    argv += [str(calib), "--nsamples", "4", "--seqlen", "32", "--out", dirs["flap-cli"]]
    assert prune_main([*argv, "--quiet"]) == 0
    configs["flap-cli"] = json.loads(Path(dirs["flap-cli"], "config.json").read_text())
    expected["flap-cli"] = logits_and_greedy(load_pruned(dirs["flap-cli"]))
    spec = root / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "dirs": dirs,
                "ids": IDS.tolist(),
                "new_tokens": NEW_TOKENS,
                "lm_eval": "llama-gqa-per-layer",
                "request": REQUEST,
            }
        )
    )
    out = root / "out.safetensors"
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, str(LOADER), str(spec), str(out)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = load_file(out)
    results = {
        case: (expected[case], (got[f"{case}.logits"], got[f"{case}.greedy"]), configs[case])
        for case in dirs
    }
    reference = continuation_loglikelihood(
        models["llama-gqa-per-layer"], tiny_tokenizer(), *REQUEST
    )
    results["lm_eval"] = (reference, float(got["lm_eval.loglikelihood"]))
    return results


@pytest.mark.parametrize("case", [*CASES, "flap-cli"])
def test_pruned_output_loads_without_minillm_with_the_same_logits(loaded, case):
    (logits, greedy), (got_logits, got_greedy), config = loaded[case]
    assert config["model_type"] == PRUNED_MODEL_TYPE
    assert config["auto_map"]["AutoModelForCausalLM"].startswith(Path(MODELING_FILE).stem)
    torch.testing.assert_close(got_logits, logits, atol=1e-4, rtol=0)
    assert torch.equal(got_greedy, greedy)


def test_compensation_biases_are_recorded_and_reloaded(loaded):
    *_, config = loaded["llama-gqa-per-layer"]
    assert config["minillm"]["biases"] == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert len(loaded["flap-cli"][2]["minillm"]["biases"]) > 0


def test_plain_output_also_loads_with_trust_remote_code(loaded):
    (logits, greedy), (got_logits, got_greedy), config = loaded["llama-plain"]
    assert config["model_type"] == "llama" and "auto_map" not in config
    torch.testing.assert_close(got_logits, logits, atol=1e-4, rtol=0)
    assert torch.equal(got_greedy, greedy)


def test_lm_eval_hflm_scores_the_pruned_directory(loaded):
    reference, got = loaded["lm_eval"]
    assert got == pytest.approx(reference, abs=1e-4)


def test_load_pruned_still_rebuilds_remote_code_outputs(tmp_path):
    model = pruned_model("bloom-per-layer")
    save_pruned(model, None, tmp_path)
    assert (tmp_path / MODELING_FILE).is_file()
    torch.testing.assert_close(
        logits_and_greedy(load_pruned(tmp_path))[0], logits_and_greedy(model)[0]
    )


def test_stock_transformers_refuses_without_trust_remote_code(tmp_path):
    save_pruned(pruned_model("opt-uniform"), None, tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False)

"""The Python API prunes a model in memory exactly as the command does; the command has one
entry point (``minillm prune`` = ``python -m minillm.prune``); outputs carry a model card."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, make_tiny_model, random_text, tiny_tokenizer
from transformers import AutoModelForCausalLM

import minillm
from minillm.cli import main as minillm_main
from minillm.data import calibration_batches
from minillm.model import shards

CALIB = ["--nsamples", "6", "--seqlen", "16", "--layers", "0-2", "--eval-text", "none"]


def _cli_prune(model_dir: Path, calib_file: Path, out: Path, *extra: str) -> dict:
    argv = ["prune", str(model_dir), "--calib", str(calib_file), *CALIB, *extra]
    assert minillm_main([*argv, "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("family", [*FAMILIES, "gemma3"])
def test_api_model_equals_the_command_model(family, tmp_path, calib_file):
    model_dir = tmp_path / "dense"
    make_tiny_model(family).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    report = _cli_prune(model_dir, calib_file, tmp_path / "cli")
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # as the command loads it
    tokenizer = tiny_tokenizer()
    tokens = calibration_batches(str(calib_file), tokenizer, 6, 16, 0)
    pruned, api_report = minillm.prune_model(
        model, tokenizer, calibration=tokens, layers="0-2", nsamples=6, seqlen=16
    )
    assert pruned is model and api_report["layers"] == report["layers"]
    assert api_report["params_after"] == report["params_after"] < report["params_before"]
    ref = shards.load_sharded(tmp_path / "cli")
    got = {k: v for k, v in model.state_dict().items() if k in ref}
    assert got.keys() == ref.keys()
    for name, t in ref.items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=0, msg=name)


def test_api_takes_text_and_saves_a_loadable_model_with_its_card(tmp_path):
    model, tokenizer = make_tiny_model("llama-gqa"), tiny_tokenizer()
    texts = [random_text(600, seed) for seed in range(4)]
    model, report = minillm.prune_model(
        model, tokenizer, ratio=0.5, calibration=texts, nsamples=8, seqlen=16, allocation="uniform"
    )
    assert report["pruned_layers"] == [0, 1, 2]  # uniform: every layer, the same sizes
    assert len({(r["heads"], r["channels"]) for r in report["layers"]}) == 1
    config = minillm.save_pruned(model, tokenizer, tmp_path / "out", report)
    assert "auto_map" not in config  # refit biases in a plain LLaMA config
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        expected = model(ids).logits
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        torch.testing.assert_close(stock(ids).logits, expected)
        torch.testing.assert_close(minillm.load_pruned(tmp_path / "out")(ids).logits, expected)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "criterion: `flap`" in card and "`--ratio 0.5`" in card
    assert 'AutoModelForCausalLM.from_pretrained("DIR")' in card


def test_api_names_an_unknown_option_or_a_bad_value():
    model = make_tiny_model("llama-gqa")
    with pytest.raises(ValueError, match="unknown options ratios"):
        minillm.prune_model(model, tiny_tokenizer(), ratios=0.2)
    with pytest.raises(ValueError, match="--criterion: 'flop' is not one of flap"):
        minillm.prune_model(model, tiny_tokenizer(), criterion="flop")
    with pytest.raises(ValueError, match="--ratio: 1.5 is out of range"):
        minillm.prune_model(model, tiny_tokenizer(), ratio=1.5)


@pytest.mark.parametrize("family", ["llama-gqa"])
def test_uniform_default_output_loads_in_stock_transformers(tiny_model_dir, calib_file, tmp_path):
    # half the query heads of each KV group: 4 heads, which divide the width (transformers
    # insists); the default criterion and refit
    report = _cli_prune(tiny_model_dir, calib_file, tmp_path / "out", "--uniform", "--ratio", "0.5")
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert report["loading"] == "transformers" and config["model_type"] == "llama"
    assert config["attention_bias"] is True and config["mlp_bias"] is True  # the refit's biases
    assert not (out / "modeling_minillm.py").exists()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        stock = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code
        torch.testing.assert_close(stock(ids).logits, minillm.load_pruned(out)(ids).logits)
    assert 'AutoModelForCausalLM.from_pretrained("DIR")' in (out / "README.md").read_text()


@pytest.mark.parametrize("family", ["opt"])
def test_console_script_and_module_give_the_same_model(tiny_model_dir, calib_file, tmp_path):
    script = shutil.which("minillm", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the minillm console script is not installed (pip install -e .)")
    args = [str(tiny_model_dir), "--calib", str(calib_file), *CALIB, "--quiet"]
    subprocess.run([script, "prune", *args, "--out", str(tmp_path / "a")], check=True)
    module = [sys.executable, "-m", "minillm.prune"]
    subprocess.run([*module, *args, "--out", str(tmp_path / "b")], check=True)
    a, b = shards.load_sharded(tmp_path / "a"), shards.load_sharded(tmp_path / "b")
    assert a.keys() == b.keys()
    for name, t in a.items():
        torch.testing.assert_close(b[name], t, rtol=0, atol=0, msg=name)


def test_unknown_command_is_one_line(capsys):
    assert minillm_main(["shrink"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "minillm: error: unknown command 'shrink'; choose from prune, eval, recover, export"
    )

"""The prune CLI end to end on tiny models, and its refusals of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import make_tiny_model, tiny_tokenizer

from minillm.prune import main
from minillm.scoring.allocation import parse_layers


def run_cli(*args: str) -> int:
    """The exit status of the prune command (argparse's rejections exit with 2)."""
    try:
        return main([*map(str, args), "--quiet"])
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("family", ["llama-gqa", "bloom"])
def test_cli_prunes_and_result_reloads_in_a_fresh_process(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    rc = run_cli(
        tiny_model_dir,
        "--criterion",
        "magnitude",
        "--ratio",
        "0.3",
        "--layers",
        "0-2",
        "--out",
        out,
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert "params" in capsys.readouterr().out
    for key in ("load", "score", "prune", "save", "total"):
        assert report["time_s"][key] >= 0 and report["peak_memory_bytes"][key] > 0
    code = (
        "import sys, minillm, torch\n"
        f"m = minillm.load_pruned({str(out)!r})\n"
        "out = m.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False)\n"
        "print(sum(p.numel() for p in m.parameters()), out.shape[1])\n"
    )
    printed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert printed == [str(report["params_after"]), "7"]


@pytest.mark.parametrize("family", ["llama-gqa"])
def test_cli_ratio_removes_that_fraction_of_prunable_parameters(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    assert (
        run_cli(
            tiny_model_dir,
            "--criterion",
            "random",
            "--no-reconstruct",  # the refit adds a bias to down_proj
            "--ratio",
            "0.5",
            "--uniform",
            "--target",
            "channels",
            "--layers",
            "0-2",
            "--out",
            out,
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    removed = report["params_before"] - report["params_after"]
    assert removed == 3 * 48 * 3 * 64  # 48 of 96 channels, 3 matrices of width 64, 3 layers


def test_default_layers_leave_first_and_last_dense():
    assert parse_layers(None, 32) == list(range(4, 30))
    assert parse_layers(None, 30) == list(range(3, 28))
    assert parse_layers("3-5", 30) == [3, 4, 5]
    assert parse_layers(None, 3) == [1]
    with pytest.raises(ValueError, match="--layers: .*2-layer model.*0-1"):
        parse_layers(None, 2)
    with pytest.raises(ValueError, match="--layers"):
        parse_layers("3-40", 30)


@pytest.mark.parametrize("ratio", ["0", "1", "-0.2", "1.5"])
@pytest.mark.parametrize("family", ["llama-mha"])
def test_ratio_out_of_range_is_refused(tiny_model_dir, tmp_path, capsys, ratio):
    out = tmp_path / "out"
    assert run_cli(tiny_model_dir, "--ratio", ratio, "--out", out) == 2
    assert "--ratio" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("family", ["llama-mha"])
def test_non_empty_output_directory_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert run_cli(tiny_model_dir, "--criterion", "magnitude", "--out", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("family", ["llama-mha"])
def test_missing_gguf_file_is_named(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_cli(tiny_model_dir, "--gguf-file", "missing.gguf", "--out", out)
    assert rc == 2
    assert "--gguf-file: no such file" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_architecture_is_refused(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128)).save_pretrained(
        model_dir
    )
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    assert run_cli(model_dir, "--criterion", "magnitude", "--out", out) == 2
    assert "unsupported architecture 'gpt2'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("flag", "value"), [("--dtype", "int8"), ("--calib", "no/such/file.txt")])
def test_bad_dtype_and_missing_calibration_file_are_named(tmp_path, capsys, flag, value):
    model_dir = tmp_path / "m"
    make_tiny_model("llama-mha").save_pretrained(model_dir)
    out = tmp_path / "out"
    assert run_cli(model_dir, flag, value, "--out", out) == 2
    assert flag in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
@pytest.mark.parametrize("criterion", ["wanda-sp", "flap", "taylor", "fms"])
def test_every_data_criterion_prunes_from_a_calibration_file(
    tiny_model_dir, calib_file, tmp_path, criterion
):
    out = tmp_path / "pruned"
    extra = ["--compensate"] if criterion == "flap" else []
    rc = run_cli(
        tiny_model_dir,
        "--criterion",
        criterion,
        "--calib",
        calib_file,
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--layers",
        "0-2",
        "--ratio",
        "0.3",
        "--out",
        out,
        *extra,
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["forward_passes"] > 0 and report["tokens_forwarded"] >= 4 * 16
    assert report["params_after"] < report["params_before"]
    import minillm

    reloaded = minillm.load_pruned(out)
    assert sum(p.numel() for p in reloaded.parameters()) == report["params_after"]


@pytest.mark.parametrize("family", ["llama-gqa", "bloom"])
def test_reconstruct_output_reloads_with_refit_biases(tiny_model_dir, calib_file, tmp_path):
    """--reconstruct saves refit consumers (with a bias, created where the family has none) that
    reload and differ from the plain prune of the same kept units."""
    import torch

    import minillm
    from minillm.model.adapters import adapter_for

    out = tmp_path / "pruned"
    args = [tiny_model_dir, "--criterion", "wanda-sp", "--calib", calib_file]
    args += ["--nsamples", "6", "--seqlen", "16", "--layers", "1-2", "--ratio", "0.3"]
    args += ["--allocation", "global"]  # the same kept units with and without the refit
    assert run_cli(*args, "--reconstruct", "--out", out) == 0
    model = minillm.load_pruned(out)
    adapter = adapter_for(model)
    for layer in (1, 2):
        groups = adapter.groups(model, layer)
        assert all(g.consumers[0].linear.bias is not None for g in groups.values())
    masked = tmp_path / "masked"
    assert run_cli(*args, "--no-reconstruct", "--out", masked) == 0
    plain = minillm.load_pruned(masked)
    # LLaMA gains o_proj and down_proj biases in layers 1 and 2; BLOOM has them already
    added = 0 if plain.config.model_type == "bloom" else 4 * model.config.hidden_size
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for p in plain.parameters()) + added
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, plain(ids).logits)


@pytest.mark.parametrize("family", ["llama-gqa"])
def test_compensate_with_reconstruct_is_refused(tiny_model_dir, tmp_path, capsys):
    rc = run_cli(tiny_model_dir, "--reconstruct", "--compensate", "--out", tmp_path / "o")
    assert rc == 2
    assert "--compensate" in capsys.readouterr().err

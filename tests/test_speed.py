"""``minillm.eval --speed``: batch 1 and 16, and the dense reference timed beside the model."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_model

from minillm.eval import main as eval_main
from minillm.prune import main as prune_main

KEYS = {f"{p}_tokens_per_s_b{b}" for p in ("prefill", "decode") for b in (1, 16)}


@pytest.mark.parametrize("family", ["llama-gqa"])
def test_speed_reference_is_the_recorded_base_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    argv = [str(tiny_model_dir), "--criterion", "magnitude", "--ratio", "0.5"]
    assert prune_main([*argv, "--layers", "0-2", "--out", str(out), "--quiet"]) == 0
    res_file = tmp_path / "res.json"
    argv = [str(out), "--speed", "--speed-reference", "--speed-tokens", "8,4", "--quiet"]
    argv += ["--out", str(res_file)]
    assert eval_main(argv) == 0
    res = json.loads(res_file.read_text())
    dense = make_tiny_model("llama-gqa")
    dense_bytes = 4 * sum(t.numel() for t in [*dense.parameters(), *dense.buffers()])
    assert res["speed_reference"]["param_bytes"] == dense_bytes
    assert res["speed"]["param_bytes"] < dense_bytes
    assert KEYS <= res["speed"].keys() and KEYS <= res["speed_reference"].keys()
    for key in KEYS:
        assert res["speed_ratio"][key] == pytest.approx(
            res["speed"][key] / res["speed_reference"][key]
        )
    assert "speed_ratio" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["llama-gqa"])
def test_speed_reference_needs_speed_and_a_report(tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        eval_main([str(tiny_model_dir), "--speed-reference"])
    assert "--speed-reference: needs --speed" in capsys.readouterr().err
    assert eval_main([str(tiny_model_dir), "--speed", "--speed-reference", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no report.json naming its base model" in err and "\n" not in err
    with pytest.raises(SystemExit):
        eval_main([str(tiny_model_dir), "--speed", "--speed-tokens", "128"])
    assert "--speed-tokens: '128' is not PROMPT,NEW" in capsys.readouterr().err

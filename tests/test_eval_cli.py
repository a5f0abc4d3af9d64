"""``python -m minillm.eval`` end to end on a tiny saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _tiny_lm import byte_tokenizer, pruned_tiny, tiny_model

from minillm.eval import main
from minillm.evaluation.perplexity import perplexity_stats
from minillm.model.io import save_pruned

TASK_DATA = Path(__file__).parent / "data" / "zeroshot"
TEXT = "The cat sat on the mat. A dog ran in the park. " * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_eval_json_has_metrics_as_keys_and_matches_library_perplexity(model_dir, tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "test.txt").write_text(TEXT, encoding="utf-8")
    out = tmp_path / "res.json"
    argv = [
        str(model_dir),
        "--text",
        str(tmp_path / "corpus"),
        "--seqlen",
        "64",
        "--max-tokens",
        "500",
        "--tasks",
        "piqa,arc_easy",
        "--task-data-dir",
        str(TASK_DATA),
        "--generate",
        "--max-new-tokens",
        "4",
        "--speed",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    tokenizer = byte_tokenizer()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    expected = perplexity_stats(tiny_model("llama"), ids, 64, max_tokens=500)
    assert res["ppl"]["corpus"] == pytest.approx(expected.ppl, rel=1e-5)
    assert res["ppl_tokens"]["corpus"] == expected.predicted_tokens == 7 * 63
    assert set(res["acc"]) == {"piqa", "arc_easy"}
    assert set(res["acc_norm"]) == {"piqa", "arc_easy"}
    assert len(res["generation"]) == 3
    assert res["speed"]["param_bytes"] > 0 and res["speed"]["decode_tokens_per_s_b16"] > 0
    table = capsys.readouterr().out
    assert "ppl" in table and "corpus" in table and "piqa" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "piqa,lambada"], "--tasks: unknown task(s) lambada; valid: boolq, piqa"),
        (["--text", "nope.txt"], "--text: no such file or directory 'nope.txt' (or one of c4"),
        (["--text", "imagenet"], "--text: no such file or directory 'imagenet' (or one of c4"),
        (["--seqlen", "0"], "--seqlen: must be >= 1"),
    ],
)
def test_bad_flags_exit_with_one_line_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err


def test_missing_task_file_is_a_one_line_error(model_dir, tmp_path, capsys):
    argv = [str(model_dir), "--tasks", "boolq", "--task-data-dir", str(tmp_path), "--quiet"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("no data for task boolq; expected boolq.jsonl or boolq/validation.jsonl")


def test_eval_loads_non_uniform_pruned_model(tmp_path):
    model = pruned_tiny("llama")
    save_pruned(model, byte_tokenizer(), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "minillm_pruned"
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "res.json"
    argv = [str(tmp_path), "--text", str(text), "--seqlen", "64", "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    ids = byte_tokenizer()(TEXT, return_tensors="pt").input_ids
    expected = perplexity_stats(model, ids, 64).ppl
    assert json.loads(out.read_text())["ppl"]["text"] == pytest.approx(expected, rel=1e-5)

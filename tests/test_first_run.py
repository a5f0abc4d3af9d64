"""What the first run shows: perplexity on the shipped held-out text, a greedy sample before
and after, the removed fractions spelled out, and silence under --quiet."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model, tiny_tokenizer

import minillm
from minillm.config import HELDOUT_TEXT, PROMPT
from minillm.eval import main as eval_main
from minillm.prune import main
from minillm.run import PROMPT_TOKENS

TASK_DATA = Path(__file__).parent / "data" / "zeroshot"


def windowed_ppl(model, ids: torch.Tensor, seqlen: int) -> float:
    """Independent reference: exp of the mean NLL over non-overlapping windows."""
    windows = ids[: ids.numel() // seqlen * seqlen].view(-1, seqlen)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    return math.exp(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item())


def greedy(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=PROMPT_TOKENS, pad_token_id=2)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """Prune tiny llama-gqa with the defaults a first run gets; (report, stdout, out dir)."""
    tmp_path = tmp_path_factory.mktemp("first-run")
    dense_dir = tmp_path / "dense"
    make_tiny_model("llama-gqa").save_pretrained(dense_dir)
    tiny_tokenizer().save_pretrained(dense_dir)
    out = tmp_path / "pruned"
    argv = [str(dense_dir), "--criterion", "magnitude", "--ratio", "0.4"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*argv, "--layers", "0-2", "--prompt", "w5 w9 w1", "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text()), stdout.getvalue(), out


def test_heldout_text_is_shipped_with_its_license():
    assert HELDOUT_TEXT.is_file() and 8_000 < HELDOUT_TEXT.stat().st_size < 40_000
    sources = (HELDOUT_TEXT.parent / "SOURCES.md").read_text()
    assert HELDOUT_TEXT.name in sources and "CC BY-SA 3.0" in sources
    assert Path(minillm.__file__).parent in HELDOUT_TEXT.parents


def test_perplexity_before_after_on_the_shipped_text(pruned):
    report, stdout, out = pruned
    tokenizer = tiny_tokenizer()
    ids = tokenizer(HELDOUT_TEXT.read_text(), return_tensors="pt").input_ids[0]
    dense = make_tiny_model("llama-gqa")  # windows of 512 cut to its 128 positions
    assert report["ppl_before"] == pytest.approx(windowed_ppl(dense, ids, 128), rel=1e-4)
    after = minillm.load_pruned(out)
    assert report["ppl_after"] == pytest.approx(windowed_ppl(after, ids, 128), rel=1e-4)
    assert f"perplexity {report['ppl_before']:.2f} -> {report['ppl_after']:.2f}" in stdout


def test_greedy_sample_before_and_after(pruned):
    report, stdout, out = pruned
    tokenizer = tiny_tokenizer()
    sample = report["generation"]
    assert sample["before"] == greedy(make_tiny_model("llama-gqa"), tokenizer, "w5 w9 w1")
    assert sample["after"] == greedy(minillm.load_pruned(out), tokenizer, "w5 w9 w1")
    assert repr(sample["before"]) in stdout and repr(sample["after"]) in stdout


def test_summary_states_both_removed_fractions(pruned):
    report, stdout, _ = pruned
    # per layer: 8 query heads x (16 q rows + 16 o columns) x 64, 96 channels x 3 x 64
    prunable = 3 * (8 * 2 * 16 * 64 + 96 * 3 * 64)
    assert report["prunable_params"] == prunable
    removed = sum(
        (8 - r["heads"]) * 2 * 16 * 64 + (96 - r["channels"]) * 3 * 64 for r in report["layers"][:3]
    )
    assert report["prunable_params_removed"] == removed
    assert f"{100 * removed / prunable:.1f}% of the prunable parameters of layers 0-2" in stdout
    # the whole model's count is net: the refit adds o_proj/down_proj biases (64 per layer)
    assert report["params_before"] - report["params_after"] == removed - 3 * 2 * 64
    whole = 100 * (1 - report["params_after"] / report["params_before"])
    assert f"{whole:.1f}% of the whole model" in stdout


def test_eval_text_and_prompt_can_be_skipped(tmp_path, capsys):
    dense_dir = tmp_path / "dense"
    make_tiny_model("opt").save_pretrained(dense_dir)
    tiny_tokenizer().save_pretrained(dense_dir)
    argv = [str(dense_dir), "--criterion", "magnitude", "--eval-text", "none"]
    assert main([*argv, "--prompt", "", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["ppl_before"] is None and report["generation"] is None
    assert "perplexity" not in capsys.readouterr().out


def test_default_prompt_is_fixed():
    assert PROMPT == "The capital of France is" and PROMPT_TOKENS == 16


def test_quiet_prints_no_progress_bar(tmp_path, capfd):
    """lm-eval's own bars included: stderr (fd 2 too) of both CLIs stays empty under --quiet."""
    dense_dir = tmp_path / "dense"
    make_tiny_model("llama-gqa").save_pretrained(dense_dir)
    tiny_tokenizer().save_pretrained(dense_dir)
    capfd.readouterr()
    argv = [str(dense_dir), "--tasks", "piqa,arc_easy", "--limit", "4", "--quiet"]
    assert eval_main([*argv, "--task-data-dir", str(TASK_DATA)]) == 0
    out, err = capfd.readouterr()
    assert err == "" and "piqa" in out
    argv = [str(dense_dir), "--criterion", "magnitude", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0
    out, err = capfd.readouterr()
    assert err == "" and "perplexity" in out

"""Perplexity protocol against an independent per-token computation."""

from __future__ import annotations

import math

import pytest
import torch
from _tiny_lm import byte_tokenizer, tiny_model

from minillm.evaluation.perplexity import (
    load_eval_text,
    perplexity,
    perplexity_stats,
    tokenize_text,
)


def reference_ppl(model, ids: torch.Tensor, seqlen: int) -> float:
    """Window by window, token by token: -log softmax(logits)[next token], averaged, exp."""
    ids = ids.reshape(-1)
    total, count = 0.0, 0
    for start in range(0, ids.numel() - seqlen + 1, seqlen):
        window = ids[start : start + seqlen]
        with torch.no_grad():
            logits = model(window[None]).logits[0].double()
        for pos in range(seqlen - 1):
            logp = logits[pos] - torch.logsumexp(logits[pos], dim=0)
            total -= logp[window[pos + 1]].item()
            count += 1
    return math.exp(total / count)


@pytest.mark.parametrize("family", ["llama", "opt", "bloom"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_equals_per_token_reference(family, batch_size):
    model = tiny_model(family)
    ids = torch.randint(1, 257, (1, 101), generator=torch.Generator().manual_seed(1))
    got = perplexity(model, ids, seqlen=16, batch_size=batch_size)
    # 101 tokens -> 6 windows of 16, remainder of 5 dropped
    assert got == pytest.approx(reference_ppl(model, ids[:, :96], 16), rel=1e-5)


def test_max_tokens_caps_the_stream_and_counts_are_reported():
    model = tiny_model("llama")
    ids = torch.randint(1, 257, (200,), generator=torch.Generator().manual_seed(2))
    stats = perplexity_stats(model, ids, seqlen=20, max_tokens=70)
    assert (stats.windows, stats.seqlen, stats.predicted_tokens) == (3, 20, 57)
    assert stats.ppl == pytest.approx(reference_ppl(model, ids[:60], 20), rel=1e-5)


def test_stream_shorter_than_seqlen_is_one_window():
    model = tiny_model("llama")
    ids = torch.randint(1, 257, (1, 12), generator=torch.Generator().manual_seed(3))
    stats = perplexity_stats(model, ids, seqlen=2048)
    assert (stats.windows, stats.seqlen) == (1, 12)
    assert stats.ppl == pytest.approx(reference_ppl(model, ids, 12), rel=1e-5)


def test_tokenize_text_with_max_tokens_is_a_prefix_of_full_tokenization():
    tok = byte_tokenizer()
    text = "The quick brown fox. " * 50
    full = tokenize_text(tok, text)
    capped = tokenize_text(tok, text, max_tokens=100)
    assert capped.shape == (1, 100)
    assert torch.equal(capped, full[:, :100])


def test_load_eval_text_reads_files_and_directories(tmp_path):
    (tmp_path / "test.txt").write_text("test split\n", encoding="utf-8")
    (tmp_path / "valid.txt").write_text("valid split\n", encoding="utf-8")
    assert load_eval_text(tmp_path) == "test split\n"
    assert load_eval_text(tmp_path, split="valid") == "valid split\n"
    assert load_eval_text(tmp_path / "valid.txt") == "valid split\n"


def test_load_eval_text_errors_name_what_is_valid(tmp_path):
    with pytest.raises(FileNotFoundError, match="wikitext2"):
        load_eval_text(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="test.txt"):
        load_eval_text(tmp_path)

"""Self-written text (``minillm.data.self_generated``): top-k sampling on the KV cache."""

from __future__ import annotations

import pytest
import torch
from _tiny_lm import byte_tokenizer, tiny_model

import minillm.data as data
from minillm.data import SELF_TOP_K, self_generated
from minillm.recovery.loss import teacher_topk


def _reference(
    model, tokenizer, nsamples: int, seqlen: int, seed: int, top_k: int | None = SELF_TOP_K
) -> torch.Tensor:
    """The same sampling without a KV cache: every step recomputes the whole prefix."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(0, len(tokenizer), (nsamples, 1), generator=gen)
    prompt = torch.cat([torch.full_like(first, tokenizer.bos_token_id), first], 1)
    rows = []
    for ids in prompt.split(3):
        while ids.shape[1] < seqlen:
            with torch.no_grad():
                logits = model(input_ids=ids).logits[:, -1]
            logits[:, tokenizer.eos_token_id] = -torch.inf
            if top_k is None:  # inverse CDF of the whole softmax at one uniform per row
                cdf = logits.softmax(-1).cumsum(-1)
                u = torch.rand(len(ids), 1, generator=gen) * cdf[:, -1:]
                ids = torch.cat([ids, (cdf <= u).sum(-1, keepdim=True)], 1)
                continue
            top = logits.topk(top_k, dim=-1)
            pick = torch.multinomial(top.values.softmax(-1), 1, generator=gen)
            ids = torch.cat([ids, top.indices.gather(-1, pick)], 1)
        rows.append(ids)
    return torch.cat(rows)


@pytest.mark.parametrize("family", ["llama", "opt", "bloom"])
def test_kv_cache_sampling_of_the_whole_distribution_equals_the_whole_prefix(family, monkeypatch):
    monkeypatch.setattr(data, "SELF_BATCH", 3)
    model, tokenizer = tiny_model(family), byte_tokenizer()
    text, _ = self_generated(model, tokenizer, 7, 20, seed=5, top_k=None)
    assert torch.equal(text, _reference(model, tokenizer, 7, 20, seed=5, top_k=None))


def test_whole_distribution_draws_follow_the_softmax_and_never_a_masked_token():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, generator=gen) * 2
    logits[:, 4] = -torch.inf  # as EOS is masked
    draws = torch.cat([data._draw(logits, None, gen) for _ in range(20_000)], 1)
    freq = torch.stack([torch.bincount(row, minlength=10) for row in draws]) / 20_000
    assert (freq[:, 4] == 0).all()
    assert torch.allclose(freq, logits.softmax(-1), atol=0.015)  # 4 sigma at 20k draws


@pytest.mark.parametrize("family", ["llama", "opt", "bloom"])
def test_kv_cache_sampling_equals_sampling_on_the_whole_prefix(family, monkeypatch):
    monkeypatch.setattr(data, "SELF_BATCH", 3)  # 7 sequences: batches of 3, 3 and 1
    model, tokenizer = tiny_model(family), byte_tokenizer()
    text, _ = self_generated(model, tokenizer, 7, 20, seed=5)
    assert torch.equal(text, _reference(model, tokenizer, 7, 20, seed=5))
    # the top-k kept while writing: the same text, and the top-k of one forward over it
    same, (logp, ids) = self_generated(model, tokenizer, 7, 20, 5, keep_topk=6, temperature=2.0)
    with torch.no_grad():
        ref_logp, ref_ids = teacher_topk(model(input_ids=text).logits, 6, 2.0)
    assert torch.equal(same, text) and logp.shape == ids.shape == (7, 20, 6)
    assert torch.allclose(logp[:, :-1], ref_logp[:, :-1], atol=1e-5)
    assert torch.equal(ids[:, :-1], ref_ids[:, :-1])


def test_every_written_token_is_among_the_top_k_and_never_eos():
    model, tokenizer = tiny_model("llama"), byte_tokenizer()
    text, _ = self_generated(model, tokenizer, 16, 40, seed=1)
    assert text.shape == (16, 40) and (text[:, 0] == tokenizer.bos_token_id).all()
    with torch.no_grad():
        logits = model(input_ids=text).logits[:, 1:-1]  # position t predicts t + 1
    logits[..., tokenizer.eos_token_id] = -torch.inf
    written = text[:, 2:]
    allowed = logits.topk(SELF_TOP_K, dim=-1).indices
    assert (allowed == written.unsqueeze(-1)).any(-1).all()
    assert (written != tokenizer.eos_token_id).all()
    assert not torch.equal(text, self_generated(model, tokenizer, 16, 40, seed=2)[0])

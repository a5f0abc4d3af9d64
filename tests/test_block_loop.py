"""The block loop and exact block-by-block gradients against the whole model and full backprop."""

from __future__ import annotations

import pytest
import torch
from _memory import PeakTensorBytes
from conftest import VOCAB, make_tiny_model, tiny_config
from transformers import AutoModelForCausalLM

from minillm.blocks.loop import capture, sweep
from minillm.model.adapters import adapter_for
from minillm.model.lm_loss import chunked_lm_loss, sequence_losses
from minillm.scoring.gradients import weight_gradients
from minillm.scoring.stats import model_input_stats

TOKENS = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(4))


def _tied_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tiny_config("llama-gqa", tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


MODELS = {
    "llama-mha": lambda: make_tiny_model("llama-mha"),
    "llama-gqa": lambda: make_tiny_model("llama-gqa"),
    "llama-tied": _tied_llama,
    "opt": lambda: make_tiny_model("opt"),
    "bloom": lambda: make_tiny_model("bloom"),
    "gemma3": lambda: make_tiny_model("gemma3"),  # per-layer sliding-window / global arguments
}


def _linears(model) -> list[torch.nn.Linear]:
    adapter = adapter_for(model)
    return [
        m
        for block in adapter.layers(model)
        for m in block.modules()
        if isinstance(m, torch.nn.Linear)
    ]


def _full_backprop(model, linears) -> dict:
    """Reference: ``dL/dW`` of the mean per-sequence loss, one backward through the whole model."""
    model.zero_grad()
    sequence_losses(model, TOKENS).mean().backward()
    grads = {lin: lin.weight.grad.clone() for lin in linears}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("name", MODELS)
def test_block_sweep_loss_equals_whole_model(name):
    model = MODELS[name]()
    adapter = adapter_for(model)
    boundary = capture(model, adapter, TOKENS, batch_size=2)
    top = sweep(model, adapter, boundary, range(len(adapter.layers(model))))
    losses = torch.cat(
        [
            chunked_lm_loss(model, adapter.final_norm(model)(h), ids)
            for h, ids in zip(top.hidden, top.tokens, strict=True)
        ]
    )
    with torch.no_grad():
        ref = sequence_losses(model, TOKENS)
    torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spill", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_block_gradients_equal_full_backprop(name, spill):
    model = MODELS[name]()
    linears = _linears(model)
    ref = _full_backprop(model, linears)
    flags = [p.requires_grad for p in model.parameters()]
    grads, passes, _ = weight_gradients(model, linears, TOKENS, batch_size=2, spill=spill)
    assert passes == 2 * 3  # forward sweep + recompute sweep over 3 micro-batches
    for lin in linears:
        torch.testing.assert_close(grads[lin], ref[lin], rtol=1e-4, atol=1e-6)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_block_gradients_stop_at_the_lowest_requested_block():
    model = make_tiny_model("llama-gqa")
    top_block = adapter_for(model).layers(model)[2]
    linears = [top_block.mlp.down_proj, top_block.self_attn.o_proj]
    ref = _full_backprop(model, linears)
    calls = []
    lower = adapter_for(model).layers(model)[1]
    hook = lower.register_full_backward_hook(lambda *a: calls.append(1))
    grads, _, _ = weight_gradients(model, linears, TOKENS, batch_size=5)
    hook.remove()
    assert not calls  # block 1 was never backpropagated
    for lin in linears:
        torch.testing.assert_close(grads[lin], ref[lin], rtol=1e-4, atol=1e-6)


def test_reduce_sees_gradient_and_input_stats_of_the_forward_sweep():
    model = make_tiny_model("opt")
    linears = _linears(model)[:4]
    ref_grads = _full_backprop(model, linears)
    ref_stats, _ = model_input_stats(model, linears, TOKENS, batch_size=5)

    def reduce(lin, grad, stats):
        return (grad.abs() * stats.norm).sum(0)

    sums, _, stats = weight_gradients(model, linears, TOKENS, batch_size=2, reduce=reduce)
    for lin in linears:
        torch.testing.assert_close(stats[lin].sum_sq, ref_stats[lin].sum_sq, rtol=1e-5, atol=1e-6)
        expected = (ref_grads[lin].abs() * ref_stats[lin].norm).sum(0)
        torch.testing.assert_close(sums[lin], expected, rtol=1e-4, atol=1e-6)


def _gradient_working_memory(n_layers: int, spill: bool) -> int:
    torch.manual_seed(0)
    cfg = tiny_config("llama-gqa", num_hidden_layers=n_layers)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    tokens = torch.randint(0, VOCAB, (16, 64), generator=torch.Generator().manual_seed(1))
    with PeakTensorBytes() as meter:
        weight_gradients(
            model, _linears(model), tokens, batch_size=2, spill=spill, reduce=lambda *a: None
        )
    return meter.peak


def test_spilled_block_gradients_memory_does_not_grow_with_depth():
    """Spilled: one micro-batch of a stored boundary is resident, whatever the depth. In memory,
    each extra layer adds a boundary of ``n * seqlen * hidden * 4`` bytes (which shows that the
    meter sees the stored inputs)."""
    boundary = 16 * 64 * 64 * 4
    assert _gradient_working_memory(8, spill=True) <= _gradient_working_memory(2, spill=True) * 1.05
    grown = _gradient_working_memory(8, spill=False) - _gradient_working_memory(2, spill=False)
    assert grown >= 5.5 * boundary


def test_block_gradients_never_hold_a_micro_batch_of_logits():
    """The LM head is backpropagated chunk by chunk: the working memory stays well below one
    micro-batch's logits (``8 * 63 * 32768`` floats here), which autograd would otherwise keep."""
    torch.manual_seed(0)
    vocab = 32768
    model = AutoModelForCausalLM.from_config(
        tiny_config("llama-gqa", vocab_size=vocab), attn_implementation="eager"
    ).eval()
    tokens = torch.randint(0, vocab, (8, 64), generator=torch.Generator().manual_seed(2))
    with PeakTensorBytes() as meter:
        weight_gradients(model, _linears(model), tokens, batch_size=8, reduce=lambda *a: None)
    assert meter.peak < 0.4 * 8 * 63 * vocab * 4

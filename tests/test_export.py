"""GGUF export: metadata and tensors read back with gguf's own reader match the model."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import make_tiny_model, tiny_config
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from minillm.export import main
from minillm.model.adapters import adapter_for
from minillm.model.gguf_export import export_gguf
from minillm.model.io import save_pruned
from minillm.model.surgery import first_units, layer_records, prune_layer

BYTE_TOKENIZER = Path(__file__).parent / "data" / "byte_tokenizer" / "tokenizer.json"
MERGES = [["Ġ", "t"], ["h", "e"]]  # ids 257, 258; llama.cpp's BPE vocabulary needs merges
VOCAB = 260  # one embedding row more than the tokenizer has: a padding token


def bpe_tokenizer(tmp_path: Path) -> PreTrainedTokenizerFast:
    """The byte-level test tokenizer with two merges added."""
    spec = json.loads(BYTE_TOKENIZER.read_text())
    for i, pair in enumerate(MERGES):
        spec["model"]["vocab"]["".join(pair)] = 257 + i
    spec["model"]["merges"] = MERGES
    path = tmp_path / "bpe-tokenizer.json"
    path.write_text(json.dumps(spec))
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), eos_token=eos, bos_token=eos, pad_token=eos
    )


def tiny_llama(family: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_config(family, vocab_size=VOCAB, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.requires_grad_(False).eval()


def prune(model, uniform: bool) -> None:
    """Layer i keeps fewer heads/channels than layer i-1 unless ``uniform``."""
    adapter = adapter_for(model)
    for layer in range(3):
        groups = adapter.groups(model, layer)
        heads, channels = groups["heads"], groups["channels"]
        step = 1 if uniform else layer + 1
        keep_heads = first_units(heads, heads.n_units - heads.partitions * step)
        prune_layer(model, adapter, layer, keep_heads, first_units(channels, 96 - 8 * step))


def saved(model, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    out.mkdir()
    save_pruned(model, bpe_tokenizer(tmp_path), out)
    return out


def fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def hf_to_llamacpp_rows(head_dim: int, n_rows: int) -> list[int]:
    """Row ``r`` of the GGUF q/k weight holds HF row ``result[r]``: per head, element 2i is
    RoPE pair i's first half (HF row i), element 2i + 1 its second half (HF row i + d/2)."""
    rows = []
    for head in range(n_rows // head_dim):
        for i in range(head_dim // 2):
            rows += [head * head_dim + i, head * head_dim + head_dim // 2 + i]
    return rows


@pytest.mark.parametrize(
    ("family", "uniform", "arch"),
    [
        ("llama-mha", True, "llama"),
        ("llama-gqa", True, "llama"),
        ("llama-mha", False, "deci"),
        ("llama-gqa", False, "deci"),
    ],
)
def test_sizes_and_tensors_read_back_equal_the_model(family, uniform, arch, tmp_path):
    model = tiny_llama(family)
    prune(model, uniform)
    out = tmp_path / "m.gguf"
    result = export_gguf(saved(model, tmp_path), out, progress=False)
    reader = gguf.GGUFReader(out)
    meta = fields(reader)
    records = layer_records(model, adapter_for(model))
    head_dim = model.config.head_dim
    assert result["architecture"] == meta["general.architecture"] == arch
    for key, rec_key in [
        ("attention.head_count", "heads"),
        ("attention.head_count_kv", "kv_heads"),
        ("feed_forward_length", "channels"),
    ]:
        expected = [r[rec_key] for r in records]
        assert meta[f"{arch}.{key}"] == (expected[0] if uniform else expected)
    assert meta[f"{arch}.attention.key_length"] == head_dim
    assert meta[f"{arch}.rope.dimension_count"] == head_dim
    assert meta[f"{arch}.embedding_length"] == 64
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    params = dict(model.named_parameters())
    assert len(tensors) == len(params)  # tied lm_head left to llama.cpp
    for layer, rec in enumerate(records):
        attn = model.model.layers[layer].self_attn
        q = tensors[f"blk.{layer}.attn_q.weight"]
        k = tensors[f"blk.{layer}.attn_k.weight"]
        assert q.shape == (rec["heads"] * head_dim, 64)
        assert k.shape == (rec["kv_heads"] * head_dim, 64)
        np.testing.assert_array_equal(q, attn.q_proj.weight[hf_to_llamacpp_rows(head_dim, len(q))])
        np.testing.assert_array_equal(k, attn.k_proj.weight[hf_to_llamacpp_rows(head_dim, len(k))])
        np.testing.assert_array_equal(tensors[f"blk.{layer}.attn_v.weight"], attn.v_proj.weight)
        mlp = model.model.layers[layer].mlp
        np.testing.assert_array_equal(tensors[f"blk.{layer}.ffn_down.weight"], mlp.down_proj.weight)
        assert tensors[f"blk.{layer}.ffn_gate.weight"].shape == (rec["channels"], 64)
    np.testing.assert_array_equal(tensors["token_embd.weight"], model.model.embed_tokens.weight)


def test_tokenizer_is_carried_over(tmp_path):
    model = tiny_llama("llama-gqa")
    out = tmp_path / "m.gguf"
    export_gguf(saved(model, tmp_path), out, progress=False)
    meta = fields(gguf.GGUFReader(out))
    vocab = bpe_tokenizer(tmp_path).get_vocab()
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == VOCAB
    assert all(tokens[i] == tok for tok, i in vocab.items())
    assert tokens[259] == "[PAD259]"
    types = meta["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.CONTROL and types[65] == gguf.TokenType.NORMAL
    assert types[259] == gguf.TokenType.UNUSED
    assert meta["tokenizer.ggml.merges"] == ["Ġ t", "h e"]
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.eos_token_id"] == 0
    assert meta["tokenizer.ggml.add_bos_token"] is False


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_half_and_q8_outtypes_stay_close_to_the_weights(outtype, tmp_path):
    model = tiny_llama("llama-gqa")
    prune(model, uniform=False)  # layer 0 keeps 88 channels: not a multiple of Q8_0's 32
    out = tmp_path / "m.gguf"
    export_gguf(saved(model, tmp_path), out, outtype=outtype, progress=False)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    Q = gguf.GGMLQuantizationType
    expected_up = Q.Q8_0 if outtype == "q8_0" else Q.F16
    assert tensors["blk.0.ffn_up.weight"].tensor_type == expected_up
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.F16  # 88 columns: f16 fallback
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    t = tensors["blk.0.ffn_up.weight"]
    weights = gguf.quants.dequantize(t.data, t.tensor_type).reshape(88, 64)
    reference = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    scale = np.abs(reference).max(axis=1, keepdims=True)
    assert np.abs(weights - reference).max() <= (scale / 127).max() + 1e-3


def test_added_biases_and_linear_rope_are_written(tmp_path):
    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    model = tiny_llama("llama-gqa", rope_parameters=rope, attention_bias=True)
    q_bias = model.model.layers[0].self_attn.q_proj.bias
    torch.nn.init.normal_(q_bias)
    down = model.model.layers[1].mlp.down_proj
    down.bias = torch.nn.Parameter(torch.randn(64))  # as FLAP compensation adds
    out = tmp_path / "m.gguf"
    export_gguf(saved(model, tmp_path), out, progress=False)
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.bias"], down.bias.detach().numpy())
    rows = hf_to_llamacpp_rows(16, 128)
    np.testing.assert_array_equal(tensors["blk.0.attn_q.bias"], q_bias.detach().numpy()[rows])
    np.testing.assert_allclose(tensors["rope_freqs.weight"], np.full(8, 4.0), rtol=1e-6)


def test_unsupported_architecture_is_refused_in_one_line(tmp_path, capsys):
    model = make_tiny_model("opt")
    out = tmp_path / "m.gguf"
    assert main([str(saved(model, tmp_path)), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot export a 'opt' model" in err and "load_pruned" in err
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".m.gguf*")) == []


def test_existing_output_is_refused_unless_overwrite(tmp_path, capsys):
    model_dir = saved(tiny_llama("llama-mha"), tmp_path)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"user data")
    assert main([str(model_dir), "--out", str(out), "--quiet"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"user data"
    assert main([str(model_dir), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert fields(gguf.GGUFReader(out))["general.architecture"] == "llama"


def test_missing_tokenizer_is_refused(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_pruned(tiny_llama("llama-mha"), None, model_dir)
    assert main([str(model_dir), "--out", str(tmp_path / "m.gguf"), "--quiet"]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err


def test_failure_while_writing_leaves_no_file(tmp_path, monkeypatch):
    model_dir = saved(tiny_llama("llama-mha"), tmp_path)

    def killed(self, progress=False):
        self.fout[0].write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", killed)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(model_dir, tmp_path / "m.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe-tokenizer.json", "model"]


def test_the_command_offers_every_outtype_the_writer_has():
    from minillm import export
    from minillm.model import gguf_export

    assert set(export.OUTTYPES) == set(gguf_export.OUTTYPES)

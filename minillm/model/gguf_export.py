"""Export a LLaMA-family model (dense or pruned by minillm) to GGUF for llama.cpp.

The writer behind ``minillm export MODEL --out OUT.gguf [--outtype f32|f16|q8_0]``.

Which llama.cpp graph runs it (llama.cpp as vendored in llama-cpp-python 0.3.36):

* ``llama`` builds every layer with one head count, KV-head count and feed-forward size (those
  of layer 0): used when every layer has the same sizes, so any llama.cpp runtime loads it;
* ``deci`` (DeciLM / Nemotron-NAS) reads ``head_count``, ``head_count_kv`` and
  ``feed_forward_length`` as per-layer arrays and is otherwise the same graph (RMSNorm, RoPE,
  SwiGLU, optional q/k/v/o and MLP biases): used for per-layer sizes.

``attention.key_length`` carries the head dimension explicitly (llama.cpp otherwise derives it
as ``hidden_size / head_count``). q/k rows are permuted per head from Hugging Face's
half-split RoPE layout to llama.cpp's interleaved one. The tokenizer (byte-level BPE) is
carried over from ``DIR/tokenizer.json``. The file is written to a temporary sibling and
renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel

from minillm.model.adapters import adapter_for
from minillm.model.loading import load_model

log = logging.getLogger("minillm.export")

ARCHITECTURES = ("llama", "mistral", "qwen2")
OUTTYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
ROPE_TYPES = ("default", "linear", "llama3")  # inv_freq rescaled per frequency only
T = gguf.MODEL_TENSOR
LAYER_TENSORS = {
    "input_layernorm": T.ATTN_NORM,
    "self_attn.q_proj": T.ATTN_Q,
    "self_attn.k_proj": T.ATTN_K,
    "self_attn.v_proj": T.ATTN_V,
    "self_attn.o_proj": T.ATTN_OUT,
    "post_attention_layernorm": T.FFN_NORM,
    "mlp.gate_proj": T.FFN_GATE,
    "mlp.up_proj": T.FFN_UP,
    "mlp.down_proj": T.FFN_DOWN,
}
MODEL_TENSORS = {
    "model.embed_tokens": T.TOKEN_EMBD,
    "model.norm": T.OUTPUT_NORM,
    "lm_head": T.OUTPUT,
}
# tokenizer.json pre-tokenizers we can name in llama.cpp's terms (tokenizer.ggml.pre)
_DIGITS = {"type": "Digits", "individual_digits": True}
_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name of a Hugging Face LLaMA parameter; ValueError if it has none."""
    module, _, leaf = hf_name.rpartition(".")
    parts = module.split(".")
    if module in MODEL_TENSORS:
        return f"{gguf.TENSOR_NAMES[MODEL_TENSORS[module]]}.{leaf}"
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in LAYER_TENSORS:
        kind = LAYER_TENSORS[".".join(parts[3:])]
        return f"{gguf.TENSOR_NAMES[kind].format(bid=int(parts[2]))}.{leaf}"
    raise ValueError(
        f"--gguf: '{hf_name}' has no place in llama.cpp's llama graph; this model cannot be "
        "exported (use the safetensors output with minillm.load_pruned instead)"
    )


def rope_to_interleaved(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of q/k ([heads * head_dim, ...] or bias [heads * head_dim]) from Hugging Face's
    rotate-half order (x0..x_{d/2-1}, y0..) to llama.cpp's pairs (x0, y0, x1, y1, ...)."""
    shape = t.shape
    t = t.reshape(-1, 2, head_dim // 2, *shape[1:])
    return t.transpose(1, 2).reshape(shape)


def layer_sizes(model: PreTrainedModel) -> list[dict]:
    """Per decoder layer ``{"heads", "kv_heads", "channels"}``."""
    adapter = adapter_for(model)
    return [adapter.layer_sizes(model, i) for i in range(len(adapter.layers(model)))]


def check_architecture(model_dir: Path) -> None:
    """ValueError unless ``model_dir/config.json`` is a LLaMA-family model (before loading it)."""
    config = json.loads((model_dir / "config.json").read_text())
    extra = config.get("minillm", {})
    model_type = extra.get("base_model_type") or extra.get("base_config", config).get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"--gguf: cannot export a '{model_type}' model: llama.cpp runs pruned models of the "
            f"LLaMA family only ({', '.join(ARCHITECTURES)}); load this output with "
            "minillm.load_pruned or transformers instead"
        )


def check_exportable(model: PreTrainedModel) -> list[dict]:
    """Per-layer sizes; ValueError (one line, naming the remedy) for what llama.cpp's graphs
    cannot run."""
    sizes = layer_sizes(model)
    if model.config.hidden_act != "silu":
        raise ValueError(
            f"--gguf: hidden_act '{model.config.hidden_act}' is not the SwiGLU llama.cpp's llama "
            "graph computes; load this output with minillm.load_pruned instead"
        )
    for i, s in enumerate(sizes):
        if min(s["heads"], s["kv_heads"], s["channels"]) == 0:
            raise ValueError(
                f"--gguf: layer {i} has no heads or no channels left ({s}); llama.cpp's graphs "
                "need both: prune with a lower --ratio or a narrower --layers range"
            )
    rope = model.model.rotary_emb
    if rope.rope_type not in ROPE_TYPES or float(rope.attention_scaling) != 1.0:
        raise ValueError(
            f"--gguf: RoPE type '{rope.rope_type}' is not exported (supported: "
            f"{', '.join(ROPE_TYPES)}); load this output with minillm.load_pruned instead"
        )
    return sizes


def rope_theta(config) -> float:
    """RoPE base: ``rope_parameters`` (transformers >= 5) or ``rope_theta`` (4.x)."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rope_factors(model: PreTrainedModel, head_dim: int) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs`` ([head_dim / 2]: each frequency is divided by its factor),
    or None when the model uses plain RoPE."""
    theta = rope_theta(model.config)
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = plain / model.model.rotary_emb.inv_freq.double().cpu()
    return None if torch.allclose(factors, torch.ones_like(factors)) else factors.float()


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE ``tokenizer.json``."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    steps = [{k: s.get(k) for k in ("type", "individual_digits", "use_regex")} for s in steps]
    steps = [{k: v for k, v in s.items() if v is not None} for s in steps]
    if steps == [_BYTE_LEVEL]:
        return "gpt-2"
    if steps == [_DIGITS, _BYTE_LEVEL]:
        return "smollm"
    raise ValueError(
        "--tokenizer-pre: this tokenizer's pre-tokenizer is not one minillm can name for "
        "llama.cpp; pass --tokenizer-pre NAME (llama.cpp's name for it, e.g. llama-bpe, qwen2)"
    )


def add_tokenizer(
    writer: gguf.GGUFWriter, model_dir: Path, tokenizer, n_vocab: int, pre: str | None
) -> None:
    """Write ``tokenizer.ggml.*`` from ``model_dir/tokenizer.json`` (byte-level BPE only)."""
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if spec["model"]["type"] != "BPE" or spec["model"].get("byte_fallback"):
        raise ValueError(
            f"--gguf: tokenizer model '{spec['model']['type']}' is not exported (byte-level BPE "
            "only); convert the dense model with llama.cpp's convert_hf_to_gguf.py instead"
        )
    if not spec["model"].get("merges"):
        raise ValueError(
            "--gguf: the tokenizer has no BPE merges; llama.cpp's BPE vocabulary needs them"
        )
    by_id = {i: tok for tok, i in spec["model"]["vocab"].items()}
    types = dict.fromkeys(by_id, gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        special = added["special"]
        types[added["id"]] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    if max(by_id) >= n_vocab:
        raise ValueError(
            f"--gguf: the tokenizer has id {max(by_id)} but the embedding only {n_vocab} rows"
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    token_types = [types.get(i, gguf.TokenType.UNUSED) for i in range(n_vocab)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(
        tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    )


def tensor_data(
    t: torch.Tensor, outtype: str
) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """(array, raw dtype) of one tensor; norms, biases and RoPE factors stay float32."""
    data = t.detach().float().cpu().numpy()
    if outtype == "f32" or data.ndim == 1:
        return data, None
    q8 = gguf.GGMLQuantizationType.Q8_0
    if outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[q8][0] == 0:
        return gguf.quants.quantize(data, q8), q8
    return data.astype(np.float16), None  # f16, or q8_0 rows not a multiple of 32


def add_hparams(writer: gguf.GGUFWriter, model: PreTrainedModel, sizes: list[dict]) -> None:
    """Model hyper-parameters; per-layer arrays when the layers differ (``deci``)."""
    config = model.config
    head_dim = model.model.layers[0].self_attn.head_dim
    per_layer = writer.arch == "deci"
    pick = (lambda key: [s[key] for s in sizes]) if per_layer else (lambda key: sizes[0][key])
    context = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < context:
        log.info("sliding window %d: context length capped to it (llama graph has none)", window)
        context = window  # within the window, full attention is sliding-window attention
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(sizes))
    writer.add_feed_forward_length(pick("channels"))
    writer.add_head_count(pick("heads"))
    writer.add_head_count_kv(pick("kv_heads"))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])


def add_tensors(writer: gguf.GGUFWriter, model: PreTrainedModel, outtype: str) -> None:
    """Every parameter under its llama.cpp name (a tied ``lm_head`` is left to llama.cpp)."""
    head_dim = model.model.layers[0].self_attn.head_dim
    for hf_name, t in model.named_parameters():  # tied duplicates are skipped
        if "q_proj" in hf_name or "k_proj" in hf_name:
            t = rope_to_interleaved(t.detach(), head_dim)
        data, raw = tensor_data(t, outtype)
        writer.add_tensor(gguf_tensor_name(hf_name), data, raw_dtype=raw)
    factors = rope_factors(model, head_dim)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight", factors.numpy())


def export_gguf(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    outtype: str = "f32",
    overwrite: bool = False,
    tokenizer_pre: str | None = None,
    progress: bool = True,
) -> dict:
    """Write ``model_dir`` (a minillm output or a Hugging Face LLaMA directory) to ``out``.

    Returns ``{"gguf", "architecture", "outtype", "tensors", "bytes"}``.
    """
    model_dir, out = Path(model_dir), Path(out)
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype: '{outtype}' is not one of {', '.join(OUTTYPES)}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"--gguf: '{out}' exists; pass --overwrite or choose another path")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"DIR: '{model_dir}' has no config.json: not a model directory")
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"--gguf: '{model_dir}' has no tokenizer.json; save the tokenizer next to the model "
            "(minillm.prune does) before exporting"
        )
    check_architecture(model_dir)
    model, tokenizer = load_model(str(model_dir))
    sizes = check_exportable(model)
    uniform = all(s == sizes[0] for s in sizes)
    arch = "llama" if uniform else "deci"
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(model_dir.name)
        writer.add_file_type(OUTTYPES[outtype])
        add_hparams(writer, model, sizes)
        add_tokenizer(writer, model_dir, tokenizer, model.config.vocab_size, tokenizer_pre)
        with torch.no_grad():
            add_tensors(writer, model, outtype)
        n_tensors = len(writer.tensors[0])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {
        "gguf": str(out),
        "architecture": arch,
        "outtype": outtype,
        "tensors": n_tensors,
        "bytes": out.stat().st_size,
    }

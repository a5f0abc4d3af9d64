"""Gemma 3 (text): the LLaMA layout of heads and channels, with its own traps checked.

Heads and KV groups are the rows of q/k/v_proj and columns of o_proj, exactly as in LLaMA
(grouped-query attention; ``head_dim`` is explicit and ``heads * head_dim`` need not equal
``hidden_size``: 270M has 4 heads of 256 in a 640-wide model). Channels are the rows of
gate_proj/up_proj and columns of down_proj of the GeGLU MLP (``gelu(gate) * up``).

What stays intact when heads are removed:

* ``q_norm``/``k_norm`` are RMSNorms over ``head_dim`` whose one weight vector is shared by all
  heads: each surviving head is normalised exactly as before;
* RoPE is per head (local and global bases alike);
* sliding-window vs full attention is a per-layer property (``config.layer_types``), the
  attention scale comes from ``query_pre_attn_scalar``: neither depends on the head count.

Its blocks take per-layer arguments (sliding-window or global mask and RoPE), so the block
loop (``--reconstruct``, exact block-by-block gradients) records each block's own
(:func:`minillm.blocks.loop.capture`).
"""

from __future__ import annotations

from minillm.model.adapters.llama import LlamaAdapter


class Gemma3Adapter(LlamaAdapter):
    name = "gemma3"
    model_types = ("gemma3_text",)
    per_layer_block_kwargs = True

"""The Llama weights, named and shaped, in the format chosen for the run.

    embed        [V, d]          token embedding, in the run's format, looked up by row
    layers[i]:
      attn_norm  [d]             RMSNorm gain before attention
      w_qkv      [(H + 2*Hkv) * D, d]   Wq, Wk, Wv stacked by rows: one GEMM instead of three
      w_o        [d, H * D]
      ffn_norm   [d]
      w_gate_up  [2 * F, d]      W_gate, W_up stacked by rows: one GEMM instead of two
      w_down     [d, F]
    final_norm   [d]
    lm_head      [V, d]          the embedding itself when tied (the very same object)

Matrices are float32/float16 arrays or :class:`QuantizedWeight`; stacking works on any
row-blocked format because quantization blocks never cross rows.

The embedding table is held in the run's format too (SmolLM2's is 49152 x 576: 113 MB in
float32, 30 MB as the GGUF's Q8_0, 28 MB as int8). A lookup dequantizes only the rows it
gathers (``nanoserve.quant.embedding_rows``); a tied LM head is the same quantized table
and goes through the format's linear kernel. With ``--weights gguf`` both are exactly
the file's blocks; with fp16, int8 and q8_0 the table is converted like every other matrix.

The 4-bit formats keep the LM head at 8 bits (:data:`HEAD_FORMAT`: q4_0 and q4_1 -> q8_0,
int4 -> int8), as ``llama-quantize`` does for its 4-bit types: it writes ``output.weight``
(or, when tied, ``token_embd.weight``) as Q6_K, or as Q8_0 where the rows are not a
multiple of 256 wide (SmolLM2's 576: so its Q4_1 file holds a Q8_0 table). The LM head
turns every hidden state into the logits directly: on SmolLM2, an int4 table alone cost
+15.7% perplexity (docs/quantization.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nanoserve.errors import ModelLoadError, UnsupportedModelError
from nanoserve.model.config import LlamaConfig
from nanoserve.quant import WEIGHT_FORMATS, QuantizedWeight, dequantize, quantize

Weight = Any  # np.ndarray or QuantizedWeight

#: The format of the LM head (a tied embedding with it) in a 4-bit run; other runs use theirs.
HEAD_FORMAT = {"q4_0": "q8_0", "q4_1": "q8_0", "int4": "int8"}


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    w_qkv: Weight
    w_o: Weight
    ffn_norm: np.ndarray
    w_gate_up: Weight
    w_down: Weight


@dataclass
class LlamaWeights:
    embed: Weight
    layers: list[LayerWeights]
    final_norm: np.ndarray
    lm_head: Weight

    def nbytes(self) -> int:
        def size(w: Weight) -> int:
            return w.nbytes if isinstance(w, QuantizedWeight) else int(np.asarray(w).nbytes)

        total = size(self.embed) + size(self.final_norm)
        if self.lm_head is not self.embed:
            total += size(self.lm_head)
        for layer in self.layers:
            total += sum(size(getattr(layer, f)) for f in LayerWeights.__dataclass_fields__)
        return total

    def formats(self) -> list[str]:
        """The formats the matrices are held in, most common first: ``["q4_1", "q8_0"]``."""
        matrices = [self.embed, self.lm_head] + [getattr(layer, f) for layer in self.layers for f in ("w_qkv", "w_o", "w_gate_up", "w_down")]
        names = [w.format if isinstance(w, QuantizedWeight) else str(w.dtype) for w in matrices]
        return sorted(set(names), key=lambda name: -names.count(name))


def _stack_rows(parts: list[Weight], fmt: str) -> Weight:
    """Concatenate matrices by rows in the target format."""
    if fmt == "gguf" and all(isinstance(p, QuantizedWeight) for p in parts):
        if len({p.format for p in parts}) == 1:
            arrays = tuple(np.concatenate(cols, axis=0) for cols in zip(*(p.arrays for p in parts)))
            return QuantizedWeight(parts[0].format, arrays, (sum(p.shape[0] for p in parts), parts[0].shape[1]))
    return _convert(np.concatenate([dequantize(p) for p in parts], axis=0), fmt)


def _convert(w: Weight, fmt: str) -> Weight:
    if fmt == "gguf":  # keep what the file stores; float tensors stay float32
        return w if isinstance(w, QuantizedWeight) else np.ascontiguousarray(w, dtype=np.float32)
    return quantize(dequantize(w), fmt)


def _vector(w: Weight, name: str, size: int) -> np.ndarray:
    v = dequantize(w).reshape(-1)
    if v.shape != (size,):
        raise ModelLoadError(f"tensor {name!r} has {v.shape[0]} values, expected {size}")
    return np.ascontiguousarray(v, dtype=np.float32)


def build_weights(config: LlamaConfig, tensors: dict[str, Weight], names: dict[str, str], fmt: str) -> LlamaWeights:
    """Assemble :class:`LlamaWeights` from named tensors.

    ``names`` maps nanoserve's names (``embed``, ``final_norm``, ``lm_head``,
    ``{i}.attn_norm``, ``{i}.q``, ``{i}.k``, ``{i}.v``, ``{i}.o``, ``{i}.ffn_norm``,
    ``{i}.gate``, ``{i}.up``, ``{i}.down``; ``{i}`` is the layer) to the source's.
    """
    if fmt not in WEIGHT_FORMATS:
        raise UnsupportedModelError(f"unknown weight format {fmt!r}; choose one of {WEIGHT_FORMATS}")

    def get(key: str, layer: int | None = None) -> Weight:
        name = names[key].format(i=layer)
        if name not in tensors:
            raise ModelLoadError(f"checkpoint lacks tensor {name!r}")
        return tensors[name]

    def check(w: Weight, name: str, shape: tuple[int, int]) -> Weight:
        got = w.shape if isinstance(w, QuantizedWeight) else tuple(np.shape(w))
        if tuple(got) != shape:
            raise ModelLoadError(f"tensor {name!r} has shape {tuple(got)}, expected {shape}")
        return w

    c = config
    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    head_fmt = HEAD_FORMAT.get(fmt, fmt)
    embed_fmt = head_fmt if c.tie_word_embeddings else fmt  # tied: the embedding is the LM head
    embed = _convert(check(get("embed"), "embed", (c.vocab_size, c.hidden_size)), embed_fmt)
    layers = []
    for i in range(c.num_layers):
        q = check(get("q", i), f"layer {i} q", (q_rows, c.hidden_size))
        k = check(get("k", i), f"layer {i} k", (kv_rows, c.hidden_size))
        v = check(get("v", i), f"layer {i} v", (kv_rows, c.hidden_size))
        gate = check(get("gate", i), f"layer {i} gate", (c.intermediate_size, c.hidden_size))
        up = check(get("up", i), f"layer {i} up", (c.intermediate_size, c.hidden_size))
        layers.append(
            LayerWeights(
                attn_norm=_vector(get("attn_norm", i), f"layer {i} attn_norm", c.hidden_size),
                w_qkv=_stack_rows([q, k, v], fmt),
                w_o=_convert(check(get("o", i), f"layer {i} o", (c.hidden_size, q_rows)), fmt),
                ffn_norm=_vector(get("ffn_norm", i), f"layer {i} ffn_norm", c.hidden_size),
                w_gate_up=_stack_rows([gate, up], fmt),
                w_down=_convert(check(get("down", i), f"layer {i} down", (c.hidden_size, c.intermediate_size)), fmt),
            )
        )
    if c.tie_word_embeddings:
        lm_head = embed  # tied: the very same table, quantized or not
    else:
        lm_head = _convert(check(get("lm_head"), "lm_head", (c.vocab_size, c.hidden_size)), head_fmt)
    return LlamaWeights(
        embed=embed,
        layers=layers,
        final_norm=_vector(get("final_norm"), "final_norm", c.hidden_size),
        lm_head=lm_head,
    )


GGUF_NAMES = {
    "embed": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "lm_head": "output.weight",
    "attn_norm": "blk.{i}.attn_norm.weight",
    "q": "blk.{i}.attn_q.weight",
    "k": "blk.{i}.attn_k.weight",
    "v": "blk.{i}.attn_v.weight",
    "o": "blk.{i}.attn_output.weight",
    "ffn_norm": "blk.{i}.ffn_norm.weight",
    "gate": "blk.{i}.ffn_gate.weight",
    "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight",
}

HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
}

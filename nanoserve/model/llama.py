"""The Llama decoder forward pass, written once for every backend and every KV cache.

    input_ids [T] --embed--> x [T, d]                 (only the T rows gathered are dequantized)
    for each layer:                                   (pre-norm residual blocks)
        h = rms_norm(x)
        q, k, v = split(h @ W_qkv.T)                  [T, H, D], [T, Hkv, D], [T, Hkv, D]
        q, k = rope([q k], positions)                 (one call rotates the H + Hkv heads)
        a = kv_cache.attend(layer, q, k, v)           [T, H, D]  (stores k, v; reads the past)
        x = x + a @ W_o.T
        h = rms_norm(x)
        g, u = split(h @ W_gate_up.T)                 [T, F], [T, F]
        x = x + silu_mul(g, u) @ W_down.T
    logits = rms_norm(x[rows]) @ W_lm_head.T          [R, V]  (only rows that need a token)

The T tokens may belong to many sequences (a ragged batch): everything above is per
token except ``attend``, and the KV cache object decides how tokens find their past. Two
caches implement it: :class:`nanoserve.cache.contiguous.ContiguousKVCache` (one sequence,
lesson 1) and :class:`nanoserve.cache.paged.PagedKVCache` (the serving engine).

The model never imports NumPy or CuPy helpers directly: it uses ``backend.xp`` and
``backend.kernels``, so the same code runs on every backend.
"""

from __future__ import annotations

from typing import Any, Protocol

from nanoserve.kernels import Backend
from nanoserve.model.config import LlamaConfig
from nanoserve.model.weights import LlamaWeights
from nanoserve.quant import QuantizedWeight, apply_linear, embedding_rows, gather_rows


class KVCache(Protocol):
    def attend(self, layer: int, q: Any, k: Any, v: Any) -> Any:  # [T, H, D], [T, Hkv, D] x2 -> [T, H, D]
        """Store this step's k, v for ``layer`` and return attention of q over each token's past."""
        ...


class LlamaModel:
    """A Llama decoder bound to its weights (moved to the backend's device) and kernels."""

    def __init__(self, config: LlamaConfig, weights: LlamaWeights, backend: Backend, activations: str = "float") -> None:
        self.config = config
        self.activations = activations  # "int8": GGUF-block matmuls quantize their input (nanoserve.quant.apply_linear)
        self.backend = backend
        self.xp = backend.xp
        self.k = backend.kernels
        self.weights = _to_device(weights, backend)

    def forward(self, input_ids: Any, positions: Any, kv_cache: KVCache) -> Any:  # [T], [T] -> [T, d]
        """Run every layer over the batch's T tokens; returns the final hidden states."""
        c, k, w = self.config, self.k, self.weights
        num_tokens = int(input_ids.shape[0])
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        x = self.embed(input_ids)  # [T, d]
        for i, layer in enumerate(w.layers):
            h = k.rms_norm(x, layer.attn_norm, c.rms_norm_eps)
            qkv = self.linear(h, layer.w_qkv)  # [T, q_size + 2 * kv_size]
            qk = qkv[:, : q_size + kv_size].reshape(num_tokens, c.num_heads + c.num_kv_heads, c.head_dim)
            qk = k.rope(qk, positions, c.rope_theta)  # query and key heads: same positions, one call
            q, key = qk[:, : c.num_heads], qk[:, c.num_heads :]  # [T, H, D], [T, Hkv, D]
            value = qkv[:, q_size + kv_size :].reshape(num_tokens, c.num_kv_heads, c.head_dim)
            attn = kv_cache.attend(i, q, key, value)  # [T, H, D]
            x = x + self.linear(attn.reshape(num_tokens, q_size), layer.w_o)
            h = k.rms_norm(x, layer.ffn_norm, c.rms_norm_eps)
            gate_up = self.linear(h, layer.w_gate_up)  # [T, 2F]
            ffn = c.intermediate_size
            x = x + self.linear(k.silu_mul(gate_up[:, :ffn], gate_up[:, ffn:]), layer.w_down)
        return x

    def embed(self, input_ids: Any) -> Any:  # [T] -> [T, d] float32
        """Rows ``input_ids`` of the embedding table, dequantized (only those rows) to float32.

        On a device backend the T quantized rows are gathered there, dequantized on the
        host by ``kernels_ref.quant`` (T x d values: a few KB per decode step) and sent back.
        """
        table = self.weights.embed
        if not isinstance(table, QuantizedWeight):
            x = table[input_ids]
            return x if x.dtype == self.xp.float32 else x.astype(self.xp.float32)
        if self.xp.__name__ == "numpy":
            return embedding_rows(table, input_ids)
        rows = gather_rows(table, input_ids)
        host = QuantizedWeight(rows.format, tuple(self.backend.to_host(a) for a in rows.arrays), rows.shape)
        return self.backend.to_device(embedding_rows(host, slice(None)))

    def compute_logits(self, hidden: Any) -> Any:  # [R, d] -> [R, V] float32
        """Final norm and LM head for the R rows that need a next token."""
        h = self.k.rms_norm(hidden, self.weights.final_norm, self.config.rms_norm_eps)
        return self.linear(h, self.weights.lm_head)

    def linear(self, x: Any, w: Any) -> Any:  # [T, in] -> [T, out] float32
        """``x @ W.T`` through the kernel for w's format and the model's activations."""
        return apply_linear(self.k, x, w, self.activations)


def _to_device(weights: LlamaWeights, backend: Backend) -> LlamaWeights:
    """The same weights with every array moved to the backend (a no-op for NumPy)."""
    if backend.xp.__name__ == "numpy":
        return weights

    def move(w: Any) -> Any:
        if isinstance(w, QuantizedWeight):
            return QuantizedWeight(w.format, tuple(backend.to_device(a) for a in w.arrays), w.shape)
        return backend.to_device(w)

    embed = move(weights.embed)
    layers = [type(layer)(**{f: move(getattr(layer, f)) for f in layer.__dataclass_fields__}) for layer in weights.layers]
    lm_head = embed if weights.lm_head is weights.embed else move(weights.lm_head)
    return LlamaWeights(embed=embed, layers=layers, final_norm=move(weights.final_norm), lm_head=lm_head)

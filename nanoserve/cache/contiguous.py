"""Lesson 1's KV cache: one sequence, one preallocated [max_len] array per layer.

    k[layer]: [max_len, Hkv, D]     slot t holds the key of token t
    v[layer]: [max_len, Hkv, D]

Simple and fast for one stream, but every sequence reserves ``max_len`` slots up front,
however short it turns out: the waste the paged cache removes.
"""

from __future__ import annotations

from typing import Any

from nanoserve.kernels import Backend
from nanoserve.model.config import LlamaConfig


class ContiguousKVCache:
    """The KV cache of one sequence. Feed ``positions`` to the model that continue the sequence."""

    def __init__(self, config: LlamaConfig, max_len: int, backend: Backend) -> None:
        xp = backend.xp
        shape = (config.num_layers, max_len, config.num_kv_heads, config.head_dim)
        self.k = xp.zeros(shape, dtype=xp.float32)
        self.v = xp.zeros(shape, dtype=xp.float32)
        self.kernels = backend.kernels
        self.max_len = max_len
        self.positions: Any = None  # [T] positions of the tokens in the current forward pass
        self.scale = config.head_dim**-0.5

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def set_positions(self, positions: Any) -> None:  # [T] consecutive positions
        """Call before each forward pass with the positions of its tokens."""
        self.positions = positions

    def attend(self, layer: int, q: Any, k: Any, v: Any) -> Any:  # [T, H, D], [T, Hkv, D] x2 -> [T, H, D]
        start = int(self.positions[0])
        end = start + q.shape[0]
        self.k[layer, start:end] = k
        self.v[layer, start:end] = v
        return self.kernels.attention(q, self.k[layer, :end], self.v[layer, :end], self.scale)

"""The paged KV cache the serving engine runs on: one pool of pages per layer.

    k[layer], v[layer]: [N, B, Hkv, D]    (N blocks of B slots, shared by all requests)

Before each forward pass the model runner sets the batch's attention metadata (the
names are vLLM's): where each new token's K/V goes (``slot_mapping``) and how each
sequence finds its past (``block_tables``, ``query_start_loc``, ``seq_lens``). Then every
layer's ``attend`` is two kernels: ``store_kv`` and ``paged_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nanoserve.kernels import Backend
from nanoserve.model.config import LlamaConfig


@dataclass
class AttentionMetadata:
    slot_mapping: Any  # [T] int, pool slot of each new token
    block_tables: Any  # [S, max_blocks] int
    query_start_loc: Any  # [S + 1] int
    seq_lens: Any  # [S] int, tokens in the cache per sequence after this step


def bytes_per_block(config: LlamaConfig, block_size: int) -> int:
    """K and V, every layer, float32."""
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * 4


class PagedKVCache:
    def __init__(self, config: LlamaConfig, num_blocks: int, block_size: int, backend: Backend) -> None:
        xp = backend.xp
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.k = xp.zeros(shape, dtype=xp.float32)
        self.v = xp.zeros(shape, dtype=xp.float32)
        self.kernels = backend.kernels
        self.scale = config.head_dim**-0.5
        self.metadata: AttentionMetadata | None = None

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def attend(self, layer: int, q: Any, k: Any, v: Any) -> Any:  # [T, H, D], [T, Hkv, D] x2 -> [T, H, D]
        m = self.metadata
        assert m is not None, "set PagedKVCache.metadata before the forward pass"
        self.kernels.store_kv(k, v, self.k[layer], self.v[layer], m.slot_mapping)
        return self.kernels.paged_attention(
            q, self.k[layer], self.v[layer], m.block_tables, m.query_start_loc, m.seq_lens, self.scale
        )

"""The paged KV cache the serving engine runs on: one pool of pages per layer.

    k[layer], v[layer]: [N, B, Hkv, D]    (N blocks of B slots, shared by all requests)

The pages are float32, or float16 (``dtype="float16"``, what llama.cpp keeps by default):
half the memory, so twice the tokens in the same budget. Keys and values are rounded
to float16 when stored; attention still computes in float32 (on the cpu backend it
widens each page first, which measured a little slower than float32 pages:
docs/benchmarks.md).

Before each forward pass the model runner sets the batch's attention metadata (the
names are vLLM's): where each new token's K/V goes (``slot_mapping``) and how each
sequence finds its past (``block_tables``, ``query_start_loc``, ``seq_lens``). Then every
layer's ``attend`` is two kernels: ``store_kv`` and ``paged_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nanoserve.config import KV_CACHE_DTYPES
from nanoserve.kernels import Backend
from nanoserve.model.config import LlamaConfig


@dataclass
class AttentionMetadata:
    slot_mapping: Any  # [T] int, pool slot of each new token
    block_tables: Any  # [S, max_blocks] int
    query_start_loc: Any  # [S + 1] int
    seq_lens: Any  # [S] int, tokens in the cache per sequence after this step


BYTES_PER_VALUE = {"float32": 4, "float16": 2}  # each of KV_CACHE_DTYPES (the page formats)


def bytes_per_block(config: LlamaConfig, block_size: int, dtype: str = "float32") -> int:
    """K and V, every layer."""
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * _itemsize(dtype)


def _itemsize(dtype: str) -> int:
    if dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"KV cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {dtype!r}")
    return BYTES_PER_VALUE[dtype]


class PagedKVCache:
    def __init__(
        self, config: LlamaConfig, num_blocks: int, block_size: int, backend: Backend, dtype: str = "float32"
    ) -> None:
        _itemsize(dtype)  # a known format, or a clear error
        xp = backend.xp
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.k = xp.zeros(shape, dtype=dtype)
        self.v = xp.zeros(shape, dtype=dtype)
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

"""The paged KV cache the serving engine runs on: one pool of pages per layer.

    k[layer], v[layer]: [N, B, Hkv, D]    (N blocks of B slots, shared by all requests)

The pages are float32, or float16 (``dtype="float16"``, what llama.cpp keeps by default):
half the memory, so twice the tokens in the same budget. Keys and values are rounded
to float16 when stored; attention still computes in float32 (on the cpu backend it
widens each page first, which measured a little slower than float32 pages:
docs/benchmarks.md).

Or int8 (``dtype="int8"``, layout and error bound in ``kernels_ref.kv_int8``): pages of
int8 plus one float32 scale per token per KV head,

    k[layer], v[layer]:                int8    [N, B, Hkv, D]
    k_scales[layer], v_scales[layer]:  float32 [N, B, Hkv]

D + 4 bytes per token per KV head (68 for SmolLM2's D = 64, against 256 in float32: 3.76x
the tokens in the same budget). ``attend`` then calls ``store_kv_int8`` (quantizes on
write) and ``paged_attention_int8`` (dequantizes each token as attention reads it). The
block ids mean the same for every format, so the block pool, the prefix cache and the
draft model's own cache need nothing else.

Before each forward pass the model runner sets the batch's attention metadata (the
names are vLLM's): where each new token's K/V goes (``slot_mapping``) and how each
sequence finds its past (``block_tables``, ``query_start_loc``, ``seq_lens``). Then every
layer's ``attend`` is two kernels: ``store_kv`` and ``paged_attention`` (their int8
variants for an int8 cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nanoserve.config import KV_CACHE_DTYPES
from nanoserve.errors import ConfigError
from nanoserve.kernels import Backend
from nanoserve.model.config import LlamaConfig


@dataclass
class AttentionMetadata:
    slot_mapping: Any  # [T] int, pool slot of each new token
    block_tables: Any  # [S, max_blocks] int
    query_start_loc: Any  # [S + 1] int
    seq_lens: Any  # [S] int, tokens in the cache per sequence after this step


BYTES_PER_VALUE = {"float32": 4, "float16": 2, "int8": 1}  # each of KV_CACHE_DTYPES (the page formats)
SCALE_BYTES = {"float32": 0, "float16": 0, "int8": 4}  # per token per KV head: int8's float32 scale


def bytes_per_token(config: LlamaConfig, dtype: str = "float32") -> int:
    """K and V of one token, every layer: values, plus the int8 format's scales."""
    check_kv_cache_dtype(dtype)
    per_head = config.head_dim * BYTES_PER_VALUE[dtype] + SCALE_BYTES[dtype]
    return 2 * config.num_layers * config.num_kv_heads * per_head


def bytes_per_block(config: LlamaConfig, block_size: int, dtype: str = "float32") -> int:
    """K and V, every layer (and the int8 format's scales)."""
    return block_size * bytes_per_token(config, dtype)


def check_kv_cache_dtype(dtype: str) -> None:
    """Raise ConfigError (a ValueError) naming the allowed formats unless ``dtype`` is one."""
    if dtype not in KV_CACHE_DTYPES:
        raise ConfigError(f"KV cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {dtype!r}")


class PagedKVCache:
    def __init__(
        self, config: LlamaConfig, num_blocks: int, block_size: int, backend: Backend, dtype: str = "float32"
    ) -> None:
        check_kv_cache_dtype(dtype)
        xp = backend.xp
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.dtype = dtype
        self.k = xp.zeros(shape, dtype=dtype)  # [L, N, B, Hkv, D]
        self.v = xp.zeros(shape, dtype=dtype)
        self.k_scales: Any = None  # int8 only: [L, N, B, Hkv] float32
        self.v_scales: Any = None
        if dtype == "int8":
            self.k_scales = xp.zeros(shape[:-1], dtype=xp.float32)
            self.v_scales = xp.zeros(shape[:-1], dtype=xp.float32)
        self.kernels = backend.kernels
        self.scale = config.head_dim**-0.5
        self.metadata: AttentionMetadata | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the whole pool: pages, and the int8 format's scales."""
        scales = 0 if self.k_scales is None else self.k_scales.nbytes + self.v_scales.nbytes
        return int(self.k.nbytes + self.v.nbytes + scales)

    def attend(self, layer: int, q: Any, k: Any, v: Any) -> Any:  # [T, H, D], [T, Hkv, D] x2 -> [T, H, D]
        m = self.metadata
        assert m is not None, "set PagedKVCache.metadata before the forward pass"
        if self.dtype == "int8":
            k_pages, v_pages, k_scales, v_scales = self.k[layer], self.v[layer], self.k_scales[layer], self.v_scales[layer]
            self.kernels.store_kv_int8(k, v, k_pages, v_pages, k_scales, v_scales, m.slot_mapping)
            return self.kernels.paged_attention_int8(
                q, k_pages, v_pages, k_scales, v_scales, m.block_tables, m.query_start_loc, m.seq_lens, self.scale
            )
        self.kernels.store_kv(k, v, self.k[layer], self.v[layer], m.slot_mapping)
        return self.kernels.paged_attention(
            q, self.k[layer], self.v[layer], m.block_tables, m.query_start_loc, m.seq_lens, self.scale
        )

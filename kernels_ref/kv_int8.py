"""An int8 KV cache: keys and values stored as int8, one float32 scale per token per KV head.

Layout (one set of arrays per layer)::

    k_cache, v_cache:    [N, B, Hkv, D] int8      the quantized pages
    k_scales, v_scales:  [N, B, Hkv]    float32   one scale per slot per KV head

    quantize   (x = one token's key, or value, for one KV head: [D] float32)
        scale = max_d |x[d]| / 127                      (float32 division)
        q[d]  = clip(rint(x[d] / scale), -127, 127)     (round half to even; q = 0 if scale == 0)
    dequantize
        x[d] ~= q[d] * scale                            |error| <= scale / 2 = max|x| / 254

Symmetric (no zero point): keys and values of a Llama layer are centred on zero, and a
dequantized value is then one multiply. -128 is never used, so ``q`` and ``-q`` are both
representable.

Why one scale per (token, KV head): a token's row is written exactly once, by
``store_kv_int8`` when the token is computed, so its scale can be computed from that row
alone and never changes. Nothing already in the page is ever requantized, and a slot is
self-contained: the prefix cache can share its block, and a rejected speculative token
can be overwritten, without touching its neighbours. A scale per KV head (not per
token) keeps heads of very different size from sharing one range. The cost is 4 bytes
of scale per D int8 values: 68 bytes per token per KV head for D = 64, against 256 in
float32 (3.76x fewer), 128 in float16.

What llama.cpp does instead (``-ctk q8_0 -ctv q8_0``): its cache rows are GGUF ``q8_0``
blocks, a float16 scale per 32 consecutive values along head_dim (34 bytes per 32
values; for D = 64 that is 2 scales per row, 68 bytes, the same size as here). Smaller
blocks follow the values more closely when one dimension of a head is an outlier; the
price is a scale per 32 values in every dot product, where here one scale multiplies a
whole head's dot product once.

Attention dequantizes inside the kernel: ``paged_attention_int8`` is, per sequence,
exactly ``attention(q_s, K_s, V_s, scale)`` with ``K_s = k_pages * k_scales`` for the
sequence's tokens (kernels_ref.attention.paged_attention over dequantized pages). A
compiled backend reads the int8 pages in place and folds each token's scale into its
score (``(q . k_int8) * k_scale``) and its probability (``p * v_scale``): the same math,
rounded in a different order.

Inputs must be finite: a token's scale comes from its largest value.
"""

import numpy as np

from kernels_ref.attention import attention, check_paged_metadata, check_slot_mapping, gather_pages

#: The largest quantized magnitude; -128 is never stored.
INT8_MAX = 127


def quantize_kv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # [..., D] float32 -> int8 [..., D], float32 [...]
    """Symmetric int8 over the last axis: ``scale = max|x| / 127``, ``q = rint(x / scale)``."""
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1, initial=np.float32(0)) / np.float32(INT8_MAX)).astype(np.float32)
    divisor = np.where(scale > 0, scale, np.float32(1))[..., None]  # a row of zeros stays zeros
    q = np.clip(np.rint(x / divisor), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def dequantize_kv(q: np.ndarray, scale: np.ndarray) -> np.ndarray:  # int8 [..., D], float32 [...] -> float32 [..., D]
    """``q * scale`` per row: the keys or values the quantized rows stand for."""
    return q.astype(np.float32) * scale.astype(np.float32)[..., None]


def store_kv_int8(
    k: np.ndarray,  # [T, Hkv, D] float32
    v: np.ndarray,  # [T, Hkv, D] float32
    k_cache: np.ndarray,  # [N, B, Hkv, D] int8, written in place
    v_cache: np.ndarray,  # [N, B, Hkv, D] int8, written in place
    k_scales: np.ndarray,  # [N, B, Hkv] float32, written in place
    v_scales: np.ndarray,  # [N, B, Hkv] float32, written in place
    slot_mapping: np.ndarray,  # [T] int, slot = block * B + offset; -1 = skip this token
) -> None:
    """Quantize each new token's key and value (per KV head) and scatter them into its slot.

    For every t with ``slot_mapping[t] >= 0``: ``k_cache`` and ``k_scales`` at that slot
    become ``quantize_kv(k[t])`` (likewise v). Negative slots are padding: nothing is
    written for them, and no other slot changes.
    """
    check_slot_mapping(k_cache, slot_mapping)
    keep = np.asarray(slot_mapping) >= 0
    slots = np.asarray(slot_mapping)[keep]
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    for x, cache, scales in ((k, k_cache, k_scales), (v, v_cache, v_scales)):
        q, scale = quantize_kv(np.asarray(x)[keep])  # [T', Hkv, D], [T', Hkv]
        cache.reshape(num_slots, *cache.shape[2:])[slots] = q
        scales.reshape(num_slots, scales.shape[2])[slots] = scale


def gather_pages_int8(
    k_cache: np.ndarray, v_cache: np.ndarray, k_scales: np.ndarray, v_scales: np.ndarray, block_table: np.ndarray, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:  # -> [L, Hkv, D] float32 x2
    """One sequence's first seq_len keys and values, read through its block table and dequantized."""
    k, v = gather_pages(k_cache, v_cache, block_table, seq_len)  # [L, Hkv, D] int8
    ks, vs = gather_pages(k_scales[..., None], v_scales[..., None], block_table, seq_len)  # [L, Hkv, 1]
    return dequantize_kv(k, ks[..., 0]), dequantize_kv(v, vs[..., 0])


def paged_attention_int8(
    q: np.ndarray,  # [T, H, D] float32, queries of all scheduled tokens, sequence after sequence
    k_cache: np.ndarray,  # [N, B, Hkv, D] int8
    v_cache: np.ndarray,  # [N, B, Hkv, D] int8
    k_scales: np.ndarray,  # [N, B, Hkv] float32
    v_scales: np.ndarray,  # [N, B, Hkv] float32
    block_tables: np.ndarray,  # [S, max_blocks] int
    query_start_loc: np.ndarray,  # [S + 1] int
    seq_lens: np.ndarray,  # [S] int, tokens in the cache for seq s, the new ones included
    scale: float,
) -> np.ndarray:  # -> [T, H, D] float32
    """Varlen causal attention over int8 pages: the ragged-batch contract of
    kernels_ref.attention.paged_attention, with each key and value row dequantized
    (``q * scale``) as it is read.

    Sequence s owns query rows ``query_start_loc[s] : query_start_loc[s+1]``; its query i
    sits at position ``seq_lens[s] - q_len + i``. Per sequence this is exactly
    ``attention(q_s, K_s, V_s, scale)`` with K_s, V_s its first seq_len dequantized
    keys/values. Slots past seq_len, and their scales, are never read.
    """
    check_paged_metadata(k_cache, block_tables, query_start_loc, seq_lens)
    out = np.zeros(q.shape, dtype=np.float32)
    starts = np.asarray(query_start_loc)
    for s in range(len(seq_lens)):
        start, end = int(starts[s]), int(starts[s + 1])
        if end > start:
            k, v = gather_pages_int8(k_cache, v_cache, k_scales, v_scales, block_tables[s], int(seq_lens[s]))
            out[start:end] = attention(np.asarray(q[start:end], dtype=np.float32), k, v, scale)
    return out

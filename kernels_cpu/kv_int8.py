"""The int8 KV cache compiled for the CPU: ``store_kv_int8`` and ``paged_attention_int8``
(spec and layout: kernels_ref.kv_int8).

``store_kv_int8`` quantizes each (token, KV head) row as it writes it: one pass for the
row's largest magnitude, one to divide and round. It is compiled without fastmath, so
``x / scale`` is one correctly rounded float32 division and ``rint`` rounds half to even,
exactly as NumPy does: the stored bytes and scales equal the reference's bit for bit.

Decodes read the int8 pages in place, like ``kernels_cpu.attention``'s float decode
(the same loop order: a token's keys for all KV heads are one contiguous row of
Hkv * D bytes, read front to back), and dequantize per token without ever writing a
float page::

    for s in range(S):
        for j in 0 .. seq_len-1:                       (1) scores
            block, offset = block_tables[s, j // B], j % B
            scores[h, j] = (q[s, h] . k_cache[block, offset, h // g]) * (k_scales[block, offset, h // g] * scale)
        p = softmax(scores, axis=-1)                   (2)
        for j in 0 .. seq_len-1:                       (3) values
            out[s, h] += (p[h, j] * v_scales[block, offset, h // g]) * v_cache[block, offset, h // g]

Each dot product runs over int8 keys widened to float32 in registers; the token's scale
multiplies the finished dot product once (and the probability once, for the values),
so the reference's ``q . (k * scale)`` becomes ``(q . k) * scale``: the same number,
rounded in another order. The K/V bytes read per decode step are 1/4 of a float32
cache's, plus one float32 scale per row of D bytes.

Prefill chunks (q_len > 1) take the reference's path: gather the sequence's pages once,
dequantize them, then BLAS (as the float kernel does; the gather is cheap next to the
q_len * seq_len dot products).
"""

from __future__ import annotations

import math
import os

import numpy as np
from numba import njit

import kernels_ref
from kernels_cpu.pointwise import FASTMATH
from kernels_ref.attention import check_paged_metadata, check_slot_mapping
from kernels_ref.kv_int8 import INT8_MAX, gather_pages_int8

# Compiled loops do not check their indices; NANOSERVE_CHECK_BOUNDS=1 checks first, as the reference always does.
CHECK_BOUNDS = os.environ.get("NANOSERVE_CHECK_BOUNDS", "") == "1"


@njit(cache=True)  # no fastmath: the division and the rounding must be NumPy's, bit for bit
def _quantize_scatter(x, cache, scales, slot_mapping):
    # x [T, Hkv, D] f32; cache [N, B, Hkv, D] int8 (written); scales [N, B, Hkv] f32 (written); slot_mapping [T] int64
    block_size = cache.shape[1]
    num_kv_heads, head_dim = x.shape[1], x.shape[2]
    for t in range(x.shape[0]):
        slot = slot_mapping[t]
        if slot < 0:  # a padding token: nothing to store
            continue
        block, offset = slot // block_size, slot % block_size
        for h in range(num_kv_heads):
            row = x[t, h]
            amax = np.float32(0.0)
            for d in range(head_dim):
                amax = max(amax, abs(row[d]))
            scale = amax / np.float32(INT8_MAX)
            divisor = scale if scale > 0 else np.float32(1.0)
            for d in range(head_dim):
                cache[block, offset, h, d] = np.int8(min(max(np.rint(row[d] / divisor), -INT8_MAX), INT8_MAX))
            scales[block, offset, h] = scale


def store_kv_int8(
    k: np.ndarray,  # [T, Hkv, D] float32
    v: np.ndarray,  # [T, Hkv, D] float32
    k_cache: np.ndarray,  # [N, B, Hkv, D] int8, written in place
    v_cache: np.ndarray,  # [N, B, Hkv, D] int8, written in place
    k_scales: np.ndarray,  # [N, B, Hkv] float32, written in place
    v_scales: np.ndarray,  # [N, B, Hkv] float32, written in place
    slot_mapping: np.ndarray,  # [T] int; -1 = skip this token
) -> None:
    """Quantize and write each token's key and value; the contract of kernels_ref.store_kv_int8."""
    if CHECK_BOUNDS:
        check_slot_mapping(k_cache, slot_mapping)
    slots = np.asarray(slot_mapping, dtype=np.int64)
    _quantize_scatter(np.ascontiguousarray(k, dtype=np.float32), k_cache, k_scales, slots)
    _quantize_scatter(np.ascontiguousarray(v, dtype=np.float32), v_cache, v_scales, slots)


@njit(fastmath=FASTMATH, cache=True)
def _decode_attention_int8(q, k_cache, v_cache, k_scales, v_scales, block_tables, seq_lens, scale, out):
    # q [S, H, D] f32; k_cache, v_cache [N, B, Hkv, D] int8; k_scales, v_scales [N, B, Hkv] f32;
    # block_tables [S, max_blocks] int64; seq_lens [S] int64; out [S, H, D] f32 (written)
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    for s in range(num_seqs):
        seq_len = seq_lens[s]
        scores = np.empty((num_heads, seq_len), dtype=np.float32)
        for j in range(seq_len):  # (1) q . k for every key, int8 read in place
            block, offset = block_tables[s, j // block_size], j % block_size
            keys = k_cache[block, offset]  # [Hkv, D] int8
            for h in range(num_heads):
                query, key = q[s, h], keys[h // group]
                dot = np.float32(0.0)
                for d in range(head_dim):
                    dot += query[d] * np.float32(key[d])
                scores[h, j] = dot * (k_scales[block, offset, h // group] * scale)
        for h in range(num_heads):  # (2) softmax of each query head's row
            row = scores[h]
            row_max = row.max()
            total = np.float32(0.0)
            for j in range(seq_len):
                row[j] = math.exp(row[j] - row_max)
                total += row[j]
            row /= total
        acc = out[s]  # [H, D], accumulated in place
        acc[:] = 0.0
        for j in range(seq_len):  # (3) the probability-weighted sum of the dequantized values
            block, offset = block_tables[s, j // block_size], j % block_size
            values = v_cache[block, offset]  # [Hkv, D] int8
            for h in range(num_heads):
                weight = scores[h, j] * v_scales[block, offset, h // group]
                value, acc_h = values[h // group], acc[h]
                for d in range(head_dim):
                    acc_h[d] += weight * np.float32(value[d])


def paged_attention_int8(
    q: np.ndarray,  # [T, H, D] float32
    k_cache: np.ndarray,  # [N, B, Hkv, D] int8
    v_cache: np.ndarray,  # [N, B, Hkv, D] int8
    k_scales: np.ndarray,  # [N, B, Hkv] float32
    v_scales: np.ndarray,  # [N, B, Hkv] float32
    block_tables: np.ndarray,  # [S, max_blocks] int
    query_start_loc: np.ndarray,  # [S + 1] int
    seq_lens: np.ndarray,  # [S] int
    scale: float,
) -> np.ndarray:  # -> [T, H, D] float32
    """Varlen causal attention over int8 pages; the contract of kernels_ref.paged_attention_int8."""
    if CHECK_BOUNDS:
        check_paged_metadata(k_cache, block_tables, query_start_loc, seq_lens)
    out = np.zeros(q.shape, dtype=np.float32)
    query_start_loc = np.asarray(query_start_loc, dtype=np.int64)
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    q_lens = np.diff(query_start_loc)
    decodes = np.nonzero(q_lens == 1)[0]
    if len(decodes):
        rows = query_start_loc[decodes]
        decode_out = np.empty((len(decodes), *q.shape[1:]), dtype=np.float32)
        _decode_attention_int8(
            np.ascontiguousarray(q[rows], dtype=np.float32),
            k_cache,
            v_cache,
            k_scales,
            v_scales,
            np.ascontiguousarray(block_tables[decodes], dtype=np.int64),
            seq_lens[decodes],
            np.float32(scale),
            decode_out,
        )
        out[rows] = decode_out
    for s in np.nonzero(q_lens > 1)[0]:  # prefill chunks: gather and dequantize once, then BLAS
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        k, v = gather_pages_int8(k_cache, v_cache, k_scales, v_scales, block_tables[s], int(seq_lens[s]))
        out[start:end] = kernels_ref.attention(np.asarray(q[start:end], dtype=np.float32), k, v, scale)
    return out

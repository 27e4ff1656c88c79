"""Paged attention and ``store_kv`` compiled for the CPU (spec: kernels_ref.attention).

Decodes read the pages in place. The reference gathers every sequence's pages into one
padded [S, L, Hkv, D] array before multiplying, which copies the whole KV context on
every layer of every step (and pads each sequence to the longest). Here each sequence
walks its block table and reads each key and value once, straight from the pool::

    for s in range(S):
        for j in 0 .. seq_len-1:                        (1) scores, keys read in place
            keys = k_cache[block_tables[s, j // B], j % B]             [Hkv, D]
            scores[h, j] = scale * q[s, h] . keys[h // g]   for every query head h (GQA)
        p = softmax(scores, axis=-1)                    (2) per query head
        for j in 0 .. seq_len-1:                        (3) values, in the same order
            values = v_cache[block_tables[s, j // B], j % B]           [Hkv, D]
            out[s, h] += p[h, j] * values[h // g]       for every query head h

(The kernel takes the j loops a page at a time, so that a float16 cache can be widened
to float32 one page at a time: Numba's CPU target has no float16, so such a cache comes
in as its raw 16-bit patterns and ``_float16_page`` converts them, exactly.)

The loop order follows the memory. A token's keys for all KV heads are one contiguous
row of Hkv * D floats, and a block is B such rows, so the walk above reads each page
front to back, which is what the hardware prefetcher predicts well. Walking one KV
head at a time instead (the natural "task per (sequence, KV head)" of a GPU kernel)
reads every third 256-byte piece of each page: measured 2x slower at SmolLM2's shapes.

The sequences are independent, so ``prange`` could split them over threads. On the
2-core machine this project is measured on, splitting (sequence, KV head) tasks that way
made whole serving runs ~8% *slower* (``bench/step_profile.py``, 16 requests,
alternating runs: 64-65 tok/s on one thread, 59-61 on two). Splitting the sequences
over two Python threads (the kernel can release the GIL) cut this kernel's time by
35-45%,
but only once OpenBLAS's idle workers were told to sleep (``OPENBLAS_THREAD_TIMEOUT``):
by default they spin between matmuls and hold the second core. Sleeping workers cost a
wake-up on every matmul instead, and whole serving runs came out the same, 45-48 s
either way in alternating runs. So the loop is a plain ``range``, on one thread.

A plain three-pass softmax is enough here: a sequence's row of scores is at most
seq_len floats per head, so the online softmax of the GPU kernel, which exists to never
hold that row, buys nothing on a CPU core.

Prefill chunks (q_len > 1) go through the reference path: gather the sequence's pages
once, then BLAS matmuls. With q_len queries per gathered key the copy is cheap next to
the q_len * seq_len dot products, and BLAS does those faster than a compiled loop.
"""

from __future__ import annotations

import math
import os

import numpy as np
from numba import njit

import kernels_ref
from kernels_cpu.pointwise import FASTMATH
from kernels_ref.attention import check_paged_metadata, check_slot_mapping, gather_pages

# The compiled loops do not check their indices: inconsistent metadata would read or write
# outside the pool. NANOSERVE_CHECK_BOUNDS=1 checks it first, as the reference always does.
CHECK_BOUNDS = os.environ.get("NANOSERVE_CHECK_BOUNDS", "") == "1"


# Not cached on disk: its signature holds the ``read_page`` function, and Numba's cache key for
# a function argument never matches in another process. Every process compiled it anew anyway,
# the on-disk index grew by one entry per process, and saving that index could fail with
# "ReferenceError: underlying object has vanished" (a failed step), so it is compiled per process.
@njit(fastmath=FASTMATH)
def _decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, out, read_page):
    # q [S, H, D] f32; k_cache, v_cache [N, B, Hkv, D] f32 or uint16 (float16 bits);
    # block_tables [S, max_blocks] int64; seq_lens [S] int64; out [S, H, D] f32 (written);
    # read_page(cache, block, scratch) -> that page as float32 [B, Hkv, D]
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    scratch = np.empty((block_size, num_kv_heads, head_dim), dtype=np.float32)
    for s in range(num_seqs):
        seq_len = seq_lens[s]
        scores = np.empty((num_heads, seq_len), dtype=np.float32)
        for first in range(0, seq_len, block_size):  # (1) q . k for every key, page by page
            keys = read_page(k_cache, block_tables[s, first // block_size], scratch)  # [B, Hkv, D]
            for i in range(min(block_size, seq_len - first)):
                for h in range(num_heads):
                    query, key = q[s, h], keys[i, h // group]
                    dot = np.float32(0.0)
                    for d in range(head_dim):
                        dot += query[d] * key[d]
                    scores[h, first + i] = dot * scale
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
        for first in range(0, seq_len, block_size):  # (3) the probability-weighted sum of the values
            values = read_page(v_cache, block_tables[s, first // block_size], scratch)  # [B, Hkv, D]
            for i in range(min(block_size, seq_len - first)):
                for h in range(num_heads):
                    p, value, acc_h = scores[h, first + i], values[i, h // group], acc[h]
                    for d in range(head_dim):
                        acc_h[d] += p * value[d]


@njit(cache=True)
def _float32_page(cache, block, scratch):
    return cache[block]  # read in place


@njit(fastmath=FASTMATH, cache=True)
def _float16_page(cache, block, scratch):
    """Page ``block`` of a float16 cache, given as its uint16 bits, widened into ``scratch``.

    A finite half (-1)^s * 2^(e-15) * 1.m becomes float32 by moving its exponent and
    mantissa bits up 13 places, which reads as 2^(e-127) * 1.m, then multiplying by
    2^112: exact, subnormal halves included. Exponent 31 becomes 255: inf stays inf, nan
    stays nan (a signalling nan comes out quiet).
    """
    half = cache[block]  # [B, Hkv, D] uint16
    bits = scratch.view(np.uint32)
    for i in range(half.shape[0]):
        for h in range(half.shape[1]):
            for d in range(half.shape[2]):
                x = np.uint32(half[i, h, d])
                magnitude = (x & np.uint32(0x7FFF)) << np.uint32(13)
                if (x & np.uint32(0x7C00)) == np.uint32(0x7C00):
                    magnitude |= np.uint32(0x7F800000)
                bits[i, h, d] = ((x & np.uint32(0x8000)) << np.uint32(16)) | magnitude
    scratch *= np.float32(2.0**112)
    return scratch


def paged_attention(
    q: np.ndarray,  # [T, H, D]
    k_cache: np.ndarray,  # [N, B, Hkv, D]
    v_cache: np.ndarray,  # [N, B, Hkv, D]
    block_tables: np.ndarray,  # [S, max_blocks] int
    query_start_loc: np.ndarray,  # [S + 1] int
    seq_lens: np.ndarray,  # [S] int
    scale: float,
) -> np.ndarray:  # -> [T, H, D]
    """Varlen causal attention over pages; the contract of kernels_ref.paged_attention."""
    if CHECK_BOUNDS:
        check_paged_metadata(k_cache, block_tables, query_start_loc, seq_lens)
    out = np.zeros(q.shape, dtype=q.dtype)
    query_start_loc = np.asarray(query_start_loc, dtype=np.int64)
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    q_lens = np.diff(query_start_loc)
    decodes = np.nonzero(q_lens == 1)[0]
    if len(decodes):
        rows = query_start_loc[decodes]
        if k_cache.dtype == np.float16:  # no float16 in Numba's CPU target: pass the bits
            k_pages, v_pages, read_page = k_cache.view(np.uint16), v_cache.view(np.uint16), _float16_page
        else:
            k_pages, v_pages, read_page = k_cache.astype(np.float32, copy=False), v_cache.astype(np.float32, copy=False), _float32_page
        decode_out = np.empty((len(decodes), *q.shape[1:]), dtype=np.float32)
        _decode_attention(
            np.ascontiguousarray(q[rows], dtype=np.float32),
            k_pages,
            v_pages,
            np.ascontiguousarray(block_tables[decodes], dtype=np.int64),
            seq_lens[decodes],
            np.float32(scale),
            decode_out,
            read_page,
        )
        out[rows] = decode_out
    for s in np.nonzero(q_lens > 1)[0]:  # prefill chunks: gather once, then BLAS
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        k, v = gather_pages(k_cache, v_cache, block_tables[s], int(seq_lens[s]))  # [L, Hkv, D] x2
        out[start:end] = kernels_ref.attention(q[start:end], k, v, scale)
    return out


@njit(cache=True)
def _scatter(k, v, k_cache, v_cache, slot_mapping):
    # k, v [T, Hkv, D] f32; k_cache, v_cache [N, B, Hkv, D] f32 (written); slot_mapping [T] int64
    block_size = k_cache.shape[1]
    for t in range(k.shape[0]):
        slot = slot_mapping[t]
        if slot >= 0:  # a negative slot is a padding token: nothing to store
            k_cache[slot // block_size, slot % block_size] = k[t]
            v_cache[slot // block_size, slot % block_size] = v[t]


def store_kv(
    k: np.ndarray,  # [T, Hkv, D]
    v: np.ndarray,  # [T, Hkv, D]
    k_cache: np.ndarray,  # [N, B, Hkv, D], written in place
    v_cache: np.ndarray,  # [N, B, Hkv, D], written in place
    slot_mapping: np.ndarray,  # [T] int; -1 = skip this token
) -> None:
    """Write each token's key and value into its slot; the contract of kernels_ref.store_kv."""
    if CHECK_BOUNDS:
        check_slot_mapping(k_cache, slot_mapping)
    if k_cache.dtype != np.float32:  # a float16 cache: NumPy's scatter converts on write
        kernels_ref.store_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    _scatter(
        k.astype(np.float32, copy=False),
        v.astype(np.float32, copy=False),
        k_cache,
        v_cache,
        np.asarray(slot_mapping, dtype=np.int64),
    )

"""Paged attention on the GPU (plus ``store_kv``, and contiguous ``attention`` on top of it).

``store_kv`` is a scatter: a grid-stride loop over the T * Hkv * D elements of k and v,
each copied to ``cache[slot // B, slot % B]``; tokens with a negative slot are skipped.

``paged_attention`` gives one thread block to each (query token t, query head h)::

    grid  = (T, H)
    block = n threads; a *tile* of n consecutive keys is processed per step, thread i
            owning key tile_start + i

    find s (binary search in query_start_loc), the query's position, and so the number
    of visible keys ctx = seq_len - q_len + (t - query_start_loc[s]) + 1   (causal)
    kv_head = h // (H / Hkv)                                                 (GQA)
    q -> shared memory; acc[D] = 0 (shared); m = -inf; norm = 0  (m, norm: registers)
    for each tile of keys:
        thread i: j = tile_start + i; physical block = block_tables[s, j // B]
                  score_i = scale * q . k_cache[block, j % B, kv_head]       (-inf past ctx)
        syncthreads                                   (1) the tile's scores are visible
        every thread: m_new = max(m, max_i score_i); p_i = exp(score_i - m_new)
        syncthreads                                   (2) the tile's p_i are visible
        every thread: norm = norm * exp(m - m_new) + sum_i p_i
        thread owning dims d: acc[d] = acc[d] * exp(m - m_new) + sum_i p_i * v[j_i, d]
        syncthreads                                   (3) tile buffers free for the next tile
    out[t, h] = acc / norm

This is the online softmax: the running max m and denominator norm are rescaled by
``exp(m - m_new)`` whenever a larger score appears, so the keys are read once and the
full row of scores never exists. Every thread folds the same shared tile in the same
order, so m and norm are identical in every thread without a broadcast. Keys are gathered
through the block table one token at a time: a sequence's pages may be anywhere in the
pool, and table entries past its last page are never read.

What a production kernel (vLLM's, FlashInfer's) does beyond this one: one block per
(sequence, KV head) so the g query heads of a GQA group share each K/V load; a warp per
key with vectorised 16-byte loads, so reading a key is coalesced (here thread i reads key
i's D values, a strided pattern); warp shuffles instead of shared memory for the tile
max and sum; and a split over the context ("flash-decoding") so a long decode with few
sequences still fills the GPU.
"""

from __future__ import annotations

import math
import os
from typing import Any

from numba import cuda, float32, int64

from kernels_cuda._runtime import (
    MAX_BLOCK_THREADS,
    block_threads,
    contiguous,
    grid_stride_blocks,
    require_device,
    to_host,
    xp,
)
from kernels_ref.attention import check_paged_metadata, check_slot_mapping

#: The kernels do not check their indices: inconsistent metadata would read or write outside
#: the pool (on a GPU, another allocation's memory). NANOSERVE_CHECK_BOUNDS=1 checks it first,
#: as the reference always does, on a host copy of the metadata (a device-to-host copy per call).
CHECK_BOUNDS = os.environ.get("NANOSERVE_CHECK_BOUNDS", "") == "1"

#: Largest head dimension the shared-memory buffers hold (SmolLM2 uses 64).
MAX_HEAD_DIM = 256


@cuda.jit
def store_kv_kernel(k, v, k_cache, v_cache, slot_mapping):  # [T, Hkv, D] x2 -> [N, B, Hkv, D] x2 in place
    num_tokens, num_kv_heads, head_dim = k.shape
    block_size = k_cache.shape[1]
    for e in range(cuda.grid(1), num_tokens * num_kv_heads * head_dim, cuda.gridsize(1)):
        t = e // (num_kv_heads * head_dim)
        slot = slot_mapping[t]
        if slot < 0:  # a padding token: nothing to store
            continue
        h = (e // head_dim) % num_kv_heads
        d = e % head_dim
        k_cache[slot // block_size, slot % block_size, h, d] = k[t, h, d]
        v_cache[slot // block_size, slot % block_size, h, d] = v[t, h, d]


def store_kv(k: Any, v: Any, k_cache: Any, v_cache: Any, slot_mapping: Any) -> None:  # [T, Hkv, D] x2 -> caches
    """Scatter k, v into their slots of the paged caches, in place; slot < 0 = skip.

    With ``CHECK_BOUNDS``, a slot other than -1 outside the pool is a ValueError, raised
    before anything is written.
    """
    require_device()
    if CHECK_BOUNDS:
        check_slot_mapping(k_cache, to_host(slot_mapping))
    elements = k.shape[0] * k.shape[1] * k.shape[2]
    if elements == 0:
        return
    threads = block_threads(256)
    store_kv_kernel[grid_stride_blocks(elements, threads), threads](
        contiguous(k), contiguous(v), k_cache, v_cache, contiguous(slot_mapping, xp.int64)
    )


@cuda.jit(device=True)
def sequence_of(query_start_loc, t):  # [S + 1], row -> s
    """The sequence owning query row t: the largest s with query_start_loc[s] <= t."""
    lo = 0
    hi = query_start_loc.shape[0] - 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if query_start_loc[mid] <= t:
            lo = mid
        else:
            hi = mid - 1
    return lo


@cuda.jit
def paged_attention_kernel(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, out):
    # q [T, H, D], caches [N, B, Hkv, D], block_tables [S, max_blocks] -> out [T, H, D]
    q_sh = cuda.shared.array(MAX_HEAD_DIM, float32)  # this block's query vector
    acc = cuda.shared.array(MAX_HEAD_DIM, float32)  # running sum of p * v (unnormalised)
    scores = cuda.shared.array(MAX_BLOCK_THREADS, float32)  # the tile's scores
    probs = cuda.shared.array(MAX_BLOCK_THREADS, float32)  # the tile's exp(score - m_new)
    key_block = cuda.shared.array(MAX_BLOCK_THREADS, int64)  # physical block of each tile key

    t = cuda.blockIdx.x
    h = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    n = cuda.blockDim.x
    num_seqs = seq_lens.shape[0]
    if t < query_start_loc[0] or t >= query_start_loc[num_seqs]:
        return  # a row no sequence owns stays zero (the whole block leaves together)
    s = sequence_of(query_start_loc, t)
    q_len = query_start_loc[s + 1] - query_start_loc[s]
    ctx = seq_lens[s] - q_len + (t - query_start_loc[s]) + 1  # keys 0 .. ctx-1 are visible
    head_dim = q.shape[2]
    block_size = k_cache.shape[1]
    kv_head = h // (q.shape[1] // k_cache.shape[2])
    scale32 = float32(scale)

    for d in range(tid, head_dim, n):
        q_sh[d] = q[t, h, d]
        acc[d] = 0.0
    cuda.syncthreads()

    m = float32(-math.inf)  # running max of the scores seen so far
    norm = float32(0.0)  # running sum of exp(score - m): the softmax denominator
    for tile_start in range(0, ctx, n):
        j = tile_start + tid
        score = float32(-math.inf)
        if j < ctx:
            block = block_tables[s, j // block_size]
            key_block[tid] = block
            dot = float32(0.0)
            for d in range(head_dim):
                dot += q_sh[d] * float32(k_cache[block, j % block_size, kv_head, d])
            score = dot * scale32
        scores[tid] = score
        cuda.syncthreads()  # (1) scores of the whole tile are visible

        m_new = m
        for i in range(n):
            m_new = max(m_new, scores[i])
        probs[tid] = math.exp(score - m_new)  # 0 for keys past ctx
        alpha = math.exp(m - m_new)  # rescales everything accumulated so far
        cuda.syncthreads()  # (2) probabilities of the whole tile are visible

        tile_sum = float32(0.0)
        for i in range(n):
            tile_sum += probs[i]
        norm = norm * alpha + tile_sum
        keys_in_tile = min(n, ctx - tile_start)
        for d in range(tid, head_dim, n):  # this thread owns acc[d]: no race
            a = acc[d] * alpha
            for i in range(keys_in_tile):
                a += probs[i] * float32(v_cache[key_block[i], (tile_start + i) % block_size, kv_head, d])
            acc[d] = a
        m = m_new
        cuda.syncthreads()  # (3) everyone is done with the tile before it is overwritten

    for d in range(tid, head_dim, n):
        out[t, h, d] = acc[d] / norm


def paged_attention(
    q: Any,  # [T, H, D]
    k_cache: Any,  # [N, B, Hkv, D]
    v_cache: Any,  # [N, B, Hkv, D]
    block_tables: Any,  # [S, max_blocks] int
    query_start_loc: Any,  # [S + 1] int
    seq_lens: Any,  # [S] int
    scale: float,
) -> Any:  # -> [T, H, D]
    """Varlen causal attention over pages; same contract as kernels_ref.paged_attention.

    With ``CHECK_BOUNDS``, metadata that would read outside the pool (a block id that a
    sequence reads outside [0, N), a seq_len past its block table, query lengths that do
    not fit) is a ValueError, raised before the launch.
    """
    require_device()
    if CHECK_BOUNDS:
        check_paged_metadata(k_cache, to_host(block_tables), to_host(query_start_loc), to_host(seq_lens))
    q = contiguous(q, xp.float32)
    out = xp.zeros_like(q)
    num_tokens, num_heads, head_dim = q.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"paged_attention supports head_dim <= {MAX_HEAD_DIM}, got {head_dim}")
    if num_tokens == 0 or num_heads == 0 or len(seq_lens) == 0:
        return out
    threads = block_threads(128)
    paged_attention_kernel[(num_tokens, num_heads), threads](
        q,
        k_cache,
        v_cache,
        contiguous(block_tables, xp.int64),
        contiguous(query_start_loc, xp.int64),
        contiguous(seq_lens, xp.int64),
        float(scale),
        out,
    )
    return out


def attention(q: Any, k: Any, v: Any, scale: float) -> Any:  # [Tq, H, D], [Tk, Hkv, D] x2 -> [Tq, H, D]
    """Contiguous causal attention: the paged kernel with the keys as one block of Tk slots."""
    num_q, num_k = q.shape[0], k.shape[0]
    if num_q == 0:
        return xp.zeros_like(contiguous(q, xp.float32))
    return paged_attention(
        q,
        xp.asarray(k)[None],  # [1, Tk, Hkv, D]: a pool of one block holding the whole sequence
        xp.asarray(v)[None],
        xp.zeros((1, 1), dtype=xp.int64),
        xp.asarray([0, num_q], dtype=xp.int64),
        xp.asarray([num_k], dtype=xp.int64),
        scale,
    )

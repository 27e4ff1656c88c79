"""The int8 KV cache on the GPU: ``store_kv_int8`` and ``paged_attention_int8``
(spec and layout: kernels_ref.kv_int8).

``store_kv_int8`` gives one thread to each (token, KV head) row, in a grid-stride loop
over the T * Hkv rows: the thread finds the row's largest magnitude, writes its scale,
then divides and rounds the D values into int8. A row is D values (64 for SmolLM2), so
a thread per row is enough parallelism for the few rows a step writes. The division is
IEEE (no fastmath) and the rounding half to even (``_round_half_even``), so the bytes
and scales equal the reference's bit for bit.

``paged_attention_int8`` is ``kernels_cuda.attention.paged_attention_kernel`` (one block
per (query token t, query head h), tiles of n keys, online softmax, three barriers per
tile: its docstring draws it) reading int8 pages, with each token's scale folded in
where the float kernel reads a float::

    thread i: score_i = (q . k_int8[j_i]) * (k_scale[j_i] * scale)     (-inf past ctx)
              weight_i = p_i * v_scale[j_i]                            (into shared memory)
    acc[d] += sum_i weight_i * v_int8[j_i, d]

so a key or value is never dequantized into memory: the int8 is widened in a register.
"""

from __future__ import annotations

import math
import os
from typing import Any

from numba import cuda, float32, float64, int8, int64

from kernels_cuda._runtime import (
    MAX_BLOCK_THREADS,
    block_threads,
    contiguous,
    grid_stride_blocks,
    require_device,
    to_host,
    xp,
)
from kernels_cuda.attention import MAX_HEAD_DIM, sequence_of
from kernels_ref.attention import check_paged_metadata, check_slot_mapping
from kernels_ref.kv_int8 import INT8_MAX

#: Kernels do not check their indices; NANOSERVE_CHECK_BOUNDS=1 checks on a host copy first.
CHECK_BOUNDS = os.environ.get("NANOSERVE_CHECK_BOUNDS", "") == "1"


@cuda.jit(device=True)
def _round_half_even(y):  # float32 with |y| < 2**22 -> the nearest integer, ties to even (NumPy's rint)
    r = math.floor(y + float32(0.5))  # exact: y + 0.5 needs no rounding below 2**22
    if r - y == float32(0.5) and r % 2 != 0:
        r -= 1
    return r


@cuda.jit
def store_kv_int8_kernel(x, cache, scales, slot_mapping):  # [T, Hkv, D] -> [N, B, Hkv, D] int8, [N, B, Hkv] in place
    num_tokens, num_kv_heads, head_dim = x.shape
    block_size = cache.shape[1]
    for row in range(cuda.grid(1), num_tokens * num_kv_heads, cuda.gridsize(1)):
        t = row // num_kv_heads
        h = row % num_kv_heads
        slot = slot_mapping[t]
        if slot < 0:  # a padding token: nothing to store
            continue
        block = slot // block_size
        offset = slot % block_size
        amax = float32(0.0)
        for d in range(head_dim):
            amax = max(amax, abs(float32(x[t, h, d])))
        scale = amax / float32(INT8_MAX)
        divisor = scale if scale > float32(0.0) else float32(1.0)
        for d in range(head_dim):
            r = _round_half_even(float32(x[t, h, d]) / divisor)
            cache[block, offset, h, d] = min(max(r, -INT8_MAX), INT8_MAX)
        scales[block, offset, h] = scale


def store_kv_int8(k: Any, v: Any, k_cache: Any, v_cache: Any, k_scales: Any, v_scales: Any, slot_mapping: Any) -> None:
    """Quantize k, v per (token, KV head) into their slots, in place; slot < 0 = skip.

    [T, Hkv, D] float32 x2 -> [N, B, Hkv, D] int8 x2 and [N, B, Hkv] float32 x2. With
    ``CHECK_BOUNDS``, a slot other than -1 outside the pool is a ValueError, raised
    before anything is written.
    """
    require_device()
    if CHECK_BOUNDS:
        check_slot_mapping(k_cache, to_host(slot_mapping))
    rows = k.shape[0] * k.shape[1]
    if rows == 0:
        return
    threads = block_threads(128)
    slots = contiguous(slot_mapping, xp.int64)
    for x, cache, scales in ((k, k_cache, k_scales), (v, v_cache, v_scales)):
        store_kv_int8_kernel[grid_stride_blocks(rows, threads), threads](contiguous(x, xp.float32), cache, scales, slots)


@cuda.jit
def paged_attention_int8_kernel(q, k_cache, v_cache, k_scales, v_scales, block_tables, query_start_loc, seq_lens, scale, out):
    # q [T, H, D] f32, caches [N, B, Hkv, D] int8, scales [N, B, Hkv] f32, block_tables [S, max_blocks] -> out [T, H, D]
    q_sh = cuda.shared.array(MAX_HEAD_DIM, float32)  # this block's query vector
    acc = cuda.shared.array(MAX_HEAD_DIM, float32)  # running sum of p * v (unnormalised)
    scores = cuda.shared.array(MAX_BLOCK_THREADS, float32)  # the tile's scores
    probs = cuda.shared.array(MAX_BLOCK_THREADS, float32)  # the tile's exp(score - m_new)
    weights = cuda.shared.array(MAX_BLOCK_THREADS, float32)  # probs * the value's scale
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
                dot += q_sh[d] * float32(k_cache[block, j % block_size, kv_head, d])  # int8 widened in a register
            score = dot * (k_scales[block, j % block_size, kv_head] * scale32)
        scores[tid] = score
        cuda.syncthreads()  # (1) scores of the whole tile are visible

        m_new = m
        for i in range(n):
            m_new = max(m_new, scores[i])
        p = math.exp(score - m_new)  # 0 for keys past ctx
        probs[tid] = p
        weights[tid] = p * v_scales[key_block[tid], j % block_size, kv_head] if j < ctx else float32(0.0)
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
                a += weights[i] * float32(v_cache[key_block[i], (tile_start + i) % block_size, kv_head, d])
            acc[d] = a
        m = m_new
        cuda.syncthreads()  # (3) everyone is done with the tile before it is overwritten

    for d in range(tid, head_dim, n):
        out[t, h, d] = acc[d] / norm


def paged_attention_int8(
    q: Any,  # [T, H, D] float32
    k_cache: Any,  # [N, B, Hkv, D] int8
    v_cache: Any,  # [N, B, Hkv, D] int8
    k_scales: Any,  # [N, B, Hkv] float32
    v_scales: Any,  # [N, B, Hkv] float32
    block_tables: Any,  # [S, max_blocks] int
    query_start_loc: Any,  # [S + 1] int
    seq_lens: Any,  # [S] int
    scale: float,
) -> Any:  # -> [T, H, D] float32
    """Varlen causal attention over int8 pages; same contract as kernels_ref.paged_attention_int8.

    With ``CHECK_BOUNDS``, metadata that would read outside the pool is a ValueError,
    raised before the launch.
    """
    require_device()
    if CHECK_BOUNDS:
        check_paged_metadata(k_cache, to_host(block_tables), to_host(query_start_loc), to_host(seq_lens))
    q = contiguous(q, xp.float32)
    out = xp.zeros_like(q)
    num_tokens, num_heads, head_dim = q.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"paged_attention_int8 supports head_dim <= {MAX_HEAD_DIM}, got {head_dim}")
    if num_tokens == 0 or num_heads == 0 or len(seq_lens) == 0:
        return out
    threads = block_threads(128)
    paged_attention_int8_kernel[(num_tokens, num_heads), threads](
        q,
        k_cache,
        v_cache,
        k_scales,
        v_scales,
        contiguous(block_tables, xp.int64),
        contiguous(query_start_loc, xp.int64),
        contiguous(seq_lens, xp.int64),
        float(scale),
        out,
    )
    return out


def ptx_signatures() -> list[tuple[str, Any, tuple]]:
    """(label, kernel, argument types) of this module's kernels for ``cuda.compile_ptx``,
    in the form of ``kernels_cuda.ptx.kernel_signatures``."""
    f32_3, i8_4, i64_1, i64_2 = float32[:, :, ::1], int8[:, :, :, ::1], int64[::1], int64[:, ::1]
    return [
        ("store_kv_int8", store_kv_int8_kernel, (f32_3, i8_4, f32_3, i64_1)),
        ("paged_attention_int8", paged_attention_int8_kernel,
         (f32_3, i8_4, i8_4, f32_3, f32_3, i64_2, i64_1, i64_1, float64, f32_3)),
    ]  # fmt: skip

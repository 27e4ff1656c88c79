"""Paged attention and ``store_kv`` compiled for the CPU (spec: kernels_ref.attention).

Decodes and short chunks read the pages in place. The reference gathers every sequence's pages into one
padded [S, L, Hkv, D] array before multiplying, which copies the whole KV context on
every layer of every step (and pads each sequence to the longest). Here each sequence
walks its block table and reads each key and value once, straight from the pool::

    for s in range(S):                                  query rows r of s: positions last + r
        for j in 0 .. seq_len-1:                        (1) scores, keys read in place
            keys = k_cache[block_tables[s, j // B], j % B]             [Hkv, D]
            scores[r, h, j] = scale * q[r, h] . keys[h // g]   every head h (GQA), every r with last + r >= j
        p = softmax(scores[r, h, :last + r + 1])        (2) per query row and head
        for j in 0 .. seq_len-1:                        (3) values, in the same order
            values = v_cache[block_tables[s, j // B], j % B]           [Hkv, D]
            out[r, h] += p[r, h, j] * values[h // g]    the same (r, h) pairs

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

Sequences with up to ``MAX_QUERY_ROWS`` queries (decodes, and the k + 1 rows of a
speculative verification) take this loop, each query row seeing the keys up to its own
position, so each page is read once for all rows of its sequence. Longer prefill chunks go
through the reference path: gather the sequence's pages once, then BLAS matmuls (with
many queries per gathered key the copy is cheap next to the dot products, and BLAS does
those faster). The whole batch is one compiled call: the per-call Python work (index
arrays, fancy indexing, a function-typed argument that Numba re-typed on every call)
used to cost more than the kernel at short contexts. The softmax's ``exp`` is a
vectorised polynomial (:func:`_exp_shifted`), not libm's one call per element.

Measured (Intel Xeon with AVX-512, 2 cores, idle; one sequence, 9 query heads, 3 KV
heads, D = 64, wall time per call, median of 30, in an ad-hoc timing loop; before = decodes
through the old per-decode loop, chunks through gather + BLAS; a second run of the new
code came out 0-20% slower at 256 and 1024 keys, the machine's noise):

    context     32              256              1024
    rows T      1    5    9     1    5    9      1     5     9
    before      59  103  123   137  392  509    459  2710  3926   us
    now         22   57   77    80  328  574    301  1392  2336   us

At 256 keys, 9 rows already lose to gather + BLAS, hence ``MAX_QUERY_ROWS = 8``.
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit

import kernels_ref
from kernels_cpu.pointwise import FASTMATH
from kernels_ref.attention import check_paged_metadata, check_slot_mapping, gather_pages

# The compiled loops do not check their indices: inconsistent metadata would read or write
# outside the pool. NANOSERVE_CHECK_BOUNDS=1 checks it first, as the reference always does.
CHECK_BOUNDS = os.environ.get("NANOSERVE_CHECK_BOUNDS", "") == "1"

#: Sequences with up to this many queries in a step are computed in place by the compiled
#: loop; longer prefill chunks gather their pages for BLAS (the crossover: see above).
MAX_QUERY_ROWS = 8


@njit(fastmath={"contract"}, cache=True)
def _exp_shifted(row, count, shift):  # [>= count] f32, float32; row[:count] rewritten
    """``row[j] = exp(row[j] - shift)`` for j < count, where every ``row[j] - shift <= 0``.

    libm's ``expf`` is one call per element; this loop vectorises. It is Cephes' ``expf``:
    write ``y = k ln2 + r`` with k an integer and ``|r| <= ln2 / 2`` (ln2 split in two
    constants, so that ``k ln2`` is exact), take ``exp(r)`` from a degree-7 polynomial,
    then add k to the float's exponent bits. Relative error below 1e-7 (two float32 ulps,
    tested against NumPy); y below -87.3 is taken as -87.3 (1.2e-38, about the smallest normal
    float32, where exp would be 0 or a subnormal); a nan stays nan. Only ``contract``:
    reassociating ``y - k * C1 - k * C2`` would undo the split.
    """
    bits = row.view(np.int32)
    for j in range(count):
        y = row[j] - shift
        y = np.float32(-87.3) if y < np.float32(-87.3) else y
        k = np.floor(y * np.float32(1.44269504) + np.float32(0.5))  # round(y / ln2)
        r = y - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        row[j] = p * (r * r) + r + np.float32(1.0)  # exp(r), in [0.7, 1.5)
        bits[j] += np.int32(k) << 23  # times 2^k


@njit(fastmath=FASTMATH, inline="always")
def _attend_rows(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, max_rows, out, read_page):
    # q [T, H, D] f32; k_cache, v_cache [N, B, Hkv, D] f32 or uint16 (float16 bits);
    # block_tables [S, max_blocks] int64; query_start_loc [S + 1] int64; seq_lens [S] int64;
    # out [T, H, D] f32, zeros (the rows of every sequence with 1..max_rows queries accumulated);
    # read_page(cache, block, scratch) -> that page as float32 [B, Hkv, D]
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    scratch = np.empty((block_size, num_kv_heads, head_dim), dtype=np.float32)
    for s in range(seq_lens.shape[0]):
        row0, rows = query_start_loc[s], query_start_loc[s + 1] - query_start_loc[s]
        if rows < 1 or rows > max_rows:
            continue  # no queries, or a prefill chunk (gather + BLAS, in the caller)
        seq_len = seq_lens[s]
        last = seq_len - rows  # query r sits at position last + r and sees keys 0 .. last + r
        scores = np.empty((rows, num_heads, seq_len), dtype=np.float32)
        for first in range(0, seq_len, block_size):  # (1) q . k for every key, page by page
            keys = read_page(k_cache, block_tables[s, first // block_size], scratch)  # [B, Hkv, D]
            for i in range(min(block_size, seq_len - first)):
                j = first + i
                for r in range(max(0, j - last), rows):  # the queries that see key j
                    for h in range(num_heads):
                        g = h // group
                        dot = np.float32(0.0)
                        for d in range(head_dim):
                            dot += q[row0 + r, h, d] * keys[i, g, d]
                        scores[r, h, j] = dot * scale
        for r in range(rows):  # (2) softmax of each query head's visible row
            visible = last + r + 1
            for h in range(num_heads):
                row = scores[r, h]  # [seq_len], the first `visible` used
                row_max = row[0]
                for j in range(1, visible):
                    row_max = max(row_max, row[j])
                _exp_shifted(row, visible, row_max)
                total = np.float32(0.0)
                for j in range(visible):
                    total += row[j]
                inverse = np.float32(1.0) / total
                for j in range(visible):
                    row[j] *= inverse
        for first in range(0, seq_len, block_size):  # (3) the probability-weighted sum of the values
            values = read_page(v_cache, block_tables[s, first // block_size], scratch)  # [B, Hkv, D]
            for i in range(min(block_size, seq_len - first)):
                j = first + i
                for r in range(max(0, j - last), rows):
                    for h in range(num_heads):
                        g, p = h // group, scores[r, h, j]
                        for d in range(head_dim):
                            out[row0 + r, h, d] += p * values[i, g, d]


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


@njit(fastmath=FASTMATH, cache=True)
def _attend_rows_f32(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, max_rows, out):
    """:func:`_attend_rows` over a float32 cache, its pages read in place."""
    _attend_rows(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, max_rows, out, _float32_page)


@njit(fastmath=FASTMATH, cache=True)
def _attend_rows_f16(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, max_rows, out):
    """:func:`_attend_rows` over a float16 cache (its uint16 bits), each page widened first."""
    _attend_rows(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, max_rows, out, _float16_page)


def paged_attention(
    q: np.ndarray,  # [T, H, D]
    k_cache: np.ndarray,  # [N, B, Hkv, D]
    v_cache: np.ndarray,  # [N, B, Hkv, D]
    block_tables: np.ndarray,  # [S, max_blocks] int
    query_start_loc: np.ndarray,  # [S + 1] int
    seq_lens: np.ndarray,  # [S] int
    scale: float,
) -> np.ndarray:  # -> [T, H, D]
    """Varlen causal attention over pages; the contract of kernels_ref.paged_attention.

    Sequences with 1 .. ``MAX_QUERY_ROWS`` queries (decodes, speculative verifications)
    are one compiled call that reads the pages in place; longer chunks gather their pages
    and go through the reference's BLAS attention.
    """
    if CHECK_BOUNDS:
        check_paged_metadata(k_cache, block_tables, query_start_loc, seq_lens)
    query_start_loc = np.asarray(query_start_loc, dtype=np.int64)
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    out = np.zeros(q.shape, dtype=np.float32)
    if k_cache.dtype == np.float16:  # no float16 in Numba's CPU target: pass the bits
        attend, k_pages, v_pages = _attend_rows_f16, k_cache.view(np.uint16), v_cache.view(np.uint16)
    else:
        attend, k_pages, v_pages = _attend_rows_f32, k_cache.astype(np.float32, copy=False), v_cache.astype(np.float32, copy=False)
    attend(
        np.ascontiguousarray(q, dtype=np.float32),
        k_pages,
        v_pages,
        np.ascontiguousarray(block_tables, dtype=np.int64),
        query_start_loc,
        seq_lens,
        np.float32(scale),
        MAX_QUERY_ROWS,
        out,
    )
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    for s in np.nonzero(q_lens > MAX_QUERY_ROWS)[0]:  # prefill chunks: gather once, then BLAS
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        k, v = gather_pages(k_cache, v_cache, block_tables[s], int(seq_lens[s]))  # [L, Hkv, D] x2
        out[start:end] = kernels_ref.attention(q[start:end], k, v, scale)
    return out if q.dtype == np.float32 else out.astype(q.dtype)


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

"""The sampler's kernels on the GPU: repetition penalties, and the top-k, top-p and min-p filters.

``apply_penalties`` is element-wise: a grid-stride loop over the flattened [S, V], one
logit per thread per step, each reading its own prompt flag and output count (the
per-row penalties are three loads that every thread of a row shares through the cache).
The operations are the reference's, in its order; the one difference a real GPU may make
is the code generator fusing ``x - f * c`` into a multiply-add (the PTX has plain
``mul.f32`` / ``sub.f32``, which ptxas may contract; rounded once, not twice), which is
why its tolerance is a few float32 roundings rather than exact.

The filters run one thread block per row. top-k and top-p need "the k-th largest logit" / "where the sorted cumulative mass
crosses p", but a full sort of a 49152-entry row per sequence is the expensive way. Both
kernels instead *bisect over the float's bit pattern*::

    order_key(x):  reinterpret the float32 bits as an int32; positive floats already sort
                   like their bits, negative ones sort backwards, so flip their 31
                   magnitude bits. Now  x < y  <=>  order_key(x) < order_key(y).

    k-th largest key = the largest t with  count(key >= t) >= k      (32 halvings of the
    top-p cut-off    = the smallest t with mass(key > t)  <  p        int32 key range)

Each halving step is one block-wide reduction (``block_sum``); the result is exact, ties
included, with no sort and no extra memory. The logits are passed twice, as float32 and
as an int32 view of the same bytes, because numba has no scalar bit-cast.

top-p also reproduces the reference's tie rule: tokens with equal logits are ranked by
index, so at the cut-off key they are kept in index order while the mass before them
stays below p. min-p needs only the row max.
"""

from __future__ import annotations

import math
from typing import Any

from numba import cuda, float32, float64, int64

from kernels_cuda._reduce import block_max, block_sum
from kernels_cuda._runtime import (
    MAX_BLOCK_THREADS,
    block_threads,
    contiguous,
    grid_stride_blocks,
    require_device,
    xp,
)

KEY_MIN = -(2**31)  # smallest int32 key
KEY_END = 2**31  # one past the largest int32 key


@cuda.jit
def penalties_kernel(logits, prompt_mask, output_counts, presence, frequency, repetition, out):
    # [S, V] f32, [S, V] bool, [S, V] i32, [S] f32 x3 -> out [S, V] f32
    rows, vocab = logits.shape
    for i in range(cuda.grid(1), rows * vocab, cuda.gridsize(1)):
        s = i // vocab
        v = i - s * vocab
        x = logits[s, v]
        c = output_counts[s, v]
        if c > 0:  # in the output: all three penalties
            r = repetition[s]
            x = x / r if x > 0 else x * r
            x = x - frequency[s] * float32(c)
            x = x - presence[s]
        elif prompt_mask[s, v]:  # in the prompt only: the repetition penalty
            r = repetition[s]
            x = x / r if x > 0 else x * r
        out[s, v] = x


def apply_penalties(
    logits: Any,  # [S, V] float32
    prompt_mask: Any,  # [S, V] bool
    output_counts: Any,  # [S, V] int32
    presence: Any,  # [S] float32
    frequency: Any,  # [S] float32
    repetition: Any,  # [S] float32
) -> Any:  # [S, V] float32
    """Penalise tokens already seen (vLLM's semantics); same contract as kernels_ref."""
    require_device()
    logits = contiguous(logits, xp.float32)
    out = xp.empty_like(logits)
    if out.size:
        threads = block_threads(256)
        penalties_kernel[grid_stride_blocks(out.size, threads), threads](
            logits,
            contiguous(prompt_mask, xp.bool_),
            contiguous(output_counts, xp.int32),
            contiguous(presence, xp.float32),
            contiguous(frequency, xp.float32),
            contiguous(repetition, xp.float32),
            out,
        )
    return out


@cuda.jit(device=True)
def order_key(bits):  # int32 bit pattern of a float32 -> integer key that sorts like the float
    key = bits if bits >= 0 else bits ^ 0x7FFFFFFF
    return 0 if key == -1 else key  # -0.0 (key -1) compares equal to +0.0 (key 0)


@cuda.jit
def top_k_kernel(logits_bits, top_k, out):  # [S, V] int32 view of the logits, [S] -> out [S, V] in place
    counts = cuda.shared.array(MAX_BLOCK_THREADS, int64)
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    n = cuda.blockDim.x
    vocab = logits_bits.shape[1]
    k = top_k[row]
    if k <= 0 or k >= vocab:
        return  # filter disabled for this row (uniform across the block)
    lo = int64(KEY_MIN)  # invariant: count(key >= lo) >= k, and the answer is in [lo, hi]
    hi = int64(KEY_END - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        count = 0
        for i in range(tid, vocab, n):
            if order_key(logits_bits[row, i]) >= mid:
                count += 1
        if block_sum(counts, count) >= k:  # the same total in every thread: no divergence
            lo = mid
        else:
            hi = mid - 1
    for i in range(tid, vocab, n):  # lo is now the key of the k-th largest logit
        if order_key(logits_bits[row, i]) < lo:
            out[row, i] = -math.inf


def top_k_filter(logits: Any, top_k: Any) -> Any:  # [S, V], int [S] -> [S, V]
    """Keep the k largest logits of each row (ties kept); same contract as kernels_ref."""
    require_device()
    logits = contiguous(logits, xp.float32)
    out = logits.copy()
    if out.size:
        top_k_kernel[logits.shape[0], block_threads(128)](
            logits.view(xp.int32), contiguous(top_k, xp.int64), out
        )
    return out


@cuda.jit
def top_p_kernel(logits, logits_bits, top_p, probs, out):  # [S, V] f32, [S, V] i32, [S], scratch [S, V] f64 -> out
    scratch = cuda.shared.array(MAX_BLOCK_THREADS, float64)
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    n = cuda.blockDim.x
    vocab = logits.shape[1]
    p = top_p[row]
    if p >= 1.0:
        return  # filter disabled for this row

    # 1. probabilities in float64, as the reference computes them (thread-private entries)
    local_max = -math.inf
    for i in range(tid, vocab, n):
        local_max = max(local_max, float64(logits[row, i]))
    row_max = block_max(scratch, local_max)
    local_sum = 0.0
    for i in range(tid, vocab, n):
        e = math.exp(float64(logits[row, i]) - row_max)
        probs[row, i] = e
        local_sum += e
    total = block_sum(scratch, local_sum)
    for i in range(tid, vocab, n):
        probs[row, i] = probs[row, i] / total

    # 2. the cut-off key: the smallest t with mass(key > t) < p (KEY_END if none: p <= 0)
    lo = int64(KEY_MIN)
    hi = int64(KEY_END)
    while lo < hi:
        mid = (lo + hi) // 2
        mass = 0.0
        for i in range(tid, vocab, n):
            if order_key(logits_bits[row, i]) > mid:
                mass += probs[row, i]
        if block_sum(scratch, mass) < p:
            hi = mid
        else:
            lo = mid + 1
    cutoff = lo
    mass = 0.0
    for i in range(tid, vocab, n):
        if order_key(logits_bits[row, i]) > cutoff:
            mass += probs[row, i]
    mass_above = block_sum(scratch, mass)

    # 3. keep keys above the cut-off; at the cut-off, ties are ranked by index
    for i in range(tid, vocab, n):
        key = order_key(logits_bits[row, i])
        if key < cutoff:
            out[row, i] = -math.inf
        elif key == cutoff:
            ties_before = 0
            for j in range(i):
                if order_key(logits_bits[row, j]) == cutoff:
                    ties_before += 1
            if mass_above + ties_before * probs[row, i] >= p:
                out[row, i] = -math.inf


def top_p_filter(logits: Any, top_p: Any) -> Any:  # [S, V], float [S] -> [S, V]
    """Keep the smallest most-likely set with mass >= top_p; same contract as kernels_ref."""
    require_device()
    logits = contiguous(logits, xp.float32)
    out = logits.copy()
    if out.size:
        probs = xp.empty(logits.shape, dtype=xp.float64)  # per-row scratch
        top_p_kernel[logits.shape[0], block_threads(128)](
            logits, logits.view(xp.int32), contiguous(top_p, xp.float64), probs, out
        )
    return out


@cuda.jit
def min_p_kernel(logits, min_p, log_min_p, out):  # [S, V] f32, [S], [S] -> out [S, V] in place
    scratch = cuda.shared.array(MAX_BLOCK_THREADS, float32)
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    n = cuda.blockDim.x
    vocab = logits.shape[1]
    if min_p[row] <= 0:
        return  # filter disabled for this row
    local_max = float32(-math.inf)
    for i in range(tid, vocab, n):
        local_max = max(local_max, logits[row, i])
    threshold = block_max(scratch, local_max) + log_min_p[row]  # in min_p's precision
    for i in range(tid, vocab, n):
        if logits[row, i] < threshold:
            out[row, i] = -math.inf


def min_p_filter(logits: Any, min_p: Any) -> Any:  # [S, V], float [S] -> [S, V]
    """Keep tokens with probability >= min_p * p_max; same contract as kernels_ref.

    ``log(min_p)`` is taken on the host side array module, one value per row, so that the
    threshold is rounded exactly as the reference rounds it.
    """
    require_device()
    logits = contiguous(logits, xp.float32)
    min_p = contiguous(min_p)
    out = logits.copy()
    if out.size:
        log_min_p = xp.log(xp.where(min_p > 0, min_p, 1).astype(min_p.dtype))
        min_p_kernel[logits.shape[0], block_threads(128)](logits, min_p, log_min_p, out)
    return out

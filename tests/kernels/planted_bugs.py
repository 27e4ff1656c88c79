"""Kernels with planted bugs, to show that the suite in nanoserve.check_kernels catches them.

Each backend below is a copy of a correct kernel with one classic mistake:

    WRONG_GQA_HEAD      paged attention maps query head h to KV head h % Hkv instead of
                        h // (H / Hkv): right when H == Hkv or Hkv == 1, wrong otherwise
    LAST_KEY_DROPPED    paged attention lets a query see keys 0 .. pos-1, not 0 .. pos
                        (an off-by-one that hides the token's own key)
    RACY_RMS_NORM       the CUDA rms_norm without the barrier between writing the partial
                        sums to shared memory and reading them back (a race)
    PADDING_STORED      store_kv writes tokens whose slot is -1 (into the pool's last slot)
    TIES_DROPPED        top-k keeps exactly k tokens, dropping logits tied with the k-th

The numba kernel runs on the CUDA simulator (tests/kernels/conftest.py selects it).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable

import numpy as np
from numba import cuda, float32

import kernels_ref


def _paged_attention(kv_head_of: Callable[[int, int, int], int], visible: Callable[[int], int]) -> Callable:
    """A per-head loop copy of kernels_ref.paged_attention with pluggable head map / causal extent."""

    def paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale):  # [T, H, D] -> [T, H, D]
        out = np.zeros_like(q)
        block_size = k_cache.shape[1]
        num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
        for s in range(len(seq_lens)):
            start, end, seq_len = int(query_start_loc[s]), int(query_start_loc[s + 1]), int(seq_lens[s])
            blocks = block_tables[s, : -(-seq_len // block_size)]
            k = k_cache[blocks].reshape(-1, num_kv_heads, q.shape[2])[:seq_len].astype(np.float32)
            v = v_cache[blocks].reshape(-1, num_kv_heads, q.shape[2])[:seq_len].astype(np.float32)
            for t in range(start, end):
                pos = seq_len - (end - start) + (t - start)  # this query's position
                keys = visible(pos)
                for h in range(num_heads):
                    kvh = kv_head_of(h, num_heads, num_kv_heads)
                    scores = (k[:keys, kvh] @ q[t, h]) * scale
                    probs = kernels_ref.softmax(scores) if keys else scores
                    out[t, h] = probs @ v[:keys, kvh]
        return out

    return paged_attention


CORRECT_PAGED = types.SimpleNamespace(
    paged_attention=_paged_attention(lambda h, heads, kv: h // (heads // kv), lambda pos: pos + 1)
)
WRONG_GQA_HEAD = types.SimpleNamespace(
    paged_attention=_paged_attention(lambda h, heads, kv: h % kv, lambda pos: pos + 1)
)
LAST_KEY_DROPPED = types.SimpleNamespace(
    paged_attention=_paged_attention(lambda h, heads, kv: h // (heads // kv), lambda pos: pos)
)


@cuda.jit
def racy_rms_norm_kernel(x, w, eps, out):  # [R, d], [d] -> [R, d]
    scratch = cuda.shared.array(256, float32)
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    partial = float32(0.0)
    for i in range(tid, x.shape[1], cuda.blockDim.x):
        partial += x[row, i] * x[row, i]
    scratch[tid] = partial
    # BUG: no cuda.syncthreads() here: a thread may sum partials not written yet.
    total = float32(0.0)
    for i in range(cuda.blockDim.x):
        total += scratch[i]
    cuda.syncthreads()
    inv_rms = float32(1.0 / math.sqrt(total / x.shape[1] + eps))
    for i in range(tid, x.shape[1], cuda.blockDim.x):
        out[row, i] = x[row, i] * inv_rms * w[i]


def _racy_rms_norm(x, w, eps):  # [..., d], [d] -> [..., d]
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    if rows.size:
        racy_rms_norm_kernel[rows.shape[0], 8](rows, np.ascontiguousarray(w, dtype=np.float32), float(eps), out)
    return out.reshape(x.shape)


RACY_RMS_NORM = types.SimpleNamespace(rms_norm=_racy_rms_norm)


def _store_kv_with_padding(k, v, k_cache, v_cache, slot_mapping):  # [T, Hkv, D] x2 -> caches in place
    flat_k = k_cache.reshape(-1, *k_cache.shape[2:])
    flat_v = v_cache.reshape(-1, *v_cache.shape[2:])
    flat_k[slot_mapping] = k  # BUG: slot -1 is not skipped; it indexes the last slot
    flat_v[slot_mapping] = v


PADDING_STORED = types.SimpleNamespace(store_kv=_store_kv_with_padding)


def _top_k_exactly_k(logits, top_k):  # [S, V], [S] -> [S, V]
    out = logits.copy()
    vocab = logits.shape[-1]
    for s in np.nonzero((top_k > 0) & (top_k < vocab))[0]:
        drop = np.argsort(-logits[s], kind="stable")[top_k[s] :]  # BUG: ties with the k-th dropped
        out[s, drop] = -np.inf
    return out


TIES_DROPPED = types.SimpleNamespace(top_k_filter=_top_k_exactly_k)

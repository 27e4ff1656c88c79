"""Lab 03: the paged KV cache's two kernels, store_kv and paged_attention, in NumPy.

Write the bodies below. The grader uses this file as a kernel backend: the serving engine
calls your ``store_kv`` and ``paged_attention`` in every layer of every step. Use NumPy and
the standard library only (not kernels_ref, the answer key).

    python -m nanoserve lab check 03 student.py

The pool, one pair of arrays per layer:

    k_cache, v_cache: [N, B, Hkv, D]     N blocks (pages) of B token slots each
    slot s is block s // B, offset s % B  (slot = block * B + offset)
    block_tables[s, i] = the block holding tokens i*B .. i*B + B-1 of sequence s
"""

from __future__ import annotations

import numpy as np


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:  # [Tq, H, D], [Tk, Hkv, D], [Tk, Hkv, D] -> [Tq, H, D]
    """Your lab 02 kernel (paste it here): causal attention of the last Tq positions over Tk
    contiguous keys; query head h reads KV head ``h // (H // Hkv)``."""
    raise NotImplementedError("Lab 03: write attention (paste your lab 02 solution)")


def store_kv(
    k: np.ndarray,  # [T, Hkv, D]
    v: np.ndarray,  # [T, Hkv, D]
    k_cache: np.ndarray,  # [N, B, Hkv, D], written in place
    v_cache: np.ndarray,  # [N, B, Hkv, D], written in place
    slot_mapping: np.ndarray,  # [T] int, slot = block * B + offset; -1 = skip this token
) -> None:
    """Scatter each new token's key and value into its slot of the paged cache.

    Token t goes to block ``slot_mapping[t] // B``, offset ``slot_mapping[t] % B`` of both
    caches (B = ``k_cache.shape[1]``). A slot of -1 marks a token that must not be stored:
    nothing changes for it. Nothing else in the caches changes either. Returns None.
    """
    raise NotImplementedError("Lab 03: write store_kv")


def gather_pages(k_cache: np.ndarray, v_cache: np.ndarray, block_table: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:  # -> [L, Hkv, D] x2
    """One sequence's first ``seq_len`` keys and values, read in order through its block table.

    The sequence uses the first ``ceil(seq_len / B)`` entries of ``block_table``; entries
    after those may hold anything (even ids outside the pool) and must not be read.
    Returns two arrays of ``seq_len`` rows (L = seq_len), in token order.
    """
    raise NotImplementedError("Lab 03: write gather_pages")


def paged_attention(
    q: np.ndarray,  # [T, H, D]  queries of all scheduled tokens, sequence after sequence
    k_cache: np.ndarray,  # [N, B, Hkv, D]
    v_cache: np.ndarray,  # [N, B, Hkv, D]
    block_tables: np.ndarray,  # [S, max_blocks] int
    query_start_loc: np.ndarray,  # [S + 1] int, q rows of seq s are query_start_loc[s]:[s+1]
    seq_lens: np.ndarray,  # [S] int, tokens in the cache for seq s, the new ones included
    scale: float,
) -> np.ndarray:  # -> [T, H, D]
    """Causal attention over pages for a ragged batch of prefills, prefill chunks and decodes.

    Sequence s has ``q_len = query_start_loc[s+1] - query_start_loc[s]`` queries (0 for an
    idle sequence, 1 for a decode, seq_len for a whole prefill): the last q_len of its
    ``seq_lens[s]`` tokens, whose K/V ``store_kv`` already wrote. For each sequence the
    result is exactly ``attention(q_s, K_s, V_s, scale)`` with ``K_s, V_s = gather_pages(...)``.
    Slots past seq_len and unused pages may hold anything, even NaN. Returns a new float32
    array of q's shape.
    """
    raise NotImplementedError("Lab 03: write paged_attention")

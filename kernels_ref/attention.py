"""Attention kernels: contiguous causal attention (lesson 1), and paged attention over a
block pool (what the serving engine uses), plus ``store_kv`` which writes into the pool.

Paged KV layout (one pair of arrays per layer)::

    k_cache, v_cache: [N, B, Hkv, D]      N blocks of B token slots each
    block_tables:     [S, max_blocks]     block_tables[s, i] = physical block holding
                                          tokens i*B .. i*B+B-1 of sequence s
    slot of token t of sequence s = block_tables[s, t // B] * B + t % B

                 logical blocks of seq s           physical pool
                 +-----+-----+-----+               +----+----+----+----+----+
    tokens 0..   |  0  |  1  |  2  |   ------>     | b0 | b1 | b2 | b3 | b4 |
                 +-----+-----+-----+               +----+----+----+----+----+
    block_tables[s] = [3, 0, 4, ...]  (token 0 lives in b3, token B in b0, ...)

Entries of a block table past a sequence's last block are never read; they may hold
anything (including out-of-range ids). Everything that *is* read or written must be in the
pool: ``check_slot_mapping`` and ``check_paged_metadata`` say so with a clear error, and the
reference kernels always call them (compiled backends do when ``NANOSERVE_CHECK_BOUNDS=1``,
since a compiled kernel does not check its indices and would write outside the pool).

GQA: query head h reads key/value head ``h // (H // Hkv)``.
"""

import numpy as np

from kernels_ref.activation import softmax


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:  # [Tq, H, D], [Tk, Hkv, D], [Tk, Hkv, D] -> [Tq, H, D]
    """Causal attention of Tq new queries against Tk keys held contiguously (Tk >= Tq).

    The queries are the *last* Tq positions of the Tk-long sequence, so query i sits at
    position ``Tk - Tq + i`` and may attend to keys ``0 .. Tk - Tq + i``. Tq = Tk is a
    whole prefill; Tq = 1 is a decode step.

        out[i, h] = sum_j softmax_j(scale * q[i, h] . k[j, h // g]) * v[j, h // g]
    """
    num_q, num_heads, head_dim = q.shape
    num_k, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    qg = q.reshape(num_q, num_kv_heads, group, head_dim).transpose(1, 2, 0, 3)  # [Hkv, g, Tq, D]
    kt = k.transpose(1, 2, 0)[:, None]  # [Hkv, 1, D, Tk]
    scores = (qg @ kt) * scale  # [Hkv, g, Tq, Tk]
    q_pos = np.arange(num_k - num_q, num_k)[:, None]  # [Tq, 1]
    k_pos = np.arange(num_k)[None, :]  # [1, Tk]
    scores = np.where(k_pos <= q_pos, scores, -np.inf)
    probs = softmax(scores, axis=-1)
    out = probs @ v.transpose(1, 0, 2)[:, None]  # [Hkv, g, Tq, D]
    return out.transpose(2, 0, 1, 3).reshape(num_q, num_heads, head_dim)


def check_slot_mapping(k_cache: np.ndarray, slot_mapping: np.ndarray) -> None:  # [N, B, Hkv, D], [T]
    """Raise ValueError unless every slot is -1 (skip) or inside the pool's N * B slots."""
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    slots = np.asarray(slot_mapping)
    bad = slots[(slots < -1) | (slots >= num_slots)]
    if bad.size:
        raise ValueError(f"slot_mapping holds {bad[:3].tolist()}: slots must be -1 or in [0, {num_slots})")


def check_paged_metadata(
    k_cache: np.ndarray,  # [N, B, Hkv, D]
    block_tables: np.ndarray,  # [S, max_blocks]
    query_start_loc: np.ndarray,  # [S + 1]
    seq_lens: np.ndarray,  # [S]
) -> None:
    """Raise ValueError unless the blocks each sequence reads are in the pool and its queries fit."""
    num_blocks, block_size = k_cache.shape[:2]
    seq_lens = np.asarray(seq_lens)
    q_lens = np.diff(np.asarray(query_start_loc))
    if len(q_lens) != len(seq_lens) or (q_lens < 0).any() or (q_lens > seq_lens).any():
        raise ValueError(f"query lengths {q_lens.tolist()[:8]} must be >= 0 and <= seq_lens {seq_lens.tolist()[:8]}")
    used = -(-seq_lens // block_size)  # [S] blocks each sequence reads
    if (used > block_tables.shape[1]).any():
        raise ValueError(f"a seq_len needs more than the block table's {block_tables.shape[1]} blocks")
    read = np.arange(block_tables.shape[1])[None, :] < used[:, None]  # [S, max_blocks]
    bad = block_tables[read & ((block_tables < 0) | (block_tables >= num_blocks))]
    if bad.size:
        raise ValueError(f"block tables read blocks {bad[:3].tolist()}: ids must be in [0, {num_blocks})")


def store_kv(
    k: np.ndarray,  # [T, Hkv, D]
    v: np.ndarray,  # [T, Hkv, D]
    k_cache: np.ndarray,  # [N, B, Hkv, D], written in place
    v_cache: np.ndarray,  # [N, B, Hkv, D], written in place
    slot_mapping: np.ndarray,  # [T] int, slot = block * B + offset; -1 = skip this token
) -> None:
    """Scatter each new token's key and value into its slot of the paged cache.

    ``k_cache.reshape(N * B, Hkv, D)[slot_mapping[t]] = k[t]`` for every t whose slot is
    >= 0 (a negative slot marks a padding token that must not be stored).
    """
    check_slot_mapping(k_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    num_blocks, block_size = k_cache.shape[:2]
    flat_k = k_cache.reshape(num_blocks * block_size, *k_cache.shape[2:])
    flat_v = v_cache.reshape(num_blocks * block_size, *v_cache.shape[2:])
    flat_k[slots] = k[keep]
    flat_v[slots] = v[keep]


def paged_attention(
    q: np.ndarray,  # [T, H, D]  queries of all scheduled tokens, sequence after sequence
    k_cache: np.ndarray,  # [N, B, Hkv, D]
    v_cache: np.ndarray,  # [N, B, Hkv, D]
    block_tables: np.ndarray,  # [S, max_blocks] int
    query_start_loc: np.ndarray,  # [S + 1] int, q rows of seq s are query_start_loc[s]:[s+1]
    seq_lens: np.ndarray,  # [S] int, tokens in the cache for seq s, the new ones included
    scale: float,
) -> np.ndarray:  # -> [T, H, D]
    """Varlen causal attention over pages for a ragged batch of prefill chunks and decodes.

    Sequence s contributes ``q_len = query_start_loc[s+1] - query_start_loc[s]`` queries:
    the last q_len of its ``seq_lens[s]`` tokens (their K/V already stored with
    ``store_kv``). A decode has q_len 1, a whole prefill has q_len == seq_len, a prefill
    chunk or a speculative verification anything between. Per sequence this is exactly
    ``attention(q_s, K_s, V_s, scale)`` where K_s, V_s are the sequence's first seq_len
    keys/values gathered through its block table.
    """
    check_paged_metadata(k_cache, block_tables, query_start_loc, seq_lens)
    out = np.zeros_like(q)
    q_lens = np.diff(np.asarray(query_start_loc))
    decodes = np.nonzero(q_lens == 1)[0]
    if len(decodes):  # all single-token queries in one batched computation
        rows = np.asarray(query_start_loc)[decodes]
        out[rows] = _decode_attention(q[rows], k_cache, v_cache, block_tables[decodes], seq_lens[decodes], scale)
    for s in np.nonzero(q_lens > 1)[0]:  # prefill chunks one by one
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        k, v = gather_pages(k_cache, v_cache, block_tables[s], int(seq_lens[s]))
        out[start:end] = attention(q[start:end], k, v, scale)
    return out


def gather_pages(k_cache: np.ndarray, v_cache: np.ndarray, block_table: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:  # -> [L, Hkv, D] x2
    """One sequence's first seq_len keys and values, read through its block table."""
    block_size = k_cache.shape[1]
    blocks = block_table[: -(-seq_len // block_size)]
    k = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:seq_len]
    v = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:seq_len]
    return k, v


def _decode_attention(
    q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_tables: np.ndarray, seq_lens: np.ndarray, scale: float
) -> np.ndarray:  # [S, H, D], [N, B, Hkv, D] x2, [S, max_blocks], [S] -> [S, H, D]
    """The q_len == 1 case for S sequences at once: same math as ``attention`` per sequence.

    Every sequence's pages are gathered into one padded [S, L, Hkv, D] array (L = the
    longest sequence, rounded up to whole blocks); key positions >= seq_len are masked.
    A decode's single query is the last token, so no causal mask is needed beyond that.
    """
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = -(-int(seq_lens.max()) // block_size)
    table = block_tables[:, :num_blocks]
    in_use = np.arange(num_blocks)[None, :] * block_size < seq_lens[:, None]  # [S, nb]
    table = np.where(in_use, table, 0)  # unused entries may hold anything: read block 0, masked below
    k = k_cache[table].reshape(num_seqs, num_blocks * block_size, num_kv_heads, head_dim)  # [S, L, Hkv, D]
    v = v_cache[table].reshape(num_seqs, num_blocks * block_size, num_kv_heads, head_dim)
    qg = q.reshape(num_seqs, num_kv_heads, group, head_dim)  # [S, Hkv, g, D]
    scores = (qg @ k.transpose(0, 2, 3, 1)) * scale  # [S, Hkv, g, L]
    beyond = np.arange(num_blocks * block_size)[None, :] >= seq_lens[:, None]  # [S, L]
    scores = np.where(beyond[:, None, None, :], -np.inf, scores)
    v[beyond] = 0.0  # slots past seq_len may hold anything (even NaN); 0 * NaN would leak into out
    probs = softmax(scores, axis=-1)
    out = probs @ v.transpose(0, 2, 1, 3)  # [S, Hkv, g, D]
    return out.reshape(num_seqs, num_heads, head_dim)

"""Cases for ``kernels_ref.attention``: ``attention``, ``store_kv`` and ``paged_attention``.

Paged attention gets ragged batches (decodes, whole prefills, prefill chunks, idle
sequences) whose pages are scattered through the pool, with garbage wherever the kernel
must not look; :func:`paged_attention_params` and :func:`paged_attention_build` are also
used by the metamorphic tests in ``tests/kernels``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from nanoserve.check_kernels.cases.draw import case_rng, normal, seeds, strategies
from nanoserve.check_kernels.limits import Limits
from nanoserve.check_kernels.spec import KernelSpec
from nanoserve.check_kernels.tolerances import ATTENTION, EXACT, value_magnitude


def _heads(limits: Limits) -> dict:
    st = strategies()
    return {
        "kv_heads": st.integers(1, limits.max_kv_heads),
        "group": st.integers(1, limits.max_group),
        "head_dim": st.sampled_from(limits.head_dims),
    }


def _attention_params(limits: Limits) -> Any:
    st = strategies()

    @st.composite
    def params(draw: Callable) -> dict:
        num_k = draw(st.integers(1, limits.max_seq_len))
        fields = draw(st.fixed_dictionaries({
            **_heads(limits),
            "kv_dtype": st.sampled_from(["float32", "float16"]),
            "scale": st.sampled_from([None, 0.05, 2.0]),  # None: 1/sqrt(head_dim)
            "seed": seeds(),
        }))  # fmt: skip
        return {"num_q": draw(st.integers(1, min(num_k, limits.max_tokens))), "num_k": num_k, **fields}

    return params()


def _scale(p: dict) -> float:
    return 1.0 / math.sqrt(p["head_dim"]) if p["scale"] is None else p["scale"]


def _attention_build(p: dict) -> tuple:  # -> q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, D], scale
    rng = case_rng(p)
    heads, dim = p["kv_heads"] * p["group"], p["head_dim"]
    q = normal(rng, (p["num_q"], heads, dim))
    k = normal(rng, (p["num_k"], p["kv_heads"], dim), 1.0, p["kv_dtype"])
    v = normal(rng, (p["num_k"], p["kv_heads"], dim), 1.0, p["kv_dtype"])
    return q, k, v, _scale(p)


def _store_kv_params(limits: Limits) -> Any:
    st = strategies()
    return st.fixed_dictionaries({
        "tokens": st.integers(0, limits.max_tokens),
        "kv_heads": st.integers(1, limits.max_kv_heads),
        "head_dim": st.sampled_from(limits.head_dims),
        "block_size": st.sampled_from(limits.block_sizes),
        "spare_blocks": st.integers(0, 3),
        "skip_fraction": st.sampled_from([0.0, 0.3, 1.0]),
        "cache_dtype": st.sampled_from(["float32", "float16"]),
        "slot_dtype": st.sampled_from(["int32", "int64"]),
        "seed": seeds(),
    })  # fmt: skip


def _store_kv_build(p: dict) -> tuple:  # -> k, v [T, Hkv, D], k_cache, v_cache [N, B, Hkv, D], slots [T]
    rng = case_rng(p)
    tokens, block_size = p["tokens"], p["block_size"]
    num_blocks = max(1, -(-tokens // block_size) + p["spare_blocks"])
    shape = (tokens, p["kv_heads"], p["head_dim"])
    cache_shape = (num_blocks, block_size, p["kv_heads"], p["head_dim"])
    slots = rng.choice(num_blocks * block_size, size=tokens, replace=False)  # distinct slots
    slots[rng.random(tokens) < p["skip_fraction"]] = -1
    return (
        normal(rng, shape),
        normal(rng, shape),
        normal(rng, cache_shape, 1.0, p["cache_dtype"]),
        normal(rng, cache_shape, 1.0, p["cache_dtype"]),
        slots.astype(p["slot_dtype"]),
    )


def paged_attention_params(limits: Limits) -> Any:
    """Strategy for a ragged batch: per sequence (q_len, seq_len), pages, heads, dtypes.

    Sequences are decodes (q_len 1), whole prefills (q_len = seq_len), prefill chunks or
    idle (q_len 0); lengths are often exact multiples of the block size. The total
    number of query tokens stays within ``limits.max_tokens``.
    """
    st = strategies()

    @st.composite
    def params(draw: Callable) -> dict:
        block_size = draw(st.sampled_from(limits.block_sizes))
        whole_blocks = st.integers(1, max(1, limits.max_seq_len // block_size)).map(lambda n: n * block_size)
        budget = limits.max_tokens
        seqs = []
        for _ in range(draw(st.integers(0, limits.max_seqs))):
            seq_len = draw(st.one_of(st.integers(1, limits.max_seq_len), whole_blocks))
            kind = draw(st.sampled_from(["decode", "prefill", "chunk", "idle"]))
            if kind == "chunk":
                q_len = draw(st.integers(1, seq_len))
            else:
                q_len = {"decode": 1, "prefill": seq_len, "idle": 0}[kind]
            q_len = min(q_len, budget)
            budget -= q_len
            seqs.append((q_len, seq_len))
        fields = draw(st.fixed_dictionaries({
            **_heads(limits),
            "spare_blocks": st.integers(0, 3),
            "table_padding": st.integers(0, 2),  # extra, unused block-table columns
            "unused_entries": st.sampled_from(["out_of_range", "minus_one", "valid_block"]),
            "cache_dtype": st.sampled_from(["float32", "float16"]),
            "index_dtype": st.sampled_from(["int32", "int64"]),
            "scale": st.sampled_from([None, 0.05, 2.0]),
            "seed": seeds(),
        }))  # fmt: skip
        return {"seqs": seqs, "block_size": block_size, **fields}

    return params()


def paged_attention_build(p: dict) -> tuple:
    """Arguments of ``paged_attention`` for parameters drawn by :func:`paged_attention_params`.

    Physical blocks are handed out in a random permutation of the pool, so a sequence's
    pages are scattered anywhere; the pool, the unused slots of the last block and the
    unused block-table entries hold garbage that must never influence the result.
    -> q [T, H, D], k_cache, v_cache [N, B, Hkv, D], block_tables [S, max_blocks],
       query_start_loc [S + 1], seq_lens [S], scale
    """
    rng = case_rng(p)
    block_size, seqs = p["block_size"], p["seqs"]
    blocks_per_seq = [-(-seq_len // block_size) for _, seq_len in seqs]
    num_blocks = max(1, sum(blocks_per_seq) + p["spare_blocks"])
    physical = rng.permutation(num_blocks)
    width = max(blocks_per_seq, default=0) + p["table_padding"]
    fillers = {"out_of_range": num_blocks + 1000, "minus_one": -1, "valid_block": num_blocks - 1}
    filler = fillers[p["unused_entries"]]
    block_tables = np.full((len(seqs), max(1, width)), filler, dtype=np.int64)
    start = 0
    for s, n in enumerate(blocks_per_seq):
        block_tables[s, :n] = physical[start : start + n]
        start += n
    heads, dim = p["kv_heads"] * p["group"], p["head_dim"]
    cache_shape = (num_blocks, block_size, p["kv_heads"], dim)
    query_start_loc = np.concatenate([[0], np.cumsum([q_len for q_len, _ in seqs], dtype=np.int64)])
    idx = p["index_dtype"]
    return (
        normal(rng, (int(query_start_loc[-1]), heads, dim)),
        normal(rng, cache_shape, 1.0, p["cache_dtype"]),
        normal(rng, cache_shape, 1.0, p["cache_dtype"]),
        block_tables.astype(idx),
        query_start_loc.astype(idx),
        np.array([seq_len for _, seq_len in seqs], dtype=idx),
        _scale(p),
    )


def _paged_edge_cases(limits: Limits) -> list[dict]:
    base = {
        "kv_heads": min(2, limits.max_kv_heads), "group": min(2, limits.max_group),
        "head_dim": limits.head_dims[0], "spare_blocks": 1, "table_padding": 1,
        "unused_entries": "out_of_range", "cache_dtype": "float32", "index_dtype": "int64",
        "scale": None, "seed": 0,
    }  # fmt: skip
    block = 4 if 4 in limits.block_sizes else limits.block_sizes[-1]
    return [
        {"seqs": [], "block_size": block, **base},  # empty batch
        {"seqs": [(1, 1)], "block_size": block, **base},  # one token, one (partly used) block
        {"seqs": [(1, block)], "block_size": block, **base},  # decode at exactly one full block
        # prefill of one block
        {"seqs": [(min(block, limits.max_tokens), block)], "block_size": block, **base},
        {"seqs": [(1, 2 * block + 1), (0, 5), (1, 1)], "block_size": block, **base},  # ragged, one idle
    ]


def _attention_edge_cases(limits: Limits) -> list[dict]:
    base = {
        "kv_heads": 1, "group": 1, "head_dim": limits.head_dims[0], "kv_dtype": "float32",
        "scale": None, "seed": 0,
    }  # fmt: skip
    return [{**base, "num_q": 1, "num_k": 1}, {**base, "num_q": 0, "num_k": 3}]


def _store_kv_edge_cases(limits: Limits) -> list[dict]:
    base = {
        "kv_heads": 1, "head_dim": limits.head_dims[0], "block_size": limits.block_sizes[-1],
        "spare_blocks": 0, "skip_fraction": 0.0, "cache_dtype": "float32", "slot_dtype": "int64", "seed": 0,
    }  # fmt: skip
    return [{**base, "tokens": 0}, {**base, "tokens": 1, "skip_fraction": 1.0}]


SPECS: list[KernelSpec] = [
    KernelSpec("attention", _attention_params, _attention_build,
               ATTENTION, value_magnitude(2), edge_cases=_attention_edge_cases),
    KernelSpec("store_kv", _store_kv_params, _store_kv_build, EXACT, in_place=(2, 3),
               edge_cases=_store_kv_edge_cases),
    KernelSpec("paged_attention", paged_attention_params, paged_attention_build,
               ATTENTION, value_magnitude(2), edge_cases=_paged_edge_cases),
]  # fmt: skip

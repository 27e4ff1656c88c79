"""Cases for ``kernels_ref.kv_int8``: ``store_kv_int8`` and ``paged_attention_int8``.

``paged_attention_int8`` gets the ragged batches of ``cases.attention`` (decodes, whole
prefills, prefill chunks, idle sequences; pages scattered through the pool), with the
float pool quantized by the reference's ``quantize_kv``; every slot outside the
sequences' tokens then gets a garbage scale (NaN or a huge number), so a kernel that
reads one shows it in its output. ``store_kv_int8`` gets tokens whose rows include all
zeros (scale 0) and one large outlier, written over a pool of random bytes and scales.

Tolerances. ``store_kv_int8`` is exact: the quantization is a max of absolute values,
one float32 division and a round half to even, which every backend can do bit for bit.
``paged_attention_int8`` is held to ``ATTENTION`` (``1e-5 + 1e-4 * max|v|``, ``v`` the
dequantized values) against the reference's int8 math itself, not against float32
attention: a backend differs from the reference only in where each token's scale
multiplies (``(q . k) * s`` instead of ``q . (k * s)``), a rounding-order difference of
the size the float kernels already have. How far int8 attention is from float32
attention is a separate, much larger bound (tests/test_kv_int8.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernels_ref.kv_int8 import dequantize_kv, quantize_kv
from nanoserve.check_kernels.cases.attention import paged_attention_build, paged_attention_params
from nanoserve.check_kernels.cases.draw import case_rng, normal, seeds, strategies
from nanoserve.check_kernels.limits import Limits
from nanoserve.check_kernels.spec import KernelSpec
from nanoserve.check_kernels.tolerances import ATTENTION, EXACT

GARBAGE_SCALES = {"nan": np.nan, "huge": 3e38}  # scale of every slot no sequence owns


def _store_params(limits: Limits) -> Any:
    st = strategies()
    return st.fixed_dictionaries({
        "tokens": st.integers(0, limits.max_tokens),
        "kv_heads": st.integers(1, limits.max_kv_heads),
        "head_dim": st.sampled_from(limits.head_dims),
        "block_size": st.sampled_from(limits.block_sizes),
        "spare_blocks": st.integers(0, 3),
        "skip_fraction": st.sampled_from([0.0, 0.3, 1.0]),
        "zero_fraction": st.sampled_from([0.0, 0.3]),  # rows of zeros: scale 0
        "outlier": st.sampled_from([1.0, 100.0]),  # one value per row this many sigmas out
        "slot_dtype": st.sampled_from(["int32", "int64"]),
        "seed": seeds(),
    })  # fmt: skip


def _rows(rng: np.random.Generator, p: dict) -> np.ndarray:  # -> [T, Hkv, D] float32
    x = normal(rng, (p["tokens"], p["kv_heads"], p["head_dim"]))
    x[..., 0] *= np.float32(p["outlier"])
    x[rng.random(x.shape[:2]) < p["zero_fraction"]] = 0.0
    return x


def _store_build(p: dict) -> tuple:  # -> k, v [T, Hkv, D], k_cache, v_cache int8 [N, B, Hkv, D], k_scales, v_scales [N, B, Hkv], slots [T]
    rng = case_rng(p)
    tokens, block_size = p["tokens"], p["block_size"]
    num_blocks = max(1, -(-tokens // block_size) + p["spare_blocks"])
    cache_shape = (num_blocks, block_size, p["kv_heads"], p["head_dim"])
    slots = rng.choice(num_blocks * block_size, size=tokens, replace=False)  # distinct slots
    slots[rng.random(tokens) < p["skip_fraction"]] = -1
    return (
        _rows(rng, p),
        _rows(rng, p),
        rng.integers(-128, 128, cache_shape, dtype=np.int8),  # what was there before: must survive
        rng.integers(-128, 128, cache_shape, dtype=np.int8),
        rng.random(cache_shape[:3], dtype=np.float32),
        rng.random(cache_shape[:3], dtype=np.float32),
        slots.astype(p["slot_dtype"]),
    )


def _store_edge_cases(limits: Limits) -> list[dict]:
    base = {
        "kv_heads": 1, "head_dim": limits.head_dims[0], "block_size": limits.block_sizes[-1],
        "spare_blocks": 0, "skip_fraction": 0.0, "zero_fraction": 0.0, "outlier": 1.0,
        "slot_dtype": "int64", "seed": 0,
    }  # fmt: skip
    return [
        {**base, "tokens": 0},
        {**base, "tokens": 1, "skip_fraction": 1.0},
        {**base, "tokens": 2, "zero_fraction": 1.0},  # every row zero: scale 0, bytes 0
    ]


def paged_attention_int8_params(limits: Limits) -> Any:
    """The ragged batches of ``cases.attention.paged_attention_params``, int8 pages, garbage scales."""
    st = strategies()
    without_dtype = paged_attention_params(limits).map(
        lambda p: {k: v for k, v in p.items() if k != "cache_dtype"}
    )
    return st.tuples(without_dtype, st.sampled_from(sorted(GARBAGE_SCALES))).map(
        lambda pair: {**pair[0], "garbage_scales": pair[1]}
    )


def paged_attention_int8_build(p: dict) -> tuple:
    """-> q [T, H, D], k_cache, v_cache int8 [N, B, Hkv, D], k_scales, v_scales [N, B, Hkv],
    block_tables [S, max_blocks], query_start_loc [S + 1], seq_lens [S], scale"""
    float_params = {k: v for k, v in p.items() if k != "garbage_scales"}
    q, k_pool, v_pool, block_tables, query_start_loc, seq_lens, scale = paged_attention_build(
        {**float_params, "cache_dtype": "float32"}
    )
    k_cache, k_scales = quantize_kv(k_pool)
    v_cache, v_scales = quantize_kv(v_pool)
    block_size = k_cache.shape[1]
    owned = np.zeros(k_scales.shape[:2], dtype=bool)  # [N, B] slots holding a sequence's tokens
    for s, seq_len in enumerate(np.asarray(seq_lens)):
        for t in range(int(seq_len)):
            owned[block_tables[s, t // block_size], t % block_size] = True
    garbage = np.float32(GARBAGE_SCALES[p["garbage_scales"]])
    k_scales[~owned] = garbage
    v_scales[~owned] = garbage
    return q, k_cache, v_cache, k_scales, v_scales, block_tables, query_start_loc, seq_lens, scale


def _paged_edge_cases(limits: Limits) -> list[dict]:
    base = {
        "kv_heads": min(2, limits.max_kv_heads), "group": min(2, limits.max_group),
        "head_dim": limits.head_dims[0], "spare_blocks": 1, "table_padding": 1,
        "unused_entries": "out_of_range", "index_dtype": "int64", "scale": None, "seed": 0,
        "garbage_scales": "nan",
    }  # fmt: skip
    block = 4 if 4 in limits.block_sizes else limits.block_sizes[-1]
    return [
        {"seqs": [], "block_size": block, **base},  # empty batch
        {"seqs": [(1, 1)], "block_size": block, **base},  # one token, one (partly used) block
        {"seqs": [(1, block)], "block_size": block, **base},  # decode at exactly one full block
        {"seqs": [(min(block, limits.max_tokens), block)], "block_size": block, **base},  # prefill of one block
        {"seqs": [(1, 2 * block + 1), (0, 5), (1, 1)], "block_size": block, **base},  # ragged, one idle
    ]


def dequantized_value_magnitude(args: tuple, ref: np.ndarray) -> float:
    """max |v| over the values a sequence can read (the garbage scales excluded): the
    bound on an attention output, a convex combination of value rows."""
    with np.errstate(over="ignore", invalid="ignore"):  # the garbage scales overflow; they are left out
        values = np.abs(dequantize_kv(args[2], args[4]))
    finite = values[np.isfinite(values) & (np.abs(args[4]) < 1e30)[..., None]]
    return float(finite.max()) if finite.size else 0.0


SPECS: list[KernelSpec] = [
    KernelSpec("store_kv_int8", _store_params, _store_build, EXACT, in_place=(2, 3, 4, 5),
               edge_cases=_store_edge_cases),
    KernelSpec("paged_attention_int8", paged_attention_int8_params, paged_attention_int8_build,
               ATTENTION, dequantized_value_magnitude, edge_cases=_paged_edge_cases),
]  # fmt: skip

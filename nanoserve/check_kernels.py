"""The kernel-correctness suite: hold any backend's kernels to the NumPy reference.

For every name in ``kernels_ref.KERNEL_NAMES`` this module knows how to draw random but
meaningful arguments (a :class:`KernelSpec`: shapes, dtypes, ragged batches, block
tables with pages scattered through the pool, GQA ratios, ties, ``-inf`` logits, ...),
runs the backend's kernel and the reference on the same arguments, and compares the
results within a stated :class:`Tolerance`. Hypothesis drives the search and, when a
kernel fails, shrinks the arguments to a minimal failing example.

    >>> from nanoserve.check_kernels import check_backend
    >>> for report in check_backend("cuda"): print(report.kernel, report.status)

It is also the grader behind ``python -m nanoserve check-kernels --backend NAME``: a lab
registers its own backend (or passes the path of a .py file defining kernels) and gets a
per-kernel pass/fail table, the largest error seen, and the minimal failing example.
Kernels a backend does not define fall back to the reference and are listed as such.

Arguments are built from a small dictionary of parameters plus a seed
(:func:`build_case`), so a failing example is short to print and exact to reproduce.
The reference ``kernels_ref`` is the specification; this module never changes it.

Hypothesis is a development dependency and is imported only when a check runs.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import kernels_ref
from nanoserve.kernels import Backend, get_backend

# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    """Bounds on the shapes the suite draws."""

    max_tokens: int  # T: query tokens in a batch, rows of a norm / linear input
    max_seqs: int  # S: sequences in a batch, rows of the logit filters
    max_seq_len: int  # tokens in a sequence's KV cache
    max_kv_heads: int  # Hkv
    max_group: int  # H / Hkv (GQA ratio)
    head_dims: tuple[int, ...]  # D (even)
    block_sizes: tuple[int, ...]  # B
    max_width: int  # d of rms_norm, F of silu_mul, n of softmax rows
    max_vocab: int  # V of the logit filters
    max_in_blocks: int  # linear in_features = 32 * blocks (GGUF block size)
    max_out: int  # linear out_features
    max_position: int  # RoPE positions


#: For the CUDA simulator and CI: tiny shapes (every simulated barrier costs ~1 ms).
SMALL = Limits(
    max_tokens=6, max_seqs=3, max_seq_len=24, max_kv_heads=2, max_group=3,
    head_dims=(2, 4, 8), block_sizes=(1, 2, 4, 8, 16), max_width=24, max_vocab=40,
    max_in_blocks=2, max_out=8, max_position=8192,
)  # fmt: skip

#: For a real GPU or a NumPy backend: shapes up to the default model's.
LARGE = Limits(
    max_tokens=64, max_seqs=8, max_seq_len=300, max_kv_heads=4, max_group=4,
    head_dims=(4, 8, 16, 64, 128), block_sizes=(1, 4, 8, 16, 32), max_width=1536,
    max_vocab=4096, max_in_blocks=8, max_out=96, max_position=8192,
)  # fmt: skip

LIMITS = {"small": SMALL, "large": LARGE}


# --------------------------------------------------------------------------- tolerance


@dataclass(frozen=True)
class Tolerance:
    """An element passes when ``|got - ref| <= atol + rtol * magnitude``.

    ``magnitude`` is stated per kernel in ``relative_to`` (usually ``|ref|``; for a dot
    product ``|x| @ |W|.T``, the size of the terms that were summed). Entries that are
    not finite (the filters' ``-inf``) must match exactly. atol = rtol = 0 means exact.
    """

    atol: float
    rtol: float
    relative_to: str = "|ref|"

    @property
    def exact(self) -> bool:
        return self.atol == 0 and self.rtol == 0

    def __str__(self) -> str:
        if self.exact:
            return "exact"
        return f"{self.atol:g} + {self.rtol:g}*{self.relative_to}"


EXACT = Tolerance(0.0, 0.0)


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class KernelSpec:
    """How to test one kernel: what to draw, how to build its arguments, how close is close."""

    name: str
    params: Callable[[Limits], Any]  # -> hypothesis strategy of parameter dicts
    build: Callable[[dict], tuple]  # parameters -> the kernel's arguments (numpy, fresh)
    tolerance: Tolerance
    magnitude: Callable[[tuple, np.ndarray], Any] | None = None  # (args, ref) -> scale for rtol
    in_place: tuple[int, ...] = ()  # argument positions the kernel writes: its outputs
    edge_cases: Callable[[Limits], list[dict]] = lambda limits: []  # always tried first


def _rng(params: dict) -> np.random.Generator:
    return np.random.default_rng(params["seed"])


def _normal(rng: np.random.Generator, shape: tuple, scale: float = 1.0, dtype: Any = np.float32) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _st() -> Any:
    from hypothesis import strategies

    return strategies


def _seed() -> Any:
    return _st().integers(0, 2**16)


# ---- rms_norm, rope, silu_mul, softmax ---------------------------------------


def _rms_norm_params(limits: Limits) -> Any:
    st = _st()
    return st.fixed_dictionaries({
        "rows": st.lists(st.integers(0, limits.max_tokens), min_size=1, max_size=2),
        "d": st.integers(1, limits.max_width),
        "eps": st.sampled_from([1e-5, 1e-6, 1e-2]),
        "x_dtype": st.sampled_from(["float32", "float16"]),
        "scale": st.sampled_from([1.0, 1e-3, 30.0]),
        "seed": _seed(),
    })  # fmt: skip


def _rms_norm_build(p: dict) -> tuple:  # -> x [*rows, d], w [d], eps
    rng = _rng(p)
    x = _normal(rng, (*p["rows"], p["d"]), p["scale"], p["x_dtype"])
    return x, _normal(rng, (p["d"],)), p["eps"]


def _rope_params(limits: Limits) -> Any:
    st = _st()
    return st.fixed_dictionaries({
        "tokens": st.integers(0, limits.max_tokens),
        "heads": st.integers(1, limits.max_kv_heads * limits.max_group),
        "head_dim": st.sampled_from(limits.head_dims),
        "theta": st.sampled_from([10000.0, 100000.0, 500000.0]),
        "max_position": st.sampled_from([1, 16, limits.max_position]),
        "position_dtype": st.sampled_from(["int32", "int64"]),
        "seed": _seed(),
    })  # fmt: skip


def _rope_build(p: dict) -> tuple:  # -> x [T, H, D], positions [T], theta
    rng = _rng(p)
    x = _normal(rng, (p["tokens"], p["heads"], p["head_dim"]))
    positions = rng.integers(0, p["max_position"], p["tokens"]).astype(p["position_dtype"])
    return x, positions, p["theta"]


def _rope_magnitude(args: tuple, ref: np.ndarray) -> np.ndarray:  # rotation mixes a head's entries
    return np.abs(args[0]).max(axis=-1, keepdims=True)


def _silu_mul_params(limits: Limits) -> Any:
    st = _st()
    return st.fixed_dictionaries({
        "tokens": st.integers(0, limits.max_tokens),
        "width": st.integers(1, limits.max_width),
        "scale": st.sampled_from([1.0, 10.0, 120.0]),  # 120: exp(-gate) overflows float32
        "seed": _seed(),
    })  # fmt: skip


def _silu_mul_build(p: dict) -> tuple:  # -> gate [T, F], up [T, F]
    rng = _rng(p)
    shape = (p["tokens"], p["width"])
    return _normal(rng, shape, p["scale"]), _normal(rng, shape)


def _softmax_params(limits: Limits) -> Any:
    st = _st()

    @st.composite
    def params(draw: Callable) -> dict:
        shape = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
        shape.append(draw(st.integers(1, limits.max_width)))
        return {
            "shape": shape,
            "axis": draw(st.integers(-len(shape), len(shape) - 1)),
            "dtype": draw(st.sampled_from(["float32", "float64"])),
            "scale": draw(st.sampled_from([1.0, 30.0, 1000.0])),
            "masked": draw(st.booleans()),  # some entries -inf (never a whole row)
            "seed": draw(_seed()),
        }

    return params()


def _softmax_build(p: dict) -> tuple:  # -> x [...], axis
    rng = _rng(p)
    x = _normal(rng, tuple(p["shape"]), p["scale"], p["dtype"])
    if p["masked"]:
        first = [slice(None)] * x.ndim
        first[p["axis"]] = 0  # entry 0 of every row along the axis stays finite
        kept = x[tuple(first)].copy()
        x[rng.random(x.shape) < 0.5] = -np.inf
        x[tuple(first)] = kept
    return x, p["axis"]


# ---- linear layers ------------------------------------------------------------


def _linear_common(limits: Limits, in_features: Any) -> dict:
    st = _st()
    return {
        "tokens": st.integers(0, limits.max_tokens),
        "in": in_features,
        "out": st.integers(1, limits.max_out),
        "seed": _seed(),
    }


def _gguf_in(limits: Limits) -> Any:
    return _st().integers(1, limits.max_in_blocks).map(lambda blocks: 32 * blocks)


def _linear_params(limits: Limits) -> Any:
    st = _st()
    fields = _linear_common(limits, st.integers(1, 32 * limits.max_in_blocks))
    fields["w_dtype"] = st.sampled_from(["float32", "float16"])
    return st.fixed_dictionaries(fields)


def _linear_int8_params(limits: Limits) -> Any:
    return _st().fixed_dictionaries(_linear_common(limits, _st().integers(1, 32 * limits.max_in_blocks)))


def _linear_int4_params(limits: Limits) -> Any:
    st = _st()

    @st.composite
    def params(draw: Callable) -> dict:
        group_size = draw(st.sampled_from([2, 4, 8, 16, 32]))
        groups = draw(st.integers(1, max(1, 32 * limits.max_in_blocks // group_size)))
        fields = draw(st.fixed_dictionaries(_linear_common(limits, st.just(group_size * groups))))
        return {**fields, "group_size": group_size}

    return params()


def _gguf_params(limits: Limits) -> Any:
    st = _st()
    fields = _linear_common(limits, _gguf_in(limits))
    fields["scales"] = st.sampled_from(["normal", "tiny", "with_zero"])  # tiny: float16 subnormals
    return st.fixed_dictionaries(fields)


def _x(rng: np.random.Generator, p: dict) -> np.ndarray:  # [T, in]
    return _normal(rng, (p["tokens"], p["in"]))


def _linear_build(p: dict) -> tuple:  # -> x [T, in], w [out, in]
    rng = _rng(p)
    return _x(rng, p), _normal(rng, (p["out"], p["in"]), 0.1, p["w_dtype"])


def _linear_int8_build(p: dict) -> tuple:  # -> x, qweight int8 [out, in], scale [out]
    rng = _rng(p)
    qweight = rng.integers(-127, 128, (p["out"], p["in"])).astype(np.int8)
    return _x(rng, p), qweight, (rng.random(p["out"]) * 0.02).astype(np.float32)


def _linear_int4_build(p: dict) -> tuple:  # -> x, qweight uint8 [out, in/2], scales [out, G]
    rng = _rng(p)
    qweight = rng.integers(0, 256, (p["out"], p["in"] // 2)).astype(np.uint8)
    scales = (rng.random((p["out"], p["in"] // p["group_size"])) * 0.02).astype(np.float32)
    return _x(rng, p), qweight, scales


def _f16_bytes(rng: np.random.Generator, shape: tuple, kind: str) -> np.ndarray:  # -> uint8 [*shape, 2]
    values = rng.standard_normal(shape) * (1e-6 if kind == "tiny" else 0.02)
    if kind == "with_zero":
        values[rng.random(shape) < 0.3] = 0.0
    return values.astype(np.float16).view(np.uint8).reshape(*shape, 2)


def _gguf_raw(p: dict, rng: np.random.Generator, block_bytes: int, headers: int) -> np.ndarray:
    """Random GGUF rows: ``headers`` float16 values then random quant bytes, per 32 weights."""
    blocks = p["in"] // 32
    raw = rng.integers(0, 256, (p["out"], blocks, block_bytes)).astype(np.uint8)
    for h in range(headers):
        raw[:, :, 2 * h : 2 * h + 2] = _f16_bytes(rng, (p["out"], blocks), p["scales"])
    return raw.reshape(p["out"], blocks * block_bytes)


def _gguf_build(block_bytes: int, headers: int) -> Callable[[dict], tuple]:
    def build(p: dict) -> tuple:  # -> x [T, in], raw uint8 [out, in/32*block_bytes]
        rng = _rng(p)
        return _x(rng, p), _gguf_raw(p, rng, block_bytes, headers)

    return build


def _dot_magnitude(dequantize: Callable[..., np.ndarray]) -> Callable[[tuple, np.ndarray], np.ndarray]:
    """``|x| @ |W|.T``: the size of the summed terms, the scale of a dot product's rounding."""

    def magnitude(args: tuple, ref: np.ndarray) -> np.ndarray:
        w = dequantize(*args[1:]).astype(np.float64)
        return np.abs(args[0].astype(np.float64)) @ np.abs(w).T

    return magnitude


# ---- attention ------------------------------------------------------------------


def _heads(limits: Limits) -> dict:
    st = _st()
    return {
        "kv_heads": st.integers(1, limits.max_kv_heads),
        "group": st.integers(1, limits.max_group),
        "head_dim": st.sampled_from(limits.head_dims),
    }


def _attention_params(limits: Limits) -> Any:
    st = _st()

    @st.composite
    def params(draw: Callable) -> dict:
        num_k = draw(st.integers(1, limits.max_seq_len))
        fields = draw(st.fixed_dictionaries({
            **_heads(limits),
            "kv_dtype": st.sampled_from(["float32", "float16"]),
            "scale": st.sampled_from([None, 0.05, 2.0]),  # None: 1/sqrt(head_dim)
            "seed": _seed(),
        }))  # fmt: skip
        return {"num_q": draw(st.integers(1, min(num_k, limits.max_tokens))), "num_k": num_k, **fields}

    return params()


def _scale(p: dict) -> float:
    return 1.0 / math.sqrt(p["head_dim"]) if p["scale"] is None else p["scale"]


def _attention_build(p: dict) -> tuple:  # -> q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, D], scale
    rng = _rng(p)
    heads, dim = p["kv_heads"] * p["group"], p["head_dim"]
    q = _normal(rng, (p["num_q"], heads, dim))
    k = _normal(rng, (p["num_k"], p["kv_heads"], dim), 1.0, p["kv_dtype"])
    v = _normal(rng, (p["num_k"], p["kv_heads"], dim), 1.0, p["kv_dtype"])
    return q, k, v, _scale(p)


def _value_magnitude(position: int) -> Callable[[tuple, np.ndarray], float]:
    """Attention output is a convex combination of value rows: bounded by max |v|."""

    def magnitude(args: tuple, ref: np.ndarray) -> float:
        v = args[position]
        return float(np.abs(v.astype(np.float32)).max()) if v.size else 0.0

    return magnitude


def _store_kv_params(limits: Limits) -> Any:
    st = _st()
    return st.fixed_dictionaries({
        "tokens": st.integers(0, limits.max_tokens),
        "kv_heads": st.integers(1, limits.max_kv_heads),
        "head_dim": st.sampled_from(limits.head_dims),
        "block_size": st.sampled_from(limits.block_sizes),
        "spare_blocks": st.integers(0, 3),
        "skip_fraction": st.sampled_from([0.0, 0.3, 1.0]),
        "cache_dtype": st.sampled_from(["float32", "float16"]),
        "slot_dtype": st.sampled_from(["int32", "int64"]),
        "seed": _seed(),
    })  # fmt: skip


def _store_kv_build(p: dict) -> tuple:  # -> k, v [T, Hkv, D], k_cache, v_cache [N, B, Hkv, D], slots [T]
    rng = _rng(p)
    tokens, block_size = p["tokens"], p["block_size"]
    num_blocks = max(1, -(-tokens // block_size) + p["spare_blocks"])
    shape = (tokens, p["kv_heads"], p["head_dim"])
    cache_shape = (num_blocks, block_size, p["kv_heads"], p["head_dim"])
    slots = rng.choice(num_blocks * block_size, size=tokens, replace=False)  # distinct slots
    slots[rng.random(tokens) < p["skip_fraction"]] = -1
    return (
        _normal(rng, shape),
        _normal(rng, shape),
        _normal(rng, cache_shape, 1.0, p["cache_dtype"]),
        _normal(rng, cache_shape, 1.0, p["cache_dtype"]),
        slots.astype(p["slot_dtype"]),
    )


def paged_attention_params(limits: Limits) -> Any:
    """Strategy for a ragged batch: per sequence (q_len, seq_len), pages, heads, dtypes.

    Sequences are decodes (q_len 1), whole prefills (q_len = seq_len), prefill chunks or
    idle (q_len 0); lengths are often exact multiples of the block size. The total
    number of query tokens stays within ``limits.max_tokens``.
    """
    st = _st()

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
            "seed": _seed(),
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
    rng = _rng(p)
    block_size, seqs = p["block_size"], p["seqs"]
    blocks_per_seq = [-(-seq_len // block_size) for _, seq_len in seqs]
    num_blocks = max(1, sum(blocks_per_seq) + p["spare_blocks"])
    physical = rng.permutation(num_blocks)
    width = max(blocks_per_seq, default=0) + p["table_padding"]
    filler = {"out_of_range": num_blocks + 1000, "minus_one": -1, "valid_block": num_blocks - 1}[p["unused_entries"]]
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
        _normal(rng, (int(query_start_loc[-1]), heads, dim)),
        _normal(rng, cache_shape, 1.0, p["cache_dtype"]),
        _normal(rng, cache_shape, 1.0, p["cache_dtype"]),
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
        {"seqs": [(min(block, limits.max_tokens), block)], "block_size": block, **base},  # prefill of one block
        {"seqs": [(1, 2 * block + 1), (0, 5), (1, 1)], "block_size": block, **base},  # ragged, one idle
    ]


def _attention_edge_cases(limits: Limits) -> list[dict]:
    base = {"kv_heads": 1, "group": 1, "head_dim": limits.head_dims[0], "kv_dtype": "float32", "scale": None, "seed": 0}
    return [{**base, "num_q": 1, "num_k": 1}, {**base, "num_q": 0, "num_k": 3}]


def _store_kv_edge_cases(limits: Limits) -> list[dict]:
    base = {
        "kv_heads": 1, "head_dim": limits.head_dims[0], "block_size": limits.block_sizes[-1],
        "spare_blocks": 0, "skip_fraction": 0.0, "cache_dtype": "float32", "slot_dtype": "int64", "seed": 0,
    }  # fmt: skip
    return [{**base, "tokens": 0}, {**base, "tokens": 1, "skip_fraction": 1.0}]


# ---- logit filters ----------------------------------------------------------------


def _filter_params(limits: Limits, per_row: Callable[[int], Any], extra: dict | None = None) -> Any:
    st = _st()

    @st.composite
    def params(draw: Callable) -> dict:
        vocab = draw(st.integers(1, limits.max_vocab))
        rows = draw(st.integers(0, limits.max_seqs))
        values = draw(st.lists(per_row(vocab), min_size=rows, max_size=rows))
        fields = draw(st.fixed_dictionaries({
            "ties": st.booleans(),  # logits on a coarse grid: many exactly equal values
            "neg_inf": st.booleans(),  # some logits already -inf (never a whole row)
            "seed": _seed(),
            **(extra or {}),
        }))  # fmt: skip
        return {"vocab": vocab, "values": values, **fields}

    return params()


def _logits(p: dict) -> np.ndarray:  # -> [S, V] float32
    rng = _rng(p)
    logits = _normal(rng, (len(p["values"]), p["vocab"]), 3.0)
    if p["ties"]:
        logits = np.round(logits)
    if p["neg_inf"]:
        logits[rng.random(logits.shape) < 0.3] = -np.inf
        logits[:, 0] = np.where(np.isfinite(logits[:, 0]), logits[:, 0], 0.0)
    return logits.astype(np.float32)


def _top_k_params(limits: Limits) -> Any:
    return _filter_params(limits, lambda vocab: _st().integers(-1, vocab + 1))


def _top_k_build(p: dict) -> tuple:  # -> logits [S, V], top_k [S]
    return _logits(p), np.array(p["values"], dtype=np.int64).reshape(-1)


def _top_p_params(limits: Limits) -> Any:
    st = _st()
    p = st.one_of(st.floats(0.01, 0.99), st.just(1.0), st.floats(1e-6, 0.01), st.floats(1.0, 2.0))
    return _filter_params(limits, lambda vocab: p)


def _top_p_build(p: dict) -> tuple:  # -> logits [S, V], top_p [S]
    return _logits(p), np.array(p["values"], dtype=np.float64).reshape(-1)


def _min_p_params(limits: Limits) -> Any:
    st = _st()
    p = st.one_of(st.just(0.0), st.floats(1e-4, 1.0), st.just(-0.5))
    return _filter_params(limits, lambda vocab: p, {"dtype": st.sampled_from(["float32", "float64"])})


def _min_p_build(p: dict) -> tuple:  # -> logits [S, V], min_p [S]
    return _logits(p), np.array(p["values"], dtype=p["dtype"]).reshape(-1)


def _filter_edge_cases(per_row: Any) -> Callable[[Limits], list[dict]]:
    def cases(limits: Limits) -> list[dict]:
        base = {"ties": False, "neg_inf": False, "seed": 0}
        return [{**base, "vocab": 5, "values": []}, {**base, "vocab": 1, "values": [per_row]}]

    return cases


def _with_dtype(cases: Callable[[Limits], list[dict]]) -> Callable[[Limits], list[dict]]:
    return lambda limits: [{**case, "dtype": "float32"} for case in cases(limits)]


# ---- the table ------------------------------------------------------------------

_CLOSE = Tolerance(1e-6, 1e-5)

SPECS: dict[str, KernelSpec] = {
    spec.name: spec
    for spec in [
        KernelSpec("rms_norm", _rms_norm_params, _rms_norm_build, _CLOSE),
        KernelSpec("rope", _rope_params, _rope_build, Tolerance(1e-6, 1e-5, "max|x| of the head"), _rope_magnitude),
        KernelSpec("linear", _linear_params, _linear_build,
                   Tolerance(1e-6, 2e-5, "|x|@|W|.T"), _dot_magnitude(lambda w: w)),
        KernelSpec("linear_int8", _linear_int8_params, _linear_int8_build,
                   Tolerance(1e-6, 2e-5, "|x|@|W|.T"), _dot_magnitude(kernels_ref.dequantize_int8)),
        KernelSpec("linear_int4", _linear_int4_params, _linear_int4_build,
                   Tolerance(1e-6, 2e-5, "|x|@|W|.T"), _dot_magnitude(kernels_ref.dequantize_int4)),
        KernelSpec("linear_q8_0", _gguf_params, _gguf_build(kernels_ref.quant.Q8_0_BLOCK_BYTES, 1),
                   Tolerance(1e-6, 2e-5, "|x|@|W|.T"), _dot_magnitude(kernels_ref.dequantize_q8_0)),
        KernelSpec("linear_q4_0", _gguf_params, _gguf_build(kernels_ref.quant.Q4_0_BLOCK_BYTES, 1),
                   Tolerance(1e-6, 2e-5, "|x|@|W|.T"), _dot_magnitude(kernels_ref.dequantize_q4_0)),
        KernelSpec("linear_q4_1", _gguf_params, _gguf_build(kernels_ref.quant.Q4_1_BLOCK_BYTES, 2),
                   Tolerance(1e-6, 2e-5, "|x|@|W|.T"), _dot_magnitude(kernels_ref.dequantize_q4_1)),
        KernelSpec("silu_mul", _silu_mul_params, _silu_mul_build, _CLOSE),
        KernelSpec("softmax", _softmax_params, _softmax_build, _CLOSE),
        KernelSpec("attention", _attention_params, _attention_build,
                   Tolerance(1e-5, 1e-4, "max|v|"), _value_magnitude(2), edge_cases=_attention_edge_cases),
        KernelSpec("store_kv", _store_kv_params, _store_kv_build, EXACT, in_place=(2, 3),
                   edge_cases=_store_kv_edge_cases),
        KernelSpec("paged_attention", paged_attention_params, paged_attention_build,
                   Tolerance(1e-5, 1e-4, "max|v|"), _value_magnitude(2), edge_cases=_paged_edge_cases),
        KernelSpec("top_k_filter", _top_k_params, _top_k_build, EXACT, edge_cases=_filter_edge_cases(1)),
        KernelSpec("top_p_filter", _top_p_params, _top_p_build, EXACT, edge_cases=_filter_edge_cases(0.5)),
        KernelSpec("min_p_filter", _min_p_params, _min_p_build, EXACT,
                   edge_cases=_with_dtype(_filter_edge_cases(0.5))),
    ]
}  # fmt: skip


def build_case(kernel: str, params: dict) -> tuple:
    """The exact arguments the suite passed to ``kernel`` for ``params`` (to reproduce a failure)."""
    return SPECS[kernel].build(params)


# --------------------------------------------------------------------------- comparing


@dataclass
class CaseOutcome:
    """One example: the largest error, its ratio to the allowed error, what was wrong."""

    max_abs_error: float = 0.0
    worst_ratio: float = 0.0  # max of error / allowed error; <= 1 passes
    problem: str | None = None


def _index(flat: int, shape: tuple) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, shape))


def compare(got: Any, want: np.ndarray, tolerance: Tolerance, magnitude: Any = None) -> CaseOutcome:
    """Compare one output with the reference's; ``magnitude`` defaults to ``|want|``."""
    got = np.asarray(got)
    if got.shape != want.shape:
        return CaseOutcome(problem=f"output shape {got.shape}, expected {want.shape}")
    if got.dtype != want.dtype:
        return CaseOutcome(problem=f"output dtype {got.dtype}, expected {want.dtype}")
    if got.size == 0:
        return CaseOutcome()
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return _compare_values(got, want, tolerance, magnitude)


def _compare_values(got: np.ndarray, want: np.ndarray, tolerance: Tolerance, magnitude: Any) -> CaseOutcome:
    g, w = got.astype(np.float64), want.astype(np.float64)
    special = ~np.isfinite(g) | ~np.isfinite(w)
    mismatched = special & ~((g == w) | (np.isnan(g) & np.isnan(w)))
    if mismatched.any():
        where = _index(int(np.argmax(mismatched)), got.shape)
        return CaseOutcome(
            math.inf, math.inf,
            f"{int(mismatched.sum())} non-finite entries differ, first at {where}: got {g[where]}, expected {w[where]}",
        )  # fmt: skip
    err = np.where(special, 0.0, np.abs(g - w))
    scale = np.abs(w) if magnitude is None else np.broadcast_to(np.asarray(magnitude, dtype=np.float64), w.shape)
    allowed = tolerance.atol + tolerance.rtol * np.where(special, 0.0, scale)
    ratio = np.where(err == 0, 0.0, err / allowed)
    worst = int(np.argmax(ratio))
    outcome = CaseOutcome(float(err.max()), float(ratio.flat[worst]))
    if outcome.worst_ratio > 1.0:
        where = _index(worst, got.shape)
        outcome.problem = (
            f"|error| {err[where]:.3g} at {where} (got {g[where]:.7g}, expected {w[where]:.7g}), "
            f"allowed {allowed[where]:.3g} ({tolerance})"
        )
    return outcome


def _host_copy(a: Any) -> Any:
    return a.copy() if isinstance(a, np.ndarray) else a


def run_case(backend: Backend, spec: KernelSpec, params: dict) -> CaseOutcome:
    """Run ``spec``'s kernel of ``backend`` and the reference on one example and compare."""
    args = spec.build(params)
    ref_args = tuple(_host_copy(a) for a in args)
    ref_result = getattr(kernels_ref, spec.name)(*ref_args)
    wants = [ref_args[i] for i in spec.in_place] if spec.in_place else [ref_result]

    dev_args = tuple(backend.to_device(a.copy()) if isinstance(a, np.ndarray) else a for a in args)
    try:
        result = getattr(backend.kernels, spec.name)(*dev_args)
        gots = [backend.to_host(dev_args[i]) for i in spec.in_place] if spec.in_place else [backend.to_host(result)]
    except Exception as exc:  # a crash is a failure like any other, reported with the example
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return CaseOutcome(math.inf, math.inf, f"raised {type(exc).__name__}: {first_line}")

    for i, original in enumerate(args):
        if isinstance(original, np.ndarray) and i not in spec.in_place:
            after = np.ascontiguousarray(backend.to_host(dev_args[i]))
            if after.dtype != original.dtype or after.tobytes() != np.ascontiguousarray(original).tobytes():
                return CaseOutcome(math.inf, math.inf, f"modified its input argument {i} (kernels must not)")

    total = CaseOutcome()
    for got, want in zip(gots, wants, strict=True):
        magnitude = spec.magnitude(ref_args, want) if spec.magnitude else None
        outcome = compare(got, want, spec.tolerance, magnitude)
        total.max_abs_error = max(total.max_abs_error, outcome.max_abs_error)
        total.worst_ratio = max(total.worst_ratio, outcome.worst_ratio)
        total.problem = total.problem or outcome.problem
    return total


# --------------------------------------------------------------------------- the search


@dataclass
class KernelReport:
    """What the suite found for one kernel of one backend."""

    kernel: str
    status: str  # "pass", "FAIL", or "ref" (not implemented: the reference is used)
    examples: int = 0
    max_abs_error: float = 0.0
    worst_ratio: float = 0.0  # largest error / allowed error over all examples
    tolerance: Tolerance | None = None
    failing_example: dict | None = None  # the minimal one, after shrinking
    problem: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status != "FAIL"

    def describe_failure(self) -> str:
        """The problem and the minimal failing example, ready to print."""
        if self.passed:
            return ""
        lines = [f"{self.kernel} FAILED: {self.problem}"]
        if self.failing_example is not None:
            args = describe_args(build_case(self.kernel, self.failing_example))
            lines += [
                f"  minimal failing example: {self.failing_example!r}",
                f"  its arguments: {args}",
                f"  reproduce: args = nanoserve.check_kernels.build_case({self.kernel!r}, <example above>)",
            ]
        return "\n".join(lines)


def describe_args(args: tuple) -> str:
    """``float32[2, 3, 8], int64[2], 0.35``: arrays by dtype and shape, the rest by value."""
    return ", ".join(
        f"{a.dtype}{list(a.shape)}" if isinstance(a, np.ndarray) else repr(a) for a in args
    )


class KernelMismatch(AssertionError):
    """Raised inside the property when the backend disagrees with the reference."""


def check_kernel(
    backend: Backend | str,
    kernel: str,
    *,
    limits: Limits = SMALL,
    max_examples: int | None = None,
    seed: int | None = None,
    shrink: bool = True,
    parent: Any = None,
) -> KernelReport:
    """Property-test one kernel of ``backend`` against the reference.

    Explicit edge cases run first, then ``max_examples`` random examples (default: those
    of ``parent``, a hypothesis ``settings`` object such as a registered profile, or of
    the active profile). On failure hypothesis shrinks to a minimal example, which the
    report carries. A nondeterministic failure (a race) is reported as such.
    """
    from hypothesis import HealthCheck, Phase, Verbosity, example, given, settings
    from hypothesis import seed as fixed_seed
    from hypothesis.errors import Flaky

    if isinstance(backend, str):
        backend = get_backend(backend)
    spec = SPECS[kernel]
    report = KernelReport(kernel, "pass", tolerance=spec.tolerance)
    if kernel in backend.fallbacks:
        report.status = "ref"
        return report

    def prop(params: dict) -> None:
        report.examples += 1
        outcome = run_case(backend, spec, params)
        if math.isfinite(outcome.max_abs_error):
            report.max_abs_error = max(report.max_abs_error, outcome.max_abs_error)
        report.worst_ratio = max(report.worst_ratio, outcome.worst_ratio)
        if outcome.problem:
            report.failing_example, report.problem = params, outcome.problem
            raise KernelMismatch(outcome.problem)

    phases = [p for p in Phase if shrink or p is not Phase.shrink]
    overrides: dict[str, Any] = {
        "deadline": None,
        "database": None,
        "phases": phases,
        "verbosity": Verbosity.quiet,
        "report_multiple_bugs": False,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    }
    if max_examples is not None:
        overrides["max_examples"] = max_examples
    test = given(params=spec.params(limits))(prop)
    for case in reversed(spec.edge_cases(limits)):
        test = example(params=case)(test)
    test = settings(parent or settings(), **overrides)(test)
    if seed is not None:
        test = fixed_seed(seed)(test)

    start = time.perf_counter()
    try:
        test()
    except Flaky:
        report.status = "FAIL"
        report.problem = f"nondeterministic (a race?): {report.problem}"
    except Exception as exc:
        report.status = "FAIL"
        report.problem = report.problem or f"{type(exc).__name__}: {exc}"
    report.seconds = time.perf_counter() - start
    return report


def check_backend(
    backend: Backend | str,
    kernels: Sequence[str] | None = None,
    *,
    progress: Callable[[KernelReport], None] | None = None,
    **options: Any,
) -> list[KernelReport]:
    """:func:`check_kernel` for each kernel (all of the contract by default)."""
    if isinstance(backend, str):
        backend = get_backend(backend)
    reports = []
    for kernel in kernels or kernels_ref.KERNEL_NAMES:
        report = check_kernel(backend, kernel, **options)
        reports.append(report)
        if progress is not None:
            progress(report)
    return reports


# --------------------------------------------------------------------------- CLI

#: Under the CUDA simulator every block's threads are Python threads that hand the GIL
#: around at each barrier; a short switch interval makes that hand-over ~20x faster.
SIMULATOR_SWITCH_INTERVAL = 1e-4


def gpu_present() -> bool:
    """True when the CUDA driver reports at least one device (asked without numba)."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    return False


def use_simulator_if_no_gpu() -> bool:
    """Select numba's CUDA simulator when there is no GPU; True if it will be used.

    Must run before anything imports numba: numba reads NUMBA_ENABLE_CUDASIM once, at
    import. An explicit NUMBA_ENABLE_CUDASIM in the environment always wins.
    """
    if "NUMBA_ENABLE_CUDASIM" not in os.environ and "numba" not in sys.modules:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "0" if gpu_present() else "1"
    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"
    if simulated:
        sys.setswitchinterval(SIMULATOR_SWITCH_INTERVAL)
    return simulated


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m nanoserve check-kernels``."""
    parser.add_argument("--backend", default="ref", help="registered backend name or path of a .py file (default: ref)")
    parser.add_argument(
        "--kernel", action="append", default=None, metavar="K",
        help="check only this kernel (repeat, or comma-separate; default: all of them)",
    )  # fmt: skip
    parser.add_argument(
        "--examples", type=int, default=None, metavar="N",
        help="random examples per kernel (default 100; 10 on the CUDA simulator)",
    )  # fmt: skip
    parser.add_argument(
        "--size", choices=sorted(LIMITS), default=None,
        help="shape limits (default: small on the CUDA simulator, large otherwise)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="fix hypothesis' random seed")


def _selected_kernels(requested: list[str] | None) -> list[str]:
    if not requested:
        return list(kernels_ref.KERNEL_NAMES)
    names = [name.strip() for item in requested for name in item.split(",") if name.strip()]
    unknown = [name for name in names if name not in SPECS]
    if unknown:
        raise SystemExit(f"unknown kernel(s) {', '.join(unknown)}; choose from {', '.join(kernels_ref.KERNEL_NAMES)}")
    return names


def _fmt(value: float) -> str:
    return "-" if value == 0 else ("inf" if math.isinf(value) else f"{value:.2g}")


def _table_rows(reports: list[KernelReport]) -> list[list[str]]:
    return [
        [r.kernel, r.status, str(r.examples), _fmt(r.max_abs_error), _fmt(r.worst_ratio), str(r.tolerance), f"{r.seconds:.1f}s"]
        for r in reports
    ]


_HEADER = ["kernel", "result", "examples", "max |err|", "err/allowed", "tolerance", "time"]


def print_report(reports: list[KernelReport], title: str) -> None:
    """The per-kernel table, then the minimal failing example of every failure."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None:
        table = Table(title=title)
        for column in _HEADER:
            table.add_column(column, justify="left" if column in ("kernel", "tolerance") else "right", no_wrap=True)
        style = {"pass": "green", "FAIL": "bold red", "ref": "yellow"}
        for row, report in zip(_table_rows(reports), reports, strict=True):
            table.add_row(*row, style=style[report.status])
        Console(width=max(Console().width, 120)).print(table)  # never squeeze the columns
    else:
        rows = [_HEADER, *_table_rows(reports)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
        print(title)
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    for report in reports:
        if not report.passed:
            print("\n" + report.describe_failure())
    if any(r.status == "ref" for r in reports):
        print("\n'ref': the backend does not define this kernel; the reference is used (nothing to check).")


def run(args: argparse.Namespace) -> int:
    """``check-kernels``: check a backend, print the table; exit code 1 if any kernel fails.

    With no GPU present, numba.cuda kernels run on numba's CUDA simulator
    (NUMBA_ENABLE_CUDASIM=1 is set before numba is imported), with small shapes and few
    examples by default, because simulated threads are slow.
    """
    simulated = use_simulator_if_no_gpu()
    kernels = _selected_kernels(args.kernel)
    backend = get_backend(args.backend)
    simulated = simulated and "numba.cuda" in sys.modules
    size = args.size or ("small" if simulated else "large")
    examples = args.examples if args.examples is not None else (10 if simulated else 100)
    where = " on the CUDA simulator" if simulated else ""
    print(f"checking backend {args.backend!r}{where}: {len(kernels)} kernel(s), {examples} examples each, {size} shapes")
    reports = check_backend(
        backend, kernels, limits=LIMITS[size], max_examples=examples, seed=args.seed,
        progress=lambda r: print(f"  {r.kernel:16s} {r.status}", flush=True),
    )  # fmt: skip
    print_report(reports, f"backend {args.backend!r} vs kernels_ref")
    return 1 if any(not r.passed for r in reports) else 0


__all__ = [
    "LARGE",
    "LIMITS",
    "SMALL",
    "SPECS",
    "CaseOutcome",
    "KernelReport",
    "KernelSpec",
    "Limits",
    "Tolerance",
    "add_arguments",
    "build_case",
    "check_backend",
    "check_kernel",
    "compare",
    "describe_args",
    "gpu_present",
    "paged_attention_build",
    "paged_attention_params",
    "print_report",
    "run",
    "run_case",
    "use_simulator_if_no_gpu",
]


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="check-kernels", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))

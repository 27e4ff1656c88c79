"""Metamorphic properties of paged attention, for every backend.

These do not compare against the reference's paged_attention; they state what paged
attention *means*:

* over any placement of a sequence's pages in the pool (written there by the backend's
  own store_kv), it equals contiguous causal attention over the same keys;
* a prefill split into chunks, each attending to the cache written so far, equals the
  whole prefill computed at once;
* a sequence's output does not depend on which other sequences share the batch or in
  what order (bit for bit: each query row is computed independently).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels_ref
from nanoserve.check_kernels import paged_attention_build, paged_attention_params
from nanoserve.kernels import get_backend
from tests.kernels.conftest import PROFILE, limits_for

BACKENDS = ["ref", "cuda"]


def _device(backend, *arrays):
    return [backend.to_device(a) if isinstance(a, np.ndarray) else a for a in arrays]


def _max_abs(backend, rows, want: np.ndarray) -> float:  # rows: backend array -> max |rows - want|
    got = backend.to_host(rows)
    return float(np.abs(got - want).max()) if want.size else 0.0


@pytest.mark.parametrize("name", BACKENDS)
def test_paged_attention_equals_contiguous_attention_for_any_block_permutation(name: str) -> None:
    backend = get_backend(name)
    limits = limits_for(name)

    @settings(PROFILE)
    @given(params=paged_attention_params(limits))
    def prop(params: dict) -> None:
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale = paged_attention_build(params)
        rng = np.random.default_rng(params["seed"] + 1)
        block_size = k_cache.shape[1]
        # fresh K/V for every token of every sequence, stored through the block tables
        keys = [rng.standard_normal((int(n), *k_cache.shape[2:])).astype(np.float32) for n in seq_lens]
        values = [rng.standard_normal((int(n), *k_cache.shape[2:])).astype(np.float32) for n in seq_lens]
        slots = np.concatenate([
            [block_tables[s, t // block_size] * block_size + t % block_size for t in range(int(n))]
            for s, n in enumerate(seq_lens)
        ] + [np.zeros(0)]).astype(np.int64)  # fmt: skip
        dev = _device(backend, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens)
        k_new = np.concatenate([*keys, np.zeros((0, *k_cache.shape[2:]), np.float32)])
        v_new = np.concatenate([*values, np.zeros((0, *k_cache.shape[2:]), np.float32)])
        backend.kernels.store_kv(*_device(backend, k_new, v_new), dev[1], dev[2], backend.to_device(slots))
        out = backend.to_host(backend.kernels.paged_attention(*dev, scale))
        for s in range(len(seq_lens)):
            start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
            k_s = keys[s].astype(k_cache.dtype)  # what the cache holds after store_kv
            v_s = values[s].astype(v_cache.dtype)
            want = kernels_ref.attention(q[start:end], k_s, v_s, scale)
            np.testing.assert_allclose(out[start:end], want, atol=1e-4, rtol=1e-4)

    prop()


@pytest.mark.parametrize("name", BACKENDS)
def test_chunked_prefill_equals_whole_prefill(name: str) -> None:
    backend = get_backend(name)
    limits = limits_for(name)

    @settings(PROFILE)
    @given(
        seq_len=st.integers(1, 2 * limits.max_tokens),
        cuts=st.lists(st.integers(1, 2 * limits.max_tokens - 1), max_size=3),
        params=paged_attention_params(limits),
    )
    def prop(seq_len: int, cuts: list[int], params: dict) -> None:
        params = {**params, "seqs": [(seq_len, seq_len)]}
        q, k_cache, v_cache, block_tables, _, _, scale = paged_attention_build(params)
        dev = _device(backend, q, k_cache, v_cache, block_tables)
        whole = backend.to_host(
            backend.kernels.paged_attention(
                *dev, backend.to_device(np.array([0, seq_len])), backend.to_device(np.array([seq_len])), scale
            )
        )
        bounds = sorted({0, seq_len, *(c for c in cuts if c < seq_len)})
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):  # chunk [start, end) sees the cache up to end
            chunk = backend.kernels.paged_attention(
                backend.to_device(q[start:end]), *dev[1:],
                backend.to_device(np.array([0, end - start])), backend.to_device(np.array([end])), scale,
            )  # fmt: skip
            assert _max_abs(backend, chunk, whole[start:end]) <= 1e-5

    prop()


@pytest.mark.parametrize("name", BACKENDS)
def test_paged_attention_is_invariant_to_the_order_of_sequences_in_the_batch(name: str) -> None:
    backend = get_backend(name)
    limits = limits_for(name)

    @settings(PROFILE)
    @given(params=paged_attention_params(limits), order_seed=st.integers(0, 2**16))
    def prop(params: dict, order_seed: int) -> None:
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale = paged_attention_build(params)
        order = np.random.default_rng(order_seed).permutation(len(seq_lens))
        rows = [np.arange(query_start_loc[s], query_start_loc[s + 1]) for s in order]
        rows = np.concatenate([*rows, np.zeros(0, dtype=np.int64)]).astype(np.int64)
        q_lens = np.diff(query_start_loc)[order]
        permuted_start_loc = np.concatenate([[0], np.cumsum(q_lens)]).astype(query_start_loc.dtype)
        dev_cache = _device(backend, k_cache, v_cache)
        out = backend.to_host(backend.kernels.paged_attention(
            backend.to_device(q), *dev_cache, *_device(backend, block_tables, query_start_loc, seq_lens), scale
        ))  # fmt: skip
        out_permuted = backend.to_host(backend.kernels.paged_attention(
            backend.to_device(q[rows]), *dev_cache,
            *_device(backend, block_tables[order], permuted_start_loc, seq_lens[order]), scale,
        ))  # fmt: skip
        np.testing.assert_array_equal(out_permuted, out[rows])

    prop()


def _poison_unused_slots(k_cache, v_cache, block_tables, seq_lens) -> None:  # caches, in place
    """Fill every pool slot that holds no live token with NaN (an uninitialised pool may)."""
    live = np.zeros(k_cache.shape[:2], dtype=bool)  # [N, B]
    block_size = k_cache.shape[1]
    for s, n in enumerate(seq_lens):
        for t in range(int(n)):
            live[block_tables[s, t // block_size], t % block_size] = True
    k_cache[~live] = np.nan
    v_cache[~live] = np.nan


@pytest.mark.parametrize(
    "name",
    [
        "ref",
        "cuda",
    ],
)
def test_paged_attention_never_reads_slots_outside_the_sequences(name: str) -> None:
    backend = get_backend(name)
    params = {
        "seqs": [(1, 6), (1, 3), (2, 5)], "block_size": 4, "kv_heads": 1, "group": 2, "head_dim": 4,
        "spare_blocks": 2, "table_padding": 1, "unused_entries": "valid_block", "cache_dtype": "float32",
        "index_dtype": "int64", "scale": None, "seed": 0,
    }  # fmt: skip
    args = list(paged_attention_build(params))
    clean = backend.to_host(backend.kernels.paged_attention(*_device(backend, *args)))
    _poison_unused_slots(args[1], args[2], args[3], args[5])
    poisoned = backend.to_host(backend.kernels.paged_attention(*_device(backend, *args)))
    np.testing.assert_array_equal(poisoned, clean)

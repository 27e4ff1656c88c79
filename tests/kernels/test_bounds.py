"""Inconsistent paged metadata is an error, never a read or write outside the pool.

The reference kernels always check; the compiled cpu kernels and the cuda kernels check
when ``NANOSERVE_CHECK_BOUNDS=1`` (here: each module's flag, set for the test). The cuda
kernels run on Numba's CUDA simulator unless the suite runs on a GPU (see conftest.py).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import kernels_ref
from kernels_cuda import to_host

cpu_attention = importlib.import_module("kernels_cpu.attention")  # the module (kernels_cpu.attention is a kernel)
cuda_attention = importlib.import_module("kernels_cuda.attention")
CHECKED = {"cpu": cpu_attention, "cuda": cuda_attention}  # backends that check only when asked

N, B, HKV, H, D = 4, 4, 2, 4, 8


def pool() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((N, B, HKV, D)).astype(np.float32), rng.standard_normal((N, B, HKV, D)).astype(np.float32)


@pytest.fixture(params=["ref", "cpu", "cuda"])
def kernels(request, monkeypatch):
    if request.param in CHECKED:
        monkeypatch.setattr(CHECKED[request.param], "CHECK_BOUNDS", True)
        return CHECKED[request.param]
    return kernels_ref


@pytest.mark.parametrize("slot", [N * B, 10**6, -2])
def test_store_kv_refuses_a_slot_outside_the_pool(kernels, slot):
    k_cache, v_cache = pool()
    before = k_cache.copy()
    k = np.ones((2, HKV, D), dtype=np.float32)
    with pytest.raises(ValueError, match=r"slots must be -1 or in \[0, 16\)"):
        kernels.store_kv(k, k, k_cache, v_cache, np.array([3, slot]))
    assert np.array_equal(k_cache, before), "nothing was written"


@pytest.mark.parametrize(
    "table, seq_len, message",
    [
        ([0, N], 6, r"ids must be in \[0, 4\)"),  # the second block is read and is past the pool
        ([-1, 0], 3, r"ids must be in \[0, 4\)"),  # -1 would wrap around to the last block
        ([0, 1], 9, "more than the block table's 2 blocks"),
    ],
)
def test_paged_attention_refuses_blocks_outside_the_pool(kernels, table, seq_len, message):
    k_cache, v_cache = pool()
    q = np.ones((1, H, D), dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        kernels.paged_attention(q, k_cache, v_cache, np.array([table]), np.array([0, 1]), np.array([seq_len]), 0.3)


def test_unused_table_entries_may_hold_anything(kernels):
    k_cache, v_cache = pool()
    q = np.ones((1, H, D), dtype=np.float32)
    tables = np.array([[2, 10**6, -1]])  # only block 2 is read
    out = kernels.paged_attention(q, k_cache, v_cache, tables, np.array([0, 1]), np.array([3]), 0.3)
    ref = kernels_ref.paged_attention(q, k_cache, v_cache, np.array([[2]]), np.array([0, 1]), np.array([3]), 0.3)
    np.testing.assert_allclose(to_host(out), ref, atol=1e-6)


def test_a_padding_slot_of_minus_one_is_skipped(kernels):
    k_cache, v_cache = pool()
    before = k_cache.copy()
    k = np.full((2, HKV, D), 7.0, dtype=np.float32)
    kernels.store_kv(k, k, k_cache, v_cache, np.array([-1, 5]))
    expected = before.reshape(N * B, HKV, D).copy()
    expected[5] = 7.0
    np.testing.assert_array_equal(k_cache.reshape(N * B, HKV, D), expected)

"""The NumPy reference kernels against formulas written out independently, in float64.

Each expected value here is computed the slow, obvious way (Python loops, ``math``,
complex numbers), so a test failure points at the kernel, not at shared vectorised code.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import kernels_ref as K


def rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# --- rms_norm ------------------------------------------------------------------------------


def rms_norm_loop(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:  # [..., d], [d] -> [..., d]
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    out = np.empty_like(rows)
    for r, row in enumerate(rows):
        mean_square = sum(float(v) * float(v) for v in row) / len(row)
        inv_rms = 1.0 / math.sqrt(mean_square + eps)
        for i, v in enumerate(row):
            out[r, i] = float(v) * inv_rms * float(w[i])
    return out.reshape(x.shape)


@pytest.mark.parametrize("shape", [(1, 8), (5, 64), (3, 4, 16)])
def test_rms_norm_matches_the_loop_formula(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    x, w = rand(rng, *shape, scale=3.0), rand(rng, shape[-1])
    out = K.rms_norm(x, w, 1e-5)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_allclose(out, rms_norm_loop(x, w, 1e-5), rtol=1e-5, atol=1e-6)


def test_rms_norm_of_a_zero_vector_is_zero_thanks_to_eps() -> None:
    out = K.rms_norm(np.zeros((2, 8), np.float32), np.ones(8, np.float32), 1e-6)
    assert np.all(out == 0.0)


def test_rms_norm_output_has_unit_rms_when_gain_is_one_and_eps_negligible() -> None:
    x = rand(np.random.default_rng(1), 4, 32, scale=50.0)
    out = K.rms_norm(x, np.ones(32, np.float32), 1e-12)
    np.testing.assert_allclose(np.sqrt(np.mean(out.astype(np.float64) ** 2, axis=-1)), 1.0, rtol=1e-5)


# --- rope ----------------------------------------------------------------------------------


def rope_complex(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:  # [T, H, D], [T] -> [T, H, D]
    """Pair i of the halves layout is the complex number x[i] + 1j * x[i + D/2], turned by pos * theta^(-2i/D)."""
    num_tokens, num_heads, dim = x.shape
    half = dim // 2
    out = np.empty(x.shape, dtype=np.float64)
    for t in range(num_tokens):
        for h in range(num_heads):
            for i in range(half):
                z = complex(float(x[t, h, i]), float(x[t, h, i + half]))
                angle = float(positions[t]) * theta ** (-2.0 * i / dim)
                z *= complex(math.cos(angle), math.sin(angle))
                out[t, h, i], out[t, h, i + half] = z.real, z.imag
    return out


@pytest.mark.parametrize("theta", [10000.0, 100000.0])
def test_rope_rotates_halves_like_complex_multiplication(theta: float) -> None:
    rng = np.random.default_rng(2)
    x = rand(rng, 5, 3, 16)
    positions = np.array([0, 1, 7, 300, 4095])
    out = K.rope(x, positions, theta)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, rope_complex(x, positions, theta), rtol=1e-5, atol=1e-5)


def test_rope_at_position_zero_is_the_identity() -> None:
    x = rand(np.random.default_rng(3), 2, 4, 8)
    np.testing.assert_array_equal(K.rope(x, np.zeros(2, np.int64), 10000.0), x)


def test_rope_preserves_norms_and_makes_scores_depend_only_on_relative_position() -> None:
    rng = np.random.default_rng(4)
    q, k = rand(rng, 1, 1, 32), rand(rng, 1, 1, 32)

    def score(m: int, n: int) -> float:
        qm = K.rope(q, np.array([m]), 10000.0).astype(np.float64)
        kn = K.rope(k, np.array([n]), 10000.0).astype(np.float64)
        return float(np.sum(qm * kn))

    rotated = K.rope(q, np.array([123]), 10000.0)
    assert np.linalg.norm(rotated) == pytest.approx(np.linalg.norm(q), rel=1e-5)
    assert score(10, 3) == pytest.approx(score(107, 100), rel=1e-4, abs=1e-4)
    assert score(5, 5) == pytest.approx(score(0, 0), rel=1e-4, abs=1e-4)


# --- silu_mul and softmax ---------------------------------------------------------------


def test_silu_mul_matches_the_scalar_formula() -> None:
    rng = np.random.default_rng(5)
    gate, up = rand(rng, 4, 16, scale=4.0), rand(rng, 4, 16)
    expected = np.array(
        [[g / (1.0 + math.exp(-g)) * u for g, u in zip(grow.tolist(), urow.tolist(), strict=True)] for grow, urow in zip(gate, up, strict=True)]
    )
    out = K.silu_mul(gate, up)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_silu_mul_saturates_without_warnings_for_huge_gates() -> None:
    gate = np.array([[-1000.0, -89.0, 0.0, 89.0, 1000.0]], np.float32)
    up = np.full_like(gate, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = K.silu_mul(gate, up)
    np.testing.assert_allclose(out, [[0.0, 0.0, 0.0, 178.0, 2000.0]], atol=1e-30)


def softmax_loop(row: list[float]) -> list[float]:
    top = max(row)
    exps = [0.0 if v == -math.inf else math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def test_softmax_matches_the_loop_formula_along_the_last_axis() -> None:
    x = rand(np.random.default_rng(6), 3, 10, scale=5.0)
    expected = [softmax_loop(row) for row in x.astype(np.float64).tolist()]
    np.testing.assert_allclose(K.softmax(x), expected, rtol=1e-5, atol=1e-7)


def test_softmax_along_axis_zero_normalises_columns() -> None:
    x = rand(np.random.default_rng(7), 6, 3)
    expected = np.array([softmax_loop(col) for col in x.T.astype(np.float64).tolist()]).T
    np.testing.assert_allclose(K.softmax(x, axis=0), expected, rtol=1e-5, atol=1e-7)


def test_softmax_is_stable_for_huge_logits() -> None:
    x = np.array([[1e4, 1e4 + 1.0, 1e4 - 1.0], [-1e4, -1e4, -1e4]], np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = K.softmax(x)
    np.testing.assert_allclose(out[0], softmax_loop([0.0, 1.0, -1.0]), rtol=1e-12)
    np.testing.assert_allclose(out[1], [1 / 3] * 3, rtol=1e-12)


def test_softmax_gives_minus_inf_entries_exactly_zero_probability() -> None:
    x = np.array([[0.5, -np.inf, 1.5, -np.inf], [-np.inf, -np.inf, 3.0, -np.inf]], np.float32)
    out = K.softmax(x)
    assert out[0, 1] == 0.0 and out[0, 3] == 0.0
    np.testing.assert_allclose(out[0, [0, 2]], softmax_loop([0.5, 1.5]), rtol=1e-6)
    np.testing.assert_array_equal(out[1], [0.0, 0.0, 1.0, 0.0])


# --- attention -----------------------------------------------------------------------------


def attention_loop(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:  # [Tq, H, D], [Tk, Hkv, D] x2 -> [Tq, H, D]
    """One query at a time: query i sits at position Tk - Tq + i and sees keys 0 .. that position."""
    num_q, num_heads, dim = q.shape
    num_k, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    out = np.zeros((num_q, num_heads, dim))
    for i in range(num_q):
        pos = num_k - num_q + i
        for h in range(num_heads):
            kv = h // group
            scores = [scale * float(np.dot(q[i, h].astype(np.float64), k[j, kv].astype(np.float64))) for j in range(pos + 1)]
            probs = softmax_loop(scores)
            for j, p in enumerate(probs):
                out[i, h] += p * v[j, kv].astype(np.float64)
    return out


@pytest.mark.parametrize(
    ("num_q", "num_k", "num_heads", "num_kv_heads"),
    [
        (7, 7, 4, 2),  # whole prefill, GQA
        (1, 9, 4, 2),  # decode step
        (3, 10, 6, 3),  # prefill chunk on top of a cached prefix
        (5, 5, 4, 4),  # multi-head attention
        (2, 6, 4, 1),  # multi-query attention
    ],
)
def test_attention_matches_the_per_query_loop_with_causal_offset(num_q: int, num_k: int, num_heads: int, num_kv_heads: int) -> None:
    rng = np.random.default_rng(8)
    dim = 8
    q, k, v = rand(rng, num_q, num_heads, dim), rand(rng, num_k, num_kv_heads, dim), rand(rng, num_k, num_kv_heads, dim)
    out = K.attention(q, k, v, dim**-0.5)
    assert out.shape == q.shape
    np.testing.assert_allclose(out, attention_loop(q, k, v, dim**-0.5), rtol=1e-5, atol=1e-5)


def test_attention_first_query_of_a_prefill_returns_its_own_value() -> None:
    rng = np.random.default_rng(9)
    q, k, v = rand(rng, 4, 2, 8), rand(rng, 4, 1, 8), rand(rng, 4, 1, 8)
    out = K.attention(q, k, v, 0.3)
    np.testing.assert_allclose(out[0], np.repeat(v[0], 2, axis=0), rtol=1e-6)


# --- store_kv + paged_attention --------------------------------------------------------


def test_store_kv_writes_each_token_to_its_slot_and_skips_negative_slots() -> None:
    rng = np.random.default_rng(10)
    num_blocks, block_size, kv_heads, dim = 3, 4, 2, 8
    k_cache = np.zeros((num_blocks, block_size, kv_heads, dim), np.float32)
    v_cache = np.zeros_like(k_cache)
    k, v = rand(rng, 4, kv_heads, dim), rand(rng, 4, kv_heads, dim)
    slot_mapping = np.array([9, -1, 0, 6])  # token 1 is padding
    K.store_kv(k, v, k_cache, v_cache, slot_mapping)
    for t, slot in enumerate(slot_mapping):
        if slot >= 0:
            np.testing.assert_array_equal(k_cache[slot // block_size, slot % block_size], k[t])
            np.testing.assert_array_equal(v_cache[slot // block_size, slot % block_size], v[t])
    written = {(s // block_size, s % block_size) for s in slot_mapping if s >= 0}
    for b in range(num_blocks):
        for o in range(block_size):
            if (b, o) not in written:
                assert not k_cache[b, o].any() and not v_cache[b, o].any()


def test_paged_attention_over_a_hand_built_block_table_equals_contiguous_attention() -> None:
    """Six sequences share a shuffled pool: a whole prefill, three decode steps of different
    lengths, a prefill chunk, and an idle sequence with no queries. Block-table entries past
    each sequence's last block hold garbage ids (out of range, negative) never to be read."""
    rng = np.random.default_rng(11)
    num_blocks, block_size, heads, kv_heads, dim = 16, 4, 4, 2, 8
    scale = dim**-0.5
    k_cache = rand(rng, num_blocks, block_size, kv_heads, dim)  # stale data everywhere
    v_cache = rand(rng, num_blocks, block_size, kv_heads, dim)
    seq_lens = np.array([6, 9, 11, 3, 2, 16])
    q_lens = np.array([6, 1, 4, 0, 1, 1])
    block_tables = np.array(
        [
            [7, 2, 999, 999],  # prefill of 6
            [0, 10, 5, 999],  # decode at position 8
            [3, 11, 8, -5],  # chunk: positions 7..10
            [1, 999, 999, 999],  # idle
            [15, -1, 999, 10**6],  # decode at position 1
            [4, 14, 6, 12],  # decode at position 15, every block full
        ]
    )
    query_start_loc = np.concatenate([[0], np.cumsum(q_lens)])
    keys = [rand(rng, n, kv_heads, dim) for n in seq_lens]
    values = [rand(rng, n, kv_heads, dim) for n in seq_lens]
    for s, n in enumerate(seq_lens):  # every token of every sequence goes to its slot
        slots = np.array([block_tables[s, t // block_size] * block_size + t % block_size for t in range(n)])
        K.store_kv(keys[s], values[s], k_cache, v_cache, slots)
    q = rand(rng, int(q_lens.sum()), heads, dim)

    out = K.paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)

    assert out.shape == q.shape
    for s in range(len(seq_lens)):
        rows = slice(query_start_loc[s], query_start_loc[s + 1])
        if q_lens[s]:
            np.testing.assert_allclose(out[rows], attention_loop(q[rows], keys[s], values[s], scale), rtol=1e-5, atol=1e-5)


# --- linear ----------------------------------------------------------------------------------


def matmul_loop(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [T, in], [out, in] -> [T, out]
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    return np.array([[sum(float(a) * float(b) for a, b in zip(row, col, strict=True)) for col in w64] for row in x64])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_linear_computes_x_times_w_transposed_in_float32(dtype: type) -> None:
    rng = np.random.default_rng(12)
    x, w = rand(rng, 3, 16), rand(rng, 5, 16).astype(dtype)
    out = K.linear(x, w)
    assert out.dtype == np.float32 and out.shape == (3, 5)
    np.testing.assert_allclose(out, matmul_loop(x, w), rtol=1e-5, atol=1e-5)


# --- sampling filters -------------------------------------------------------------------

NEG = -np.inf


def test_top_k_keeps_the_k_largest_logits_of_each_row() -> None:
    logits = np.array([[1.0, 3.0, 2.0, 5.0, 4.0], [0.0, -1.0, 9.0, 8.0, 7.0]], np.float32)
    out = K.top_k_filter(logits, np.array([2, 3]))
    np.testing.assert_array_equal(out, [[NEG, NEG, NEG, 5.0, 4.0], [NEG, NEG, 9.0, 8.0, 7.0]])


def test_top_k_keeps_every_token_tied_with_the_kth() -> None:
    logits = np.array([[1.0, 2.0, 2.0, 0.0, 2.0]], np.float32)
    np.testing.assert_array_equal(K.top_k_filter(logits, np.array([1])), [[NEG, 2.0, 2.0, NEG, 2.0]])
    np.testing.assert_array_equal(K.top_k_filter(logits, np.array([4])), [[1.0, 2.0, 2.0, NEG, 2.0]])


@pytest.mark.parametrize("k", [0, -1, 5, 100])
def test_top_k_disabled_rows_are_unchanged_while_other_rows_are_filtered(k: int) -> None:
    logits = np.array([[1.0, 3.0, 2.0, 5.0, 4.0], [1.0, 3.0, 2.0, 5.0, 4.0]], np.float32)
    out = K.top_k_filter(logits, np.array([k, 1]))
    np.testing.assert_array_equal(out[0], logits[0])
    np.testing.assert_array_equal(out[1], [NEG, NEG, NEG, 5.0, NEG])
    assert logits[1, 0] == 1.0  # the input is not modified


# probabilities 0.5, 0.3, 0.15, 0.05 in shuffled positions
P_ROW = np.log(np.array([0.15, 0.5, 0.05, 0.3]))


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (1e-9, [1]),  # the top token always survives
        (0.5, [1]),  # 0.5 already reaches top_p
        (0.6, [1, 3]),  # 0.5 < 0.6 <= 0.8
        (0.81, [0, 1, 3]),
        (0.99, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_smallest_prefix_of_sorted_tokens_reaching_top_p(top_p: float, kept: list[int]) -> None:
    logits = P_ROW[None, :].astype(np.float32)
    out = K.top_p_filter(logits, np.array([top_p]))
    expected = np.full(4, NEG, np.float32)
    expected[kept] = logits[0, kept]
    np.testing.assert_array_equal(out[0], expected)


def test_top_p_of_one_leaves_the_row_unchanged() -> None:
    logits = np.stack([P_ROW, P_ROW]).astype(np.float32)
    out = K.top_p_filter(logits, np.array([1.0, 0.6]))
    np.testing.assert_array_equal(out[0], logits[0])
    assert np.isinf(out[1]).sum() == 2


def test_top_p_respects_tokens_already_removed_by_top_k() -> None:
    logits = np.array([[NEG, 0.0, NEG, 0.0]], np.float32)  # two equally likely survivors
    out = K.top_p_filter(logits, np.array([0.4]))
    assert np.isfinite(out).sum() == 1


@pytest.mark.parametrize(
    ("min_p", "kept"),
    [
        (0.5, [1, 3]),  # threshold 0.25: 0.5 and 0.3 survive
        (0.2, [0, 1, 3]),  # threshold 0.1
        (0.05, [0, 1, 2, 3]),  # threshold 0.025
        (1.0, [1]),  # only the most likely token
    ],
)
def test_min_p_keeps_tokens_at_least_min_p_times_the_top_probability(min_p: float, kept: list[int]) -> None:
    logits = P_ROW[None, :].astype(np.float32)
    out = K.min_p_filter(logits, np.array([min_p]))
    expected = np.full(4, NEG, np.float32)
    expected[kept] = logits[0, kept]
    np.testing.assert_array_equal(out[0], expected)


def test_min_p_of_zero_leaves_the_row_unchanged() -> None:
    logits = np.stack([P_ROW, P_ROW, P_ROW]).astype(np.float32)
    out = K.min_p_filter(logits, np.array([0.0, 0.5, 0.0]))
    np.testing.assert_array_equal(out[[0, 2]], logits[[0, 2]])
    assert np.isinf(out[1]).sum() == 2

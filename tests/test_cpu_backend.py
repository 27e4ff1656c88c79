"""The Numba ``cpu`` backend at the default model's real shapes, and end to end.

The kernel property suite (tests/kernels) holds every ``cpu`` kernel to the reference on
small random shapes. Here: the shapes the suite keeps small (a decode batch of long
contexts, more rows than ``linear``'s few-rows threshold), and the whole engine, which
must choose the same tokens on ``cpu`` as on ``ref``.
"""

from __future__ import annotations

import numpy as np
import pytest

import kernels_cpu
import kernels_ref
from kernels_cpu.attention import MAX_QUERY_ROWS, _exp_shifted, _float16_page
from kernels_cpu.linear import FEW_ROWS
from nanoserve import threads
from nanoserve.engine import LLMEngine
from tests.engine_helpers import greedy_tokens_and_logits


def _paged_batch(rng: np.random.Generator, q_lens: list[int], seq_lens: list[int], block_size: int = 16):
    """SmolLM2's attention shapes, every sequence's pages scattered through a larger pool."""
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 7
    physical = rng.permutation(num_blocks)
    tables = np.full((len(seq_lens), max(blocks) + 2), num_blocks + 99, dtype=np.int64)  # unused: out of range
    start = 0
    for s, n in enumerate(blocks):
        tables[s, :n] = physical[start : start + n]
        start += n
    cache_shape = (num_blocks, block_size, 3, 64)
    query_start_loc = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
    q = rng.standard_normal((int(query_start_loc[-1]), 9, 64)).astype(np.float32)
    k_cache = rng.standard_normal(cache_shape).astype(np.float32)
    v_cache = rng.standard_normal(cache_shape).astype(np.float32)
    return q, k_cache, v_cache, tables, query_start_loc, np.array(seq_lens, dtype=np.int64), 0.125


@pytest.mark.parametrize("cache_dtype", [np.float32, np.float16])
def test_decode_batch_of_long_contexts_matches_reference(cache_dtype):
    rng = np.random.default_rng(0)
    seq_lens = rng.integers(1, 700, 32).tolist() + [16, 512, 513]
    q, k_cache, v_cache, *rest = _paged_batch(rng, [1] * len(seq_lens), seq_lens)
    args = (q, k_cache.astype(cache_dtype), v_cache.astype(cache_dtype), *rest)
    np.testing.assert_allclose(kernels_cpu.paged_attention(*args), kernels_ref.paged_attention(*args), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cache_dtype", [np.float32, np.float16])
def test_verification_sized_chunks_match_reference(cache_dtype):
    """Chunks of 2 .. MAX_QUERY_ROWS + 1 queries at long contexts, mixed with decodes: the
    compiled loop (each row sees the keys up to its own position) and, past the limit,
    gather + BLAS, both equal to the reference."""
    rng = np.random.default_rng(1)
    q_lens = [1, 2, 3, 5, MAX_QUERY_ROWS, MAX_QUERY_ROWS + 1, 1, 4]
    seq_lens = [300, 2, 257, 640, MAX_QUERY_ROWS, 129, 17, 33]
    q, k_cache, v_cache, *rest = _paged_batch(rng, q_lens, seq_lens)
    args = (q, k_cache.astype(cache_dtype), v_cache.astype(cache_dtype), *rest)
    np.testing.assert_allclose(kernels_cpu.paged_attention(*args), kernels_ref.paged_attention(*args), atol=2e-5, rtol=1e-4)


def test_softmax_exp_is_within_two_ulps_of_numpy():
    """``_exp_shifted`` over [-87.3, 0] and tiny magnitudes: relative error < 2e-7 against
    float64; below -87.3 it gives exp(-87.3); a nan stays nan."""
    x = np.concatenate([np.linspace(-87.3, 0.0, 200_001), -np.logspace(-9, 1, 1001), [0.0]]).astype(np.float32)
    got = x.copy()
    _exp_shifted(got, len(got), np.float32(0.0))
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 2e-7
    shifted = np.array([3.0, 5.0, -200.0 + 5.0, np.nan], dtype=np.float32)
    _exp_shifted(shifted, 4, np.float32(5.0))  # exp(x - 5)
    assert abs(shifted[0] / np.exp(-2.0) - 1) < 2e-7 and shifted[1] == 1.0
    assert abs(shifted[2] / np.exp(np.float64(np.float32(-87.3))) - 1) < 1e-6 and np.isnan(shifted[3])


def test_every_float16_value_widens_exactly():
    """All 65536 bit patterns (normal, subnormal, zero, inf, nan; both signs): bit for bit,
    except that a signalling nan comes out quiet (still nan)."""
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16).reshape(1, 1024, 2, 32)  # one page of 1024 slots
    got = _float16_page(bits, 0, np.empty(bits.shape[1:], dtype=np.float32))
    want = bits[0].view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert nan.sum() == 2 * 1023 and np.isnan(got[nan]).all()
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert np.signbit(got[nan]).tolist() == np.signbit(want[nan]).tolist()


def test_mixed_batch_of_prefill_chunks_and_decodes_matches_reference():
    rng = np.random.default_rng(1)
    args = _paged_batch(rng, q_lens=[1, 200, 1, 37, 1], seq_lens=[300, 200, 17, 400, 1])
    np.testing.assert_allclose(kernels_cpu.paged_attention(*args), kernels_ref.paged_attention(*args), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, FEW_ROWS, FEW_ROWS + 1, 300])
def test_linear_matches_reference_on_both_sides_of_the_few_rows_threshold(rows: int):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 576)).astype(np.float32)
    w = rng.standard_normal((1536, 576)).astype(np.float32)
    got = kernels_cpu.linear(x, w)
    assert got.shape == (rows, 1536) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, kernels_ref.linear(x, w), atol=1e-3, rtol=1e-4)


def _greedy(loaded, backend: str, prompts: list[list[int]], max_tokens: int, kv_cache_dtype: str = "float32") -> tuple[list[list[int]], list[np.ndarray]]:
    engine = LLMEngine(loaded=loaded, backend=backend, max_num_batched_tokens=64, kv_cache_dtype=kv_cache_dtype)
    return greedy_tokens_and_logits(engine, prompts, max_tokens)


@pytest.mark.parametrize("kv_cache_dtype", ["float32", "float16"])
def test_smollm2_engine_on_cpu_chooses_the_reference_tokens(smollm2_loaded, kv_cache_dtype: str):
    tok = smollm2_loaded.tokenizer
    prompts = [tok.encode(p) for p in ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]]
    prompts.append(tok.encode("Tell me about the sea. " * 12))  # 72 tokens: chunked prefill (budget 64)
    ref_tokens, ref_logits = _greedy(smollm2_loaded, "ref", prompts, 12, kv_cache_dtype)
    cpu_tokens, cpu_logits = _greedy(smollm2_loaded, "cpu", prompts, 12, kv_cache_dtype)
    assert cpu_tokens == ref_tokens
    assert len(cpu_logits) == len(ref_logits)
    # float16 pages: a key that lands on the other side of a rounding boundary (the two
    # backends' float32 keys differ in the last bits) moves the logits by ~1e-3 more
    atol = 2e-3 if kv_cache_dtype == "float32" else 1e-2
    for got, want in zip(cpu_logits, ref_logits):
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-3)


def test_float16_pages_hold_twice_the_tokens_and_barely_move_the_logits(smollm2_loaded):
    engines = {dtype: LLMEngine(loaded=smollm2_loaded, kv_cache_memory=0.05, kv_cache_dtype=dtype) for dtype in ("float32", "float16")}
    blocks32, blocks16 = (engines[d].stats().num_blocks for d in ("float32", "float16"))
    assert 2 * blocks32 <= blocks16 <= 2 * blocks32 + 1  # the same budget, rounded down to whole blocks
    assert engines["float16"].cache.nbytes <= 0.05 * 2**30
    assert engines["float16"].cache.k.dtype == np.float16
    tok = smollm2_loaded.tokenizer
    prompts = [tok.encode("The capital of France is"), tok.encode("Tell me about the sea. " * 12)]
    runs = {dtype: greedy_tokens_and_logits(engine, prompts, 8) for dtype, engine in engines.items()}
    (tokens32, logits32), (tokens16, logits16) = runs["float32"], runs["float16"]
    assert tokens16 == tokens32
    for got, want in zip(logits16, logits32):
        np.testing.assert_allclose(got, want, atol=0.1)


def test_unknown_kv_cache_dtype_is_a_clear_error(smollm2_loaded):
    with pytest.raises(ValueError, match="KV cache dtype must be one of float32, float16, int8; got 'bfloat16'"):
        LLMEngine(loaded=smollm2_loaded, kv_cache_dtype="bfloat16")


@pytest.mark.parametrize("logits_kind", ["normal", "ties", "flat", "peaked"])
def test_top_p_filter_keeps_the_reference_tokens_over_a_real_vocabulary(logits_kind: str):
    """The candidate search (128 tokens, growing 8x) must cut exactly where the full sort does."""
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((6, 49152)) * 3.0
    if logits_kind == "ties":
        logits = np.round(logits)  # ~20 distinct values: ties at every cut
    elif logits_kind == "flat":
        logits[:] = 0.5  # every token tied: the cut needs the whole row
    elif logits_kind == "peaked":
        logits[:, :10] += 25.0  # nearly all mass in 10 tokens
    logits = logits.astype(np.float32)
    top_p = np.array([0.05, 0.5, 0.9, 0.99, 0.9999, 1.0])
    got = kernels_cpu.top_p_filter(logits, top_p)
    want = kernels_ref.top_p_filter(logits, top_p)
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got[:5]).sum(axis=-1).min() >= 1  # the top token always survives


@pytest.mark.skipif(threads.usable_cpus() < 2, reason="needs 2 usable CPUs")
@pytest.mark.parametrize("weights", ["gguf", "fp32"])
def test_smollm2_on_two_threads_gives_the_one_thread_tokens_and_logits_bit_for_bit(smollm2_path: str, weights: str):
    """``--threads 2`` splits every compiled linear's output rows over two threads
    (``kernels_cpu.split``); each output is still summed by one thread in the same order,
    so single decodes, batched decodes and prefill chunks (steps of at most 32 rows: the
    compiled kernels, not BLAS) give the same bits."""
    from nanoserve.model import load_checkpoint

    loaded = load_checkpoint(smollm2_path, weights)
    tok = loaded.tokenizer
    prompts = [tok.encode(p) for p in ["The capital of France is", "def fibonacci(n):", "Tell me about the sea. " * 6]]
    runs = []
    try:
        for count in (1, 2):
            for batch in (prompts, prompts[:1]):  # mixed steps; then one row per step
                engine = LLMEngine(loaded=loaded, backend="cpu", max_num_batched_tokens=32, threads=count)
                assert f"kernels on {count} thread" in engine.threads
                runs.append(greedy_tokens_and_logits(engine, batch, 8))
    finally:
        threads.apply(None)
    (tokens_1, logits_1), (alone_1, alone_logits_1), (tokens_2, logits_2), (alone_2, alone_logits_2) = runs
    assert tokens_2 == tokens_1 and alone_2 == alone_1
    for got, want in zip(logits_2 + alone_logits_2, logits_1 + alone_logits_1, strict=True):
        np.testing.assert_array_equal(got, want)

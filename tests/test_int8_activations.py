"""Int8 activations (llama.cpp's Q8_0 / Q8_1 path): the reference's properties, and the cpu kernels.

The kernel suite (tests/kernels) grades every backend against the reference over random
shapes; here the reference itself is held to what its docstring promises, and the cpu
backend's quantizer, decode loops, prefill path and assembly are checked directly.
"""

from __future__ import annotations

import platform
import re

import numpy as np
import pytest

import kernels_ref
from kernels_cpu import avx2
from kernels_cpu import int8_activations as cpu_a8
from kernels_ref.int8_activations import activation_error_bound, dequantize_activations
from nanoserve.check_kernels.cases.int8_activations import INT8_DOT, int8_dot_magnitude
from nanoserve.check_kernels.cases.quant import gguf_raw
from nanoserve.check_kernels.compare import compare
from nanoserve.check_kernels.tolerances import DOT

FORMATS = {  # name -> (block bytes, float16 headers, float-activation reference kernel)
    "q8_0": (34, 1, kernels_ref.linear_q8_0),
    "q4_0": (18, 1, kernels_ref.linear_q4_0),
    "q4_1": (20, 2, kernels_ref.linear_q4_1),
}


def _case(fmt: str, tokens: int, in_features: int, out: int, seed: int = 0, x_scale: float = 1.0):
    rng = np.random.default_rng(seed)
    block_bytes, headers, _ = FORMATS[fmt]
    raw = gguf_raw({"in": in_features, "out": out, "scales": "normal"}, rng, block_bytes, headers)
    x = (rng.standard_normal((tokens, in_features)) * x_scale).astype(np.float32)
    return x, raw


def _a8(fmt: str, module=kernels_ref):
    return getattr(module, f"linear_{fmt}_a8")


# --- the reference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("x_scale", [1.0, 1e-6, 300.0])
def test_quantized_activations_reconstruct_x_within_half_a_step(x_scale: float) -> None:
    x = (np.random.default_rng(1).standard_normal((5, 128)) * x_scale).astype(np.float32)
    q, d = kernels_ref.quantize_activations_q8_0(x)
    x3 = x.reshape(5, 4, 32).astype(np.float64)
    d32 = (np.abs(x3).max(axis=-1).astype(np.float32) / np.float32(127)).astype(np.float64)
    q3 = q.reshape(5, 4, 32).astype(np.float64)
    assert np.abs(q).max() <= 127
    assert np.all(np.abs(x3 - q3 * d32[..., None]) <= d32[..., None] / 2 * (1 + 1e-6))
    assert np.array_equal(d, d32.astype(np.float32).astype(np.float16).astype(np.float32))


def test_q8_1_sum_is_the_float16_of_the_integer_sum_times_the_unrounded_scale() -> None:
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    q, d, s = kernels_ref.quantize_activations_q8_1(x)
    q0, d0 = kernels_ref.quantize_activations_q8_0(x)
    assert np.array_equal(q, q0) and np.array_equal(d, d0)
    d32 = np.abs(x.reshape(3, 2, 32)).max(axis=-1) / np.float32(127)
    sums = q.reshape(3, 2, 32).sum(axis=-1).astype(np.float32)
    assert np.array_equal(s, (sums * d32).astype(np.float16).astype(np.float32))


def test_golden_block_rounds_half_away_from_zero() -> None:
    # amax = 127 gives d32 = 1 and 1 / d32 = 1 exactly: q = roundf(x), whose ties go away from zero
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, :6] = [127.0, -2.5, 2.5, 0.5, -0.49, 3.6]
    q, d, s = kernels_ref.quantize_activations_q8_1(x)
    assert q[0, :6].tolist() == [127, -3, 3, 1, 0, 4] and not q[0, 6:].any()
    assert d.tolist() == [[1.0]] and s.tolist() == [[132.0]]
    # one Q8_0 weight block: d_w = 0.5, q_w = 1, 2, 3, ... 32 (as int8 bytes)
    raw = np.zeros((1, 34), dtype=np.uint8)
    raw[0, :2] = np.array([0.5], dtype=np.float16).view(np.uint8)
    raw[0, 2:] = np.arange(1, 33, dtype=np.int8).view(np.uint8)
    want = 0.5 * (127 * 1 - 3 * 2 + 3 * 3 + 1 * 4 + 0 * 5 + 4 * 6)  # 79.0
    assert kernels_ref.linear_q8_0_a8(x, raw).tolist() == [[want]]
    assert cpu_a8.linear_q8_0_a8(x, raw).tolist() == [[want]]
    # Q4_1: d_w = 1, m_w = 0.25, every nibble 1: sum(q) * 1 + 0.25 * s = 132 + 33
    raw41 = np.zeros((1, 20), dtype=np.uint8)
    raw41[0, :4] = np.array([1.0, 0.25], dtype=np.float16).view(np.uint8)
    raw41[0, 4:] = 0x11
    assert kernels_ref.linear_q4_1_a8(x, raw41).tolist() == [[165.0]]
    assert cpu_a8.linear_q4_1_a8(x, raw41).tolist() == [[165.0]]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a8_kernels_equal_float64_on_dequantized_activations_and_weights(fmt: str) -> None:
    x, raw = _case(fmt, 6, 256, 40)
    got = _a8(fmt)(x, raw)
    if fmt == "q4_1":
        q, d, s = kernels_ref.quantize_activations_q8_1(x)
        b = raw.reshape(40, 8, 20)
        m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0].astype(np.float64)
        w = kernels_ref.dequantize_q4_1(raw).astype(np.float64) - np.repeat(m, 32, axis=1)
        want = dequantize_activations(q, d).astype(np.float64) @ w.T + s.astype(np.float64) @ m.T
    else:
        q, d = kernels_ref.quantize_activations_q8_0(x)
        w = getattr(kernels_ref, f"dequantize_{fmt}")(raw).astype(np.float64)
        want = dequantize_activations(q, d).astype(np.float64) @ w.T
    magnitude = int8_dot_magnitude(fmt)((x, raw), got)
    assert np.all(np.abs(got - want) <= 1e-6 * magnitude + 1e-7)  # float32 rounding, far inside INT8_DOT


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_error_against_float_activations_is_within_the_stated_bound(fmt: str) -> None:
    x, raw = _case(fmt, 8, 576, 64, seed=3)
    w = getattr(kernels_ref, f"dequantize_{fmt}")(raw)
    err = np.abs(_a8(fmt)(x, raw).astype(np.float64) - FORMATS[fmt][2](x, raw))
    rounding = 2 * (DOT.atol + DOT.rtol * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T))
    bound = activation_error_bound(x, w) + rounding
    assert np.all(err <= bound)
    assert err.max() > 10 * rounding.max()  # the activations really are rounded: the bound is needed


def test_bad_inputs_name_the_problem() -> None:
    x, raw = _case("q8_0", 2, 64, 3)
    for kernel in (kernels_ref.linear_q8_0_a8, cpu_a8.linear_q8_0_a8):
        with pytest.raises(ValueError, match="multiple of 32"):
            kernel(x[:, :40], raw)
        with pytest.raises(ValueError, match="features"):
            kernel(np.zeros((2, 96), np.float32), raw)
        with pytest.raises(ValueError, match="raw blocks"):
            kernel(x, raw[:, :33])


# --- the cpu backend ---------------------------------------------------------------------------------


def test_compiled_float16_rounding_matches_numpy_on_ties_subnormals_and_overflow() -> None:
    h = np.arange(0, 0x7BFF, dtype=np.uint16).view(np.float16).astype(np.float64)
    midpoints = ((h[:-1] + h[1:]) / 2).astype(np.float32)  # every tie, subnormal ties included
    rng = np.random.default_rng(4)
    spread = (rng.standard_normal(20000) * 10.0 ** rng.integers(-10, 6, 20000)).astype(np.float32)
    values = np.concatenate([midpoints[::7], -midpoints[::11], spread, np.float32([0, 65504, 65519, 65520, 1e6])])
    got = np.array([cpu_a8._f16_value(np.float32(v)) for v in values], dtype=np.float32)
    with np.errstate(over="ignore"):
        want = values.astype(np.float16).astype(np.float32)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("x_scale", [1.0, 1e-6])
def test_compiled_quantizer_equals_the_reference_bit_for_bit(x_scale: float) -> None:
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((7, 192)) * x_scale).astype(np.float32)
    x[0, :32] = 0.0  # a block of zeros: d = 0
    x[1, :32] = (np.arange(-16, 16) + np.float32(0.5)) * np.float32(x_scale)  # with amax 127: ties of roundf
    x[1, 31] = np.float32(127 * x_scale)
    q, d, s, qsum = cpu_a8.quantize_activations(x)
    q_ref, d_ref, s_ref = kernels_ref.quantize_activations_q8_1(x)
    assert np.array_equal(q, q_ref) and np.array_equal(d, d_ref) and np.array_equal(s, s_ref)
    assert np.array_equal(qsum, q_ref.reshape(7, 6, 32).sum(axis=-1))


def _decode_with(fmt: str, x: np.ndarray, raw: np.ndarray, portable: bool) -> np.ndarray:  # one decode loop's [T, out]
    from kernels_cpu.quant_tiles import F16_TABLE, _run

    q, d, s, qsum = cpu_a8.quantize_activations(x)
    middle = {"q8_0": (d,), "q4_0": (d, qsum), "q4_1": (d, s)}[fmt]
    out = np.empty((x.shape[0], raw.shape[0]), dtype=np.float32)
    if portable:
        _run(cpu_a8.PORTABLE_DECODE_LOOPS[fmt], q, *middle, raw, F16_TABLE, out)
    else:
        avx2.decode(fmt, q, middle, raw, F16_TABLE, out)
    return out


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_portable_decode_loops_return_the_references_bits(fmt: str) -> None:
    for tokens in (1, 3, cpu_a8.R_MAX_A8):
        x, raw = _case(fmt, tokens, 576, 50, seed=tokens)
        assert np.array_equal(_decode_with(fmt, x, raw, portable=True), _a8(fmt)(x, raw))


@pytest.mark.skipif(not avx2.ENABLED, reason="the AVX2 decode loops are off here: no AVX2, NANOSERVE_AVX2=0 or NUMBA_CPU_NAME set")
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("tokens", [1, 2, 7])
@pytest.mark.parametrize("x_scale", [1.0, 1e-3, 30.0])
def test_avx2_decode_loops_are_within_the_int8_dot_tolerance(fmt: str, tokens: int, x_scale: float) -> None:
    x, raw = _case(fmt, tokens, 1536, 70, seed=tokens, x_scale=x_scale)
    x[0, :32] = 0.0  # a block of zeros: d = 0
    x[-1, 32:64] = 127 * x_scale  # a block of equal values: every q = 127
    if fmt == "q8_0":
        raw[:3, 2:34] = 0x80  # q = -128 in the first block of three rows: |q| = 128
    ref = _a8(fmt)(x, raw)
    got = _decode_with(fmt, x, raw, portable=False)
    assert np.array_equal(_a8(fmt, cpu_a8)(x, raw), got)  # what the cpu kernel takes on this host
    outcome = compare(got, ref, INT8_DOT, int8_dot_magnitude(fmt)((x, raw), ref))
    assert outcome.problem is None, outcome.problem
    assert not np.array_equal(got, np.zeros_like(got))


@pytest.mark.skipif(not avx2.ENABLED, reason="the AVX2 decode loops are off here: no AVX2, NANOSERVE_AVX2=0 or NUMBA_CPU_NAME set")
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_avx2_decode_loops_split_over_threads_give_the_same_bits(fmt: str) -> None:
    from kernels_cpu import split

    x, raw = _case(fmt, 3, 576, 101, seed=12)  # 101 rows: parts of unequal size
    one = _decode_with(fmt, x, raw, portable=False)
    split.set_threads(2)
    try:
        two = _decode_with(fmt, x, raw, portable=False)
    finally:
        split.set_threads(1)
    assert np.array_equal(one, two)


@pytest.mark.skipif(not avx2.ENABLED, reason="the AVX2 decode loops are off here: no AVX2, NANOSERVE_AVX2=0 or NUMBA_CPU_NAME set")
def test_avx2_lanes_are_exact_integer_dot_products() -> None:
    """With every scale 1, each lane of one block is sum(w[j] * x[j], j = 4l .. 4l+3), exactly."""
    from numba import njit

    @njit
    def one_block(raw, q, x):  # -> the 8 lanes after one nibble block, after one int8 block
        a, b = avx2.new_lanes(), avx2.new_lanes()
        avx2.nibble_lanes(raw, 0, x, 0, a, np.float32(1.0))
        avx2.int8_lanes(q, 0, x, 0, b, np.float32(1.0))
        lanes_a, lanes_b = np.empty(8, np.float32), np.empty(8, np.float32)
        for lane in range(8):
            lanes_a[lane], lanes_b[lane] = a[lane], b[lane]
        return lanes_a, lanes_b, avx2.lane_sum(a)

    rng = np.random.default_rng(11)
    raw = rng.integers(0, 256, 16).astype(np.uint8)
    q = rng.integers(-128, 128, 32).astype(np.int8)
    q[:4] = -128
    x = rng.integers(-127, 128, 32).astype(np.int8)
    x[:8] = 127
    nibbles = np.concatenate([raw & 0xF, raw >> 4]).astype(np.int64)  # n[0..31]
    a, b, total = one_block(raw, q, x)
    want_a = (nibbles * x).reshape(8, 4).sum(axis=1)
    want_b = (q.astype(np.int64) * x).reshape(8, 4).sum(axis=1)
    assert a.tolist() == want_a.tolist() and b.tolist() == want_b.tolist()
    assert total == float(want_a.sum())  # integers below 2**24: exact in float32


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_cpu_prefill_rows_are_within_the_int8_dot_tolerance(fmt: str) -> None:
    x, raw = _case(fmt, cpu_a8.R_MAX_A8 + 5, 1536, 300, seed=6)  # 300 rows: two BLAS tiles
    ref = _a8(fmt)(x, raw)
    outcome = compare(_a8(fmt, cpu_a8)(x, raw), ref, INT8_DOT, int8_dot_magnitude(fmt)((x, raw), ref))
    assert outcome.problem is None, outcome.problem


def test_the_q4_1_prefill_tile_holds_each_blocks_scale_times_its_nibbles_exactly() -> None:
    from kernels_cpu.quant_tiles import F16_TABLE, _run

    _, raw = _case("q4_1", 1, 96, 9, seed=7)  # [9, 3 blocks * 20 bytes]
    raw[4, 20:22] = 0  # a zero scale
    blocks = raw.reshape(9, 3, 20)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16).astype(np.float32)  # [9, 3, 1]
    nibbles = np.concatenate([blocks[..., 4:] & 0xF, blocks[..., 4:] >> 4], axis=2).astype(np.float32)  # [9, 3, 32]
    tile = np.empty((6, 96), np.float32)
    _run(cpu_a8._tile_q4_1_scaled, raw, F16_TABLE, 2, tile)  # rows 2..7
    want = (d * nibbles).reshape(9, 96)[2:8]
    np.testing.assert_array_equal(tile.view(np.uint32), want.view(np.uint32))


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not _has_avx2(),
                    reason="the integer multiply-add instructions checked are x86 AVX2 / AVX-512 ones")  # fmt: skip
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_compiled_decode_loop_uses_integer_multiply_add_instructions(fmt: str) -> None:
    asm = cpu_a8.decode_kernel_asm(fmt)
    assert re.search(r"\b(vpmaddwd|vpdpwssd|vpdpbusd)\b", asm), f"no integer multiply-add in _rows_{fmt}"
    if avx2.ENABLED:  # the byte multiply-add of kernels_cpu.avx2, and no horizontal add inside the block loop
        assert re.search(r"\bvpmaddubsw\b", asm), f"no vpmaddubsw in the AVX2 _rows_{fmt}"


# --- --activations int8 in the model ------------------------------------------------------------


def _tiny_logits(model_dir: str, backend: str, weights: str, activations: str) -> np.ndarray:  # -> [10, V]
    """One 9-row prefill (prefill kernels, above R_MAX_A8) then one decode row."""
    from nanoserve.cache.contiguous import ContiguousKVCache
    from nanoserve.kernels import get_backend
    from nanoserve.model import load_checkpoint
    from nanoserve.model.llama import LlamaModel

    loaded = load_checkpoint(model_dir, weights)
    model = LlamaModel(loaded.config, loaded.weights, get_backend(backend), activations)
    ids = np.array([5, 17, 42, 100, 7, 250, 3, 64, 99, 11] * 2)
    cache = ContiguousKVCache(model.config, len(ids), model.backend)
    rows = []
    for positions in (np.arange(len(ids) - 1), np.array([len(ids) - 1])):
        cache.set_positions(positions)
        rows.append(np.asarray(model.compute_logits(model.forward(ids[positions], positions, cache))))
    return np.concatenate(rows)


@pytest.mark.parametrize("weights", ["q8_0", "q4_1"])
def test_int8_activations_move_the_logits_a_little_and_the_cpu_backend_agrees_with_the_reference(
    weights: str, tiny_model_dir: str
) -> None:
    floats = _tiny_logits(tiny_model_dir, "ref", weights, "float")
    ref = _tiny_logits(tiny_model_dir, "ref", weights, "int8")
    cpu = _tiny_logits(tiny_model_dir, "cpu", weights, "int8")
    moved = np.linalg.norm(ref - floats) / np.linalg.norm(floats)
    assert 0 < moved < 0.05  # the a8 kernels really run, and round x by at most half a step per block
    # The backends' float kernels (norms, BLAS orders) differ in the last bit, and where an
    # activation sits on a rounding boundary that bit sends it to the other int8 step; through
    # attention that moves every later position. So the backends agree to a fraction of what
    # int8 activations themselves move the logits (on one CPU 1e-7 apart, on another 0.4 of
    # ``moved`` for Q4_1), and on the greedy token wherever the reference's top two are
    # further apart than the backends' gap on that row; the a8 kernels alone are held to
    # the reference exactly by the kernel suite.
    assert np.linalg.norm(cpu - ref) / np.linalg.norm(ref) <= 0.5 * moved
    rows = np.arange(len(ref))
    picked_ref, picked_cpu = ref.argmax(axis=-1), cpu.argmax(axis=-1)
    margin = ref[rows, picked_ref] - ref[rows, picked_cpu]  # 0 where both pick the same token
    gap = np.abs(cpu - ref).max(axis=-1)
    assert np.all((picked_cpu == picked_ref) | (margin <= 2 * gap)), (margin, gap)
    assert np.mean(picked_cpu == picked_ref) >= 0.9


def test_int8_activations_leave_formats_without_a8_kernels_on_float_activations(tiny_model_dir: str) -> None:
    np.testing.assert_array_equal(
        _tiny_logits(tiny_model_dir, "ref", "int8", "int8"), _tiny_logits(tiny_model_dir, "ref", "int8", "float")
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"weights": "fp32", "activations": "int8"}, "activations int8 needs GGUF block weights .* got weights 'fp32'"),
        ({"activations": "int4"}, "activations must be one of float, int8; got 'int4'"),
        ({"weights": "q5_k"}, "weights must be one of fp32, fp16, int8, int4, q8_0, q4_0, q4_1, gguf; got 'q5_k'"),
    ],
)
def test_engine_refuses_int8_activations_without_block_weights_before_loading(settings: dict, message: str) -> None:
    from nanoserve.engine import LLMEngine
    from nanoserve.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        LLMEngine(model="/no/such/model.gguf", **settings)  # the config is checked before any load

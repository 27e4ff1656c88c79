"""The cpu backend's fused quantized linears (``kernels_cpu.quant``) at the shapes the model
uses: decode rows (the fused path, T <= R_MAX), prefill rows (float32 tiles into BLAS),
SmolLM2's widths, every int4 group size, and the edges (no rows, float16 subnormal and
non-finite scales). The hypothesis suite (``test_backends_match_reference``) covers
random small shapes; these pin the two paths and the thresholds between them.
"""

from __future__ import annotations

import tracemalloc

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

import kernels_ref
from kernels_cpu import quant, quant_tiles
from nanoserve.quant import quantize

FORMATS = ["int8", "int4", "q8_0", "q4_0", "q4_1"]
GGUF_TYPE = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0, "q4_1": GGMLQuantizationType.Q4_1}
ROWS = sorted({0, 1, 2, 3, 4, 5, 6, 9, quant.R_MAX, quant.R_MAX + 1, quant.R_MAX_QUAD, quant.R_MAX_QUAD + 1, 100})


def weight_arrays(fmt: str, out: int, inp: int, seed: int = 0) -> tuple:
    w = (np.random.default_rng(seed).standard_normal((out, inp)) * 0.05).astype(np.float32)
    if fmt in GGUF_TYPE:
        return (gguf_quantize(w, GGUF_TYPE[fmt]),)
    return quantize(w, fmt).arrays


def dequantized(fmt: str, arrays: tuple) -> np.ndarray:  # -> float64 [out, in]
    return getattr(kernels_ref, f"dequantize_{fmt}")(*arrays).astype(np.float64)


def assert_matches_reference(fmt: str, x: np.ndarray, arrays: tuple) -> None:
    got = getattr(quant, f"linear_{fmt}")(x, *arrays)
    w = dequantized(fmt, arrays)
    want = x.astype(np.float64) @ w.T
    assert got.dtype == np.float32 and got.shape == want.shape
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(w).T  # the contract's DOT tolerance
    assert np.all(np.abs(got - want) <= 1e-6 + 2e-5 * magnitude)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_linear_matches_the_dequantized_product_on_both_sides_of_r_max(fmt: str, rows: int) -> None:
    arrays = weight_arrays(fmt, 302, 576)  # 302 output rows: a partial prefill tile, 2 rows past the groups of 4
    x = np.random.default_rng(1).standard_normal((rows, 576)).astype(np.float32)
    assert_matches_reference(fmt, x, arrays)


@pytest.mark.parametrize("x_block", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("fmt", ["int8", "int4", "q8_0", "q4_0", "q4_1"])
def test_quad_kernels_match_the_reference_at_every_block_size_of_x(fmt: str, x_block: int) -> None:
    """``X_BLOCK`` depends on the machine; the quad kernels are run here at every size."""
    arrays = weight_arrays(fmt, 38, 96, seed=3)  # 38 rows: 9 groups of four and 2 left over
    code = {"int8": quant_tiles.INT8, "int4": quant_tiles.INT4, "q8_0": quant_tiles.Q8_0, "q4_0": quant_tiles.Q4_0,
            "q4_1": quant_tiles.Q4_1}[fmt]  # fmt: skip
    if fmt in GGUF_TYPE:
        a, b = arrays[0], quant_tiles.F16_TABLE
    else:  # int8's per-row scale, int4's group scales flattened (as kernels_cpu.quant passes them)
        a, b = arrays[0], np.ascontiguousarray(arrays[1], dtype=np.float32).reshape(-1)
    w = dequantized(fmt, arrays)
    for rows in range(2, 12):
        x = np.random.default_rng(rows).standard_normal((rows, 96)).astype(np.float32)
        out = np.empty((rows, 38), dtype=np.float32)
        quant_tiles._run(quant_tiles._quad_rows, code, x, a, b, out, x_block, 0, 38)
        want = x.astype(np.float64) @ w.T
        assert np.all(np.abs(out - want) <= 1e-6 + 2e-5 * (np.abs(x.astype(np.float64)) @ np.abs(w).T))


@pytest.mark.parametrize(("out", "inp"), [(960, 576), (576, 1536)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_linear_matches_at_smollm2_widths(fmt: str, out: int, inp: int) -> None:
    arrays = weight_arrays(fmt, out, inp, seed=2)
    for rows in (1, 8):
        assert_matches_reference(fmt, np.random.default_rng(rows).standard_normal((rows, inp)).astype(np.float32), arrays)


@pytest.mark.parametrize("group", [2, 4, 6, 16, 32, 64])
@pytest.mark.parametrize("rows", [1, 3, quant.R_MAX + 1, quant.R_MAX_QUAD + 1])
def test_int4_any_group_size_matches_the_reference(group: int, rows: int) -> None:
    rng = np.random.default_rng(group)
    inp = 192
    qweight = rng.integers(0, 256, (7, inp // 2)).astype(np.uint8)
    scales = (rng.random((7, inp // group)) * 0.02).astype(np.float32)
    x = rng.standard_normal((rows, inp)).astype(np.float32)
    assert_matches_reference("int4", x, (qweight, scales))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_float16_subnormal_and_zero_scales_are_read_exactly(fmt: str) -> None:
    (raw,) = weight_arrays(fmt, 40, 128, seed=3)
    blocks = raw.reshape(40, 4, -1)
    tiny = np.array([6e-8, 0.0, -3e-6, 1e-5], np.float16).view(np.uint8).reshape(4, 2)
    blocks[:, :, 0:2] = tiny  # every block's d: subnormal, zero, subnormal, normal
    x = np.random.default_rng(4).standard_normal((2, 128)).astype(np.float32)
    assert_matches_reference(fmt, x, (raw,))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_widened_blocks_are_exactly_the_reference_dequantization(fmt: str) -> None:
    (raw,) = weight_arrays(fmt, 9, 576, seed=8)
    tile = np.empty((5, 576), np.float32)
    quant_tiles._run(getattr(quant_tiles, f"_tile_{fmt}"), raw, quant_tiles.F16_TABLE, 3, tile)  # rows 3..7
    want = getattr(kernels_ref, f"dequantize_{fmt}")(raw)[3:8]
    np.testing.assert_array_equal(tile.view(np.uint32), want.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("group", [32, 64, 6])  # whole 32-column blocks (written out), and the plain loop
def test_widened_int4_rows_are_exactly_the_reference_dequantization(group: int) -> None:
    rng = np.random.default_rng(group)
    qweight = rng.integers(0, 256, (9, 96)).astype(np.uint8)  # every nibble value, 192 columns
    scales = (rng.standard_normal((9, 192 // group)) * 0.02).astype(np.float32)
    tile = np.empty((5, 192), np.float32)
    quant_tiles._run(quant_tiles._tile_int4, qweight, scales, 3, tile)  # rows 3..7
    want = kernels_ref.dequantize_int4(qweight, scales)[3:8]
    np.testing.assert_array_equal(tile.view(np.uint32), want.astype(np.float32).view(np.uint32))


def test_f16_table_holds_the_value_of_every_float16_bit_pattern() -> None:
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(quant_tiles.F16_TABLE[finite], want[finite])
    assert np.array_equal(np.isnan(quant_tiles.F16_TABLE), np.isnan(want))
    assert np.array_equal(np.isposinf(quant_tiles.F16_TABLE), np.isposinf(want))


def test_an_infinite_scale_gives_the_non_finite_output_the_reference_gives() -> None:
    (raw,) = weight_arrays("q8_0", 4, 64, seed=5)
    raw = raw.copy()
    raw[1, 0:2] = np.array([np.inf], np.float16).view(np.uint8)  # row 1, block 0: d = inf
    x = np.ones((1, 64), np.float32)
    with np.errstate(invalid="ignore"):  # inf * 0 in the reference's dequantized row
        got, want = quant.linear_q8_0(x, raw), kernels_ref.linear_q8_0(x, raw)
    assert np.array_equal(np.isfinite(got), np.isfinite(want)) and not np.isfinite(got[0, 1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_rows_never_allocate_the_float_matrix(fmt: str) -> None:
    arrays = weight_arrays(fmt, 2048, 1024, seed=6)
    x = np.random.default_rng(7).standard_normal((4, 1024)).astype(np.float32)
    kernel = getattr(quant, f"linear_{fmt}")
    kernel(x, *arrays)  # compiled (or loaded) before measuring
    tracemalloc.start()
    kernel(x, *arrays)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2048 * 1024 * 4 // 16  # the float32 matrix would be 8 MiB


def test_kernels_leave_numbas_slp_setting_as_they_found_it() -> None:
    before = numba.config.SLP_VECTORIZE
    quant.linear_q4_1(np.ones((1, 32), np.float32), weight_arrays("q4_1", 3, 32)[0])
    assert numba.config.SLP_VECTORIZE == before


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_gguf_kernels_reject_blocks_that_do_not_fit_x(fmt: str) -> None:
    (raw,) = weight_arrays(fmt, 4, 64)
    kernel = getattr(quant, f"linear_{fmt}")
    with pytest.raises(ValueError, match="features"):
        kernel(np.ones((1, 96), np.float32), raw)
    with pytest.raises(ValueError, match="raw blocks"):
        kernel(np.ones((1, 64), np.float32), raw[:, :-1])


def test_int8_and_int4_reject_weights_that_do_not_fit_x() -> None:
    q, s = weight_arrays("int8", 4, 64)
    with pytest.raises(ValueError, match="features"):
        quant.linear_int8(np.ones((1, 32), np.float32), q, s)
    packed, scales = weight_arrays("int4", 4, 64)
    with pytest.raises(ValueError, match="features"):
        quant.linear_int4(np.ones((1, 32), np.float32), packed, scales)

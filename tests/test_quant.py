"""Weight formats: GGUF block dequantization on hand-built blocks and against the ``gguf``
package's own quantizer, nanoserve's int8/int4 round-trip error bounds, and the quantized
linear kernels.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import kernels_ref as K
from nanoserve.errors import UnsupportedModelError
from nanoserve.quant import QuantizedWeight, apply_linear, dequantize, quantize


def f16_bytes(value: float) -> bytes:
    return struct.pack("<e", value)


def pack_nibbles(low: list[int], high: list[int]) -> bytes:
    """16 bytes: byte j holds weight j in its low nibble and weight j + 16 in its high nibble."""
    assert len(low) == len(high) == 16
    return bytes(lo | (hi << 4) for lo, hi in zip(low, high, strict=True))


def as_rows(*rows: bytes) -> np.ndarray:  # -> uint8 [len(rows), bytes per row]
    return np.stack([np.frombuffer(r, dtype=np.uint8) for r in rows])


# --- GGUF blocks built by hand --------------------------------------------------------------


def test_q8_0_dequantizes_known_blocks() -> None:
    q = list(range(-16, 16))
    row0 = f16_bytes(0.5) + struct.pack("<32b", *q) + f16_bytes(-2.0) + struct.pack("<32b", *([127] * 16 + [-128] * 16))
    row1 = f16_bytes(0.0) + struct.pack("<32b", *q) + f16_bytes(1.0) + struct.pack("<32b", *q[::-1])
    out = K.dequantize_q8_0(as_rows(row0, row1))
    assert out.dtype == np.float32 and out.shape == (2, 64)
    np.testing.assert_array_equal(out[0, :32], [0.5 * v for v in q])
    np.testing.assert_array_equal(out[0, 32:], [-254.0] * 16 + [256.0] * 16)
    np.testing.assert_array_equal(out[1, :32], 0.0)
    np.testing.assert_array_equal(out[1, 32:], q[::-1])


def test_q4_0_dequantizes_known_block_low_nibbles_first() -> None:
    low = list(range(16))  # weights 0..15
    high = [15 - j for j in range(16)]  # weights 16..31
    raw = as_rows(f16_bytes(0.25) + pack_nibbles(low, high))
    out = K.dequantize_q4_0(raw)
    expected = [0.25 * (v - 8) for v in low + high]
    np.testing.assert_array_equal(out, [expected])


def test_q4_1_dequantizes_known_block() -> None:
    low = [j % 4 for j in range(16)]
    high = [15] * 8 + [0] * 8
    raw = as_rows(f16_bytes(0.5) + f16_bytes(-1.0) + pack_nibbles(low, high))
    out = K.dequantize_q4_1(raw)
    expected = [0.5 * v - 1.0 for v in low + high]
    np.testing.assert_array_equal(out, [expected])


def test_q4_1_with_two_blocks_uses_each_blocks_own_scale_and_minimum() -> None:
    nibbles = pack_nibbles([1] * 16, [2] * 16)
    raw = as_rows(f16_bytes(1.0) + f16_bytes(0.0) + nibbles + f16_bytes(2.0) + f16_bytes(10.0) + nibbles)
    out = K.dequantize_q4_1(raw)
    np.testing.assert_array_equal(out[0], [1.0] * 16 + [2.0] * 16 + [12.0] * 16 + [14.0] * 16)


@pytest.mark.parametrize(
    ("dequant", "block_bytes"),
    [(K.dequantize_q8_0, 34), (K.dequantize_q4_0, 18), (K.dequantize_q4_1, 20)],
)
def test_gguf_dequantizers_reject_raw_arrays_of_the_wrong_shape_or_dtype(dequant, block_bytes: int) -> None:
    with pytest.raises(ValueError, match="raw blocks"):
        dequant(np.zeros((2, block_bytes + 1), np.uint8))
    with pytest.raises(ValueError, match="raw blocks"):
        dequant(np.zeros((2, block_bytes), np.int8))
    with pytest.raises(ValueError, match="raw blocks"):
        dequant(np.zeros(block_bytes, np.uint8))


# --- against the gguf package ----------------------------------------------------------------

GGUF_FORMATS = [
    (GGMLQuantizationType.Q8_0, K.dequantize_q8_0, K.linear_q8_0),
    (GGMLQuantizationType.Q4_0, K.dequantize_q4_0, K.linear_q4_0),
    (GGMLQuantizationType.Q4_1, K.dequantize_q4_1, K.linear_q4_1),
]


@pytest.mark.parametrize(("qtype", "dequant", "_linear"), GGUF_FORMATS, ids=lambda v: getattr(v, "name", ""))
def test_dequantization_equals_the_gguf_packages_own_dequantizer(qtype, dequant, _linear) -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 128)) * rng.uniform(0.01, 10.0, (8, 1))).astype(np.float32)
    raw = gguf_quantize(w, qtype)
    assert raw.dtype == np.uint8
    ours = dequant(raw)
    theirs = gguf_dequantize(raw, qtype)
    assert ours.shape == w.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
    # and the round trip is a faithful approximation of the original
    bits = {GGMLQuantizationType.Q8_0: 8, GGMLQuantizationType.Q4_0: 4, GGMLQuantizationType.Q4_1: 4}[qtype]
    block_max = np.abs(w).reshape(8, 4, 32).max(axis=-1, keepdims=True)
    err = np.abs(ours - w).reshape(8, 4, 32)
    assert np.all(err <= block_max / 2 ** (bits - 2) + 1e-6)


@pytest.mark.parametrize(("qtype", "dequant", "linear"), GGUF_FORMATS, ids=lambda v: getattr(v, "name", ""))
def test_gguf_linear_kernels_equal_x_times_the_dequantized_matrix(qtype, dequant, linear) -> None:
    rng = np.random.default_rng(1)
    raw = gguf_quantize(rng.standard_normal((6, 64)).astype(np.float32), qtype)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    expected = x.astype(np.float64) @ gguf_dequantize(raw, qtype).astype(np.float64).T
    np.testing.assert_allclose(linear(x, raw), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_quantizing_to_a_gguf_format_writes_the_gguf_packages_bytes(fmt: str) -> None:
    """Same rounding as llama.cpp: all-zero blocks, a negative extreme, a lone outlier, tiny scales."""
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((12, 256)) * rng.uniform(1e-4, 5.0, (12, 1))).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    w[1, 40] = -9.0  # the extreme of its block is negative (Q4_0's scale takes its sign)
    w[2, 70] = 50.0  # one outlier spoils only its own block
    w[3] = rng.integers(-3, 4, 256)  # integers: exact ties for the rounding
    qw = quantize(w, fmt)
    qtype = GGMLQuantizationType[fmt.upper()]
    assert isinstance(qw, QuantizedWeight) and qw.format == fmt and qw.shape == w.shape
    np.testing.assert_array_equal(qw.arrays[0], gguf_quantize(w, qtype))
    np.testing.assert_array_equal(dequantize(qw), gguf_dequantize(qw.arrays[0], qtype).astype(np.float32))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_quantizing_to_a_gguf_format_rejects_rows_not_divisible_into_blocks(fmt: str) -> None:
    with pytest.raises(UnsupportedModelError, match=rf"{fmt} needs in_features divisible by 32.*\(2, 48\)"):
        quantize(np.zeros((2, 48), np.float32), fmt)


# --- nanoserve's int8 / int4 ------------------------------------------------------------------


def test_int8_round_trip_error_is_at_most_half_a_step_per_row() -> None:
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((16, 96)) * rng.uniform(1e-3, 5.0, (16, 1))).astype(np.float32)
    qw = quantize(w, "int8")
    q, scale = qw.arrays
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (16,)
    assert np.abs(q.astype(np.int32)).max(axis=1).tolist() == [127] * 16  # each row's extreme maps to +-127
    err = np.abs(dequantize(qw) - w)
    assert np.all(err <= scale[:, None] / 2 * (1 + 1e-5))


def test_int8_of_an_all_zero_row_dequantizes_to_zero() -> None:
    w = np.zeros((2, 8), np.float32)
    w[1] = np.arange(8)
    qw = quantize(w, "int8")
    assert np.all(qw.arrays[0][0] == 0) and np.isfinite(qw.arrays[1]).all()
    np.testing.assert_array_equal(dequantize(qw)[0], 0.0)


def test_int4_round_trip_error_is_at_most_half_a_step_per_group() -> None:
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((8, 128)) * rng.uniform(1e-3, 5.0, (8, 1))).astype(np.float32)
    qw = quantize(w, "int4")
    packed, scales = qw.arrays
    assert packed.dtype == np.uint8 and packed.shape == (8, 64) and scales.shape == (8, 4)
    err = np.abs(dequantize(qw) - w).reshape(8, 4, 32)
    assert np.all(err <= scales[:, :, None] / 2 * (1 + 1e-5))


def test_int4_packs_even_columns_in_the_low_nibble() -> None:
    packed = np.array([[0x9A, 0x08]], np.uint8)  # columns: 0xA, 0x9, 0x8, 0x0
    out = K.dequantize_int4(packed, np.array([[0.5]], np.float32))
    np.testing.assert_array_equal(out, [[1.0, 0.5, 0.0, -4.0]])


def test_int4_known_group_quantizes_exactly() -> None:
    w = np.array([np.arange(-7, 25) * 0.1], np.float32)  # one group of 32, max |w| = 2.4 -> scale 0.3428...
    qw = quantize(w, "int4")
    scale = float(qw.arrays[1][0, 0])
    assert scale == pytest.approx(2.4 / 7, rel=1e-6)
    expected = np.clip(np.rint(w.astype(np.float64) / scale), -8, 7) * scale
    np.testing.assert_allclose(dequantize(qw), expected, rtol=1e-6)


def test_int4_rejects_rows_not_divisible_into_groups() -> None:
    with pytest.raises(UnsupportedModelError, match="divisible by 32"):
        quantize(np.zeros((2, 48), np.float32), "int4")


def test_quantize_rejects_unknown_formats_and_keeps_float_formats() -> None:
    w = np.arange(64, dtype=np.float32).reshape(2, 32)
    assert quantize(w, "fp16").dtype == np.float16
    fp32 = quantize(w, "fp32")
    assert fp32.dtype == np.float32 and np.array_equal(fp32, w)
    with pytest.raises(UnsupportedModelError, match="q5_k"):
        quantize(w, "q5_k")


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8", "int4", "q8_0", "q4_0", "q4_1"])
def test_apply_linear_equals_x_times_the_dequantized_weight_for_every_format(fmt: str) -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((10, 64)).astype(np.float32)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    qw = quantize(w, fmt)
    if fmt == "int8":
        q, scale = qw.arrays
        w_hat = q.astype(np.float64) * scale[:, None]
    elif fmt == "int4":
        packed, scales = qw.arrays
        nib = np.empty((10, 64))
        nib[:, 0::2], nib[:, 1::2] = packed & 0xF, packed >> 4
        w_hat = (nib - 8) * np.repeat(scales.astype(np.float64), 32, axis=1)
    elif fmt.startswith("q"):
        w_hat = gguf_dequantize(qw.arrays[0], GGMLQuantizationType[fmt.upper()]).astype(np.float64)
    else:
        w_hat = np.asarray(qw, dtype=np.float64)
    out = apply_linear(K, x, qw)
    assert out.dtype == np.float32 and out.shape == (4, 10)
    np.testing.assert_allclose(out, x.astype(np.float64) @ w_hat.T, rtol=1e-5, atol=1e-5)


def test_linear_int8_equals_integer_product_scaled_per_output_row() -> None:
    rng = np.random.default_rng(5)
    q = rng.integers(-127, 128, (5, 32)).astype(np.int8)
    scale = rng.uniform(0.01, 1.0, 5).astype(np.float32)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    expected = (x.astype(np.float64) @ q.astype(np.float64).T) * scale
    # float32 accumulation: the error is relative to the largest terms, not to each result
    np.testing.assert_allclose(K.linear_int8(x, q, scale), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_quantized_weight_reports_the_bytes_it_holds() -> None:
    qw = quantize(np.ones((4, 64), np.float32), "int4")
    assert isinstance(qw, QuantizedWeight) and qw.shape == (4, 64)
    assert qw.nbytes == 4 * 32 + 4 * 2 * 4  # packed nibbles + float32 scales


# --- the embedding table stays in the run's format ----------------------------------------------


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8", "int4", "q8_0", "q4_0", "q4_1"])
def test_embedding_rows_dequantize_only_the_gathered_rows_to_the_tables_own_values(fmt: str) -> None:
    from nanoserve.quant import embedding_rows, gather_rows

    rng = np.random.default_rng(6)
    table = quantize(rng.standard_normal((50, 64)).astype(np.float32), fmt)
    ids = np.array([3, 3, 49, 0, 17])
    rows = gather_rows(table, ids)
    if fmt not in ("fp32", "fp16"):
        assert isinstance(rows, QuantizedWeight) and rows.shape == (5, 64) and rows.nbytes * 10 == table.nbytes
    got = embedding_rows(table, ids)
    assert got.dtype == np.float32 and got.shape == (5, 64)
    np.testing.assert_array_equal(got, dequantize(table)[ids])


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_embedding_rows_of_a_gguf_table_are_the_files_dequantized_rows(qtype) -> None:
    from nanoserve.quant import embedding_rows

    rng = np.random.default_rng(7)
    raw = gguf_quantize(rng.standard_normal((20, 96)).astype(np.float32), qtype)
    table = QuantizedWeight(qtype.name.lower(), (raw,), (20, 96))
    ids = np.array([19, 2, 2])
    np.testing.assert_array_equal(embedding_rows(table, ids), gguf_dequantize(raw, qtype)[ids].astype(np.float32))


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4", "q8_0", "q4_0", "q4_1"])
def test_quantized_runs_hold_one_tied_table_for_embedding_and_lm_head(fmt: str, tiny_model_dir: str) -> None:
    from nanoserve.model import load_checkpoint

    fp32 = load_checkpoint(tiny_model_dir, "fp32").weights
    weights = load_checkpoint(tiny_model_dir, fmt).weights
    if not load_checkpoint(tiny_model_dir, fmt).config.tie_word_embeddings:
        pytest.skip("the tiny model does not tie its embeddings")
    assert weights.lm_head is weights.embed
    if fmt == "fp16":
        assert weights.embed.dtype == np.float16
    else:  # a 4-bit run keeps its LM head at 8 bits, as llama-quantize does; the layers hold fmt
        head = {"q4_0": "q8_0", "q4_1": "q8_0", "int4": "int8"}.get(fmt, fmt)
        assert isinstance(weights.embed, QuantizedWeight) and weights.embed.format == head
        assert weights.layers[0].w_gate_up.format == fmt
    assert weights.nbytes() < fp32.nbytes() * (0.6 if fmt == "fp16" else 0.35)


def test_an_untied_4_bit_run_keeps_its_lm_head_at_8_bits_and_its_embedding_at_4(tmp_path) -> None:
    from nanoserve.model import load_checkpoint
    from tests.tiny_model import make_tiny_model

    untied = make_tiny_model(str(tmp_path / "untied"), tie_word_embeddings=False)
    for fmt, head in [("q4_1", "q8_0"), ("q4_0", "q8_0"), ("int4", "int8"), ("q8_0", "q8_0")]:
        weights = load_checkpoint(untied, fmt).weights
        assert weights.lm_head is not weights.embed
        assert (weights.embed.format, weights.lm_head.format) == (fmt, head)


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4", "q8_0", "q4_0", "q4_1"])
def test_cpu_backend_gives_the_reference_backends_logits_for_every_quantized_format(fmt: str, tiny_model_dir: str) -> None:
    """The fused kernels (cpu) against dequantize-then-BLAS (ref), embedding lookup included."""
    from nanoserve.cache.contiguous import ContiguousKVCache
    from nanoserve.model import load_model

    def logits(backend: str, ids: list[int]) -> np.ndarray:  # one prefill, then one decode row
        model, _ = load_model(tiny_model_dir, backend=backend, weights=fmt)
        cache = ContiguousKVCache(model.config, len(ids) + 1, model.backend)
        rows = []
        for positions in (np.arange(len(ids) - 1), np.array([len(ids) - 1])):
            cache.set_positions(positions)
            rows.append(np.asarray(model.compute_logits(model.forward(np.array(ids)[positions], positions, cache))))
        return np.concatenate(rows)

    ids = [5, 17, 42, 100, 7, 250, 3, 64, 99] * 5  # a 44-row prefill (> R_MAX) and a 1-row decode
    ref, cpu = logits("ref", ids), logits("cpu", ids)
    assert np.linalg.norm(cpu - ref) <= 1e-4 * np.linalg.norm(ref)
    assert np.array_equal(cpu.argmax(-1), ref.argmax(-1))

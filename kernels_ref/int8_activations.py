"""Int8 activations: quantize ``x`` per block of 32, then integer dot products with GGUF blocks.

The float-activation linears (``kernels_ref.linear``) widen the weights to float32 and
multiply float by float. llama.cpp's CPU backend does not: it quantizes each activation
row to blocks of 32 int8 values with one float16 scale (``quantize_row_q8_0`` /
``quantize_row_q8_1``), so that each block of a dot product is a sum of 32 int8 x int8
(or 4-bit x int8) products, exact in int32, and only one multiply by the two scales is
left per block (``ggml_vec_dot_q8_0_q8_0``, ``ggml_vec_dot_q4_0_q8_0``,
``ggml_vec_dot_q4_1_q8_1``). This module is the executable spec of that path.

Activation blocks (one row of x, ``in`` = 32 * nb features)::

    x[t]   | x[0..31]      | x[32..63]     | ...   float32 [in]
             block 0         block 1
    q[t]   | q[0..31]      | q[32..63]     | ...   int8    [in]
    d[t]   | d_0           | d_1           | ...   float32 [nb]  (a float16 value)
    s[t]   | s_0           | s_1           | ...   float32 [nb]  (a float16 value; Q8_1 only)

Per block (llama.cpp's reference ``quantize_row_q8_0_ref`` / ``quantize_row_q8_1_ref``,
all in float32)::

    amax = max_j |x_j|
    d32  = amax / 127                          (float32 division)
    id   = 1 / d32, or 0 when d32 == 0
    q_j  = roundf(x_j * id)                    round half away from zero; |q_j| <= 127
    d    = float16(d32)                        stored rounded to nearest, ties to even
    s    = float16(float32(sum_j q_j) * d32)   Q8_1 only: d32 unrounded, the product rounded once

(llama.cpp's x86 SIMD quantizer multiplies by ``127 / amax`` and rounds half to even
instead; the two differ on a value that lands within an ulp of a half. This module and
every backend follow the portable reference bit for bit.)

The linears, per output ``y[t, o]`` (``W[o]`` in the GGUF layouts of ``kernels_ref.quant``)::

    Q8_0 x Q8_0   y = sum_b float32(sum_j qw_j * q_j) * (dw_b * d_b)
    Q4_0 x Q8_0   y = sum_b float32(sum_j (nibble_j - 8) * q_j) * (dw_b * d_b)
    Q4_1 x Q8_1   y = sum_b float32(sum_j nibble_j * q_j) * (dw_b * d_b) + mw_b * s_b

The block sums are integers (at most 32 * 127 * 127 = 516,128 in magnitude); the block
terms accumulate in float32 in block order. The reference computes each block's sums
for all rows and outputs with one BLAS call on integer-valued float32 arrays: every
product and partial sum is an integer below 2**24, so float32 holds it exactly in any
summation order, and the result is the int32 sum.

Equality with the float-activation kernels: none exactly, the activations are rounded.
Per element ``|x_j - q_j * d| <= d32 / 2 + 127 * |d32 - d|``, and float16 rounding makes
``|d32 - d| <= max(d32 * 2**-11, 2**-25)``; hence, with ``W`` the dequantized weights,

    |linear_*_a8(x, raw) - linear_*(x, raw)|[t, o]
        <= sum_b (0.5 * d32_b + 127 * max(d32_b * 2**-11, 2**-25)) * sum_{j in b} |W[o, j]|
           + float32 rounding of both sums

which is at most about ``0.0044 * max_block|x| * sum|W[o]|``: the relative error of an
int8 value, not of a float32 one. :func:`activation_error_bound` computes it.

Inputs must be finite: a block's scale comes from its largest value.
"""

import numpy as np

from kernels_ref.quant import (
    Q4_0_BLOCK_BYTES,
    Q4_1_BLOCK_BYTES,
    Q8_0_BLOCK_BYTES,
    QK,
    _blocks,
    _f16,
    _nibbles,
)

#: The largest quantized magnitude of an activation; -128 is never produced.
INT8_MAX = 127
#: The worst float16 rounding of a scale: relative 2**-11 (normal), absolute 2**-25 (subnormal).
F16_HALF_ULP = 2.0**-11
F16_SUBNORMAL_HALF_ULP = 2.0**-25


def _activation_blocks(x: np.ndarray, name: str) -> np.ndarray:  # [T, in] -> float32 [T, nb, 32]
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK:
        raise ValueError(f"{name}: expected float32 x [T, in] with in a multiple of {QK}, got {x.shape}")
    return x.reshape(x.shape[0], x.shape[1] // QK, QK)


def _quantize_blocks(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # [T, nb, 32] -> q, d32, d
    """int8 q [T, nb, 32], the unrounded float32 scale d32 [T, nb] and its float16 value d [T, nb]."""
    amax = np.abs(x3).max(axis=-1, initial=np.float32(0))  # [T, nb]
    d32 = (amax / np.float32(INT8_MAX)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inverse = np.where(d32 != 0, np.float32(1) / d32, np.float32(0)).astype(np.float32)
    v = x3 * inverse[..., None]  # float32 products, as llama.cpp rounds them
    magnitude = np.floor(np.abs(v).astype(np.float64) + 0.5)  # round half away from zero (exact in float64)
    q = (np.sign(v) * magnitude).astype(np.int8)
    d = d32.astype(np.float16).astype(np.float32)
    return q, d32, d


def quantize_activations_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # [T, in] -> int8 [T, in], f32 [T, in/32]
    """llama.cpp's Q8_0 activation blocks: ``q = roundf(x / d32)``, ``d = float16(max|x| / 127)``."""
    x3 = _activation_blocks(x, "quantize_activations_q8_0")
    q, _, d = _quantize_blocks(x3)
    return q.reshape(x3.shape[0], x3.shape[1] * QK), d


def quantize_activations_q8_1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # [T, in] -> q, d, s
    """Q8_1: the Q8_0 blocks plus ``s = float16(sum(q) * d32)`` per block (float32 [T, in/32])."""
    x3 = _activation_blocks(x, "quantize_activations_q8_1")
    q, d32, d = _quantize_blocks(x3)
    s = (q.sum(axis=-1, dtype=np.int32).astype(np.float32) * d32).astype(np.float16).astype(np.float32)
    return q.reshape(x3.shape[0], x3.shape[1] * QK), d, s


def dequantize_activations(q: np.ndarray, d: np.ndarray) -> np.ndarray:  # int8 [T, in], f32 [T, in/32] -> f32 [T, in]
    """``q * d`` per block: the activations the integer dot products see (exact in float32)."""
    rows, n = q.shape
    return (q.reshape(rows, n // QK, QK).astype(np.float32) * d[..., None]).reshape(rows, n)


def activation_error_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [T, in], f32 [out, in] -> f64 [T, out]
    """The bound of the module docstring on ``|a8 - float|``, before the float32 rounding of the sums."""
    x3 = _activation_blocks(x, "activation_error_bound")
    d32 = (np.abs(x3).max(axis=-1, initial=np.float32(0)) / np.float32(INT8_MAX)).astype(np.float64)
    per_element = 0.5 * d32 + INT8_MAX * np.maximum(d32 * F16_HALF_ULP, F16_SUBNORMAL_HALF_ULP)  # [T, nb]
    w_blocks = np.abs(w.astype(np.float64)).reshape(w.shape[0], w.shape[1] // QK, QK).sum(axis=-1)  # [out, nb]
    return per_element @ w_blocks.T


def _block_sums_times_scales(
    q: np.ndarray, d: np.ndarray, qw: np.ndarray, dw: np.ndarray, mins: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """``sum_b float32(q_b . qw_b) * (dw_b * d_b) [+ mw_b * s_b]``, accumulated in float32 in block order.

    q int8 [T, nb, 32], d float32 [T, nb]; qw float32 [out, nb, 32] integer-valued,
    dw float32 [out, nb]; ``mins`` = (mw float32 [out, nb], s float32 [T, nb]) for Q4_1
    -> float32 [T, out]. One BLAS call per block gives the block's integer sums for every
    (t, o) exactly (all partial sums are integers below 2**24).
    """
    rows, blocks, _ = q.shape
    qx = q.astype(np.float32)
    qw_t = np.ascontiguousarray(qw.transpose(1, 2, 0))  # [nb, 32, out]
    y = np.zeros((rows, qw.shape[0]), dtype=np.float32)
    for b in range(blocks):
        sums = qx[:, b, :] @ qw_t[b]  # [T, out], exact integers
        term = sums * (dw[None, :, b] * d[:, b, None])
        if mins is not None:
            term = term + mins[0][None, :, b] * mins[1][:, b, None]
        y += term
    return y


def _check_raw(x3: np.ndarray, raw: np.ndarray, block_bytes: int, name: str) -> np.ndarray:  # -> [out, nb, bytes]
    b = _blocks(raw, block_bytes)
    if b.shape[1] != x3.shape[1]:
        raise ValueError(f"{name}: x has {x3.shape[1] * QK} features, the blocks hold {b.shape[1] * QK}")
    return b


def linear_q8_0_a8(x: np.ndarray, raw: np.ndarray) -> np.ndarray:  # [T, in], uint8 [out, in/32*34] -> [T, out]
    """Q8_0 weights times Q8_0 activations (llama.cpp's ``ggml_vec_dot_q8_0_q8_0``), float32 out."""
    x3 = _activation_blocks(x, "linear_q8_0_a8")
    b = _check_raw(x3, raw, Q8_0_BLOCK_BYTES, "linear_q8_0_a8")
    q, _, d = _quantize_blocks(x3)
    qw = b[..., 2:].view(np.int8).astype(np.float32)  # [out, nb, 32]
    return _block_sums_times_scales(q, d, qw, _f16(b[..., 0:2])[..., 0])


def linear_q4_0_a8(x: np.ndarray, raw: np.ndarray) -> np.ndarray:  # [T, in], uint8 [out, in/32*18] -> [T, out]
    """Q4_0 weights (nibble - 8) times Q8_0 activations (``ggml_vec_dot_q4_0_q8_0``), float32 out."""
    x3 = _activation_blocks(x, "linear_q4_0_a8")
    b = _check_raw(x3, raw, Q4_0_BLOCK_BYTES, "linear_q4_0_a8")
    q, _, d = _quantize_blocks(x3)
    qw = _nibbles(b[..., 2:]).astype(np.float32) - 8.0  # [out, nb, 32]
    return _block_sums_times_scales(q, d, qw, _f16(b[..., 0:2])[..., 0])


def linear_q4_1_a8(x: np.ndarray, raw: np.ndarray) -> np.ndarray:  # [T, in], uint8 [out, in/32*20] -> [T, out]
    """Q4_1 weights (d * nibble + m) times Q8_1 activations (``ggml_vec_dot_q4_1_q8_1``), float32 out.

    Per block ``float32(nibbles . q) * (dw * d) + mw * s``: the minimum ``mw`` meets the
    block's ``s`` (about ``sum x``) instead of every activation.
    """
    x3 = _activation_blocks(x, "linear_q4_1_a8")
    b = _check_raw(x3, raw, Q4_1_BLOCK_BYTES, "linear_q4_1_a8")
    q, d32, d = _quantize_blocks(x3)
    s = (q.sum(axis=-1, dtype=np.int32).astype(np.float32) * d32).astype(np.float16).astype(np.float32)
    qw = _nibbles(b[..., 4:]).astype(np.float32)  # [out, nb, 32]
    dw, mw = _f16(b[..., 0:2])[..., 0], _f16(b[..., 2:4])[..., 0]  # [out, nb] each
    return _block_sums_times_scales(q, d, qw, dw, mins=(mw, s))

"""Quantizing float32 matrices into the GGUF block formats Q8_0, Q4_0 and Q4_1.

The layouts (and their dequantization) are drawn in ``kernels_ref.quant``. Each row of
W [out, in] is cut into blocks of 32 weights; each block gets its own float16 scale, so
one outlier spoils only its 32 neighbours. The rounding rules are llama.cpp's
(``quantize_row_*_ref`` in ggml-quants.c), so a matrix quantized here has the same bytes
as ``llama-quantize`` or gguf-py would write (``tests/test_quant.py`` checks this against
gguf-py's quantizer):

    Q8_0   d = max|x| / 127          q = round_half_away(x / d)        in -127..127
    Q4_0   d = x[argmax |x|] / -8    q = min(15, trunc(x / d + 8.5))   in 0..15, w = d * (q - 8)
    Q4_1   d = (max - min) / 15      q = min(15, trunc((x - min) / d + 0.5)),  w = d * q + min

Q4_0's scale keeps the sign of the largest-magnitude weight, so that weight lands exactly
on level -8 (the grid is -8..7: one more level on the side of the extreme). The integers
are computed with the float32 scale and only then the scale is stored as float16, as
llama.cpp does; dequantizing uses the stored float16.
"""

from __future__ import annotations

import numpy as np

from kernels_ref.quant import QK
from nanoserve.errors import UnsupportedModelError

GGUF_FORMATS = ("q8_0", "q4_0", "q4_1")


def _blocks(w: np.ndarray, fmt: str) -> np.ndarray:  # [out, in] -> float32 [out, in/32, 32]
    out, inp = w.shape
    if inp % QK:
        raise UnsupportedModelError(f"{fmt} needs in_features divisible by {QK}, got a matrix of shape {w.shape}")
    return np.asarray(w, dtype=np.float32).reshape(out, inp // QK, QK)


def _inverse(d: np.ndarray) -> np.ndarray:  # scale -> 1/scale, 0 where the block is all zero
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _f16_bytes(v: np.ndarray) -> np.ndarray:  # float32 [out, nb, 1] -> uint8 [out, nb, 2]
    return v.astype(np.float16).view(np.uint8)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:  # uint8 [out, nb, 32] in 0..15 -> uint8 [out, nb, 16]
    """Weight j in the low nibble of byte j, weight j + 16 in its high nibble."""
    return (q[..., : QK // 2] | (q[..., QK // 2 :] << 4)).astype(np.uint8)


def quantize_q8_0(w: np.ndarray) -> np.ndarray:  # float [out, in] -> uint8 [out, in/32*34]
    """Q8_0 rows: | d: f16 | 32 x int8 | per block."""
    x = _blocks(w, "q8_0")
    d = np.abs(x).max(axis=2, keepdims=True) / np.float32(127)
    scaled = x * _inverse(d)
    q = (np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))).astype(np.int8)  # C's roundf
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=2).reshape(w.shape[0], -1)


def quantize_q4_0(w: np.ndarray) -> np.ndarray:  # float [out, in] -> uint8 [out, in/32*18]
    """Q4_0 rows: | d: f16 | 16 bytes of nibbles | per block."""
    x = _blocks(w, "q4_0")
    extreme = np.take_along_axis(x, np.abs(x).argmax(axis=2)[..., None], axis=2)  # [out, nb, 1], signed
    d = extreme / np.float32(-8)
    q = np.minimum(15, np.trunc(x * _inverse(d) + np.float32(8.5))).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=2).reshape(w.shape[0], -1)


def quantize_q4_1(w: np.ndarray) -> np.ndarray:  # float [out, in] -> uint8 [out, in/32*20]
    """Q4_1 rows: | d: f16 | m: f16 | 16 bytes of nibbles | per block."""
    x = _blocks(w, "q4_1")
    lo = x.min(axis=2, keepdims=True)
    d = (x.max(axis=2, keepdims=True) - lo) / np.float32(15)
    q = np.minimum(15, np.trunc((x - lo) * _inverse(d) + np.float32(0.5))).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], axis=2).reshape(w.shape[0], -1)

"""Dequantization of the weight formats nanoserve stores, as pure NumPy on raw bytes.

Every format quantizes a weight matrix W [out, in] row by row, in blocks along ``in``.
The GGUF formats are stored exactly as in a .gguf file: one row is a run of fixed-size
blocks, each block a little header of float16 scale(s) followed by packed integers.

    Q8_0  (34 bytes per 32 weights)   | d: f16 | q[0..31]: int8 |
          w[i] = d * q[i]
    Q4_0  (18 bytes per 32 weights)   | d: f16 | qs[0..15]: uint8 |
          w[j]      = d * ((qs[j] & 0xF) - 8)     for j in 0..15   (low nibbles first half)
          w[j + 16] = d * ((qs[j] >> 4)  - 8)                      (high nibbles second half)
    Q4_1  (20 bytes per 32 weights)   | d: f16 | m: f16 | qs[0..15]: uint8 |
          w[j]      = d * (qs[j] & 0xF) + m
          w[j + 16] = d * (qs[j] >> 4)  + m

nanoserve's own formats keep scales in float32 next to the integers:

    int8 per channel   qweight int8 [out, in], scale float32 [out]:  w = qweight * scale[:, None]
    int4 group-wise    qweight uint8 [out, in/2] (column 2c in the low nibble, 2c+1 in the
                       high nibble), scales float32 [out, in/group]:  w = (q - 8) * scale
"""

import numpy as np

QK = 32  # weights per GGUF block
Q8_0_BLOCK_BYTES = 2 + QK  # d + 32 int8
Q4_0_BLOCK_BYTES = 2 + QK // 2  # d + 16 bytes of nibbles
Q4_1_BLOCK_BYTES = 4 + QK // 2  # d, m + 16 bytes of nibbles


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:  # [out, nb*bytes] -> [out, nb, bytes]
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % block_bytes:
        raise ValueError(
            f"expected uint8 [out, n*{block_bytes}] raw blocks, got {raw.dtype} {raw.shape}"
        )
    return raw.reshape(raw.shape[0], raw.shape[1] // block_bytes, block_bytes)


def _f16(bytes2: np.ndarray) -> np.ndarray:  # [..., 2] uint8 -> [..., 1] float32
    return np.ascontiguousarray(bytes2).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:  # [..., 16] uint8 -> [..., 32] uint8 in 0..15
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:  # uint8 [out, in/32*34] -> float32 [out, in]
    """GGUF Q8_0 rows to float32 (see the module docstring for the block layout)."""
    b = _blocks(raw, Q8_0_BLOCK_BYTES)
    d = _f16(b[..., 0:2])  # [out, nb, 1]
    q = b[..., 2:].view(np.int8).astype(np.float32)  # [out, nb, 32]
    return (d * q).reshape(raw.shape[0], -1)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:  # uint8 [out, in/32*18] -> float32 [out, in]
    """GGUF Q4_0 rows to float32."""
    b = _blocks(raw, Q4_0_BLOCK_BYTES)
    d = _f16(b[..., 0:2])
    q = _nibbles(b[..., 2:]).astype(np.float32) - 8.0  # [out, nb, 32]
    return (d * q).reshape(raw.shape[0], -1)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:  # uint8 [out, in/32*20] -> float32 [out, in]
    """GGUF Q4_1 rows to float32."""
    b = _blocks(raw, Q4_1_BLOCK_BYTES)
    d = _f16(b[..., 0:2])
    m = _f16(b[..., 2:4])
    q = _nibbles(b[..., 4:]).astype(np.float32)
    return (d * q + m).reshape(raw.shape[0], -1)


def dequantize_int8(qweight: np.ndarray, scale: np.ndarray) -> np.ndarray:  # [out, in], [out] -> [out, in]
    """Per-output-channel symmetric int8: ``w = qweight * scale[:, None]``."""
    return qweight.astype(np.float32) * scale.astype(np.float32)[:, None]


def dequantize_int4(qweight: np.ndarray, scales: np.ndarray) -> np.ndarray:  # [out, in/2], [out, G] -> [out, in]
    """Group-wise symmetric int4: ``w = (q - 8) * scale`` with one scale per ``in/G`` columns."""
    out, half_in = qweight.shape
    q = np.empty((out, half_in * 2), dtype=np.float32)
    q[:, 0::2] = qweight & 0x0F
    q[:, 1::2] = qweight >> 4
    group_size = q.shape[1] // scales.shape[1]
    q = (q - 8.0).reshape(out, scales.shape[1], group_size) * scales[:, :, None]
    return q.reshape(out, -1)

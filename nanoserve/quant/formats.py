"""Quantizing float weights into nanoserve's formats, and running a linear layer on any of them.

The default, ``gguf``, keeps each matrix of a GGUF file in the format the file stores (for
SmolLM2-135M-Instruct: Q4_1 matrices, a Q8_0 embedding and tied LM head), as llama.cpp and
Ollama run it. ``fp32`` is the same file dequantized on load. The equality that holds
between them: both multiply float32 activations by the same weights, each block's
``d * q`` (``+ m``) as ``kernels_ref.dequantize_*`` computes them (the kernels for 2 rows
or more widen exactly those float32 values; the one-row kernels fold the scale into the
block's sum, or for Q4_1 fuse ``d * q + m`` into one rounding), so their logits differ
only by float32 rounding order, within ``check_kernels.tolerances.DOT``;
greedy tokens agree unless two logits tie to that precision, and perplexity on the corpus
windows agrees to four decimals (``docs/quantization.md``). With ``--activations int8``
that equality no longer holds (the activations are rounded), so it is opt-in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import kernels_ref
from nanoserve.errors import UnsupportedModelError
from nanoserve.quant.gguf_quantize import quantize_q4_0, quantize_q4_1, quantize_q8_0

#: What ``--weights`` accepts. q8_0/q4_0/q4_1 re-quantize every matrix into that GGUF block
#: format (the 4-bit ones keep the LM head at 8 bits: ``nanoserve.model.weights.HEAD_FORMAT``);
#: "gguf" keeps each matrix in the format the GGUF file stores.
WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4", "q8_0", "q4_0", "q4_1", "gguf")
INT4_GROUP_SIZE = 32

_KERNEL = {
    "int8": "linear_int8",
    "int4": "linear_int4",
    "q8_0": "linear_q8_0",
    "q4_0": "linear_q4_0",
    "q4_1": "linear_q4_1",
}
#: With ``--activations int8``: the GGUF block formats multiply int8 activations (llama.cpp's Q8_0/Q8_1).
_KERNEL_INT8_ACTIVATIONS = {"q8_0": "linear_q8_0_a8", "q4_0": "linear_q4_0_a8", "q4_1": "linear_q4_1_a8"}
_DEQUANT = {
    "int8": kernels_ref.dequantize_int8,
    "int4": kernels_ref.dequantize_int4,
    "q8_0": kernels_ref.dequantize_q8_0,
    "q4_0": kernels_ref.dequantize_q4_0,
    "q4_1": kernels_ref.dequantize_q4_1,
}


@dataclass
class QuantizedWeight:
    """A weight matrix [out, in] held in a quantized format (arrays as the kernel takes them)."""

    format: str  # a key of _KERNEL
    arrays: tuple[Any, ...]
    shape: tuple[int, int]  # (out, in) of the float matrix it stands for

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays)


Weight = Any  # np.ndarray (fp32/fp16) or QuantizedWeight


def quantize_int8(w: np.ndarray) -> QuantizedWeight:  # [out, in] -> int8 [out, in], [out]
    """Symmetric per-row int8: scale = max|w| / 127, q = round(w / scale)."""
    scale = np.abs(w).max(axis=1) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return QuantizedWeight("int8", (q, scale), w.shape)


def quantize_int4(w: np.ndarray, group_size: int = INT4_GROUP_SIZE) -> QuantizedWeight:  # [out, in] -> uint8 [out, in/2], [out, in/g]
    """Symmetric group-wise int4: per group scale = max|w| / 7, q = round(w / scale) + 8 in 0..15."""
    out, inp = w.shape
    if inp % group_size or inp % 2:
        raise UnsupportedModelError(f"int4 needs in_features divisible by {group_size}, got {inp}")
    groups = w.reshape(out, inp // group_size, group_size)
    scale = np.abs(groups).max(axis=2) / 7.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)  # [out, G]
    q = np.clip(np.rint(groups / scale[:, :, None]), -8, 7).astype(np.int16) + 8
    q = q.reshape(out, inp).astype(np.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return QuantizedWeight("int4", (packed, scale), w.shape)


def quantize(w: np.ndarray, fmt: str) -> Weight:
    """Convert a float32 [out, in] matrix to ``fmt`` (fp32, fp16, int8, int4, q8_0, q4_0, q4_1)."""
    if fmt == "fp32":
        return np.ascontiguousarray(w, dtype=np.float32)
    if fmt == "fp16":
        return w.astype(np.float16)
    if fmt == "int8":
        return quantize_int8(w)
    if fmt == "int4":
        return quantize_int4(w)
    gguf_quantizers = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0, "q4_1": quantize_q4_1}
    if fmt in gguf_quantizers:
        return QuantizedWeight(fmt, (gguf_quantizers[fmt](w),), w.shape)
    raise UnsupportedModelError(
        f"cannot quantize to {fmt!r}; choose one of fp32, fp16, int8, int4, q8_0, q4_0, q4_1"
    )


def dequantize(w: Weight) -> np.ndarray:  # -> float32 [out, in]
    """The float32 matrix a weight stands for."""
    if isinstance(w, QuantizedWeight):
        return _DEQUANT[w.format](*w.arrays).reshape(w.shape)
    return np.asarray(w, dtype=np.float32)


def gather_rows(w: Weight, rows: Any) -> Weight:  # [out, in] by [T] -> [T, in], still in w's format
    """Rows ``rows`` of w without dequantizing: every format's arrays are indexed by row first.

    Quantization blocks never cross rows (int8 and int4 scales are per row, GGUF blocks run
    along a row), so taking rows of each array gives a smaller weight in the same format.
    Works on any array module's arrays (NumPy, CuPy).
    """
    if isinstance(w, QuantizedWeight):
        arrays = tuple(a[rows] for a in w.arrays)
        return QuantizedWeight(w.format, arrays, (int(arrays[0].shape[0]), w.shape[1]))
    return w[rows]


def embedding_rows(w: Weight, ids: Any) -> np.ndarray:  # [V, d] by [T] -> float32 [T, d]
    """Look up token embeddings, dequantizing only the T rows gathered (host arrays).

    A quantized table [V, d] stays quantized in memory; ``dequantize(gather_rows(w, ids))``
    widens exactly the rows a step needs, to the same float32 values a dequantized table
    would hold.
    """
    rows = gather_rows(w, ids)
    if isinstance(rows, QuantizedWeight):
        return dequantize(rows)
    return np.asarray(rows, dtype=np.float32)


def apply_linear(kernels: Any, x: Any, w: Weight, activations: str = "float") -> Any:  # [T, in] -> [T, out]
    """``x @ W.T`` through the kernel for w's format.

    ``activations="int8"`` sends Q8_0 / Q4_0 / Q4_1 weights to the kernels that quantize x
    per 32 values and take integer dot products (``kernels_ref.int8_activations``: the
    result differs from float activations by the rounding of x, as llama.cpp's does). Any
    other format keeps float activations.
    """
    if isinstance(w, QuantizedWeight) and activations == "int8" and w.format in _KERNEL_INT8_ACTIVATIONS:
        return getattr(kernels, _KERNEL_INT8_ACTIVATIONS[w.format])(x, *w.arrays)
    if isinstance(w, QuantizedWeight):
        return getattr(kernels, _KERNEL[w.format])(x, *w.arrays)
    return kernels.linear(x, w)

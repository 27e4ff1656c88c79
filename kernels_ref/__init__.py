"""NumPy reference kernels: the executable specification of nanoserve's kernel contract.

Every backend (``kernels_cuda``, a lab's own module, ...) implements the same names with
the same signatures; the property tests in ``tests/kernels`` hold each one to the
functions here. The reference favours clarity over speed, but every kernel is vectorised
so the default model runs on it at a useful speed.

This package imports NumPy only. Shapes use these letters:

    T  tokens in the (ragged, flattened) batch      H   query heads
    S  sequences in the batch                       Hkv key/value heads (GQA: H % Hkv == 0)
    D  head dimension                               N   blocks in the KV pool
    B  block size (tokens per KV block)             V   vocabulary size
"""

from kernels_ref.activation import silu_mul, softmax
from kernels_ref.attention import attention, paged_attention, store_kv
from kernels_ref.int8_activations import (
    dequantize_activations,
    linear_q4_0_a8,
    linear_q4_1_a8,
    linear_q8_0_a8,
    quantize_activations_q8_0,
    quantize_activations_q8_1,
)
from kernels_ref.kv_int8 import dequantize_kv, paged_attention_int8, quantize_kv, store_kv_int8
from kernels_ref.linear import (
    linear,
    linear_int4,
    linear_int8,
    linear_q4_0,
    linear_q4_1,
    linear_q8_0,
)
from kernels_ref.norm import rms_norm
from kernels_ref.quant import (
    dequantize_int4,
    dequantize_int8,
    dequantize_q4_0,
    dequantize_q4_1,
    dequantize_q8_0,
)
from kernels_ref.rope import rope
from kernels_ref.sampling import apply_penalties, min_p_filter, top_k_filter, top_p_filter

#: The names every backend is measured against. A backend may implement a subset;
#: nanoserve.kernels fills the rest from this package and says so.
KERNEL_NAMES: tuple[str, ...] = (
    "rms_norm",
    "rope",
    "linear",
    "linear_int8",
    "linear_int4",
    "linear_q8_0",
    "linear_q4_0",
    "linear_q4_1",
    "linear_q8_0_a8",
    "linear_q4_0_a8",
    "linear_q4_1_a8",
    "silu_mul",
    "softmax",
    "attention",
    "store_kv",
    "paged_attention",
    "store_kv_int8",
    "paged_attention_int8",
    "apply_penalties",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
)

__all__ = [
    "KERNEL_NAMES",
    "apply_penalties",
    "attention",
    "dequantize_activations",
    "dequantize_int4",
    "dequantize_int8",
    "dequantize_kv",
    "dequantize_q4_0",
    "dequantize_q4_1",
    "dequantize_q8_0",
    "linear",
    "linear_int4",
    "linear_int8",
    "linear_q4_0",
    "linear_q4_0_a8",
    "linear_q4_1",
    "linear_q4_1_a8",
    "linear_q8_0",
    "linear_q8_0_a8",
    "min_p_filter",
    "paged_attention",
    "paged_attention_int8",
    "quantize_activations_q8_0",
    "quantize_activations_q8_1",
    "quantize_kv",
    "rms_norm",
    "rope",
    "silu_mul",
    "softmax",
    "store_kv",
    "store_kv_int8",
    "top_k_filter",
    "top_p_filter",
]

"""nanoserve's kernel contract on NVIDIA GPUs: numba.cuda kernels, CuPy arrays and cuBLAS.

Every name in ``kernels_ref.KERNEL_NAMES`` is implemented here with the reference's
signature and semantics (the property suite in ``tests/kernels`` and
``python -m nanoserve check-kernels --backend cuda`` hold them to it). Where they run:

    real GPU + CuPy      ``xp`` is cupy: pass CuPy arrays (``to_device``), get CuPy arrays back
    real GPU, no CuPy    ``xp`` is numpy: numba copies arrays to the device per launch
    CUDA simulator       set ``NUMBA_ENABLE_CUDASIM=1`` *before* numba is first imported:
                         the same kernels run as Python threads on numpy arrays (slow; for
                         tests and for reading the kernels on a machine without a GPU)

Modules, one kernel family each: ``norm`` (rms_norm), ``rope``, ``activation`` (silu_mul,
softmax), ``linear`` (a tiled GEMM that dequantizes every weight format on the fly),
``attention`` (store_kv, paged_attention, attention), ``kv_int8`` (store_kv_int8,
paged_attention_int8: the int8 KV cache), ``int8_activations`` (linear_q8_0_a8,
linear_q4_0_a8, linear_q4_1_a8: activations quantized to int8, integer dot products), ``sampling`` (apply_penalties,
top-k / top-p / min-p filters). ``ptx.compile_all`` compiles each kernel to PTX without a GPU.
"""

from kernels_cuda._runtime import SIMULATOR, to_device, to_host, xp
from kernels_cuda.activation import silu_mul, softmax
from kernels_cuda.attention import attention, paged_attention, store_kv
from kernels_cuda.int8_activations import linear_q4_0_a8, linear_q4_1_a8, linear_q8_0_a8
from kernels_cuda.kv_int8 import paged_attention_int8, store_kv_int8
from kernels_cuda.linear import (
    linear,
    linear_int4,
    linear_int8,
    linear_q4_0,
    linear_q4_1,
    linear_q8_0,
)
from kernels_cuda.norm import rms_norm
from kernels_cuda.rope import rope
from kernels_cuda.sampling import apply_penalties, min_p_filter, top_k_filter, top_p_filter

__all__ = [
    "SIMULATOR",
    "apply_penalties",
    "attention",
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
    "rms_norm",
    "rope",
    "silu_mul",
    "softmax",
    "store_kv",
    "store_kv_int8",
    "to_device",
    "to_host",
    "top_k_filter",
    "top_p_filter",
    "xp",
]

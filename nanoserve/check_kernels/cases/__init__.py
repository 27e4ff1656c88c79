"""The case generators: for every kernel of the contract, a :class:`KernelSpec`.

One module per ``kernels_ref`` module, defining the specs of that module's kernels:

    norm              rms_norm
    rope              rope
    linear            linear, linear_int8, linear_int4, linear_q8_0, linear_q4_0, linear_q4_1
    int8_activations  linear_q8_0_a8, linear_q4_0_a8, linear_q4_1_a8 (int8 activations)
    quant             (no kernel: random GGUF weights for the linear_q* cases)
    activation        silu_mul, softmax
    attention         attention, store_kv, paged_attention
    kv_int8           store_kv_int8, paged_attention_int8 (the int8 KV cache)
    sampling          apply_penalties, top_k_filter, top_p_filter, min_p_filter

``draw`` holds what they share. :data:`SPECS` collects them all, by kernel name.
"""

from __future__ import annotations

from nanoserve.check_kernels.cases import (
    activation,
    attention,
    int8_activations,
    kv_int8,
    linear,
    norm,
    rope,
    sampling,
)
from nanoserve.check_kernels.spec import KernelSpec

SPECS: dict[str, KernelSpec] = {
    spec.name: spec
    # in kernels_ref.KERNEL_NAMES' order
    for module in (norm, rope, linear, int8_activations, activation, attention, kv_int8, sampling)
    for spec in module.SPECS
}


def build_case(kernel: str, params: dict) -> tuple:
    """The exact arguments the suite passed to ``kernel`` for ``params`` (to reproduce a failure)."""
    return SPECS[kernel].build(params)

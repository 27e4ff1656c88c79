"""The case generators: for every kernel of the contract, a :class:`KernelSpec`.

One module per ``kernels_ref`` module, defining the specs of that module's kernels:

    norm        rms_norm
    rope        rope
    linear      linear, linear_int8, linear_int4, linear_q8_0, linear_q4_0, linear_q4_1
    quant       (no kernel: random GGUF weights for the linear_q* cases)
    activation  silu_mul, softmax
    attention   attention, store_kv, paged_attention
    kv_int8     store_kv_int8, paged_attention_int8 (the int8 KV cache)
    sampling    apply_penalties, top_k_filter, top_p_filter, min_p_filter

``draw`` holds what they share. :data:`SPECS` collects them all, by kernel name.
"""

from __future__ import annotations

from nanoserve.check_kernels.cases import activation, attention, kv_int8, linear, norm, rope, sampling
from nanoserve.check_kernels.spec import KernelSpec

SPECS: dict[str, KernelSpec] = {
    spec.name: spec
    for module in (norm, rope, linear, activation, attention, kv_int8, sampling)  # kernels_ref.KERNEL_NAMES' order
    for spec in module.SPECS
}


def build_case(kernel: str, params: dict) -> tuple:
    """The exact arguments the suite passed to ``kernel`` for ``params`` (to reproduce a failure)."""
    return SPECS[kernel].build(params)

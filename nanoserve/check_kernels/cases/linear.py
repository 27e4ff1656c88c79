"""Cases for ``kernels_ref.linear``: float, int8, int4 and GGUF (q8_0, q4_0, q4_1) weights.

The error of a dot product is measured against ``|x| @ |W|.T`` (``tolerances.DOT``),
with ``W`` dequantized by ``kernels_ref.quant``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import kernels_ref
from nanoserve.check_kernels.cases.draw import case_rng, normal, seeds, strategies
from nanoserve.check_kernels.cases.quant import gguf_raw
from nanoserve.check_kernels.limits import Limits
from nanoserve.check_kernels.spec import KernelSpec
from nanoserve.check_kernels.tolerances import DOT, dot_magnitude


def _linear_common(limits: Limits, in_features: Any) -> dict:
    st = strategies()
    return {
        "tokens": st.integers(0, limits.max_tokens),
        "in": in_features,
        "out": st.integers(1, limits.max_out),
        "seed": seeds(),
    }


def _gguf_in(limits: Limits) -> Any:
    return strategies().integers(1, limits.max_in_blocks).map(lambda blocks: 32 * blocks)


def _linear_params(limits: Limits) -> Any:
    st = strategies()
    fields = _linear_common(limits, st.integers(1, 32 * limits.max_in_blocks))
    fields["w_dtype"] = st.sampled_from(["float32", "float16"])
    return st.fixed_dictionaries(fields)


def _linear_int8_params(limits: Limits) -> Any:
    st = strategies()
    return st.fixed_dictionaries(_linear_common(limits, st.integers(1, 32 * limits.max_in_blocks)))


def _linear_int4_params(limits: Limits) -> Any:
    st = strategies()

    @st.composite
    def params(draw: Callable) -> dict:
        group_size = draw(st.sampled_from([2, 4, 8, 16, 32]))
        groups = draw(st.integers(1, max(1, 32 * limits.max_in_blocks // group_size)))
        fields = draw(st.fixed_dictionaries(_linear_common(limits, st.just(group_size * groups))))
        return {**fields, "group_size": group_size}

    return params()


def _gguf_params(limits: Limits) -> Any:
    st = strategies()
    fields = _linear_common(limits, _gguf_in(limits))
    fields["scales"] = st.sampled_from(["normal", "tiny", "with_zero"])  # tiny: float16 subnormals
    return st.fixed_dictionaries(fields)


def _x(rng: np.random.Generator, p: dict) -> np.ndarray:  # [T, in]
    return normal(rng, (p["tokens"], p["in"]))


def _linear_build(p: dict) -> tuple:  # -> x [T, in], w [out, in]
    rng = case_rng(p)
    return _x(rng, p), normal(rng, (p["out"], p["in"]), 0.1, p["w_dtype"])


def _linear_int8_build(p: dict) -> tuple:  # -> x, qweight int8 [out, in], scale [out]
    rng = case_rng(p)
    qweight = rng.integers(-127, 128, (p["out"], p["in"])).astype(np.int8)
    return _x(rng, p), qweight, (rng.random(p["out"]) * 0.02).astype(np.float32)


def _linear_int4_build(p: dict) -> tuple:  # -> x, qweight uint8 [out, in/2], scales [out, G]
    rng = case_rng(p)
    qweight = rng.integers(0, 256, (p["out"], p["in"] // 2)).astype(np.uint8)
    scales = (rng.random((p["out"], p["in"] // p["group_size"])) * 0.02).astype(np.float32)
    return _x(rng, p), qweight, scales


def _gguf_build(block_bytes: int, headers: int) -> Callable[[dict], tuple]:
    def build(p: dict) -> tuple:  # -> x [T, in], raw uint8 [out, in/32*block_bytes]
        rng = case_rng(p)
        return _x(rng, p), gguf_raw(p, rng, block_bytes, headers)

    return build


SPECS: list[KernelSpec] = [
    KernelSpec("linear", _linear_params, _linear_build, DOT, dot_magnitude(lambda w: w)),
    KernelSpec("linear_int8", _linear_int8_params, _linear_int8_build,
               DOT, dot_magnitude(kernels_ref.dequantize_int8)),
    KernelSpec("linear_int4", _linear_int4_params, _linear_int4_build,
               DOT, dot_magnitude(kernels_ref.dequantize_int4)),
    KernelSpec("linear_q8_0", _gguf_params, _gguf_build(kernels_ref.quant.Q8_0_BLOCK_BYTES, 1),
               DOT, dot_magnitude(kernels_ref.dequantize_q8_0)),
    KernelSpec("linear_q4_0", _gguf_params, _gguf_build(kernels_ref.quant.Q4_0_BLOCK_BYTES, 1),
               DOT, dot_magnitude(kernels_ref.dequantize_q4_0)),
    KernelSpec("linear_q4_1", _gguf_params, _gguf_build(kernels_ref.quant.Q4_1_BLOCK_BYTES, 2),
               DOT, dot_magnitude(kernels_ref.dequantize_q4_1)),
]  # fmt: skip

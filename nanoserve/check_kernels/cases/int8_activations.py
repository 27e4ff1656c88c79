"""Cases for ``kernels_ref.int8_activations``: GGUF weights times int8-quantized activations.

``linear_q8_0_a8``, ``linear_q4_0_a8`` and ``linear_q4_1_a8`` get the random GGUF rows
of ``cases.quant`` (normal, float16-subnormal and zero scales) and activations of three
kinds: normal ones; ones with whole blocks of zeros (activation scale 0, ``q = 0``);
tiny ones (``1e-6``: the activation scale ``max|x| / 127`` is a float16 subnormal).

Tolerance. A backend must quantize the activations exactly as the reference does
(``q``, ``d`` and ``s`` bit for bit: a max, a float32 division, a product and a round,
which every backend can do exactly), so what is left is the float32 rounding of the
block terms and of their sum. :data:`INT8_DOT` measures it against the size of the
summed terms *of the quantized computation*: ``|x8| @ |W|.T`` with ``x8 = q * d`` the
dequantized activations, plus ``|s| @ |m|.T`` for Q4_1, whose minimums ``m`` meet the
block sums ``s`` rather than each activation. One activation rounded differently moves
a result by about ``d * |w|``, thousands of times this tolerance. How far the int8
result is from the float-activation kernels is a separate, much larger bound
(``kernels_ref.int8_activations.activation_error_bound``, tests/test_int8_activations.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import kernels_ref
from kernels_ref.int8_activations import (
    dequantize_activations,
    quantize_activations_q8_0,
    quantize_activations_q8_1,
)
from kernels_ref.quant import Q4_0_BLOCK_BYTES, Q4_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK
from nanoserve.check_kernels.cases.draw import case_rng, normal, seeds, strategies
from nanoserve.check_kernels.cases.quant import gguf_raw
from nanoserve.check_kernels.limits import Limits
from nanoserve.check_kernels.spec import KernelSpec
from nanoserve.check_kernels.tolerances import Tolerance

#: The a8 linears against the reference's own quantized activations: float32 rounding of
#: the block terms and their sum (magnitude: :func:`int8_dot_magnitude`).
INT8_DOT = Tolerance(1e-6, 2e-5, "|x8|@|W|.T (+|s|@|m|.T)")

ACTIVATIONS = ("normal", "zero_blocks", "tiny")


def _params(limits: Limits) -> Any:
    st = strategies()
    return st.fixed_dictionaries({
        "tokens": st.integers(0, limits.max_tokens),
        "in": st.integers(1, limits.max_in_blocks).map(lambda blocks: QK * blocks),
        "out": st.integers(1, limits.max_out),
        "scales": st.sampled_from(["normal", "tiny", "with_zero"]),  # the weights' (cases.quant)
        "activations": st.sampled_from(ACTIVATIONS),
        "seed": seeds(),
    })  # fmt: skip


def _edge_cases(limits: Limits) -> list[dict]:
    base = {"in": QK, "out": 3, "scales": "normal", "seed": 0}
    return [
        {**base, "tokens": 0, "activations": "normal"},  # an empty batch
        {**base, "tokens": 2, "activations": "zero_blocks"},
        {**base, "tokens": 1, "activations": "tiny", "in": QK * limits.max_in_blocks},
    ]


def _activations(rng: np.random.Generator, p: dict) -> np.ndarray:  # -> float32 [T, in]
    x = normal(rng, (p["tokens"], p["in"]))
    if p["activations"] == "tiny":
        x *= np.float32(1e-6)
    elif p["activations"] == "zero_blocks":
        blocks = x.reshape(p["tokens"], p["in"] // QK, QK)
        blocks[rng.random(blocks.shape[:2]) < 0.5] = 0.0
    return x


def _build(block_bytes: int, headers: int) -> Callable[[dict], tuple]:
    def build(p: dict) -> tuple:  # -> x float32 [T, in], raw uint8 [out, in/32*block_bytes]
        rng = case_rng(p)
        raw = gguf_raw(p, rng, block_bytes, headers)
        return _activations(rng, p), raw

    return build


def int8_dot_magnitude(fmt: str) -> Callable[[tuple, np.ndarray], np.ndarray]:
    """``|x8| @ |W|.T`` (Q4_1: ``|x8| @ |d * n|.T + |s| @ |m|.T``), the size of the summed terms."""

    def magnitude(args: tuple, ref: np.ndarray) -> np.ndarray:
        x, raw = args
        if fmt == "q4_1":
            q, d, s = quantize_activations_q8_1(x)
            b = raw.reshape(raw.shape[0], -1, Q4_1_BLOCK_BYTES)
            m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0].astype(np.float64)  # [out, nb]
            w = kernels_ref.dequantize_q4_1(raw).astype(np.float64) - np.repeat(m, QK, axis=1)  # d * n
            minimums = np.abs(s.astype(np.float64)) @ np.abs(m).T
        else:
            q, d = quantize_activations_q8_0(x)
            dequantize = kernels_ref.dequantize_q8_0 if fmt == "q8_0" else kernels_ref.dequantize_q4_0
            w = dequantize(raw).astype(np.float64)
            minimums = 0.0
        x8 = dequantize_activations(q, d).astype(np.float64)
        return np.abs(x8) @ np.abs(w).T + minimums

    return magnitude


SPECS: list[KernelSpec] = [
    KernelSpec("linear_q8_0_a8", _params, _build(Q8_0_BLOCK_BYTES, 1), INT8_DOT, int8_dot_magnitude("q8_0"),
               edge_cases=_edge_cases),
    KernelSpec("linear_q4_0_a8", _params, _build(Q4_0_BLOCK_BYTES, 1), INT8_DOT, int8_dot_magnitude("q4_0"),
               edge_cases=_edge_cases),
    KernelSpec("linear_q4_1_a8", _params, _build(Q4_1_BLOCK_BYTES, 2), INT8_DOT, int8_dot_magnitude("q4_1"),
               edge_cases=_edge_cases),
]  # fmt: skip

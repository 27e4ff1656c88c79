"""Cases for ``kernels_ref.activation``: ``silu_mul`` and ``softmax``.

``silu_mul`` gets gates large enough to overflow ``exp``; ``softmax`` gets any axis of up
to three dimensions, float64 inputs and ``-inf`` entries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from nanoserve.check_kernels.cases.draw import case_rng, normal, seeds, strategies
from nanoserve.check_kernels.limits import Limits
from nanoserve.check_kernels.spec import KernelSpec
from nanoserve.check_kernels.tolerances import CLOSE


def _silu_mul_params(limits: Limits) -> Any:
    st = strategies()
    return st.fixed_dictionaries({
        "tokens": st.integers(0, limits.max_tokens),
        "width": st.integers(1, limits.max_width),
        "scale": st.sampled_from([1.0, 10.0, 120.0]),  # 120: exp(-gate) overflows float32
        "seed": seeds(),
    })  # fmt: skip


def _silu_mul_build(p: dict) -> tuple:  # -> gate [T, F], up [T, F]
    rng = case_rng(p)
    shape = (p["tokens"], p["width"])
    return normal(rng, shape, p["scale"]), normal(rng, shape)


def _softmax_params(limits: Limits) -> Any:
    st = strategies()

    @st.composite
    def params(draw: Callable) -> dict:
        shape = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
        shape.append(draw(st.integers(1, limits.max_width)))
        return {
            "shape": shape,
            "axis": draw(st.integers(-len(shape), len(shape) - 1)),
            "dtype": draw(st.sampled_from(["float32", "float64"])),
            "scale": draw(st.sampled_from([1.0, 30.0, 1000.0])),
            "masked": draw(st.booleans()),  # some entries -inf (never a whole row)
            "seed": draw(seeds()),
        }

    return params()


def _softmax_build(p: dict) -> tuple:  # -> x [...], axis
    rng = case_rng(p)
    x = normal(rng, tuple(p["shape"]), p["scale"], p["dtype"])
    if p["masked"]:
        first = [slice(None)] * x.ndim
        first[p["axis"]] = 0  # entry 0 of every row along the axis stays finite
        kept = x[tuple(first)].copy()
        x[rng.random(x.shape) < 0.5] = -np.inf
        x[tuple(first)] = kept
    return x, p["axis"]


SPECS: list[KernelSpec] = [
    KernelSpec("silu_mul", _silu_mul_params, _silu_mul_build, CLOSE),
    KernelSpec("softmax", _softmax_params, _softmax_build, CLOSE),
]

"""Cases for ``kernels_ref.norm``: ``rms_norm`` over any leading shape, float16 inputs, scales."""

from __future__ import annotations

from typing import Any

from nanoserve.check_kernels.cases.draw import case_rng, normal, seeds, strategies
from nanoserve.check_kernels.limits import Limits
from nanoserve.check_kernels.spec import KernelSpec
from nanoserve.check_kernels.tolerances import CLOSE


def _rms_norm_params(limits: Limits) -> Any:
    st = strategies()
    return st.fixed_dictionaries({
        "rows": st.lists(st.integers(0, limits.max_tokens), min_size=1, max_size=2),
        "d": st.integers(1, limits.max_width),
        "eps": st.sampled_from([1e-5, 1e-6, 1e-2]),
        "x_dtype": st.sampled_from(["float32", "float16"]),
        "scale": st.sampled_from([1.0, 1e-3, 30.0]),
        "seed": seeds(),
    })  # fmt: skip


def _rms_norm_build(p: dict) -> tuple:  # -> x [*rows, d], w [d], eps
    rng = case_rng(p)
    x = normal(rng, (*p["rows"], p["d"]), p["scale"], p["x_dtype"])
    return x, normal(rng, (p["d"],)), p["eps"]


SPECS: list[KernelSpec] = [KernelSpec("rms_norm", _rms_norm_params, _rms_norm_build, CLOSE)]

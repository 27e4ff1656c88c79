"""Cases for ``kernels_ref.rope``: head dims, theta, positions up to ``Limits.max_position``."""

from __future__ import annotations

from typing import Any

from nanoserve.check_kernels.cases.draw import case_rng, normal, seeds, strategies
from nanoserve.check_kernels.limits import Limits
from nanoserve.check_kernels.spec import KernelSpec
from nanoserve.check_kernels.tolerances import ROTATION, rope_magnitude


def _rope_params(limits: Limits) -> Any:
    st = strategies()
    return st.fixed_dictionaries({
        "tokens": st.integers(0, limits.max_tokens),
        "heads": st.integers(1, limits.max_kv_heads * limits.max_group),
        "head_dim": st.sampled_from(limits.head_dims),
        "theta": st.sampled_from([10000.0, 100000.0, 500000.0]),
        "max_position": st.sampled_from([1, 16, limits.max_position]),
        "position_dtype": st.sampled_from(["int32", "int64"]),
        "seed": seeds(),
    })  # fmt: skip


def _rope_build(p: dict) -> tuple:  # -> x [T, H, D], positions [T], theta
    rng = case_rng(p)
    x = normal(rng, (p["tokens"], p["heads"], p["head_dim"]))
    positions = rng.integers(0, p["max_position"], p["tokens"]).astype(p["position_dtype"])
    return x, positions, p["theta"]


SPECS: list[KernelSpec] = [KernelSpec("rope", _rope_params, _rope_build, ROTATION, rope_magnitude)]

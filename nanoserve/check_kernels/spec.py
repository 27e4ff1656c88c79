"""What the suite knows about one kernel: a :class:`KernelSpec`.

Each module of :mod:`nanoserve.check_kernels.cases` defines the specs of the kernels of
the ``kernels_ref`` module of the same name; the driver
(:mod:`nanoserve.check_kernels.driver`) runs them over a backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanoserve.check_kernels.limits import Limits
from nanoserve.check_kernels.tolerances import Tolerance


@dataclass(frozen=True)
class KernelSpec:
    """How to test one kernel: what to draw, how to build its arguments, how close is close."""

    name: str
    params: Callable[[Limits], Any]  # -> hypothesis strategy of parameter dicts
    build: Callable[[dict], tuple]  # parameters -> the kernel's arguments (numpy, fresh)
    tolerance: Tolerance
    magnitude: Callable[[tuple, np.ndarray], Any] | None = None  # (args, ref) -> scale for rtol
    in_place: tuple[int, ...] = ()  # argument positions the kernel writes: its outputs
    edge_cases: Callable[[Limits], list[dict]] = lambda limits: []  # always tried first

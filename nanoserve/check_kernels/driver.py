"""The hypothesis driver: runs a kernel's cases over a backend and reports what it found.

:func:`run_case` runs one example on the backend and on ``kernels_ref`` and compares the
results; :func:`check_kernel` lets hypothesis draw the examples (explicit edge cases
first) and shrink a failure to a minimal one, kept in the :class:`KernelReport`;
:func:`check_backend` does that for every kernel. Hypothesis is imported only when a
check runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import kernels_ref
from nanoserve.check_kernels.cases import SPECS, build_case
from nanoserve.check_kernels.compare import CaseOutcome, compare
from nanoserve.check_kernels.limits import SMALL, Limits
from nanoserve.check_kernels.spec import KernelSpec
from nanoserve.check_kernels.tolerances import Tolerance
from nanoserve.kernels import Backend, get_backend


def _host_copy(a: Any) -> Any:
    return a.copy() if isinstance(a, np.ndarray) else a


def run_case(backend: Backend, spec: KernelSpec, params: dict) -> CaseOutcome:
    """Run ``spec``'s kernel of ``backend`` and the reference on one example and compare."""
    args = spec.build(params)
    ref_args = tuple(_host_copy(a) for a in args)
    ref_result = getattr(kernels_ref, spec.name)(*ref_args)
    wants = [ref_args[i] for i in spec.in_place] if spec.in_place else [ref_result]

    dev_args = tuple(backend.to_device(a.copy()) if isinstance(a, np.ndarray) else a for a in args)
    try:
        result = getattr(backend.kernels, spec.name)(*dev_args)
        if spec.in_place:
            gots = [backend.to_host(dev_args[i]) for i in spec.in_place]
        else:
            gots = [backend.to_host(result)]
    except Exception as exc:  # a crash is a failure like any other, reported with the example
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return CaseOutcome(math.inf, math.inf, f"raised {type(exc).__name__}: {first_line}")

    for i, original in enumerate(args):
        if isinstance(original, np.ndarray) and i not in spec.in_place:
            after = np.ascontiguousarray(backend.to_host(dev_args[i]))
            if after.dtype != original.dtype or after.tobytes() != np.ascontiguousarray(original).tobytes():
                return CaseOutcome(math.inf, math.inf, f"modified its input argument {i} (kernels must not)")

    total = CaseOutcome()
    for got, want in zip(gots, wants, strict=True):
        magnitude = spec.magnitude(ref_args, want) if spec.magnitude else None
        outcome = compare(got, want, spec.tolerance, magnitude)
        total.max_abs_error = max(total.max_abs_error, outcome.max_abs_error)
        total.worst_ratio = max(total.worst_ratio, outcome.worst_ratio)
        total.problem = total.problem or outcome.problem
    return total


@dataclass
class KernelReport:
    """What the suite found for one kernel of one backend."""

    kernel: str
    status: str  # "pass", "FAIL", or "ref" (not implemented: the reference is used)
    examples: int = 0
    max_abs_error: float = 0.0
    worst_ratio: float = 0.0  # largest error / allowed error over all examples
    tolerance: Tolerance | None = None
    failing_example: dict | None = None  # the minimal one, after shrinking
    problem: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status != "FAIL"

    def describe_failure(self) -> str:
        """The problem and the minimal failing example, ready to print."""
        if self.passed:
            return ""
        lines = [f"{self.kernel} FAILED: {self.problem}"]
        if self.failing_example is not None:
            args = describe_args(build_case(self.kernel, self.failing_example))
            lines += [
                f"  minimal failing example: {self.failing_example!r}",
                f"  its arguments: {args}",
                f"  reproduce: args = nanoserve.check_kernels.build_case({self.kernel!r}, <example above>)",
            ]
        return "\n".join(lines)


def describe_args(args: tuple) -> str:
    """``float32[2, 3, 8], int64[2], 0.35``: arrays by dtype and shape, the rest by value."""
    return ", ".join(
        f"{a.dtype}{list(a.shape)}" if isinstance(a, np.ndarray) else repr(a) for a in args
    )


class KernelMismatch(AssertionError):
    """Raised inside the property when the backend disagrees with the reference."""


def check_kernel(
    backend: Backend | str,
    kernel: str,
    *,
    limits: Limits = SMALL,
    max_examples: int | None = None,
    seed: int | None = None,
    shrink: bool = True,
    parent: Any = None,
) -> KernelReport:
    """Property-test one kernel of ``backend`` against the reference.

    Explicit edge cases run first, then ``max_examples`` random examples (default: those
    of ``parent``, a hypothesis ``settings`` object such as a registered profile, or of
    the active profile). On failure hypothesis shrinks to a minimal example, which the
    report carries. A nondeterministic failure (a race) is reported as such.
    """
    from hypothesis import HealthCheck, Phase, Verbosity, example, given, settings
    from hypothesis import seed as fixed_seed
    from hypothesis.errors import Flaky

    if isinstance(backend, str):
        backend = get_backend(backend)
    spec = SPECS[kernel]
    report = KernelReport(kernel, "pass", tolerance=spec.tolerance)
    if kernel in backend.fallbacks:
        report.status = "ref"
        return report

    def prop(params: dict) -> None:
        report.examples += 1
        outcome = run_case(backend, spec, params)
        if math.isfinite(outcome.max_abs_error):
            report.max_abs_error = max(report.max_abs_error, outcome.max_abs_error)
        report.worst_ratio = max(report.worst_ratio, outcome.worst_ratio)
        if outcome.problem:
            report.failing_example, report.problem = params, outcome.problem
            raise KernelMismatch(outcome.problem)

    phases = [p for p in Phase if shrink or p is not Phase.shrink]
    overrides: dict[str, Any] = {
        "deadline": None,
        "database": None,
        "phases": phases,
        "verbosity": Verbosity.quiet,
        "report_multiple_bugs": False,
        "suppress_health_check": [
            HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
        ],
    }
    if max_examples is not None:
        overrides["max_examples"] = max_examples
    test = given(params=spec.params(limits))(prop)
    for case in reversed(spec.edge_cases(limits)):
        test = example(params=case)(test)
    test = settings(parent or settings(), **overrides)(test)
    if seed is not None:
        test = fixed_seed(seed)(test)

    start = time.perf_counter()
    try:
        test()
    except Flaky:
        report.status = "FAIL"
        report.problem = f"nondeterministic (a race?): {report.problem}"
    except Exception as exc:
        report.status = "FAIL"
        report.problem = report.problem or f"{type(exc).__name__}: {exc}"
    report.seconds = time.perf_counter() - start
    return report


def check_backend(
    backend: Backend | str,
    kernels: Sequence[str] | None = None,
    *,
    progress: Callable[[KernelReport], None] | None = None,
    **options: Any,
) -> list[KernelReport]:
    """:func:`check_kernel` for each kernel (all of the contract by default)."""
    if isinstance(backend, str):
        backend = get_backend(backend)
    reports = []
    for kernel in kernels or kernels_ref.KERNEL_NAMES:
        report = check_kernel(backend, kernel, **options)
        reports.append(report)
        if progress is not None:
            progress(report)
    return reports

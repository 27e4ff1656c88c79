"""The kernel-correctness suite: hold any backend's kernels to the NumPy reference.

For every name in ``kernels_ref.KERNEL_NAMES`` this package knows how to draw random but
meaningful arguments (a :class:`KernelSpec`: shapes, dtypes, ragged batches, block
tables with pages scattered through the pool, GQA ratios, ties, ``-inf`` logits, ...),
runs the backend's kernel and the reference on the same arguments, and compares the
results within a stated :class:`Tolerance`. Hypothesis drives the search and, when a
kernel fails, shrinks the arguments to a minimal failing example.

    >>> from nanoserve.check_kernels import check_backend
    >>> for report in check_backend("cuda"): print(report.kernel, report.status)

It is also the grader behind ``python -m nanoserve check-kernels --backend NAME``: a lab
registers its own backend (or passes the path of a .py file defining kernels) and gets a
per-kernel pass/fail table, the largest error seen, and the minimal failing example.
Kernels a backend does not define fall back to the reference and are listed as such.

Arguments are built from a small dictionary of parameters plus a seed
(:func:`build_case`), so a failing example is short to print and exact to reproduce.
The reference ``kernels_ref`` is the specification; this package never changes it.

Hypothesis is a development dependency and is imported only when a check runs.

The modules, each building on the ones above it:

    limits      Limits: bounds on the shapes drawn; SMALL, LARGE
    tolerances  Tolerance of each kernel, and what its error is measured against
    spec        KernelSpec: what to draw, how to build the arguments, how close is close
    cases/      the KernelSpecs, one module per kernels_ref module; SPECS, build_case
    compare     one output against the reference's: CaseOutcome, compare
    driver      hypothesis over the cases: run_case, check_kernel, check_backend
    gpu         GPU detection without numba; the CUDA simulator when there is no GPU
    cli         ``check-kernels``: add_arguments, run, print_report
    __main__    ``python -m nanoserve.check_kernels``, the same command

The names in ``__all__`` are importable from ``nanoserve.check_kernels`` itself.
"""

from nanoserve.check_kernels.cases import SPECS, build_case
from nanoserve.check_kernels.cases.attention import paged_attention_build, paged_attention_params
from nanoserve.check_kernels.cli import add_arguments, print_report, run
from nanoserve.check_kernels.compare import CaseOutcome, compare
from nanoserve.check_kernels.driver import KernelReport, check_backend, check_kernel, describe_args, run_case
from nanoserve.check_kernels.gpu import SIMULATOR_SWITCH_INTERVAL, gpu_present, use_simulator_if_no_gpu
from nanoserve.check_kernels.limits import LARGE, LIMITS, SMALL, Limits
from nanoserve.check_kernels.spec import KernelSpec
from nanoserve.check_kernels.tolerances import EXACT, Tolerance

__all__ = [
    "EXACT",
    "LARGE",
    "LIMITS",
    "SIMULATOR_SWITCH_INTERVAL",
    "SMALL",
    "SPECS",
    "CaseOutcome",
    "KernelReport",
    "KernelSpec",
    "Limits",
    "Tolerance",
    "add_arguments",
    "build_case",
    "check_backend",
    "check_kernel",
    "compare",
    "describe_args",
    "gpu_present",
    "paged_attention_build",
    "paged_attention_params",
    "print_report",
    "run",
    "run_case",
    "use_simulator_if_no_gpu",
]

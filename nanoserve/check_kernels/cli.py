"""``python -m nanoserve check-kernels``: its options, the run, and the per-kernel report."""

from __future__ import annotations

import argparse
import math
import sys

import kernels_ref
from nanoserve.check_kernels.cases import SPECS
from nanoserve.check_kernels.driver import KernelReport, check_backend
from nanoserve.check_kernels.gpu import use_simulator_if_no_gpu
from nanoserve.check_kernels.limits import LIMITS
from nanoserve.config import EngineConfig
from nanoserve.kernels import get_backend


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m nanoserve check-kernels``."""
    parser.add_argument(
        "--backend",
        default=EngineConfig.backend,
        help=f"registered backend name or path of a .py file (default: {EngineConfig.backend}, the engine's)",
    )
    parser.add_argument(
        "--kernel", action="append", default=None, metavar="K",
        help="check only this kernel (repeat, or comma-separate; default: all of them)",
    )  # fmt: skip
    parser.add_argument(
        "--examples", type=int, default=None, metavar="N",
        help="random examples per kernel (default 100; 10 on the CUDA simulator)",
    )  # fmt: skip
    parser.add_argument(
        "--size", choices=sorted(LIMITS), default=None,
        help="shape limits (default: small on the CUDA simulator, large otherwise)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="fix hypothesis' random seed")


def _selected_kernels(requested: list[str] | None) -> list[str]:
    if not requested:
        return list(kernels_ref.KERNEL_NAMES)
    names = [name.strip() for item in requested for name in item.split(",") if name.strip()]
    unknown = [name for name in names if name not in SPECS]
    if unknown:
        raise SystemExit(
            f"unknown kernel(s) {', '.join(unknown)}; choose from {', '.join(kernels_ref.KERNEL_NAMES)}"
        )
    return names


def _fmt(value: float) -> str:
    return "-" if value == 0 else ("inf" if math.isinf(value) else f"{value:.2g}")


def _table_rows(reports: list[KernelReport]) -> list[list[str]]:
    return [
        [
            r.kernel, r.status, str(r.examples), _fmt(r.max_abs_error), _fmt(r.worst_ratio),
            str(r.tolerance), f"{r.seconds:.1f}s",
        ]
        for r in reports
    ]


_HEADER = ["kernel", "result", "examples", "max |err|", "err/allowed", "tolerance", "time"]


def print_report(reports: list[KernelReport], title: str) -> None:
    """The per-kernel table, then the minimal failing example of every failure."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None:
        table = Table(title=title)
        for column in _HEADER:
            justify = "left" if column in ("kernel", "tolerance") else "right"
            table.add_column(column, justify=justify, no_wrap=True)
        style = {"pass": "green", "FAIL": "bold red", "ref": "yellow"}
        for row, report in zip(_table_rows(reports), reports, strict=True):
            table.add_row(*row, style=style[report.status])
        Console(width=max(Console().width, 120)).print(table)  # never squeeze the columns
    else:
        rows = [_HEADER, *_table_rows(reports)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
        print(title)
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    for report in reports:
        if not report.passed:
            print("\n" + report.describe_failure())
    print("\n'-' in an error column: the largest error was exactly zero.")
    if any(r.status == "ref" for r in reports):
        print("'ref': the backend does not define this kernel; the reference is used (nothing to check).")


def run(args: argparse.Namespace) -> int:
    """``check-kernels``: check a backend, print the table; exit code 1 if any kernel fails.

    With no GPU present, numba.cuda kernels run on numba's CUDA simulator
    (NUMBA_ENABLE_CUDASIM=1 is set before numba is imported), with small shapes and few
    examples by default, because simulated threads are slow.
    """
    simulated = use_simulator_if_no_gpu()
    kernels = _selected_kernels(args.kernel)
    backend = get_backend(args.backend)
    simulated = simulated and "numba.cuda" in sys.modules
    size = args.size or ("small" if simulated else "large")
    examples = args.examples if args.examples is not None else (10 if simulated else 100)
    where = " on the CUDA simulator" if simulated else ""
    print(
        f"checking backend {args.backend!r}{where}: {len(kernels)} kernel(s), "
        f"{examples} examples each, {size} shapes"
    )
    reports = check_backend(
        backend, kernels, limits=LIMITS[size], max_examples=examples, seed=args.seed,
        progress=lambda r: print(f"  {r.kernel:16s} {r.status}", flush=True),
    )  # fmt: skip
    print_report(reports, f"backend {args.backend!r} vs kernels_ref")
    return 1 if any(not r.passed for r in reports) else 0

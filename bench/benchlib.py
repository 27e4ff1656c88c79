"""Shared helpers for the bench scripts: the model file, the peers, timing and tables.

Peers run in the same process when they can be imported here; llama-cpp-python may live in
another virtual environment, in which case ``run_llama_cpp`` starts ``llama_cpp_peer.py``
with that environment's interpreter and reads its JSON answer. A peer that cannot run is
reported as skipped, with the reason, and never stops the nanoserve measurement.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")


class PeerUnavailable(Exception):
    """A peer cannot run here; the message says why and what to do."""


def default_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file (the same file every engine reads)."""
    from nanoserve.model.registry import resolve_model

    return resolve_model(None)


def set_x_block(rows: int | None) -> None:
    """Run the few-row kernels with blocks of ``rows`` rows of x (``kernels_cpu.linear.X_BLOCK``,
    which the machine picks: 5 with AVX-512, 2 without); None keeps the machine's. The
    float32 and the quantized kernels' wrappers read that module global at every call."""
    if rows is None:
        return
    import importlib

    importlib.import_module("kernels_cpu.linear").X_BLOCK = rows  # the module, not the package's function


def add_x_block_option(parser: Any) -> None:
    parser.add_argument("--x-block", type=int, default=None, choices=range(1, 6), metavar="N",
                        help="rows of x per block in the few-row kernels, 1-5 (default: the machine's, kernels_cpu.linear.X_BLOCK)")  # fmt: skip


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def environment() -> str:
    """One line naming the machine and library versions, printed above every table."""
    import numpy as np

    from nanoserve import threads

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, NumPy {np.__version__}; {threads.describe()}"


def warm_up(engine: Any, prompt: list[int]) -> None:
    """Run one short greedy request through ``engine`` and forget its step stats.

    Not timed: a fresh checkout compiles the cpu kernels on their first call (seconds).
    """
    from nanoserve.sampling import SamplingParams

    engine.add_request(prompt[:16], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    engine.step_stats.clear()


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """A plain fixed-width table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def results_path(name: str) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    return os.path.join(RESULTS_DIR, name)


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
        print(f"wrote {path}")


# --- HF transformers --------------------------------------------------------------------
def load_hf(gguf_path: str, threads: int) -> tuple[Any, Any]:
    """The GGUF file through transformers, dequantized to float32 (``torch.set_num_threads``)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws progress bars
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise PeerUnavailable(f"transformers/torch not importable ({exc}); pip install torch==2.13.0 transformers accelerate gguf") from exc
    torch.set_num_threads(threads)
    folder, name = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    return model, torch


def hf_version() -> str:
    import torch
    import transformers

    return f"transformers {transformers.__version__}, torch {torch.__version__}"


# --- llama.cpp ----------------------------------------------------------------------------
def run_llama_cpp(job: dict[str, Any], python: str | None, timeout: float = 3600) -> dict[str, Any]:
    """Run a ``llama_cpp_peer`` job here (if ``llama_cpp`` imports) or with the interpreter ``python``."""
    if python:
        script = os.path.join(BENCH_DIR, "llama_cpp_peer.py")
        try:
            proc = subprocess.run([python, script], input=json.dumps(job), capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PeerUnavailable(f"could not run {python} {script}: {exc}") from exc
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
            hint = " (SIGILL: the llama.cpp build uses CPU instructions this machine lacks; rebuild it for this CPU)" if proc.returncode == -4 else ""
            raise PeerUnavailable(f"llama.cpp helper failed with {how}{hint}: {' | '.join(detail)}")
        lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
        if not lines:
            raise PeerUnavailable(f"llama.cpp helper printed no JSON result: {proc.stdout[-300:]!r}")
        return json.loads(lines[-1])
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise PeerUnavailable(
            "llama_cpp is not importable in this Python; install llama-cpp-python, or pass "
            "--python-llama PATH (the python of a venv that has it)"
        ) from exc
    sys.path.insert(0, BENCH_DIR)
    import llama_cpp_peer

    return llama_cpp_peer.run_job(dict(job))

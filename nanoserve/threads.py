"""The thread policy: how many threads the matrix products (OpenBLAS) may use.

Every matmul in nanoserve is a NumPy BLAS call; everything else runs on the calling thread
(the cpu backend's Numba kernels are compiled without ``parallel=True``, so Numba's own
thread pool never starts and has nothing to set). The one knob is therefore the BLAS thread
count, set here through ``threadpoolctl`` for the whole process:

    EngineConfig.threads / --threads N   ->   apply(N)   ->   BLAS: N threads
    None (the default)                   ->   apply(None) ->   the policy below

The policy: **one thread**, unless ``OPENBLAS_NUM_THREADS`` (or ``OMP_NUM_THREADS``) says
otherwise. OpenBLAS's threads meet at a barrier inside every product, so when another
process holds one of the cores, the thread that is descheduled stalls the other, and a
step waits for the OS scheduler rather than for arithmetic: beside a busy loop on one of
2 cores, two threads ran a 128-token prefill and 32 decoding requests 3-10x slower than
one thread. On an idle machine two threads gain ~1.4x on long prompts and about nothing
on decode, where every step reads all the weights for little arithmetic. The numbers and
how they were taken: ``docs/threads.md`` (``python bench/threads.py``).

The setting is process-wide (one BLAS library per process): the last ``apply`` wins.
"""

from __future__ import annotations

import os

from nanoserve.errors import ConfigError

#: BLAS threads when neither ``--threads`` nor the environment says (see the module docstring).
DEFAULT_THREADS = 1
#: Environment variables that a user sets to choose BLAS threads; they override the default.
ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")

_source = "the library's own default"  # where the current setting came from, for describe()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _controller():  # -> threadpoolctl.ThreadpoolController
    import numpy  # noqa: F401  (loads the BLAS library that the controller looks for)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _from_environment() -> tuple[int, str] | None:
    """``(threads, variable)`` if the user set one of ``ENV_VARS`` to a positive integer."""
    for name in ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) >= 1:
            return int(value), name
    return None


def check_threads(threads: object) -> None:
    """Raise ConfigError unless ``threads`` is None or an integer in [1, usable CPUs]."""
    if threads is None:
        return
    cpus = usable_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus:
        raise ConfigError(f"threads must be an integer in [1, {cpus}] (the CPUs this process may use), got {threads!r}")


def apply(threads: int | None) -> str:
    """Set the BLAS thread count for this process and return :func:`describe`'s line.

    ``threads``: an integer in [1, usable CPUs], or None for the policy's choice
    (``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` if set, else ``DEFAULT_THREADS``).
    Raises ConfigError, naming the allowed range, for anything else; changes nothing then.
    """
    global _source
    check_threads(threads)
    if threads is not None:
        count, source = threads, "--threads"
    elif (env := _from_environment()) is not None:
        count, source = env[0], env[1]
    else:
        count, source = min(DEFAULT_THREADS, usable_cpus()), "the default policy, docs/threads.md"
    _controller().limit(limits=count, user_api="blas")
    _source = source
    return describe()


def current() -> int | None:
    """BLAS threads in effect now (the smallest over the loaded BLAS libraries), or None if none is loaded."""
    counts = [lib["num_threads"] for lib in _controller().info() if lib["user_api"] == "blas"]
    return min(counts) if counts else None


def describe() -> str:
    """One line naming the BLAS library, its threads now, the CPUs, and where the setting came from.

    >>> apply(1)
    'threads: 1 BLAS thread (openblas 0.3.31, pthreads) on 2 CPUs, from --threads'
    """
    libs = [lib for lib in _controller().info() if lib["user_api"] == "blas"]
    cpus = usable_cpus()
    if not libs:
        return f"threads: no BLAS thread pool found (matmuls run on the calling thread) on {cpus} CPUs"
    lib = libs[0]
    count = min(x["num_threads"] for x in libs)
    name = f"{lib['internal_api']} {'.'.join(str(lib.get('version') or '?').split('.')[:3])}"
    layer = f", {lib['threading_layer']}" if lib.get("threading_layer") else ""
    plural = "" if count == 1 else "s"
    return f"threads: {count} BLAS thread{plural} ({name}{layer}) on {cpus} CPUs, from {_source}"

"""The thread policy: how many threads the matrix products may use.

Every matmul in nanoserve is either a NumPy BLAS call or one of the cpu backend's compiled
few-row kernels (``kernels_cpu.linear``, ``kernels_cpu.quant``: decode steps and
speculative verifications). One count decides both: the BLAS thread count, set here
through ``threadpoolctl`` for the whole process, and the threads the compiled kernels split
their output rows over (``kernels_cpu.split``: with 1 they run on the calling thread and
Numba's thread pool never starts). Everything else runs on the calling thread:

    EngineConfig.threads / --threads N   ->   apply(N)   ->   BLAS and kernels: N threads
    None (the default)                   ->   apply(None) ->   the policy below

The policy: **one thread**, unless ``OPENBLAS_NUM_THREADS`` (or ``OMP_NUM_THREADS``) says
otherwise. OpenBLAS's threads (and the split kernels', at the end of each call) meet at a
barrier inside every product, so when another process holds one of the cores, the thread
that is descheduled stalls the other, and a step waits for the OS scheduler rather than
for arithmetic: beside a busy loop on one of 2 cores, two threads ran a 128-token prefill
and 32 decoding requests 3-10x slower than one thread. On an idle machine two threads
gain ~1.4x on long prompts, and with the compiled kernels split as well ~1.4x on decode.
The numbers and how they were taken: ``docs/threads.md`` (``python bench/threads.py``).

The setting is process-wide (one BLAS library, one kernel split per process): the last
``apply`` wins.
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
    _kernel_split().set_threads(min(count, _numba_pool_size()))
    _source = source
    return describe()


def _kernel_split():  # -> the module kernels_cpu.split (imported here: it loads Numba)
    from kernels_cpu import split

    return split


def _numba_pool_size() -> int:
    """Threads in Numba's pool: the CPUs, or fewer where ``NUMBA_NUM_THREADS`` says so."""
    import numba

    return numba.config.NUMBA_NUM_THREADS


def current() -> int | None:
    """BLAS threads in effect now (the smallest over the loaded BLAS libraries), or None if none is loaded."""
    counts = [lib["num_threads"] for lib in _controller().info() if lib["user_api"] == "blas"]
    return min(counts) if counts else None


def describe() -> str:
    """One line naming the BLAS library, its threads now, the compiled kernels' threads, the
    CPUs, and where the setting came from.

    >>> apply(1)
    'threads: 1 BLAS thread (openblas 0.3.31, pthreads), kernels on 1 thread, on 2 CPUs, from --threads'
    """
    libs = [lib for lib in _controller().info() if lib["user_api"] == "blas"]
    cpus = usable_cpus()
    kernels = _kernel_split().threads()
    on_kernels = f"kernels on {kernels} thread{'' if kernels == 1 else 's'}"
    if not libs:
        return f"threads: no BLAS thread pool found (matmuls run on the calling thread), {on_kernels}, on {cpus} CPUs"
    lib = libs[0]
    count = min(x["num_threads"] for x in libs)
    name = f"{lib['internal_api']} {'.'.join(str(lib.get('version') or '?').split('.')[:3])}"
    layer = f", {lib['threading_layer']}" if lib.get("threading_layer") else ""
    plural = "" if count == 1 else "s"
    return f"threads: {count} BLAS thread{plural} ({name}{layer}), {on_kernels}, on {cpus} CPUs, from {_source}"

"""Output rows split over threads: the one way the compiled kernels use more than one core.

A decode step's products are ``y[t, o] = x[t] . W[o]``, and every output ``o`` is its own
dot product: no two of them share a sum. So the rows of W can be cut into ``parts``
contiguous ranges, one per thread, and each thread runs the unchanged one-thread kernel on
its range::

    _split_<kernel>(..., parts):                      numba parallel=True
        for p in prange(parts):                       one thread each
            lo, hi = part_bounds(out, p, parts, align)
            _<kernel>(..., lo, hi)                    the one-thread loop, rows lo..hi

Every output is then summed by exactly the code and in exactly the order of the one-thread
kernel, so the split changes no bit of any result (``tests/kernels/test_split.py``). The
bounds are multiples of ``align`` (4 for the kernels that take weight rows four at a time)
so that each range holds the same groups of four as the whole matrix does. Each format
has its own four-line twin rather than one split kernel taking the one-thread kernel as an
argument: Numba's disk cache cannot key a compiled kernel on a function passed to it.

How many threads: :func:`set_threads`, called by ``nanoserve.threads.apply`` with the
``--threads`` count, so one setting decides the cores the engine uses, for BLAS and for
these kernels alike. With 1 (the policy's default) the split kernels are never called:
the kernels run on the calling thread and Numba's thread pool never starts. With more,
the pool starts on the first split call; each call then costs a few microseconds to start
and waits at its end for the slowest thread, which on an idle machine is about half the
work (the figures: ``docs/threads.md``), and whenever another process holds a core, is
the whole call plus a scheduler time slice. That is why 1 stays the default.
"""

from __future__ import annotations

import threading

import numba
from numba import njit

#: Threads the split kernels divide their output rows over; 1: no split (the default).
_threads = 1
# numba.set_num_threads is per calling thread (an engine thread has the pool's default):
# the count last set in each thread, so that a call sets it only when it differs.
_local = threading.local()


def set_threads(count: int) -> None:
    """Split the compiled kernels' output rows over ``count`` threads (1: do not split).

    ``count`` must be in [1, ``numba.config.NUMBA_NUM_THREADS``] (the size of Numba's
    pool: the CPUs, unless ``NUMBA_NUM_THREADS`` says fewer); ValueError otherwise.
    """
    global _threads
    if not 1 <= count <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"kernel threads must be in [1, {numba.config.NUMBA_NUM_THREADS}], got {count}")
    _threads = count


def threads() -> int:
    """The split count in effect (see :func:`set_threads`)."""
    return _threads


def parts_for(rows_out: int, align: int = 1) -> int:
    """How many parts to cut ``rows_out`` output rows into: the thread count, fewer when
    there are not ``align`` rows for each; sets Numba's thread count in the calling thread
    to that many when it is above 1 (the caller then runs the split kernel)."""
    parts = max(1, min(_threads, rows_out // align))
    if parts > 1 and getattr(_local, "numba_threads", None) != parts:
        numba.set_num_threads(parts)
        _local.numba_threads = parts
    return parts


@njit(inline="always")
def part_bounds(n, p, parts, align):  # ints -> (lo, hi): part p of range(n), cut at multiples of align
    """Rows ``lo .. hi`` of part ``p`` when ``n`` rows are cut into ``parts`` nearly equal
    ranges whose inner bounds are multiples of ``align``; the parts cover ``0 .. n`` once."""
    lo = (n * p // parts) // align * align
    hi = n if p == parts - 1 else (n * (p + 1) // parts) // align * align
    return lo, hi

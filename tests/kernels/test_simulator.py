"""The CUDA simulator, as kernels_cuda sets it up: a block's shared array is one array.

The simulator creates a shared array when the first thread of a block reaches the line;
unguarded, two threads arriving together could each create their own (57 of 300 trials
of 16 threads without kernels_cuda's lock), and a kernel would then read memory its
neighbours never wrote. This test releases 16 threads at once, many times.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

import kernels_cuda
from kernels_cuda._runtime import SIMULATOR


def _arrays_given_to_16_threads_at_once() -> int:
    """How many distinct arrays 16 threads, released together, get from one shared.array line."""
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    shared = FakeCUDAShared(0)
    barrier = threading.Barrier(16)
    got: list = [None] * 16

    def thread(i: int) -> None:
        barrier.wait()
        got[i] = shared.array(8, np.float32)

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len({id(a) for a in got})


@pytest.mark.skipif(not SIMULATOR, reason="only the simulator has this lookup")
def test_threads_of_a_block_get_the_same_shared_array():
    assert kernels_cuda.SIMULATOR
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    try:
        assert [_arrays_given_to_16_threads_at_once() for _ in range(200)] == [1] * 200
    finally:
        sys.setswitchinterval(interval)

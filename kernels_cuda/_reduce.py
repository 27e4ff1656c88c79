"""Block-wide reductions shared by the kernels that reduce a row inside one thread block.

Pattern (every thread of the block calls it with its partial value)::

    thread:   0     1     2    ...  n-1
    value:    a0    a1    a2        a(n-1)
              |     |     |          |        each writes scratch[tid]
              +-----+-----+--- ... --+        syncthreads  (all partials visible)
    total  =  a0 + a1 + ... + a(n-1)           every thread folds scratch in the same order
                                               syncthreads  (all reads done: scratch reusable)

Every thread folds the partials itself, in the same order, so every thread holds the
*bit-identical* total: kernels that branch on a reduced value (the bisections in
``kernels_cuda.sampling``) stay in lock-step without a broadcast. For the block sizes used
here (<= 256 threads) reading 256 numbers from shared memory costs less than the
log2(n) barriers of a tree reduction. Both barriers are required: without the first a
thread reads partials not yet written, without the second a fast thread overwrites
``scratch`` (in the next reduction) while a slow one is still reading it.
"""

from numba import cuda


@cuda.jit(device=True)
def block_sum(scratch, value):  # scratch: shared [>= blockDim.x]; scalar -> scalar (same in every thread)
    """Sum of ``value`` over the threads of the block, returned to every thread."""
    tid = cuda.threadIdx.x
    scratch[tid] = value
    cuda.syncthreads()
    total = scratch[0]
    for i in range(1, cuda.blockDim.x):
        total += scratch[i]
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def block_max(scratch, value):  # scratch: shared [>= blockDim.x]; scalar -> scalar (same in every thread)
    """Maximum of ``value`` over the threads of the block, returned to every thread."""
    tid = cuda.threadIdx.x
    scratch[tid] = value
    cuda.syncthreads()
    best = scratch[0]
    for i in range(1, cuda.blockDim.x):
        best = max(best, scratch[i])
    cuda.syncthreads()
    return best

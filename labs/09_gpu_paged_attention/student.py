"""Lab 09: paged attention as a numba.cuda kernel.

Write the kernel and its launcher below. The grader uses this file as a kernel backend:
the real engine calls your ``paged_attention`` in every layer of every step. It runs on
Numba's CUDA simulator (each CUDA thread a Python thread: slow, but the same code) on any
machine, and on a real NVIDIA GPU where there is one.

Use numba.cuda, NumPy, math and the standard library; kernels_cuda._runtime's launch
helpers (block_threads, contiguous, xp, to_device, to_host, SIMULATOR) are allowed, but not
kernels_cuda's attention, kernels_ref or kernels_cpu (the answer keys).

    python -m nanoserve lab check 09 student.py
    NUMBA_ENABLE_CUDASIM=1 python my_test.py        # run it yourself on the simulator
"""

from __future__ import annotations

import math  # noqa: F401  (the kernel needs math.exp and math.inf)

import numpy as np  # noqa: F401
from numba import config, cuda, float32  # noqa: F401  (float32: the kernel's scalars and shared arrays)

#: True when numba.cuda is the CPU simulator (NUMBA_ENABLE_CUDASIM=1 before numba was imported).
SIMULATOR = bool(config.ENABLE_CUDASIM)
#: Largest head dimension and threads per block your shared arrays are sized for.
MAX_HEAD_DIM = 256
MAX_THREADS = 256


@cuda.jit
def paged_attention_kernel(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, out):
    # q [T, H, D], caches [N, B, Hkv, D] (float32 or float16), block_tables [S, max_blocks],
    # query_start_loc [S + 1], seq_lens [S] -> out [T, H, D] float32 (zeros when launched)
    """One thread block per (query row t = blockIdx.x, query head h = blockIdx.y).

    1. The sequence s owning row t: the largest s with query_start_loc[s] <= t.
       q_len = query_start_loc[s + 1] - query_start_loc[s]; the query sits at position
       pos = seq_lens[s] - q_len + (t - query_start_loc[s]) and sees keys 0 .. pos.
    2. Its KV head: h // (H / Hkv) (GQA: consecutive query heads share a KV head).
    3. Key j of s is in block block_tables[s, j // B], at offset j % B; table entries past
       the sequence's last block are never read (they may hold any value).
    4. out[t, h] = softmax(scale * q[t, h] . k_j) @ v_j over the visible keys j, in float32.

    Threads of a block share work through cuda.shared.array buffers; a
    cuda.syncthreads() must separate one thread's write from another thread's read.
    """
    raise NotImplementedError("Lab 09: write paged_attention_kernel")


def paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale):  # [T, H, D] -> [T, H, D]
    """Launch the kernel; the same contract as ``kernels_ref.paged_attention``.

    q: float32 [T, H, D]; k_cache, v_cache: [N, B, Hkv, D]; block_tables: int [S, max_blocks];
    query_start_loc: int [S + 1]; seq_lens: int [S]; scale: float. Returns a new float32
    [T, H, D] array (rows no sequence owns stay 0). Launch ``grid = (T, H)`` blocks of
    ``8 if SIMULATOR else 128`` threads, with C-contiguous int64 metadata; return at once
    when there is nothing to compute (T == 0, H == 0 or S == 0).
    """
    raise NotImplementedError("Lab 09: write paged_attention")


"""Per-kernel timings, per backend, at the default model's shapes.

SmolLM2-135M: hidden 576, 9 query heads, 3 KV heads, head_dim 64, FFN 1536, vocab 49152,
KV block size 16. Two workloads:

    decode    32 sequences, one new token each, 512 tokens of context each
    prefill   1 sequence, 512 new tokens (its logits: the last token only)

Each kernel is called once to warm up (a GPU backend compiles it then), then timed
``--repeats`` times; the table shows the median, in milliseconds. Arguments are moved to
the backend once, outside the timing; a GPU backend is synchronised after every call.

On a machine without a GPU only ``ref`` is timed (the ``cuda`` backend would run on the
CUDA simulator, whose timings mean nothing); with a GPU, ``ref`` and ``cuda`` are both
timed and the table shows the speed-up. ``--backend`` adds any other backend (a
registered name or a .py path).

    python bench/kernels.py                     # ref (+ cuda on a GPU machine)
    python bench/kernels.py --repeats 20 --workload decode
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import numpy as np  # noqa: E402

from nanoserve.check_kernels import build_case, use_simulator_if_no_gpu  # noqa: E402
from nanoserve.kernels import Backend, get_backend  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, BLOCK = 576, 9, 3, 64, 1536, 49152, 16
THETA, EPS = 100000.0, 1e-5


def _normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _paged_batch(rng: np.random.Generator, q_lens: list[int], seq_len: int) -> tuple:
    """q, caches, block tables (pages shuffled through the pool), query_start_loc, seq_lens."""
    blocks_per_seq = -(-seq_len // BLOCK)
    num_blocks = len(q_lens) * blocks_per_seq
    tables = rng.permutation(num_blocks).reshape(len(q_lens), blocks_per_seq)
    cache_shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    query_start_loc = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
    q = _normal(rng, int(query_start_loc[-1]), HEADS, HEAD_DIM)
    seq_lens = np.full(len(q_lens), seq_len, dtype=np.int64)
    return q, _normal(rng, *cache_shape), _normal(rng, *cache_shape), tables, query_start_loc, seq_lens, HEAD_DIM**-0.5


def _quantized(kernel: str, tokens: int, out: int, inp: int) -> tuple:
    """x [tokens, inp] and a random weight [out, inp] in the kernel's format."""
    params = {"tokens": tokens, "in": inp, "out": out, "seed": 0}
    if kernel == "linear":
        params["w_dtype"] = "float32"
    elif kernel == "linear_int4":
        params["group_size"] = 32
    elif kernel != "linear_int8":
        params["scales"] = "normal"
    return build_case(kernel, params)


def workload(name: str) -> list[tuple[str, str, tuple]]:  # -> (kernel, shape label, host arguments)
    """The kernels of one forward step at the default model's shapes."""
    rng = np.random.default_rng(0)
    tokens, seqs, context = (32, 32, 512) if name == "decode" else (512, 1, 512)
    cases: list[tuple[str, str, tuple]] = [
        ("rms_norm", f"[{tokens}, {HIDDEN}]", (_normal(rng, tokens, HIDDEN), _normal(rng, HIDDEN), EPS)),
        ("rope", f"q [{tokens}, {HEADS}, {HEAD_DIM}]",
         (_normal(rng, tokens, HEADS, HEAD_DIM), np.arange(tokens) + context - tokens, THETA)),
        ("silu_mul", f"[{tokens}, {FFN}]", (_normal(rng, tokens, FFN), _normal(rng, tokens, FFN))),
    ]  # fmt: skip
    for kernel in ("linear", "linear_int8", "linear_int4", "linear_q8_0", "linear_q4_0", "linear_q4_1"):
        cases.append((kernel, f"[{tokens}, {HIDDEN}] x [{FFN}, {HIDDEN}]", _quantized(kernel, tokens, FFN, HIDDEN)))
    cases.append(("linear", f"lm head [{seqs}, {HIDDEN}] x [{VOCAB}, {HIDDEN}]", _quantized("linear", seqs, VOCAB, HIDDEN)))

    q_lens = [1] * seqs if name == "decode" else [tokens]
    paged = _paged_batch(rng, q_lens, context)
    slots = (paged[3][0, np.arange(tokens) // BLOCK] * BLOCK + np.arange(tokens) % BLOCK) if name == "prefill" else (
        paged[3][:, (context - 1) // BLOCK] * BLOCK + (context - 1) % BLOCK)  # fmt: skip
    kv = _normal(rng, tokens, KV_HEADS, HEAD_DIM)
    cases += [
        ("store_kv", f"{tokens} tokens -> pool of {paged[1].shape[0]} blocks", (kv, kv.copy(), paged[1], paged[2], slots)),
        ("paged_attention", f"{seqs} seq x {tokens // seqs} q, context {context}", paged),
        ("attention", f"1 seq, [{tokens // seqs}] q x [{context}] k",
         (paged[0][: tokens // seqs], _normal(rng, context, KV_HEADS, HEAD_DIM), _normal(rng, context, KV_HEADS, HEAD_DIM), HEAD_DIM**-0.5)),
    ]  # fmt: skip
    logits = _normal(rng, seqs, VOCAB, scale=3.0)
    cases += [
        ("softmax", f"[{seqs}, {VOCAB}]", (logits,)),
        ("top_k_filter", f"[{seqs}, {VOCAB}], k=50", (logits, np.full(seqs, 50))),
        ("top_p_filter", f"[{seqs}, {VOCAB}], p=0.9", (logits, np.full(seqs, 0.9))),
        ("min_p_filter", f"[{seqs}, {VOCAB}], min_p=0.05", (logits, np.full(seqs, 0.05))),
    ]
    return cases


def _synchronizer(backend: Backend) -> Callable[[], None]:
    cuda = getattr(backend.xp, "cuda", None)  # CuPy
    if cuda is not None and hasattr(cuda, "Device"):
        return lambda: cuda.Device().synchronize()
    return lambda: None


def time_kernel(backend: Backend, kernel: str, args: tuple, repeats: int) -> float:  # -> median seconds
    """Median wall time of ``repeats`` calls, after one warm-up call."""
    device_args = [backend.to_device(a) if isinstance(a, np.ndarray) else a for a in args]
    fn = getattr(backend.kernels, kernel)
    sync = _synchronizer(backend)
    fn(*device_args)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*device_args)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per kernel (median shown)")
    parser.add_argument("--workload", choices=["decode", "prefill", "both"], default="both")
    parser.add_argument("--backend", action="append", default=[], help="also time this backend (name or .py path)")
    args = parser.parse_args(argv)

    simulated = use_simulator_if_no_gpu()
    names = ["ref"] + ([] if simulated else ["cuda"]) + args.backend
    if simulated:
        print("no GPU here: timing 'ref' only (the cuda backend would run on the CUDA simulator)")
    backends: dict[str, Any] = {}
    for name in names:
        try:
            backends[name] = get_backend(name)
        except Exception as exc:  # e.g. cuda without numba installed
            print(f"skipping backend {name!r}: {exc}")
    print(f"NumPy {np.__version__}, {os.cpu_count()} CPUs; median of {args.repeats} runs, milliseconds")

    for load in ["decode", "prefill"] if args.workload == "both" else [args.workload]:
        rows = []
        for kernel, shape, host_args in workload(load):
            ms = {name: 1e3 * time_kernel(be, kernel, host_args, args.repeats) for name, be in backends.items()}
            row = [kernel, shape, *(f"{ms[n]:.3f}" for n in backends)]
            if "cuda" in ms:
                row.append(f"{ms['ref'] / ms['cuda']:.1f}x")
            rows.append(row)
        print(f"\n{load}:")
        print_table(["kernel", "shape", *backends, *(["ref/cuda"] if "cuda" in backends else [])], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

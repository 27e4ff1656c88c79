"""Where a serving run spends its time: per kernel, and per kind of step.

Runs the offline throughput workload of ``bench/throughput.py`` (same requests for the
same ``--seed``) on one backend, with every kernel call timed, and prints two tables:

    kernels   total seconds per kernel over the run, calls, share of the wall time
    steps     engine steps grouped by kind (a decode-only step, or a step that also
              computes prompt tokens) and by batch size: count, median and total time

    python bench/step_profile.py                        # cpu backend, 32 requests
    python bench/step_profile.py --backend ref          # the reference kernels
    python bench/step_profile.py --num-requests 8 --max-len 128

The wrapper adds a few microseconds per call; against steps of tens to hundreds of
milliseconds that is noise. What the tables cannot show is what is inside a kernel:
``linear`` is OpenBLAS, and its time is the floor set by the weights' bytes and the
machine's GEMM speed.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import types
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import numpy as np  # noqa: E402

from bench.benchlib import environment, print_table, warm_up  # noqa: E402
from bench.throughput import make_workload  # noqa: E402
from nanoserve import config  # noqa: E402
from nanoserve.config import EngineConfig  # noqa: E402
from nanoserve.kernels import Backend, get_backend, register_backend  # noqa: E402


def timed(backend: Backend, totals: dict[str, float], calls: collections.Counter) -> types.SimpleNamespace:
    """The same backend's kernels, each wrapped by a timer adding into ``totals``: a backend to register."""

    def wrap(name: str, fn: Callable) -> Callable:
        def timed_kernel(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start
                calls[name] += 1

        return timed_kernel

    kernels = {name: wrap(name, fn) for name, fn in vars(backend.kernels).items()}
    return types.SimpleNamespace(**kernels, xp=backend.xp, to_device=backend.to_device, to_host=backend.to_host)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(ap, EngineConfig, "nanoserve engine", only=("backend", "weights", "kv_cache_dtype", "max_num_batched_tokens"))
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parallel", type=int, default=32, help="max_num_seqs")
    args = ap.parse_args()

    from nanoserve.engine import LLMEngine
    from nanoserve.model import load_checkpoint
    from nanoserve.sampling import SamplingParams

    loaded = load_checkpoint(None, args.weights)
    totals: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    register_backend("timed", timed(get_backend(args.backend), totals, calls))
    engine = LLMEngine(config.from_args(EngineConfig, args, backend="timed", max_num_seqs=args.parallel), loaded=loaded)

    workload = make_workload(loaded.tokenizer, loaded.config.vocab_size, args.num_requests, args.min_len, args.max_len, args.seed)
    print(f"{environment()}\nbackend {args.backend}, {len(workload)} requests ...", flush=True)
    warm_up(engine, workload[0][0])
    totals.clear()  # the warm-up's kernel calls do not count
    calls.clear()
    start = time.perf_counter()
    for prompt, n in workload:
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    output_tokens = 0
    while engine.has_unfinished_requests():
        output_tokens += sum(len(out.token_ids) for out in engine.step() if out.finished)
    wall = time.perf_counter() - start

    print(f"\n{output_tokens} output tokens in {wall:.1f} s: {output_tokens / wall:.1f} tok/s, {len(engine.step_stats)} steps\n")
    rows = [[name, f"{t:.2f}", calls[name], f"{100 * t / wall:.0f}%"] for name, t in sorted(totals.items(), key=lambda kv: -kv[1])]
    rows.append(["(outside kernels)", f"{wall - sum(totals.values()):.2f}", "", f"{100 * (1 - sum(totals.values()) / wall):.0f}%"])
    print_table(["kernel", "seconds", "calls", "of wall"], rows)

    groups: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    for s in engine.step_stats:
        kind = "with prompt tokens" if s.num_tokens > s.batch_size else "decode only"
        groups[(kind, -(-s.batch_size // 8) * 8)].append(s.duration)
    print()
    print_table(
        ["step kind", "batch size", "steps", "median ms", "total s"],
        [[kind, f"{size - 7}-{size}", len(d), f"{1e3 * float(np.median(d)):.0f}", f"{sum(d):.1f}"] for (kind, size), d in sorted(groups.items())],
    )


if __name__ == "__main__":
    main()

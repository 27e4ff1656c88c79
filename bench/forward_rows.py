"""What a forward pass of T tokens of one sequence costs against one token: r(k) = T(k+1) / T(1).

Speculative decoding verifies k drafted tokens in one forward pass of k + 1 rows, so it
pays only if r(k) stays near 1. Workload (SmolLM2-135M-Instruct, ``--weights`` fp32,
cpu backend, BLAS threads as ``nanoserve.threads`` sets them): one sequence whose first
``--context`` tokens are prefilled once, then a forward pass over its next T tokens, for T
in ``--tokens`` (default 1, 2, 3, 5, 9, 17), all T rows asking for logits as a
verification does. Each pass is the real engine's ``ModelRunner.execute`` (ragged-batch
metadata, 30 layers, paged KV, final norm, LM head); the same T slots are rewritten every
time, so every pass sees the same context. Three tables:

    forward   median wall time of a pass, and r(T-1), with ``linear`` as BLAS alone
              (``kernels_cpu.linear.linear_blas``: the backend before the compiled
              few-row loop) and as the cpu backend's ``linear``; also the median CPU
              time of the calling thread (steadier on a shared machine, and the whole
              cost when BLAS has one thread)
    linear    the product alone at the model's shapes, BLAS vs compiled, per call
              (thread CPU time; 30 distinct weights per layer shape, so they stream
              from memory as in the model)
    profile   where a pass of T tokens goes: every kernel timed (thread CPU time), summed
              per pass, and what is left (embedding, residual adds, Python, metadata)
    attention paged_attention for one T-token chunk at this context, per pass (30 layers):
              as the backend runs it (T <= 8: the compiled in-place loop; longer: gather, then BLAS) and as T
              one-token decodes over the same pages (the compiled in-place path; the
              same causal result), and the gather alone

Every repeat measures every (T, linear) pair once, so drift in the machine's load is
spread over all of them alike; the tables show medians over ``--repeats``.

    python bench/forward_rows.py                         # ~2 min on 2 cores
    python bench/forward_rows.py --repeats 21 --json out.json

Measured (AMD EPYC Zen 5, 2 cores, OpenBLAS 0.3.31 on 1 thread, load average 0.4-0.8,
``--repeats 11``), medians in ms:

    T    wall blas  wall compiled   cpu blas  cpu compiled   r(T-1) cpu: blas  compiled
    1       29.8        23.4          29.8        23.4                   1.00      1.00
    2       73.9        30.4          73.8        30.4                   2.48      1.30
    3       87.4        33.6          87.4        33.6                   2.94      1.43
    5       94.1        48.5          94.1        47.0                   3.16      2.01
    9      115.4        65.8         115.4        65.8                   3.88      2.81
    17     122.5        90.0         122.4        90.0                   4.11      3.84

(``R_MAX`` is 32: every T here takes the compiled loop in the compiled column.) The
profile table of the same run put a 5-token pass at 39.3 ms of thread CPU time (r = 1.53
against 25.7 at T = 1): 30.5 ms in ``linear`` (20.8 at T = 1) and 5.9 in
``paged_attention`` (2.5 at T = 1; the chunk's gather is 0.5 of it, the reference's NumPy
attention the rest). This machine's speed drifts between runs by 20-30% (the same T = 5
pass measured 37.6 ms wall in another run): trust ratios to ~0.2.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import numpy as np  # noqa: E402

from bench.benchlib import add_x_block_option, environment, print_table, results_path, set_x_block, write_json  # noqa: E402
from nanoserve import threads  # noqa: E402
from nanoserve.interfaces import ScheduledBatch  # noqa: E402

cpu_linear = importlib.import_module("kernels_cpu.linear")  # the module (``kernels_cpu.linear`` is the function)

# the model's products: (label, out, in); the fused ones are what LlamaModel calls
LINEAR_SHAPES = [
    ("q/o 576->576", 576, 576),
    ("k/v 576->192", 192, 576),
    ("qkv 576->960", 960, 576),
    ("up 576->1536", 1536, 576),
    ("gate_up 576->3072", 3072, 576),
    ("down 1536->576", 576, 1536),
    ("lm head 576->49152", 49152, 576),
]
LINEARS = {"blas": cpu_linear.linear_blas, "compiled": cpu_linear.linear}


class Verifier:
    """One prefilled sequence and a way to run a T-token forward pass after its context."""

    def __init__(self, engine: Any, tokenizer: Any, context: int, max_tokens: int) -> None:
        from bench.prefill_decode import prompt_ids
        from nanoserve.sampling import SamplingParams

        self.engine = engine
        self.context = context
        ids = prompt_ids(tokenizer, context + max_tokens)
        request_id = engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=1))
        self.request = engine.requests[request_id]
        assert engine.kv.allocate_slots(self.request, context + max_tokens), "KV pool too small"
        engine.runner.execute(ScheduledBatch([self.request], [context], [0]))  # prefill, once
        self.request.num_computed_tokens = context  # what the scheduler would record

    def forward(self, tokens: int) -> np.ndarray:  # -> logits [tokens, V]
        return self.engine.runner.execute(ScheduledBatch([self.request], [tokens], [tokens]))


def time_forward(verifier: Verifier, kernels: Any, tokens_list: list[int], repeats: int) -> dict[tuple[str, int], dict[str, list[float]]]:
    """Wall and thread CPU seconds of every (linear, T) pass, ``repeats`` rounds."""
    times: dict[tuple[str, int], dict[str, list[float]]] = collections.defaultdict(lambda: {"wall": [], "cpu": []})
    for fn in LINEARS.values():  # warm-up: compile, touch every weight
        kernels.linear = fn
        for t in tokens_list:
            verifier.forward(t)
    for _ in range(repeats):
        for t in tokens_list:
            for name, fn in LINEARS.items():
                kernels.linear = fn
                wall, cpu = time.perf_counter(), time.thread_time()
                verifier.forward(t)
                times[name, t]["cpu"].append(time.thread_time() - cpu)
                times[name, t]["wall"].append(time.perf_counter() - wall)
    kernels.linear = LINEARS["compiled"]
    return times


def profile_forward(verifier: Verifier, kernels: Any, tokens_list: list[int], repeats: int) -> dict[int, dict[str, float]]:
    """Per T: median thread CPU seconds per pass in each kernel, the pass itself, and the rest.

    CPU time of the calling thread, which is every thread that works when BLAS has one
    (the default policy): it does not count the time another process holds the core.
    """
    totals: dict[str, float] = collections.defaultdict(float)
    originals = dict(vars(kernels))

    def wrap(name: str, fn: Callable) -> Callable:
        def timed_kernel(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.thread_time() - start

        return timed_kernel

    for name, fn in originals.items():
        setattr(kernels, name, wrap(name, fn))
    result: dict[int, dict[str, float]] = {}
    try:
        for t in tokens_list:
            runs: dict[str, list[float]] = collections.defaultdict(list)
            for _ in range(repeats):
                totals.clear()
                start = time.thread_time()
                verifier.forward(t)
                runs["pass"].append(time.thread_time() - start)
                for name in originals:
                    runs[name].append(totals.get(name, 0.0))
            result[t] = {name: statistics.median(v) for name, v in runs.items()}
    finally:
        for name, fn in originals.items():
            setattr(kernels, name, fn)
    return result


def time_linears(tokens_list: list[int], repeats: int, seed: int = 0) -> dict[tuple[str, int, str], float]:
    """Median thread CPU seconds per call of each product, per (shape, T, linear)."""
    rng = np.random.default_rng(seed)
    result: dict[tuple[str, int, str], float] = {}
    for label, out_features, in_features in LINEAR_SHAPES:
        count = 30 if out_features * in_features < 5_000_000 else 2  # the LM head: one 113 MB matrix
        weights = [(rng.standard_normal((out_features, in_features)) * 0.05).astype(np.float32) for _ in range(count)]
        for t in tokens_list:
            x = rng.standard_normal((t, in_features)).astype(np.float32)
            runs: dict[str, list[float]] = {name: [] for name in LINEARS}
            for fn in LINEARS.values():
                fn(x, weights[0])
            for _ in range(repeats):
                for name, fn in LINEARS.items():
                    start = time.thread_time()
                    for w in weights:
                        fn(x, w)
                    runs[name].append((time.thread_time() - start) / count)
            for name, v in runs.items():
                result[label, t, name] = statistics.median(v)
    return result


def _attention_ways(kernels: Any, cache: Any, table: np.ndarray, q: np.ndarray, chunk: tuple, decodes: tuple, seq_len: int) -> dict[str, Callable[[int], Any]]:
    """The three ways ``time_attention`` times, each a function of the layer."""
    from kernels_ref.attention import gather_pages

    return {
        "as run (chunk)": lambda layer: kernels.paged_attention(q, cache.k[layer], cache.v[layer], *chunk, cache.scale),
        "as t decodes": lambda layer: kernels.paged_attention(q, cache.k[layer], cache.v[layer], *decodes, cache.scale),
        "gather alone": lambda layer: gather_pages(cache.k[layer], cache.v[layer], table, seq_len),
    }


def time_attention(verifier: Verifier, kernels: Any, tokens_list: list[int], repeats: int) -> dict[int, dict[str, float]]:
    """Per T: median wall seconds per pass (all layers) of the chunk's paged_attention three ways."""
    engine, cache = verifier.engine, verifier.engine.cache
    config = engine.model.config
    table = np.asarray(engine.kv.block_table(verifier.request.request_id), dtype=np.int64)
    rng = np.random.default_rng(1)
    result: dict[int, dict[str, float]] = {}
    for t in tokens_list:
        seq_len = verifier.context + t
        q = rng.standard_normal((t, config.num_heads, config.head_dim)).astype(np.float32)
        chunk = (table[None, :], np.array([0, t], dtype=np.int64), np.array([seq_len], dtype=np.int64))
        # the same causal attention as t one-token decodes: row j sees the first context + j + 1 tokens
        decodes = (np.repeat(table[None, :], t, axis=0), np.arange(t + 1, dtype=np.int64),
                   np.arange(verifier.context + 1, seq_len + 1, dtype=np.int64))  # fmt: skip
        ways = _attention_ways(kernels, cache, table, q, chunk, decodes, seq_len)
        np.testing.assert_allclose(ways["as run (chunk)"](0), ways["as t decodes"](0), atol=1e-4, rtol=1e-4)
        runs: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(repeats):
            for name, fn in ways.items():
                start = time.perf_counter()
                for layer in range(config.num_layers):
                    fn(layer)
                runs[name].append(time.perf_counter() - start)
        result[t] = {name: statistics.median(v) for name, v in runs.items()}
    return result


def plot(tokens_list: list[int], forward: dict[str, dict[int, float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(10, 4))
    for name, color in (("blas", "tab:orange"), ("compiled", "tab:blue")):
        ms = [1e3 * forward[name][t] for t in tokens_list]
        ax_t.plot(tokens_list, ms, "o-", color=color, label=f"linear: {name}")
        ax_r.plot([t - 1 for t in tokens_list], [m / ms[0] for m in ms], "o-", color=color, label=f"linear: {name}")
    ax_t.set(xlabel="tokens in the pass (k + 1)", ylabel="ms per forward pass (median)", title="forward pass")
    ax_r.axhline(1.3, color="gray", ls="--", lw=1, label="target r(4) <= 1.3")
    ax_r.set(xlabel="drafted tokens k", ylabel="r(k) = T(k+1) / T(1)", title="cost of verifying k drafts")
    for ax in (ax_t, ax_r):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,2,3,5,9,17", help="comma-separated T (the first should be 1)")
    parser.add_argument("--context", type=int, default=256, help="tokens already in the cache")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (medians shown)")
    parser.add_argument("--weights", default="fp32", help="weight format (nanoserve.quant)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for BLAS and the compiled kernels (default: nanoserve.threads' policy)")
    parser.add_argument("--skip-linear", action="store_true", help="skip the per-shape linear table")
    add_x_block_option(parser)
    parser.add_argument("--plot", default=None, help="figure path (default bench/results/forward_rows.png)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    tokens_list = [int(t) for t in args.tokens.split(",")]

    from nanoserve.engine import LLMEngine
    from nanoserve.model import load_checkpoint

    print(threads.apply(args.threads))
    set_x_block(args.x_block)
    print(environment())
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (others may be running)")
    loaded = load_checkpoint(None, args.weights)
    engine = LLMEngine(loaded=loaded, backend="cpu", prefix_cache="none", max_num_batched_tokens=max(256, args.context),
                       threads=args.threads)  # the engine applies its own thread count: pass --threads on
    verifier = Verifier(engine, loaded.tokenizer, args.context, max(tokens_list))
    kernels = engine.model.k  # the backend's kernel namespace, shared with the KV cache

    for t in tokens_list:  # the two linears give the same logits, within the kernel tolerance
        kernels.linear = LINEARS["blas"]
        want = verifier.forward(t)
        kernels.linear = LINEARS["compiled"]
        np.testing.assert_allclose(verifier.forward(t), want, atol=1e-3, rtol=1e-4)

    times = time_forward(verifier, kernels, tokens_list, args.repeats)
    med = {clock: {name: {t: statistics.median(times[name, t][clock]) for t in tokens_list} for name in LINEARS} for clock in ("wall", "cpu")}
    t1 = tokens_list[0]
    print(f"\nforward pass of T tokens after {args.context} of context, SmolLM2-135M {args.weights}, median of {args.repeats} (ms)")
    rows = []
    for t in tokens_list:
        row: list[Any] = [t]
        for clock in ("wall", "cpu"):
            for name in LINEARS:
                row.append(f"{1e3 * med[clock][name][t]:.1f}")
            for name in LINEARS:
                row.append(f"{med[clock][name][t] / med[clock][name][t1]:.2f}")
        rows.append(row)
    print_table(["T", "wall blas", "wall compiled", "r blas", "r compiled", "cpu blas", "cpu compiled", "r blas", "r compiled"], rows)

    linear = {} if args.skip_linear else time_linears(tokens_list, args.repeats)
    if linear:
        print(f"\nlinear alone, thread CPU ms per call, median of {args.repeats} (30 distinct weights per layer shape)")
        print_table(["shape", *[f"T={t} {n}" for t in tokens_list for n in ("blas", "comp")]],
                    [[label, *[f"{1e3 * linear[label, t, n]:.3f}" for t in tokens_list for n in LINEARS]] for label, _, _ in LINEAR_SHAPES])  # fmt: skip

    prof = profile_forward(verifier, kernels, tokens_list, args.repeats)
    names = [n for n in vars(kernels) if any(prof[t][n] > 0 for t in tokens_list)]
    print(f"\nwhere a pass goes (compiled linear), thread CPU ms per pass, median of {args.repeats}")
    print_table(["T", "pass", *names, "rest"],
                [[t, f"{1e3 * prof[t]['pass']:.1f}", *[f"{1e3 * prof[t][n]:.1f}" for n in names],
                  f"{1e3 * (prof[t]['pass'] - sum(prof[t][n] for n in names)):.1f}"] for t in tokens_list])  # fmt: skip

    attention = time_attention(verifier, kernels, tokens_list, args.repeats)
    ways = list(attention[t1])
    print(f"\npaged_attention of one T-token chunk at context {args.context}, wall ms per pass ({engine.model.config.num_layers} layers), median of {args.repeats}")
    print_table(["T", *ways], [[t, *[f"{1e3 * attention[t][w]:.2f}" for w in ways]] for t in tokens_list])

    title = f"SmolLM2-135M {args.weights}, cpu backend, context {args.context}, median of {args.repeats}"
    plot(tokens_list, med["wall"], args.plot or results_path("forward_rows.png"), title)
    write_json(args.json, {
        "environment": environment(), "threads": threads.describe(), "load_average": os.getloadavg(),
        "context": args.context, "repeats": args.repeats, "tokens": tokens_list,
        "forward_median_s": {clock: {n: {str(t): v for t, v in d.items()} for n, d in m.items()} for clock, m in med.items()},
        "linear_median_s": {f"{label} T={t} {n}": v for (label, t, n), v in linear.items()},
        "profile_median_s": {str(t): p for t, p in prof.items()},
        "attention_median_s": {str(t): a for t, a in attention.items()},
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

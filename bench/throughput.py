"""Offline serving throughput: many requests at once, nanoserve versus HF transformers and llama.cpp.

Workload (fixed by ``--seed``): 32 requests, prompt lengths uniform in [64, 256] tokens
(random token ids from the vocabulary, special tokens excluded), output lengths uniform in
[64, 256] tokens, greedy, EOS ignored. Every request arrives at t = 0.

    nanoserve     LLMEngine: continuous batching, chunked prefill, paged KV cache,
                  up to --parallel (32) requests in flight, --max-num-batched-tokens per step
    transformers  model.generate in static batches of --hf-batch-size (8), in arrival order,
                  left-padded; a batch runs until its longest request is done
    llama.cpp     llama-cpp-python (through bench/llama_cpp_peer.py) running the same requests
                  with continuous batching at the same parallelism; and/or llama.cpp's own
                  llama-batched-bench (--llama-batched-bench PATH) with every request at the
                  workload's mean lengths (-npp 160 -ntg 160 -npl 32): a close proxy, not the
                  same requests

Reported per engine: output tokens/s (all output tokens / wall time), mean time to first
token (from t = 0), mean time per output token (after the first), and the ratios
nanoserve / peer. For nanoserve also the KV memory at peak load against what a contiguous
cache would reserve for the same requests (max_model_len slots each, and, more kindly,
the workload's longest prompt + output each).

    python bench/throughput.py                        # the full workload (minutes)
    python bench/throughput.py --quick                # 4 short requests: a smoke test
    python bench/throughput.py --python-llama VENV/bin/python --llama-batched-bench VENV/llama.cpp/bin/llama-batched-bench
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import numpy as np  # noqa: E402

from bench.benchlib import (  # noqa: E402
    PeerUnavailable,
    default_gguf,
    environment,
    hf_version,
    load_hf,
    print_table,
    results_path,
    run_llama_cpp,
    warm_up,
    write_json,
)
from nanoserve import config  # noqa: E402
from nanoserve.config import EngineConfig  # noqa: E402


def make_workload(tokenizer: Any, vocab_size: int, n: int, lo: int, hi: int, seed: int) -> list[tuple[list[int], int]]:
    """``n`` (prompt token ids, output length) pairs; lengths uniform in [lo, hi]."""
    rng = np.random.default_rng(seed)
    special = set(tokenizer.backend.get_added_tokens_decoder())
    ordinary = np.array([t for t in range(vocab_size) if t not in special])
    prompt_lens = rng.integers(lo, hi + 1, n)
    output_lens = rng.integers(lo, hi + 1, n)
    return [(rng.choice(ordinary, int(p)).tolist(), int(o)) for p, o in zip(prompt_lens, output_lens, strict=True)]


def summarize(wall: float, output_tokens: int, ttft: list[float], tpot: list[float | None]) -> dict[str, Any]:
    tpot_known = [t for t in tpot if t is not None]
    return {
        "wall_s": wall,
        "output_tokens": output_tokens,
        "output_tps": output_tokens / wall,
        "mean_ttft_s": float(np.mean(ttft)),
        "mean_tpot_s": float(np.mean(tpot_known)) if tpot_known else None,
    }


# --- nanoserve ------------------------------------------------------------------------------
def bench_nanoserve(loaded: Any, workload: list[tuple[list[int], int]], args: argparse.Namespace) -> dict[str, Any]:
    from nanoserve.cache.paged import bytes_per_block
    from nanoserve.engine import LLMEngine
    from nanoserve.sampling import SamplingParams

    engine = LLMEngine(config.from_args(EngineConfig, args, max_num_seqs=args.parallel), loaded=loaded)
    warm_up(engine, workload[0][0])
    start, start_clock = time.perf_counter(), time.monotonic()  # step_stats use the monotonic clock
    ids = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)) for p, n in workload]
    final: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    wall = time.perf_counter() - start
    outs = [final[i] for i in ids]
    bad = [o.request_id for o in outs if o.finish_reason != "length"]
    if bad:
        raise RuntimeError(f"requests {bad} did not finish by length: {[final[b].finish_reason for b in bad]}")
    result = summarize(wall, sum(len(o.token_ids) for o in outs), [o.time_to_first_token for o in outs], [o.time_per_output_token for o in outs])

    # KV memory: the step holding the most tokens is the peak load
    pool = engine.stats()
    B = pool.block_size
    per_slot = bytes_per_block(loaded.config, B, args.kv_cache_dtype) // B
    stats = list(engine.step_stats)
    held = [s.kv_utilization * s.blocks_used * B for s in stats]
    peak = int(np.argmax(held))
    s = stats[peak]
    longest = max(len(p) + n for p, n in workload)
    result["kv"] = {
        "num_blocks": pool.num_blocks,
        "block_size": B,
        "bytes_per_token": per_slot,
        "peak_pool_usage": max(st.blocks_used for st in stats) / pool.num_blocks,
        "peak_step": s.step,
        "peak_running": s.num_running,
        "peak_tokens_held": int(round(held[peak])),
        "paged_slots": s.blocks_used * B,
        "contiguous_max_model_len": engine.max_model_len,
        "contiguous_slots": s.num_running * engine.max_model_len,
        "contiguous_workload_len": longest,
        "contiguous_workload_slots": s.num_running * longest,
        "timeline": {
            "step": [st.step for st in stats],
            "time": [st.time - start_clock for st in stats],
            "held": held,
            "paged": [st.blocks_used * B for st in stats],
            "running": [st.num_running for st in stats],
        },
        "preemptions": sum(st.preemptions for st in stats),
        "steps": len(stats),
    }
    return result


# --- HF transformers --------------------------------------------------------------------------
class _StepClock:
    """A generate() streamer that only notes when each step's tokens come out."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def bench_hf(gguf: str, workload: list[tuple[list[int], int]], args: argparse.Namespace) -> dict[str, Any]:
    model, torch = load_hf(gguf, args.threads)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ttft: list[float] = []
    tpot: list[float | None] = []
    wasted = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(workload), args.hf_batch_size):
            batch = workload[b : b + args.hf_batch_size]
            width = max(len(p) for p, _ in batch)
            new = max(n for _, n in batch)
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch])  # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
            clock = _StepClock()
            model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=pad, streamer=clock,
            )
            steps = clock.times[1:]  # the first put() is the prompt
            for _, n in batch:
                ttft.append(steps[0] - start)
                tpot.append((steps[n - 1] - steps[0]) / (n - 1) if n > 1 else None)
                wasted += new - n
    wall = time.perf_counter() - start
    result = summarize(wall, sum(n for _, n in workload), ttft, tpot)
    result["wasted_tokens"] = wasted  # computed for finished requests while their batch ran on
    result["version"] = hf_version()
    return result


# --- llama.cpp -----------------------------------------------------------------------------------
def bench_llama_cpp_python(gguf: str, workload: list[tuple[list[int], int]], args: argparse.Namespace) -> dict[str, Any]:
    job = {
        "mode": "batched",
        "model_path": gguf,
        "prompts": [p for p, _ in workload],
        "output_lens": [n for _, n in workload],
        "parallel": args.parallel,
        "threads": args.threads,
    }
    r = run_llama_cpp(job, args.python_llama)
    result = summarize(r["wall_s"], r["output_tokens"], r["ttft_s"], r["tpot_s"])
    result["version"] = f"llama-cpp-python {r['version']}"
    return result


def parse_batched_bench(text: str) -> list[dict[str, float]]:
    """Rows of llama-batched-bench's table: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |."""
    keys = ["pp", "tg", "pl", "n_kv", "t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed"]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(keys) and all(re.fullmatch(r"-?\d+(\.\d+)?", c) for c in cells):
            rows.append(dict(zip(keys, map(float, cells), strict=True)))
    return rows


def bench_batched_bench(binary: str, gguf: str, workload: list[tuple[list[int], int]], args: argparse.Namespace) -> dict[str, Any]:
    npp = int(round(np.mean([len(p) for p, _ in workload])))
    ntg = int(round(np.mean([n for _, n in workload])))
    npl = args.parallel
    cmd = [binary, "-m", gguf, "-c", str(npl * (npp + ntg)), "-b", "2048", "-ub", "512",
           "-npp", str(npp), "-ntg", str(ntg), "-npl", str(npl), "-t", str(args.threads)]
    print("  " + " ".join(os.path.basename(c) if i == 0 else c for i, c in enumerate(cmd)), flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerUnavailable(f"could not run {binary}: {exc}") from exc
    rows = parse_batched_bench(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0 or not rows:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        if proc.returncode == -4:
            how += ", SIGILL: the binary uses CPU instructions this machine lacks; rebuild it for this CPU"
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise PeerUnavailable(f"llama-batched-bench gave no result ({how}): {tail}")
    row = rows[-1]
    # all prompts are prefilled first, then all sequences decode together
    return {
        "wall_s": row["t"],
        "output_tokens": int(row["pl"] * row["tg"]),
        "output_tps": row["pl"] * row["tg"] / row["t"],
        "mean_ttft_s": row["t_pp"],
        "mean_tpot_s": row["t_tg"] / row["tg"],
        "table_row": row,
        "shape": f"npp={npp} ntg={ntg} npl={npl}",
    }


# --- report -----------------------------------------------------------------------------------
def plot(rows: list[dict[str, Any]], kv: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    names = [r["short"] for r in rows]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:olive"][: len(rows)]
    panels = [("output_tps", "output tokens/s", 1), ("mean_ttft_s", "mean time to first token (s)", 1), ("mean_tpot_s", "mean time per output token (ms)", 1000)]
    for ax, (key, label, scale) in zip(axes.flat, panels, strict=False):  # the fourth axes is drawn below
        values = [(r[key] or 0) * scale for r in rows]
        bars = ax.bar(range(len(rows)), values, color=colors)
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), names, fontsize=8)
        ax.set_title(label, fontsize=10)
    ax = axes.flat[3]
    tl = kv["timeline"]
    t = np.array(tl["time"])
    mib = kv["bytes_per_token"] / 2**20
    ax.plot(t, np.array(tl["running"]) * kv["contiguous_max_model_len"] * mib, color="tab:red", label=f"contiguous, {kv['contiguous_max_model_len']} slots/request")
    ax.plot(t, np.array(tl["running"]) * kv["contiguous_workload_len"] * mib, color="tab:red", ls="--", label=f"contiguous, {kv['contiguous_workload_len']} slots/request")
    ax.plot(t, np.array(tl["paged"]) * mib, color="tab:blue", label="paged: blocks allocated")
    ax.plot(t, np.array(tl["held"]) * mib, color="k", ls=":", label="tokens held")
    ax.set_yscale("log")
    ax.set_xlabel("seconds since start (nanoserve run)")
    ax.set_ylabel("KV memory (MiB)")
    ax.set_title("nanoserve KV memory vs a contiguous reservation", fontsize=10)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    plt.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=64, help="shortest prompt and output, in tokens")
    ap.add_argument("--max-len", type=int, default=256, help="longest prompt and output, in tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parallel", type=int, default=32, help="requests in flight: nanoserve max_num_seqs, llama.cpp sequences")
    engine_fields = ("model", "backend", "weights", "block_size", "kv_cache_memory", "kv_cache_dtype", "max_num_batched_tokens")
    config.add_arguments(ap, EngineConfig, "nanoserve engine (--model is every engine's GGUF file)", only=engine_fields)
    ap.add_argument("--threads", type=int, default=2, help="threads for torch and llama.cpp")
    ap.add_argument("--hf-batch-size", type=int, default=8)
    ap.add_argument("--skip-hf", action="store_true", help="do not run HF transformers")
    ap.add_argument("--skip-llama", action="store_true", help="do not run llama-cpp-python")
    ap.add_argument("--python-llama", metavar="PATH", help="python of a venv with llama-cpp-python, if it is not importable here")
    ap.add_argument("--llama-batched-bench", metavar="PATH", help="llama.cpp's llama-batched-bench binary (also run it)")
    ap.add_argument("--quick", action="store_true", help="4 requests of 16-32 tokens, parallelism 4: a smoke test")
    ap.add_argument("--plot", default=None, help="where to write the figure (default: bench/results/throughput[_quick].png)")
    ap.add_argument("--json", default=None, help="also write all numbers to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_requests, args.min_len, args.max_len, args.parallel, args.hf_batch_size = 4, 16, 32, 4, 2

    from nanoserve.model import load_checkpoint

    gguf = args.model or default_gguf()
    loaded = load_checkpoint(gguf, args.weights)
    workload = make_workload(loaded.tokenizer, loaded.config.vocab_size, args.num_requests, args.min_len, args.max_len, args.seed)
    print(environment())
    print(
        f"model {os.path.basename(gguf)}; {len(workload)} requests, prompts and outputs uniform in "
        f"[{args.min_len}, {args.max_len}] tokens (seed {args.seed}): {sum(len(p) for p, _ in workload)} prompt + "
        f"{sum(n for _, n in workload)} output tokens\n"
    )

    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    print("nanoserve ...", flush=True)
    results["nanoserve"] = bench_nanoserve(loaded, workload, args)
    results["nanoserve"].update(engine=f"nanoserve ({args.backend}, {args.weights}, KV {args.kv_cache_dtype})", short="nanoserve", parallel=f"{args.parallel}, continuous")
    if not args.skip_hf:
        print("HF transformers ...", flush=True)
        try:
            results["hf"] = bench_hf(gguf, workload, args)
            results["hf"].update(engine="transformers (fp32)", short=f"transformers\nstatic x{args.hf_batch_size}", parallel=f"{args.hf_batch_size}, static")
        except PeerUnavailable as exc:
            skipped["HF transformers"] = str(exc)
    if not args.skip_llama:
        print("llama.cpp (llama-cpp-python) ...", flush=True)
        try:
            results["llama-cpp-python"] = bench_llama_cpp_python(gguf, workload, args)
            results["llama-cpp-python"].update(engine="llama.cpp (Q4_1), llama-cpp-python", short="llama.cpp\nPython", parallel=f"{args.parallel}, continuous")
        except PeerUnavailable as exc:
            skipped["llama.cpp (llama-cpp-python)"] = str(exc)
    if args.llama_batched_bench:
        print("llama.cpp (llama-batched-bench) ...", flush=True)
        try:
            r = bench_batched_bench(args.llama_batched_bench, gguf, workload, args)
            r.update(engine=f"llama.cpp (Q4_1), batched-bench {r['shape']}", short="llama.cpp\nbatched-bench", parallel=f"{args.parallel}, all at once")
            results["batched-bench"] = r
        except PeerUnavailable as exc:
            skipped["llama.cpp (llama-batched-bench)"] = str(exc)

    ns = results["nanoserve"]
    rows = list(results.values())

    def ratio(a: float | None, b: float | None) -> str | None:
        return f"{a / b:.2f}x" if a and b else None

    print()
    print_table(
        ["engine", "parallelism", "wall s", "output tok/s", "mean TTFT s", "mean TPOT ms", "peak KV use", "tok/s ns/peer", "TTFT ns/peer", "TPOT ns/peer"],
        [
            [
                r["engine"],
                r["parallel"],
                f"{r['wall_s']:.1f}",
                f"{r['output_tps']:.1f}",
                f"{r['mean_ttft_s']:.2f}",
                f"{1000 * r['mean_tpot_s']:.1f}" if r["mean_tpot_s"] else None,
                f"{r['kv']['peak_pool_usage']:.0%} of pool" if "kv" in r else None,
                ratio(ns["output_tps"], r["output_tps"]) if r is not ns else None,
                ratio(ns["mean_ttft_s"], r["mean_ttft_s"]) if r is not ns else None,
                ratio(ns["mean_tpot_s"], r["mean_tpot_s"]) if r is not ns else None,
            ]
            for r in rows
        ],
    )
    print("\nratios are nanoserve / peer: above 1 is better for tok/s, below 1 is better for TTFT and TPOT.")
    if "hf" in results:
        print(f"transformers static batches computed {results['hf']['wasted_tokens']} extra tokens for requests already done.")
    if "batched-bench" in results:
        print("llama-batched-bench runs every sequence at the mean lengths; its TTFT is the time to prefill all prompts, its TPOT T_TG / TG.")
    for r in rows:
        if r.get("version"):
            print(f"{r['engine']}: {r['version']}")
    for name, reason in skipped.items():
        print(f"{name}: skipped ({reason})")

    kv = ns["kv"]
    mib = kv["bytes_per_token"] / 2**20
    print(
        f"\nnanoserve KV memory at peak load (step {kv['peak_step']} of {kv['steps']}, {kv['peak_running']} requests running, "
        f"{kv['peak_tokens_held']} tokens held; pool {kv['num_blocks']} blocks x {kv['block_size']}; {kv['preemptions']} preemptions):"
    )
    print_table(
        ["KV layout", "slots reserved", "MiB", "holding tokens"],
        [
            ["paged (blocks allocated)", kv["paged_slots"], f"{kv['paged_slots'] * mib:.0f}", f"{kv['peak_tokens_held'] / kv['paged_slots']:.1%}"],
            [f"contiguous, max_model_len = {kv['contiguous_max_model_len']} per request", kv["contiguous_slots"], f"{kv['contiguous_slots'] * mib:.0f}", f"{kv['peak_tokens_held'] / kv['contiguous_slots']:.1%}"],
            [f"contiguous, longest request = {kv['contiguous_workload_len']} per request", kv["contiguous_workload_slots"], f"{kv['contiguous_workload_slots'] * mib:.0f}", f"{kv['peak_tokens_held'] / kv['contiguous_workload_slots']:.1%}"],
        ],
    )

    name = "throughput_quick.png" if args.quick else "throughput.png"
    plot(rows, kv, args.plot or results_path(name), f"SmolLM2-135M, {len(workload)} requests, lengths in [{args.min_len}, {args.max_len}], seed {args.seed}")
    write_json(args.json, {"environment": environment(), "args": vars(args), "results": results, "skipped": skipped})


if __name__ == "__main__":
    main()

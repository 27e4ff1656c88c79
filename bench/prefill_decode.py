"""Prefill and single-stream decode speed: nanoserve versus llama.cpp (and HF transformers).

Workload (the same token ids for every engine, greedy, EOS ignored):

    prefill   one forward pass over a 128-token prompt, up to the first output token
              -> prefill tokens/s = 128 / that time
    decode    then 128 more tokens, one forward pass of one token each
              -> decode tokens/s = 128 / their total time

Each number is the median of ``--runs`` runs (after one warm-up run). All engines read the
same GGUF file of SmolLM2-135M-Instruct: nanoserve and transformers dequantize it to float32
weights; llama.cpp runs the file's own Q4_1 weights (4-bit matrices, 8-bit activations in
its matmuls), so it moves ~6x fewer weight bytes per decoded token.

    python bench/prefill_decode.py                       # nanoserve + llama.cpp if importable
    python bench/prefill_decode.py --hf                  # + HF transformers
    python bench/prefill_decode.py --python-llama VENV/bin/python   # llama.cpp from another venv
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from bench.benchlib import (  # noqa: E402
    PeerUnavailable,
    default_gguf,
    environment,
    hf_version,
    load_hf,
    median,
    print_table,
    results_path,
    run_llama_cpp,
    write_json,
)
from nanoserve import config  # noqa: E402
from nanoserve.config import EngineConfig  # noqa: E402

PROMPT_TEXT = (
    "The history of computing is a story of abstractions. Early machines were programmed by "
    "rewiring panels; later, stored programs let the same hardware run any algorithm. Compilers "
    "turned readable code into machine instructions, operating systems shared one processor among "
    "many programs, and networks joined computers into systems that no single person fully "
    "understands. Each layer hides the details of the one below it, so that people can think about "
    "problems instead of transistors. Language models are the newest layer: they turn text into "
    "numbers, push those numbers through billions of multiplications, and turn the result back into "
    "text, one token at a time. Serving them efficiently is again a question of memory, batching "
    "and scheduling, the oldest questions in computing."
)


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    """The first ``n`` token ids of a fixed English text (repeated if it is too short)."""
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(PROMPT_TEXT + " ")
    return ids[:n]


def bench_nanoserve(loaded: Any, prompt: list[int], new_tokens: int, runs: int, weights: str, backend: str) -> dict[str, Any]:
    """Prefill = the engine step computing the whole prompt; decode = the ``new_tokens`` steps after it."""
    from nanoserve.engine import LLMEngine
    from nanoserve.sampling import SamplingParams

    total = len(prompt) + new_tokens + 1
    block_size = 16
    engine = LLMEngine(
        EngineConfig(backend=backend, weights=weights, block_size=block_size, num_blocks=-(-total // block_size) + 1, max_num_batched_tokens=max(512, len(prompt))),
        loaded=loaded,
    )
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens + 1, ignore_eos=True)
    prefill_s, decode_s, tokens = [], [], []
    for run in range(runs + 1):
        engine.add_request(prompt, params)
        t0 = time.perf_counter()
        outputs = engine.step()  # the whole prompt in one step -> first token
        t1 = time.perf_counter()
        while engine.has_unfinished_requests():
            outputs = engine.step()
        t2 = time.perf_counter()
        assert outputs[-1].finished and len(outputs[-1].token_ids) == new_tokens + 1
        if run > 0:  # run 0 warms up
            prefill_s.append(t1 - t0)
            decode_s.append(t2 - t1)
        tokens = outputs[-1].token_ids
    return {"prefill_s": prefill_s, "decode_s": decode_s, "token_ids": tokens}


def bench_hf(gguf: str, prompt: list[int], new_tokens: int, runs: int, threads: int) -> dict[str, Any]:
    """The same two loops over transformers' forward with its KV cache (``past_key_values``)."""
    model, torch = load_hf(gguf, threads)
    ids = torch.tensor([prompt], dtype=torch.long)
    prefill_s, decode_s, tokens = [], [], []
    with torch.inference_mode():
        for run in range(runs + 1):
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            token = out.logits[0, -1].argmax()
            t1 = time.perf_counter()
            generated = [int(token)]
            for _ in range(new_tokens):
                out = model(input_ids=token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[0, -1].argmax()
                generated.append(int(token))
            t2 = time.perf_counter()
            if run > 0:
                prefill_s.append(t1 - t0)
                decode_s.append(t2 - t1)
            tokens = generated
    return {"prefill_s": prefill_s, "decode_s": decode_s, "token_ids": tokens, "version": hf_version()}


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading greedy tokens two engines agree on."""
    n = 0
    for x, y in zip(a, b, strict=False):  # stop at the shorter
        if x != y:
            break
        n += 1
    return n


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["engine"] for r in rows]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"][: len(rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(axes, ("prefill_tps", "decode_tps"), ("prefill tokens/s (128-token prompt)", "decode tokens/s (1 stream, 128 tokens)"), strict=True):
        values = [r[key] for r in rows]
        bars = ax.bar(range(len(rows)), values, color=colors)
        for bar, r in zip(bars, rows, strict=True):
            text = f"{r[key]:.0f}" + (f"\nnanoserve {r[key.replace('tps', 'ratio')]:.2f}x" if r.get(key.replace("tps", "ratio")) else "")
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), names, fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_ylim(0, max(values) * 1.3)
    fig.suptitle(title, fontsize=10)
    plt.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per engine (the median is reported)")
    ap.add_argument("--threads", type=int, default=2, help="threads for torch and llama.cpp (NumPy's BLAS uses its own default)")
    config.add_arguments(ap, EngineConfig, "nanoserve engine (--model is every engine's GGUF file)", only=("model", "backend", "weights"))
    ap.add_argument("--hf", action="store_true", help="also run HF transformers (loads in ~15 s)")
    ap.add_argument("--skip-llama", action="store_true", help="do not run llama.cpp")
    ap.add_argument("--python-llama", metavar="PATH", help="python of a venv with llama-cpp-python, if it is not importable here")
    ap.add_argument("--plot", default=None, help="where to write the figure (default: bench/results/prefill_decode.png)")
    ap.add_argument("--json", default=None, help="also write all raw timings to this JSON file")
    args = ap.parse_args(argv)

    from nanoserve.model import load_checkpoint

    gguf = args.model or default_gguf()
    loaded = load_checkpoint(gguf, args.weights)
    prompt = prompt_ids(loaded.tokenizer, args.prompt_tokens)
    print(environment())
    print(f"model {os.path.basename(gguf)}; prompt {len(prompt)} tokens; {args.new_tokens} decode tokens; median of {args.runs} runs\n")

    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    print("nanoserve ...", flush=True)
    results["nanoserve"] = bench_nanoserve(loaded, prompt, args.new_tokens, args.runs, args.weights, args.backend)
    results["nanoserve"]["label"] = f"nanoserve ({args.backend}, {args.weights})"
    if args.hf:
        print("HF transformers ...", flush=True)
        try:
            results["hf"] = bench_hf(gguf, prompt, args.new_tokens, args.runs, args.threads)
            results["hf"]["label"] = "transformers (fp32)"
        except PeerUnavailable as exc:
            skipped["HF transformers"] = str(exc)
    if not args.skip_llama:
        print("llama.cpp ...", flush=True)
        job = {"mode": "single", "model_path": gguf, "prompt_ids": prompt, "new_tokens": args.new_tokens, "runs": args.runs + 1, "threads": args.threads}
        try:
            r = run_llama_cpp(job, args.python_llama)
            r["prefill_s"], r["decode_s"] = r["prefill_s"][1:], r["decode_s"][1:]  # drop the warm-up run
            r["label"] = "llama.cpp (Q4_1)"
            results["llama.cpp"] = r
        except PeerUnavailable as exc:
            skipped["llama.cpp"] = str(exc)

    base = results["nanoserve"]
    rows = []
    for key, r in results.items():
        prefill, decode = median(r["prefill_s"]), median(r["decode_s"])
        rows.append({
            "engine": r["label"],
            "prefill_ms": 1000 * prefill,
            "prefill_tps": len(prompt) / prefill,
            "decode_ms": 1000 * decode / args.new_tokens,
            "decode_tps": args.new_tokens / decode,
            "agree": agreement(base["token_ids"], r["token_ids"]) if key != "nanoserve" else None,
        })
    ns = rows[0]
    for row in rows[1:]:
        row["prefill_ratio"] = ns["prefill_tps"] / row["prefill_tps"]
        row["decode_ratio"] = ns["decode_tps"] / row["decode_tps"]
    print()
    print_table(
        ["engine", "prefill ms", "prefill tok/s", "decode ms/tok", "decode tok/s", "nanoserve/peer prefill", "nanoserve/peer decode", "greedy tokens = nanoserve's"],
        [
            [
                row["engine"],
                f"{row['prefill_ms']:.1f}",
                f"{row['prefill_tps']:.0f}",
                f"{row['decode_ms']:.2f}",
                f"{row['decode_tps']:.1f}",
                f"{row['prefill_ratio']:.2f}x" if "prefill_ratio" in row else None,
                f"{row['decode_ratio']:.2f}x" if "decode_ratio" in row else None,
                f"{row['agree']}/{args.new_tokens + 1}" if row["agree"] is not None else None,
            ]
            for row in rows
        ],
    )
    for name, reason in skipped.items():
        print(f"\n{name}: skipped ({reason})")
    print("\nratio = nanoserve tokens/s divided by the peer's (above 1: nanoserve is faster).")
    if "llama.cpp" in results:
        print("llama.cpp runs Q4_1 weights with 8-bit activations, so its greedy tokens may differ from the fp32 engines'.")
    for key in ("hf", "llama.cpp"):
        if key in results and results[key].get("version"):
            print(f"{results[key]['label']}: {results[key]['version']}")

    plot(rows, args.plot or results_path("prefill_decode.png"), f"SmolLM2-135M, {len(prompt)}-token prompt, {args.new_tokens} greedy tokens, median of {args.runs}")
    write_json(args.json, {"environment": environment(), "prompt_ids": prompt, "rows": rows, "raw": results, "skipped": skipped})


if __name__ == "__main__":
    main()

"""Speculative decoding: speed, acceptance and the cost of verification, against speculation off.

    python bench/speculative.py                                  # nanoserve only (~30 minutes: 3 rounds)
    python bench/speculative.py --llama-server PATH/llama-server # and llama.cpp's speculation
    python bench/speculative.py --quick                          # a smoke test (a minute)

Workloads (greedy, EOS ignored, ``--max-tokens`` each, through SmolLM2's chat template):

    copy-heavy   rewrite code with a variable renamed, reformat a JSON list, fix the spelling
                 of a paragraph, answer by quoting a pasted document ... (8 prompts)
    chat         open-ended questions (8 prompts)

For each workload, one stream (the first 4 prompts one after another) and 8 streams (all 8
at once), with speculation off, ``ngram`` at k in ``--ks`` and ``draft`` (the same file with
``--draft-weights``, "quantized self-speculation") at k in ``--draft-ks``. Reported:

    tok/s         one stream: decode rate, (tokens - 1) / (last token - first token), median
                  over the prompts; 8 streams: all output tokens / wall time. Each
                  configuration keeps one engine (prefix cache off) and runs ``--rounds``
                  times, every configuration in turn, so that the machine's drift hits all
                  alike; the figure is the median of the rounds
    vs off        the ratio to speculation off in the same run
    accept        accepted drafts / drafts verified;  mean len: tokens committed per verification
    per position  acceptance rate at draft position 1, 2, ..
    same tokens   whether every output equals speculation off's, token for token

and r(k) = T(k + 1 tokens) / T(1 token): one forward pass of one sequence at context 256,
median of ``--repeats``. llama.cpp's llama-server (``--spec-type ngram-simple``, and
``-md`` with the same GGUF as its own draft) runs the same prompts where a binary is given.
Results go to ``bench/results/speculative.json`` and ``speculative.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import httpx  # noqa: E402

from bench.benchlib import environment, median, print_table, results_path, warm_up, write_json  # noqa: E402
from bench.serve import free_port, stop, wait_ready  # noqa: E402
from nanoserve import threads  # noqa: E402
from nanoserve.config import EngineConfig  # noqa: E402
from nanoserve.engine import LLMEngine  # noqa: E402
from nanoserve.interfaces import ScheduledBatch  # noqa: E402
from nanoserve.llm import LLM  # noqa: E402
from nanoserve.model.loader import LoadedModel, load_checkpoint  # noqa: E402
from nanoserve.model.registry import resolve_model  # noqa: E402
from nanoserve.sampling import SamplingParams  # noqa: E402

CODE = '''def total_price(items, tax):
    x = 0
    for item in items:
        x = x + item["price"] * item["quantity"]
    x = x * (1 + tax)
    return round(x, 2)


def cheapest(items):
    x = None
    for item in items:
        if x is None or item["price"] < x["price"]:
            x = item
    return x
'''
JSON_LIST = (
    '[{"name": "apple", "color": "red", "price": 1.2}, {"name": "banana", "color": "yellow", "price": 0.5}, '
    '{"name": "cherry", "color": "red", "price": 3.0}, {"name": "grape", "color": "green", "price": 2.1}, '
    '{"name": "lemon", "color": "yellow", "price": 0.8}, {"name": "plum", "color": "purple", "price": 1.7}]'
)
PARAGRAPH = (
    "The libary opens at nine in the morning and closes at six in the evening. Visitors can borow up to "
    "five books at a time, and each book may be kept for two weeks. Late returns are charged ten cents a "
    "day. The reading room on the second floor is quiet, and the childrens section has a story hour every "
    "Saturday morning at ten."
)
DOCUMENT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. It "
    "was the entrance arch to the 1889 World's Fair. The tower is 330 metres tall, about the same height "
    "as an 81-storey building, and it was the tallest man-made structure in the world until 1930."
)
COPY_HEAVY = [
    f"Rewrite this Python code, renaming the variable x to total. Output only the code.\n\n{CODE}",
    f"Reformat this JSON list with one object per line. Output only the JSON.\n\n{JSON_LIST}",
    f"Fix the spelling mistakes in this paragraph and repeat it in full.\n\n{PARAGRAPH}",
    f"Here is a document.\n\n{DOCUMENT}\n\nCopy the sentences of the document that mention Gustave Eiffel and 1889.",
    f"Add a docstring to each function of this code and output the whole code.\n\n{CODE}",
    f"Convert this JSON list to a YAML list.\n\n{JSON_LIST}",
    f"Repeat this paragraph, replacing every 'book' with 'novel'.\n\n{PARAGRAPH}",
    f"Here is a document.\n\n{DOCUMENT}\n\nRepeat the document word for word.",
]
CHAT = [
    "What are three good habits for staying healthy?",
    "Tell me a short story about a robot who learns to paint.",
    "Why is the sky blue? Explain it to a child.",
    "Give me some tips for learning a new language.",
    "What should I pack for a weekend trip to the mountains?",
    "Describe your ideal weekend.",
    "How do plants make their food?",
    "Write a friendly email inviting my team to lunch.",
]


@dataclass
class Run:
    workload: str
    streams: int
    engine: str  # "nanoserve" | "llama-server"
    method: str  # "off" | "ngram" | "draft"
    k: int
    tok_s: float
    vs_off: float | None = None
    acceptance: float | None = None
    mean_len: float | None = None
    per_position: list[float] = field(default_factory=list)
    same_tokens: bool | None = None
    tokens: list[list[int]] = field(default_factory=list, repr=False)
    rounds: list[float] = field(default_factory=list)  # tok/s of each round (nanoserve)


def chat_prompts(loaded: LoadedModel, texts: list[str]) -> list[list[int]]:
    tok = loaded.tokenizer
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]), add_special_tokens=False) for t in texts]


def build(loaded: LoadedModel, args: argparse.Namespace, method: str, k: int, streams: int) -> LLMEngine:
    cfg = EngineConfig(
        model=args.model, backend=args.backend, weights="fp32", max_num_seqs=max(8, streams), speculative="none" if method == "off" else method,
        num_speculative_tokens=k, draft_weights=args.draft_weights, threads=args.threads, prefix_cache="none",
    )
    engine = LLMEngine(cfg, loaded=loaded)
    warm_up(engine, list(range(100, 140)))
    return engine


def run_nanoserve(engine: LLMEngine, prompts: list[list[int]], streams: int, max_tokens: int) -> tuple[float, list[list[int]]]:
    """(tok/s, outputs) as the module docstring defines tok/s."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm = LLM(engine=engine)
    if streams == 1:
        rates, outs = [], []
        for p in prompts:
            out = llm.generate([p], params, use_tqdm=False)[0]
            rates.append((len(out.token_ids) - 1) / (out.finish_time - out.first_token_time))
            outs.append(out.token_ids)
        return median(rates), outs
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    return sum(len(o.token_ids) for o in results) / wall, [o.token_ids for o in results]


def measure_nanoserve(loaded: LoadedModel, args: argparse.Namespace, workload: str, prompts: list[list[int]],
                      streams: int) -> list[Run]:  # fmt: skip
    """Every configuration's engine is built once; ``--rounds`` rounds then run them in turn.

    This machine's speed drifts by 10-35% over minutes, so one configuration run after
    another measures the drift as much as the configuration. Interleaved, a drift hits
    every configuration alike, and each one's tok/s is the median of its rounds.
    """
    configs = [("off", 0)] + [("ngram", k) for k in args.ks] + [("draft", k) for k in args.draft_ks if streams in args.draft_streams]
    engines = [build(loaded, args, method, max(k, 1), streams) for method, k in configs]
    rates: list[list[float]] = [[] for _ in configs]
    outputs: list[list[list[int]]] = [[] for _ in configs]
    for round_ in range(args.rounds):
        for i, ((method, k), engine) in enumerate(zip(configs, engines)):
            tok_s, outputs[i] = run_nanoserve(engine, prompts, streams, args.max_tokens)
            rates[i].append(tok_s)
            print(f"  {workload:10s} {streams} stream(s)  {method:5s} k={k}  round {round_ + 1}  {tok_s:7.1f} tok/s", flush=True)
    runs: list[Run] = []
    for (method, k), engine, r, outs in zip(configs, engines, rates, outputs):
        spec = engine.stats().spec_decoding  # counted over all rounds
        run = Run(workload, streams, "nanoserve", method, k, median(r), tokens=outs, rounds=r)
        if method != "off":
            run.acceptance, run.mean_len = spec.acceptance_rate, spec.mean_acceptance_length
            run.per_position = [a / spec.num_drafts if spec.num_drafts else 0.0 for a in spec.num_accepted_tokens_per_pos]
        runs.append(run)
    off = runs[0]
    for run in runs[1:]:
        run.vs_off = run.tok_s / off.tok_s
        run.same_tokens = all(a == b[: len(a)] for a, b in zip(run.tokens, off.tokens))
    return runs


def forward_ratios(loaded: LoadedModel, args: argparse.Namespace, ks: list[int]) -> dict[int, float]:
    """r(k) = T(k + 1 tokens) / T(1 token) for one sequence at context 256 (median of repeats)."""
    engine = build(loaded, args, "ngram", 8, 1)
    engine.speculator.propose = lambda requests: None  # type: ignore[union-attr]  (drafts are set by hand)
    rid = engine.add_request(list(range(1000, 1256)), SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    engine.step()  # the prompt: the request now decodes at context 256
    request = engine.requests[rid]
    times: dict[int, float] = {}
    for k in [0] + ks:
        request.spec_token_ids = [42] * k
        assert engine.kv.allocate_slots(request, k + 1)
        batch = ScheduledBatch([request], [k + 1], [k + 1])
        samples = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            engine.runner.execute(batch)  # writes K/V past the computed tokens only: nothing is committed
            samples.append(time.perf_counter() - start)
        times[k] = median(samples)
    request.spec_token_ids = []
    engine.abort(rid)
    return {k: times[k] / times[0] for k in ks} | {0: times[0]}


# --- llama.cpp ---------------------------------------------------------------------------------
def llama_server_runs(args: argparse.Namespace, gguf: str, workload: str, prompts: list[list[int]],
                      streams: int) -> list[Run]:  # fmt: skip
    kinds = [("off", []), ("ngram", ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                                     "--spec-ngram-simple-size-m", "8"]),
             ("draft", ["-md", gguf])]  # fmt: skip
    runs: list[Run] = []
    for method, extra in kinds:
        port = free_port()
        ctx = streams * (max(len(p) for p in prompts) + args.max_tokens + 16)
        cmd = [args.llama_server, "-m", gguf, "--port", str(port), "--host", "127.0.0.1", "--parallel", str(streams),
               "--ctx-size", str(ctx), "--threads", str(args.threads or 2), "--cont-batching", *extra]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc, 120)
            body = {"n_predict": args.max_tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
            with httpx.Client(base_url=url, timeout=600) as client:
                client.post("/completion", json={**body, "prompt": prompts[0][:16], "n_predict": 4})  # warm up
                draft_n = accepted = 0

                def one(p: list[int], client: httpx.Client = client, body: dict = body) -> dict[str, Any]:
                    return client.post("/completion", json={**body, "prompt": p}).json()

                if streams == 1:
                    answers = [one(p) for p in prompts]
                    tok_s = median([a["timings"]["predicted_per_second"] for a in answers])
                else:
                    start = time.perf_counter()
                    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
                        answers = list(pool.map(one, prompts))
                    tok_s = sum(a["timings"]["predicted_n"] for a in answers) / (time.perf_counter() - start)
                for a in answers:
                    draft_n += a["timings"].get("draft_n", 0)
                    accepted += a["timings"].get("draft_n_accepted", 0)
            run = Run(workload, streams, "llama-server", method, 0, tok_s)
            if draft_n:
                run.acceptance = accepted / draft_n
            runs.append(run)
            print(f"  {workload:10s} {streams} stream(s)  llama-server {method:5s}  {tok_s:7.1f} tok/s", flush=True)
        finally:
            stop(proc)
    for run in runs[1:]:
        run.vs_off = run.tok_s / runs[0].tok_s
    return runs


# --- report ------------------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".2f") -> str | None:
    return None if x is None else format(x, spec)


def print_runs(runs: list[Run]) -> None:
    rows = [[f"{r.workload}, {r.streams} stream{'s' if r.streams > 1 else ''}", r.engine, r.method, r.k or None,
             fmt(r.tok_s, ".1f"), fmt(r.vs_off), fmt(r.acceptance), fmt(r.mean_len),
             " ".join(f"{a:.2f}" for a in r.per_position) or None,
             None if r.same_tokens is None else ("yes" if r.same_tokens else "NO")] for r in runs]  # fmt: skip
    print_table(["workload", "engine", "spec", "k", "tok/s", "vs off", "accept", "mean len", "per position", "same tokens"], rows)


def check_targets(runs: list[Run]) -> None:
    def best(workload: str, streams: int, method: str) -> Run | None:
        c = [r for r in runs if r.engine == "nanoserve" and (r.workload, r.streams, r.method) == (workload, streams, method)]
        return max(c, key=lambda r: r.vs_off or 0) if c else None

    def worst(workload: str, streams: int) -> float | None:
        c = [r.vs_off for r in runs if r.engine == "nanoserve" and (r.workload, r.streams) == (workload, streams) and r.vs_off]
        return min(c) if c else None

    copy = best("copy-heavy", 1, "ngram")
    rows = [
        ["copy-heavy, 1 stream, ngram (best k)", ">= 2.00x", fmt(copy.vs_off if copy else None)],
        ["chat, 1 stream, ngram (worst k)", ">= 0.95x", fmt(min((r.vs_off for r in runs if r.engine == "nanoserve" and r.workload == "chat" and r.streams == 1 and r.method == "ngram" and r.vs_off), default=None))],
        ["copy-heavy, 8 streams (worst setting)", ">= 0.95x", fmt(worst("copy-heavy", 8))],
        ["chat, 8 streams (worst setting)", ">= 0.95x", fmt(worst("chat", 8))],
    ]  # fmt: skip
    print_table(["target", "wanted", "measured"], rows)


def plot(runs: list[Run], ratios: dict[int, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for workload, streams, style in (("copy-heavy", 1, "o-"), ("chat", 1, "s-"), ("copy-heavy", 8, "o--"), ("chat", 8, "s--")):
        rs = sorted((r for r in runs if r.engine == "nanoserve" and r.method == "ngram" and (r.workload, r.streams) == (workload, streams)), key=lambda r: r.k)
        if rs:
            ax1.plot([r.k for r in rs], [r.vs_off for r in rs], style, label=f"{workload}, {streams} stream(s)")
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set(xlabel="k (drafted tokens)", ylabel="speed vs speculation off", title="n-gram speculation: speedup against k")
    ax1.legend()
    ks = sorted(k for k in ratios if k > 0)
    ax2.plot(ks, [ratios[k] for k in ks], "o-", label="measured r(k)")
    ax2.axhline(1.3, color="grey", ls=":", label="target r(4) <= 1.3")
    ax2.set(xlabel="k", ylabel="T(k+1 tokens) / T(1 token)", title="cost of verifying k drafts (context 256)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for BLAS and the compiled kernels (default: the thread policy)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ks", default="1,2,4,8", help="k values for ngram")
    ap.add_argument("--draft-ks", default="1,2,4,8", help="k values for the draft model ('' for none)")
    ap.add_argument("--draft-weights", default="int8", help="the draft's weight format (the same file)")
    ap.add_argument("--draft-streams", default="1", help="stream counts that run the draft model")
    ap.add_argument("--repeats", type=int, default=9, help="repeats of each forward pass for r(k)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of every nanoserve configuration, run in turn (tok/s: the median)")
    ap.add_argument("--workloads", default="copy-heavy,chat", help="which workloads to run")
    ap.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server (the peer)")
    ap.add_argument("--quick", action="store_true", help="2 prompts, 24 tokens, ngram k in {2, 4}, draft k = 4, 1 round: a smoke test")
    ap.add_argument("--json", default=results_path("speculative.json"))
    ap.add_argument("--plot", default=results_path("speculative.png"))
    args = ap.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.draft_ks = [int(k) for k in args.draft_ks.split(",") if k]
    args.draft_streams = [int(s) for s in args.draft_streams.split(",") if s]
    if args.quick:
        args.max_tokens, args.ks, args.draft_ks, args.repeats, args.rounds = 24, [2, 4], [4], 3, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads.apply(args.threads)
    print(environment(), f"load: {os.getloadavg()[0]:.2f}", flush=True)
    loaded = load_checkpoint(args.model, "fp32")
    workloads = {"copy-heavy": chat_prompts(loaded, COPY_HEAVY), "chat": chat_prompts(loaded, CHAT)}
    wanted = args.workloads.split(",")
    if unknown := set(wanted) - set(workloads):
        raise SystemExit(f"unknown workload(s) {', '.join(sorted(unknown))}; choose from {', '.join(workloads)}")
    workloads = {name: prompts for name, prompts in workloads.items() if name in wanted}
    if args.quick:
        workloads = {name: prompts[:2] for name, prompts in workloads.items()}
    ratios = forward_ratios(loaded, args, sorted({1, 2, 4, 8} | set(args.ks)))
    print_table(["k", "r(k) = T(k+1) / T(1)"], [[k, f"{ratios[k]:.2f}"] for k in sorted(ratios) if k > 0])
    print(f"T(1 token) at context 256: {ratios[0] * 1000:.1f} ms\n", flush=True)
    runs: list[Run] = []
    for name, prompts in workloads.items():
        for streams in (1, 8):
            use = prompts[:4] if streams == 1 else prompts[:8]
            runs += measure_nanoserve(loaded, args, name, use, streams)
            if args.llama_server:
                runs += llama_server_runs(args, resolve_model(args.model), name, use, streams)
    print()
    print_runs(runs)
    print()
    check_targets(runs)
    write_json(args.json, {"environment": environment(), "r": ratios,
                           "runs": [{k: v for k, v in r.__dict__.items() if k != "tokens"} for r in runs]})  # fmt: skip
    plot(runs, ratios, args.plot)


if __name__ == "__main__":
    main()

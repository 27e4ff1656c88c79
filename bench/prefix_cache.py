"""Prefix caching under load: multi-turn chat and shared prompt prefixes, over HTTP.

    python bench/prefix_cache.py --llama-server PATH/TO/llama-server     # the full run (minutes)
    python bench/prefix_cache.py --skip-llama                           # nanoserve only
    python bench/prefix_cache.py --quick                                # a smoke test (~1 minute)

Every engine is a server, started here, and measured the same way: token-id prompts sent to
``/v1/completions`` with streaming (greedy, ``ignore_eos``, a fixed number of output tokens),
timed from the client. nanoserve runs three times, ``--prefix-cache radix``, ``hash`` and
``none``; the peer is llama.cpp's ``llama-server --parallel N`` on the same GGUF, with its
prompt cache (``cache_prompt: true``, sent explicitly). Each server is started fresh and runs
both workloads, multi-turn first (they share no tokens):

  multi-turn chat  16 conversations x 4 turns behind one shared system prompt (~500 tokens of
                   fixed English text, in the model's chat markup). A user message is 30-60
                   tokens, different in every conversation; an answer is 32 tokens. Turn k's
                   prompt is turn k-1's prompt + its answer (the streamed text, re-encoded, as
                   a chat client sends it back) + the next user message. All conversations run
                   at once; within one, a turn is sent when the previous answer is complete.
  shared prefix    SGLang's generated-shared-prefix shape: 8 groups x 8 questions; a request is
                   its group's 1024-token prefix + a 64-token question (random ordinary token
                   ids), answered with 64 tokens. All 64 requests are sent at once, in an order
                   shuffled with ``--seed``.

Reported per engine and workload:

  TTFT             request sent -> first streamed text (mean, p50, p99)
  output tok/s     output tokens of all requests / wall time of the workload
  hit rate         prompt tokens served from the cache / prompt tokens sent, from each
                   answer's ``usage.prompt_tokens_details.cached_tokens`` (for a nanoserve
                   that does not report it: the hit counter on its ``/metrics``)
  optimum          the hit rate of an infinite cache on the same trace: for each request, in
                   the order sent, the longest prefix of its prompt, in whole blocks of 16
                   tokens (``--block-size``), that it shares with any earlier request, never
                   covering its last prompt token. An earlier request's tokens are its prompt
                   and its answer less the last token (the tokens whose K/V an engine computed).

Then the ratios radix / none and nanoserve radix / llama-server, and the targets: multi-turn
mean TTFT at least 3x lower with the cache than without, shared-prefix output tok/s at least
2x higher, and a radix hit rate of at least 95% of the optimum. Figure:
``bench/results/prefix_cache.png`` (``prefix_cache_quick.png`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench.benchlib import environment, print_table, results_path, write_json  # noqa: E402
from bench.serve import (  # noqa: E402
    RequestTiming,
    free_port,
    gguf_path,
    served_model,
    start_llama_server,
    stop,
    wait_ready,
)
from bench.throughput import make_workload  # noqa: E402
from nanoserve import config  # noqa: E402
from nanoserve.config import EngineConfig  # noqa: E402
from nanoserve.tokenizer import Tokenizer  # noqa: E402

ENGINE_FIELDS = ("model", "backend", "weights", "block_size", "kv_cache_memory", "kv_cache_dtype",
                 "max_num_batched_tokens", "scheduler")  # fmt: skip
PREFIX_CACHES = ("radix", "hash", "none")

SYSTEM_PROMPT = (
    "You are Juniper, the reference assistant of the public library of a mid-sized town. Patrons write to "
    "you at any hour about anything a reference librarian would help with: finding books and articles, "
    "planning a project, understanding a form, learning a new skill, or settling a question of fact. "
    "Answer in plain, friendly English, as a patient and well-read person would. Start with the direct "
    "answer, then give the reasons or the steps, and stop when the question is answered. Prefer short "
    "paragraphs and numbered steps to long blocks of text, and never pad an answer with praise for the "
    "question. When a patron asks for a recommendation, offer two or three options and say in one sentence "
    "what each is best for. When the honest answer depends on something you do not know, such as the "
    "patron's budget, age, country or experience, say what it depends on and give the answer for the most "
    "likely case. Be careful with facts. If you are not sure, say so, and suggest where the patron could "
    "check: the library catalogue, a government office, an encyclopedia, or a specialist. Never invent a "
    "title, an author, a statistic, a law or a quotation; a wrong citation does more harm than none. For "
    "questions about health, money or the law, explain the general idea and the usual options, and add "
    "that a doctor, an accountant or a lawyer should be asked about the patron's own case. The library is "
    "open from nine in the morning to eight in the evening on weekdays and from ten to four on Saturdays; "
    "it is closed on Sundays and public holidays. Books can be borrowed for three weeks and renewed twice, "
    "online or at the desk, unless another patron has reserved them. The reading room has twelve "
    "computers, free wireless internet, a scanner and a printer; printing costs ten cents a page. Rooms "
    "for study groups can be booked a week ahead. The children's corner hosts a story hour on Wednesday "
    "afternoons, and volunteers help adults with computers on Tuesday evenings. Do not ask patrons for "
    "personal details you do not need, and never repeat one patron's details to another. If a message is "
    "rude, stay calm and polite and keep to the question. If a request is outside what a library can help "
    "with, say so kindly and suggest who could help instead. Keep every answer self-contained: the patron "
    "may read it days later, on a small screen, without the rest of the conversation in view."
)
TOPICS = (
    "growing vegetables on a small balcony", "learning the cello as an adult", "repairing an old bicycle",
    "baking sourdough bread at home", "writing a family history", "starting to run after an injury",
    "keeping bees in a town garden", "learning Portuguese before a trip", "building a bookshelf from pine",
    "teaching a child to play chess", "photographing birds in winter", "making a budget for a first flat",
    "knitting a sweater without a pattern", "reading about the Roman empire", "restoring a wooden chair",
    "planning a week of hiking in the hills",
)  # fmt: skip
SENTENCES = (
    "I have a question about {topic}.",
    "What would you recommend to someone who is just starting with {topic}?",
    "Could you list the three most common mistakes people make with {topic}, and how to avoid each one?",
    "How many hours a week should I expect to spend on {topic} during the first month?",
    "Please keep the answer short and practical, because I am reading it on my phone.",
    "Roughly how much money does {topic} cost in the first year, and where can I save?",
    "Is there a book or a course about {topic} that you would suggest for a beginner?",
    "What should I do differently if I only have weekends free for {topic}?",
)


@dataclass(frozen=True)
class ChatShape:
    conversations: int = 16
    turns: int = 4
    user_tokens: tuple[int, int] = (30, 60)  # each user message's length: uniform in this range
    answer_tokens: int = 32
    system_tokens: int | None = None  # keep only this many tokens of the system prompt (None: all)


@dataclass(frozen=True)
class PrefixShape:
    groups: int = 8
    questions: int = 8  # per group
    prefix_tokens: int = 1024
    question_tokens: int = 64
    answer_tokens: int = 64


FULL = (ChatShape(), PrefixShape())
QUICK = (ChatShape(4, 2, (30, 60), 16, 128), PrefixShape(2, 4, 256, 32, 16))


# --- workloads -----------------------------------------------------------------------------------
@dataclass
class ChatWorkload:
    system: list[int]  # the system prompt in chat markup, ending where the first user turn starts
    users: list[list[list[int]]]  # [conversation][turn]: the user message in chat markup
    answer_tokens: int


def user_message(tokenizer: Tokenizer, rng: np.random.Generator, conversation: int, turn: int, length: int) -> list[int]:
    """A user message of exactly ``length`` tokens, on this conversation's topic."""
    text = f"(Conversation {conversation + 1}, message {turn + 1}.)"
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < length:
        text += " " + SENTENCES[rng.integers(len(SENTENCES))].format(topic=TOPICS[conversation % len(TOPICS)])
        ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[:length]


def make_chat(tokenizer: Tokenizer, shape: ChatShape, seed: int) -> ChatWorkload:
    rng = np.random.default_rng(seed)

    def markup(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    system = markup(SYSTEM_PROMPT)[: shape.system_tokens]
    users = []
    for c in range(shape.conversations):
        turns = []
        for t in range(shape.turns):
            lo, hi = shape.user_tokens
            opening = markup(("<|im_end|>\n" if t else "") + "<|im_start|>user\n")
            message = user_message(tokenizer, rng, c, t, int(rng.integers(lo, hi + 1)))
            turns.append(opening + message + markup("<|im_end|>\n<|im_start|>assistant\n"))
        users.append(turns)
    return ChatWorkload(markup("<|im_start|>system\n") + system, users, shape.answer_tokens)


def make_shared_prefix(tokenizer: Tokenizer, shape: PrefixShape, seed: int) -> list[list[int]]:
    """Every group's prefix + each of its questions, in a shuffled arrival order."""
    prefixes = make_workload(tokenizer, tokenizer.vocab_size, shape.groups, shape.prefix_tokens, shape.prefix_tokens, seed)
    n = shape.groups * shape.questions
    questions = make_workload(tokenizer, tokenizer.vocab_size, n, shape.question_tokens, shape.question_tokens, seed + 1)
    prompts = [prefixes[i % shape.groups][0] + questions[i][0] for i in range(n)]
    order = np.random.default_rng(seed).permutation(n)
    return [prompts[i] for i in order]


def load_tokenizer(model: str | None) -> Tokenizer:
    """The model's tokenizer, without loading its weights."""
    from nanoserve.model.gguf_file import load_gguf
    from nanoserve.model.registry import resolve_model

    path = resolve_model(model)
    return Tokenizer.from_hf_dir(path) if os.path.isdir(path) else Tokenizer.from_gguf_metadata(load_gguf(path)[0])


# --- the offline optimum -------------------------------------------------------------------------
def block_hashes(tokens: list[int], num_blocks: int, block_size: int) -> list[int]:
    """Chained hashes of the first ``num_blocks`` full blocks: equal hashes, equal prefixes."""
    hashes, h = [], 0
    for b in range(num_blocks):
        h = hash((h, tuple(tokens[b * block_size : (b + 1) * block_size])))
        hashes.append(h)
    return hashes


def optimal_hits(trace: list[Sent], block_size: int) -> list[int]:
    """Per request (in the order sent): the tokens an infinite cache would serve (module docstring)."""
    seen: set[int] = set()
    hits = []
    for sent in trace:
        usable = (len(sent.prompt) - 1) // block_size  # never the last prompt token
        matched = 0
        for h in block_hashes(sent.prompt, usable, block_size):
            if h not in seen:
                break
            matched += 1
        hits.append(matched * block_size)
        computed = sent.prompt + sent.answer[:-1]
        seen.update(block_hashes(computed, len(computed) // block_size, block_size))
    return hits


# --- the client ----------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    url: str
    model: str
    extra: dict[str, Any]  # body fields this server needs beyond the OpenAI ones


@dataclass
class Sent(RequestTiming):
    """One request of the trace: its timing, prompt, answer and what the server said of it."""

    prompt: list[int] = field(default_factory=list)
    text: str = ""
    answer: list[int] = field(default_factory=list)  # the answer text, re-encoded
    completion_tokens: int | None = None
    cached_tokens: int | None = None


async def sse_events(client: httpx.AsyncClient, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of one streamed ``/v1/completions`` answer."""
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                yield json.loads(line.removeprefix("data: "))


async def complete(client: httpx.AsyncClient, server: Server, prompt: list[int], max_tokens: int,
                   tokenizer: Tokenizer, trace: list[Sent]) -> Sent:  # fmt: skip
    """Send one greedy streaming completion; note it in ``trace`` (in the order sent)."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **server.extra}  # fmt: skip
    sent = Sent(sent=time.perf_counter(), prompt=prompt)
    trace.append(sent)
    async for event in sse_events(client, body):
        if "error" in event:
            raise RuntimeError(f"{server.name}: {event['error']}")
        text = "".join(choice.get("text") or "" for choice in event.get("choices") or [])
        if text:
            sent.chunk_times.append(time.perf_counter())
            sent.text += text
        if event.get("usage"):
            sent.completion_tokens = event["usage"].get("completion_tokens")
            sent.cached_tokens = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
    sent.answer = tokenizer.encode(sent.text, add_special_tokens=False)
    sent.tokens = sent.completion_tokens or 0
    return sent


async def run_chat(client: httpx.AsyncClient, server: Server, chat: ChatWorkload, tokenizer: Tokenizer,
                   trace: list[Sent]) -> None:  # fmt: skip
    """All conversations at once; each sends its next turn when the previous answer is complete."""

    async def conversation(turns: list[list[int]]) -> None:
        prompt = chat.system
        for user in turns:
            prompt = prompt + user
            answer = await complete(client, server, prompt, chat.answer_tokens, tokenizer, trace)
            prompt = prompt + answer.answer

    await asyncio.gather(*(conversation(turns) for turns in chat.users))


async def run_all_at_once(client: httpx.AsyncClient, server: Server, prompts: list[list[int]], max_tokens: int,
                          tokenizer: Tokenizer, trace: list[Sent]) -> None:  # fmt: skip
    await asyncio.gather(*(complete(client, server, p, max_tokens, tokenizer, trace) for p in prompts))


def prefix_cache_hits(url: str) -> int | None:
    """nanoserve's prefix-cache hit counter from ``/metrics`` (None where there is none)."""
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    values = [line.split()[-1] for line in text.splitlines() if line.startswith("nanoserve_prefix_cache_hits")]
    return int(float(values[0])) if values else None


# --- one engine ----------------------------------------------------------------------------------
@dataclass
class Result:
    engine: str
    workload: str
    requests: int
    prompt_tokens: int
    cached_tokens: int | None
    optimal_tokens: int
    output_tokens: int
    answers_of_requested_length: int
    wall_s: float
    output_tps: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p99_s: float

    @property
    def hit_rate(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.cached_tokens is not None else None

    @property
    def optimum(self) -> float:
        return self.optimal_tokens / self.prompt_tokens


def summarize(engine: str, workload: str, trace: list[Sent], wall: float, max_tokens: int,
              metrics_hits: int | None, block_size: int) -> Result:  # fmt: skip
    ttft = [s.ttft for s in trace if s.ttft is not None]
    reported = [s.cached_tokens for s in trace]
    cached = sum(reported) if None not in reported else metrics_hits  # type: ignore[arg-type]
    output = sum(s.tokens for s in trace)
    return Result(
        engine, workload, len(trace), sum(len(s.prompt) for s in trace), cached, sum(optimal_hits(trace, block_size)),
        output, sum(s.completion_tokens == max_tokens for s in trace), wall, output / wall,
        float(np.mean(ttft)), float(np.percentile(ttft, 50)), float(np.percentile(ttft, 99)),
    )  # fmt: skip


async def measure(server: Server, chat: ChatWorkload, shared: list[list[int]], shared_tokens: int,
                  tokenizer: Tokenizer, block_size: int) -> list[Result]:  # fmt: skip
    """Warm up, then both workloads, one after the other."""
    # a new connection per request: llama-server closes one idle for 5 s, and a client that
    # reuses it just then gets "Server disconnected without sending a response"
    limits = httpx.Limits(max_connections=len(shared) + 8, max_keepalive_connections=0)
    results = []
    async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(1800.0), limits=limits) as client:
        await complete(client, server, tokenizer.encode("Warm up, please."), 4, tokenizer, [])
        runs = [
            ("multi-turn chat", chat.answer_tokens, lambda trace: run_chat(client, server, chat, tokenizer, trace)),
            ("shared prefix", shared_tokens, lambda trace: run_all_at_once(client, server, shared, shared_tokens, tokenizer, trace)),
        ]  # fmt: skip
        for workload, max_tokens, run in runs:
            print(f"  {server.name}: {workload} ...", file=sys.stderr, flush=True)
            hits_before, trace = prefix_cache_hits(server.url), []
            start = time.perf_counter()
            await run(trace)
            wall = time.perf_counter() - start
            hits_after = prefix_cache_hits(server.url)
            hits = hits_after - hits_before if hits_before is not None and hits_after is not None else None
            results.append(summarize(server.name, workload, trace, wall, max_tokens, hits, block_size))
    return results


def start_nanoserve(args: argparse.Namespace, prefix_cache: str) -> tuple[subprocess.Popen, str]:
    """``python -m nanoserve serve`` with this run's engine flags and ``--prefix-cache``."""
    port = free_port()
    engine = {name: getattr(args, name) for name in ENGINE_FIELDS}
    engine.update(prefix_cache=prefix_cache, max_num_seqs=args.parallel)
    cmd = [sys.executable, "-m", "nanoserve", "serve", "--port", str(port), "--log-level", "warning",
           "--no-access-log", "--max-waiting", "4096"]  # fmt: skip
    cmd += [part for name, value in engine.items() if value is not None for part in (config.flag(name), str(value))]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(cmd, env=env), f"http://127.0.0.1:{port}"


def run_server(name: str, started: tuple[subprocess.Popen, str], extra: dict[str, Any],
               workloads: tuple[ChatWorkload, list[list[int]], int], tokenizer: Tokenizer,
               args: argparse.Namespace) -> list[Result]:  # fmt: skip
    proc, url = started
    try:
        wait_ready(url, proc, args.startup_timeout)
        server = Server(name, url, served_model(url), extra)
        return asyncio.run(measure(server, *workloads, tokenizer, args.block_size))
    finally:
        stop(proc)


def longest_request(chat: ChatWorkload, shared: list[list[int]], shared_tokens: int) -> int:
    """An upper bound on prompt + answer tokens of any request (re-encoded answers counted twice)."""
    chat_longest = len(chat.system) + max(sum(map(len, turns)) for turns in chat.users)
    chat_longest += 2 * chat.answer_tokens * len(chat.users[0])
    return max(chat_longest, max(map(len, shared)) + shared_tokens)


# --- report --------------------------------------------------------------------------------------
def fmt_rate(x: float | None) -> str | None:
    return f"{x:.1%}" if x is not None else None


def print_results(results: list[Result]) -> None:
    print_table(
        ["engine", "requests", "prompt tok", "hit rate", "optimum", "wall s", "output tok/s",
         "TTFT mean s", "TTFT p50 s", "TTFT p99 s", "full answers"],
        [[r.engine, r.requests, r.prompt_tokens, fmt_rate(r.hit_rate), fmt_rate(r.optimum), f"{r.wall_s:.1f}",
          f"{r.output_tps:.1f}", f"{r.ttft_mean_s:.3f}", f"{r.ttft_p50_s:.3f}", f"{r.ttft_p99_s:.3f}",
          f"{r.answers_of_requested_length}/{r.requests}"] for r in results],
    )  # fmt: skip


def print_ratios(by_engine: dict[str, Result], pairs: list[tuple[str, str]]) -> None:
    rows = []
    for a, b in pairs:
        if a in by_engine and b in by_engine:
            x, y = by_engine[a], by_engine[b]
            rows.append([f"{a} / {b}", f"{x.ttft_mean_s / y.ttft_mean_s:.2f}", f"{x.ttft_p50_s / y.ttft_p50_s:.2f}",
                         f"{x.ttft_p99_s / y.ttft_p99_s:.2f}", f"{x.output_tps / y.output_tps:.2f}"])  # fmt: skip
    if rows:
        print_table(["ratio", "TTFT mean", "TTFT p50", "TTFT p99", "output tok/s"], rows)


def print_targets(chat: dict[str, Result], shared: dict[str, Result]) -> None:
    radix, none = "nanoserve radix", "nanoserve none"
    if radix not in chat or none not in chat:
        return
    checks = [
        ("multi-turn mean TTFT, none / radix", chat[none].ttft_mean_s / chat[radix].ttft_mean_s, 3.0),
        ("shared-prefix output tok/s, radix / none", shared[radix].output_tps / shared[none].output_tps, 2.0),
    ]
    for name, by in (("multi-turn", chat), ("shared-prefix", shared)):
        if by[radix].hit_rate is not None:
            checks.append((f"{name} radix hit rate / optimum", by[radix].hit_rate / by[radix].optimum, 0.95))
    print("\ntargets:")
    for name, value, target in checks:
        print(f"  {name}: {value:.2f} (target >= {target:g}): {'met' if value >= target else 'MISSED'}")


def plot(results: list[Result], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r.workload for r in results))
    fig, axes = plt.subplots(len(workloads), 3, figsize=(14, 4 * len(workloads)), squeeze=False)
    for row, workload in zip(axes, workloads, strict=True):
        rs = [r for r in results if r.workload == workload]
        names = [r.engine.replace(" ", "\n", 1) for r in rs]
        panels = [("mean TTFT (s)", [r.ttft_mean_s for r in rs]), ("output tokens/s", [r.output_tps for r in rs]),
                  ("prompt tokens from cache (%)", [100 * (r.hit_rate or 0) for r in rs])]  # fmt: skip
        for ax, (label, values) in zip(row, panels, strict=True):
            bars = ax.bar(range(len(rs)), values, color="tab:blue")
            ax.bar_label(bars, fmt="%.2f" if "TTFT" in label else "%.1f", fontsize=8)
            ax.set_xticks(range(len(rs)), names, fontsize=8)
            ax.set_title(f"{workload}: {label}", fontsize=10)
        row[2].scatter(range(len(rs)), [100 * r.optimum for r in rs], color="k", marker="_", s=400, label="offline optimum")
        row[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    plt.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# --- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parallel", type=int, default=16, help="requests in flight: nanoserve --max-num-seqs, llama-server --parallel")
    ap.add_argument("--seed", type=int, default=0, help="user-message lengths, shared-prefix tokens and arrival order")
    ap.add_argument("--prefix-caches", default=",".join(PREFIX_CACHES), help="nanoserve --prefix-cache settings to run, comma-separated")
    config.add_arguments(ap, EngineConfig, "nanoserve engine (--model: the model every engine runs)", only=ENGINE_FIELDS)
    ap.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary (the peer)")
    ap.add_argument("--gguf", metavar="PATH", help="GGUF file for llama-server (default: the file of --model)")
    ap.add_argument("--skip-llama", action="store_true", help="do not run llama-server")
    ap.add_argument("--threads", type=int, default=2, help="llama-server threads")
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for a server to be ready")
    ap.add_argument("--quick", action="store_true", help="4 conversations x 2 turns, 2 groups x 4 questions, short: a smoke test")
    ap.add_argument("--plot", default=None, help="where to write the figure (default: bench/results/prefix_cache[_quick].png)")
    ap.add_argument("--json", default=None, help="also write all numbers to this JSON file")  # fmt: skip
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    chat_shape, prefix_shape = QUICK if args.quick else FULL
    tokenizer = load_tokenizer(args.model)
    chat = make_chat(tokenizer, chat_shape, args.seed)
    shared = make_shared_prefix(tokenizer, prefix_shape, args.seed)
    workloads = (chat, shared, prefix_shape.answer_tokens)
    print(environment())
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"multi-turn chat: {chat_shape.conversations} conversations x {chat_shape.turns} turns, system prompt "
        f"{len(chat.system)} tokens, user messages {chat_shape.user_tokens[0]}-{chat_shape.user_tokens[1]} tokens, "
        f"answers {chat_shape.answer_tokens} tokens\nshared prefix: {prefix_shape.groups} groups x "
        f"{prefix_shape.questions} questions, prefix {prefix_shape.prefix_tokens} + question "
        f"{prefix_shape.question_tokens} tokens, answers {prefix_shape.answer_tokens} tokens, all sent at once "
        f"(seed {args.seed}); {args.parallel} requests in flight per engine\n",
        flush=True,
    )

    results: list[Result] = []
    skipped: dict[str, str] = {}
    for cache in args.prefix_caches.split(","):
        results += run_server(f"nanoserve {cache}", start_nanoserve(args, cache), {}, workloads, tokenizer, args)
    if args.llama_server and not args.skip_llama:
        # serve.start_llama_server gives each slot max_tokens + 128 tokens of context
        peer = argparse.Namespace(llama_server=args.llama_server, threads=args.threads,
                                  max_tokens=longest_request(*workloads))  # fmt: skip
        name = f"llama-server --parallel {args.parallel}"
        try:
            started = start_llama_server(peer, gguf_path(args), args.parallel)
            results += run_server(name, started, {"cache_prompt": True}, workloads, tokenizer, args)
        except (SystemExit, OSError, RuntimeError, httpx.HTTPError) as exc:  # report nanoserve's numbers anyway
            skipped[name] = str(exc)
    elif not args.quick:
        skipped["llama-server"] = "--skip-llama" if args.skip_llama else "no --llama-server PATH given"

    by_workload: dict[str, dict[str, Result]] = {}
    for r in results:
        by_workload.setdefault(r.workload, {})[r.engine] = r
    peer_name = f"llama-server --parallel {args.parallel}"
    pairs = [("nanoserve radix", "nanoserve none"), ("nanoserve hash", "nanoserve none"), ("nanoserve radix", peer_name)]
    for workload, by_engine in by_workload.items():
        print(f"\n{workload}:")
        print_results(list(by_engine.values()))
        print()
        print_ratios(by_engine, pairs)
    print("\nratios: below 1 is better for TTFT, above 1 for tok/s. hit rate: prompt tokens served from the cache;")
    print(f"optimum: an infinite cache on the same trace ({args.block_size}-token blocks).")
    if args.quick:
        print("(--quick: the workloads are too small for the targets, which are set for the full run)")
    print_targets(by_workload.get("multi-turn chat", {}), by_workload.get("shared prefix", {}))
    for name, reason in skipped.items():
        print(f"{name}: skipped ({reason})")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    png = "prefix_cache_quick.png" if args.quick else "prefix_cache.png"
    plot(results, args.plot or results_path(png), f"SmolLM2-135M, prefix caching over HTTP, {args.parallel} in flight")
    write_json(args.json, {"environment": environment(), "args": vars(args), "skipped": skipped,
                           "results": [asdict(r) | {"hit_rate": r.hit_rate, "optimum": r.optimum} for r in results]})  # fmt: skip


if __name__ == "__main__":
    main()

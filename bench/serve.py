"""Serving benchmark: N concurrent streaming clients against the HTTP server.

    python bench/serve.py                                   # starts `python -m nanoserve serve`
    python bench/serve.py --concurrency 1,8,32 --max-tokens 64
    python bench/serve.py --url http://127.0.0.1:8000       # a server that is already running
    python bench/serve.py --llama-server PATH/TO/llama-server   # also llama.cpp, same GGUF, same load

Each of N clients sends ``--requests-per-client`` streaming ``/v1/completions`` requests
one after another (greedy, ``ignore_eos``, so every answer has exactly ``--max-tokens``
tokens). Measured from the client side:

  output tok/s        all generated tokens / wall time of the whole run
  TTFT                request sent -> first streamed text (p50, p99)
  ITL                 gap between consecutive streamed chunks of one request (p50, p99)

With ``--llama-server``, llama.cpp's server runs the same GGUF with ``--parallel N`` (one
slot per client, continuous batching) on the same threads, and the table gives the ratios
nanoserve / llama.cpp. Both servers run on the same machine in the same run: compare the
ratios, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

PASSAGE = (
    "The history of computing is a story of machines that grew smaller and faster while the problems they "
    "solved grew larger. Early computers filled rooms and were programmed with switches and punched cards."
)


@dataclass
class RequestTiming:
    sent: float
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def gaps(self) -> list[float]:
        return list(np.diff(self.chunk_times)) if len(self.chunk_times) > 1 else []


@dataclass
class RunResult:
    server: str
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    errors: int


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> RequestTiming:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    timing = RequestTiming(sent=time.perf_counter())
    chunks, usage_tokens = 0, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if event.get("usage"):
                usage_tokens = event["usage"].get("completion_tokens")
            if event.get("choices") and event["choices"][0].get("text"):
                timing.chunk_times.append(time.perf_counter())
                chunks += 1
    timing.tokens = usage_tokens if usage_tokens is not None else max(chunks, max_tokens)
    return timing


async def run_load(
    url: str, model: str, concurrency: int, requests_per_client: int, max_tokens: int, label: str
) -> RunResult:
    """N clients, each sending its requests one after another; all clients start together."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        await one_request(client, model, "Warm up.", 2)
        errors = 0

        async def client_loop(c: int) -> list[RequestTiming]:
            nonlocal errors
            done = []
            for k in range(requests_per_client):
                try:
                    done.append(
                        await one_request(client, model, f"Client {c}, request {k}. {PASSAGE}", max_tokens)
                    )
                except (RuntimeError, httpx.HTTPError) as exc:
                    errors += 1
                    print(f"  {label} client {c}: {exc}", file=sys.stderr)
            return done

        start = time.perf_counter()
        results = await asyncio.gather(*(client_loop(c) for c in range(concurrency)))
        wall = time.perf_counter() - start
    timings = [t for per_client in results for t in per_client]
    ttfts = [t.ttft for t in timings if t.ttft is not None]
    gaps = [g for t in timings for g in t.gaps]
    tokens = sum(t.tokens for t in timings)

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    return RunResult(
        label, concurrency, len(timings), tokens, wall, tokens / wall if wall else 0.0,
        pct(ttfts, 50), pct(ttfts, 99), pct(gaps, 50), pct(gaps, 99), errors,
    )  # fmt: skip


# --- servers -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    """Poll GET /health until 200; SystemExit if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"{url} was not ready within {timeout:.0f} s")


def served_model(url: str) -> str:
    try:
        return httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return "default"


def start_nanoserve(args: argparse.Namespace, max_seqs: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "nanoserve", "serve", "--port", str(port), "--max-num-seqs", str(max_seqs), "--no-access-log",
           "--log-level", "warning", "--max-waiting", "4096", "--backend", args.backend, "--weights", args.weights]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.blas_threads:
        env.update(
            {
                name: str(args.blas_threads)
                for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
            }
        )
    return subprocess.Popen(cmd, env=env), f"http://127.0.0.1:{port}"


def start_llama_server(args: argparse.Namespace, gguf: str, parallel: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    ctx = parallel * (args.max_tokens + 128)  # one slot per client: its prompt + answer
    cmd = [args.llama_server, "-m", gguf, "--port", str(port), "--host", "127.0.0.1", "--parallel", str(parallel),
           "--ctx-size", str(ctx), "--threads", str(args.threads), "--cont-batching"]  # fmt: skip
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ), f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def gguf_path(args: argparse.Namespace) -> str:
    if args.gguf:
        return args.gguf
    from nanoserve.model.registry import resolve_model

    path = resolve_model(args.model)
    if not path.endswith(".gguf"):
        raise SystemExit("llama-server needs a .gguf file: pass --gguf PATH")
    return path


# --- report --------------------------------------------------------------------------------------
def print_table(ours: list[RunResult], peer: list[RunResult]) -> None:
    by_n = {r.concurrency: r for r in peer}
    head = f"{'N':>3} | {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}"
    if peer:
        head += f" || {'llama tok/s':>11} {'TTFT p50':>9} {'ITL p50':>8} || {'tok/s ratio':>11} {'TTFT ratio':>10} {'ITL ratio':>9}"
    print(
        "\nnanoserve"
        + (
            " vs llama-server (ratios: nanoserve / llama.cpp; tok/s higher is better, latencies lower)"
            if peer
            else ""
        )
    )
    print(head)
    print("-" * len(head))
    for r in ours:
        row = f"{r.concurrency:>3} | {r.tokens_per_s:>7.1f} {r.ttft_p50_s:>8.3f}s {r.ttft_p99_s:>8.3f}s {r.itl_p50_s * 1e3:>6.1f}ms {r.itl_p99_s * 1e3:>6.1f}ms"
        p = by_n.get(r.concurrency)
        if p is not None:
            row += f" || {p.tokens_per_s:>11.1f} {p.ttft_p50_s:>8.3f}s {p.itl_p50_s * 1e3:>6.1f}ms"
            row += f" || {r.tokens_per_s / p.tokens_per_s:>11.2f} {r.ttft_p50_s / p.ttft_p50_s:>10.2f} {r.itl_p50_s / p.itl_p50_s:>9.2f}"
        print(row)
    if any(r.errors for r in ours + peer):
        print(
            "errors: "
            + ", ".join(f"{r.server} N={r.concurrency}: {r.errors}" for r in ours + peer if r.errors)
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default: 1,8,32)")
    p.add_argument(
        "--requests-per-client",
        type=int,
        default=2,
        help="requests each client sends, one after another (default: 2)",
    )
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default: 64)")
    p.add_argument(
        "--model",
        default=None,
        help="model for the nanoserve server it starts (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--backend", default="cpu", help="nanoserve kernel backend (default: cpu)")
    p.add_argument("--weights", default="fp32", help="nanoserve weight format (default: fp32)")
    p.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="threads of the nanoserve server, given as OPENBLAS_NUM_THREADS (the thread policy applies it to BLAS "
        "and the compiled kernels; default: the policy's)",
    )
    p.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    p.add_argument(
        "--llama-server",
        default=None,
        metavar="PATH",
        help="llama.cpp's llama-server binary: run the same load against it",
    )
    p.add_argument("--gguf", default=None, help="GGUF file for llama-server (default: the file of --model)")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="llama-server threads (default: all cores)"
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--startup-timeout", type=float, default=300.0, help="seconds to wait for a server to be ready"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(n) for n in args.concurrency.split(",") if n.strip()]
    ours: list[RunResult] = []
    proc, url = (None, args.url) if args.url else start_nanoserve(args, max(levels))
    try:
        wait_ready(url, proc, args.startup_timeout)
        model = served_model(url)
        for n in levels:
            print(f"nanoserve: {n} concurrent clients ...", file=sys.stderr, flush=True)
            ours.append(
                asyncio.run(run_load(url, model, n, args.requests_per_client, args.max_tokens, "nanoserve"))
            )
    finally:
        if proc is not None:
            stop(proc)
    peer: list[RunResult] = []
    if args.llama_server:
        gguf = gguf_path(args)
        for n in levels:
            print(f"llama-server --parallel {n}: {n} concurrent clients ...", file=sys.stderr, flush=True)
            proc, url = start_llama_server(args, gguf, n)
            try:
                wait_ready(url, proc, args.startup_timeout)
                peer.append(
                    asyncio.run(
                        run_load(
                            url,
                            served_model(url),
                            n,
                            args.requests_per_client,
                            args.max_tokens,
                            "llama-server",
                        )
                    )
                )
            except SystemExit as exc:  # report what nanoserve measured even if the peer cannot run
                print(f"llama-server failed at N={n}: {exc}", file=sys.stderr)
            finally:
                stop(proc)
    print_table(ours, peer)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "nanoserve": [asdict(r) for r in ours],
                    "llama_server": [asdict(r) for r in peer],
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

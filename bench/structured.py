"""Structured output: JSON extraction against an 8-field schema, free, constrained, and with jump-forward.

    python bench/structured.py            # SmolLM2, 4 prompts, 96 tokens each (~5 minutes on 2 cores)
    python bench/structured.py --quick    # 2 prompts, 48 tokens (a minute)
    python bench/structured.py --llama-server PATH/TO/llama-server   # plus the peer

Strings are unbounded: ``maxLength: n`` unrolls a string's automaton n times (each copy
allows almost every token), which multiplies compile time and index size; the token budget
(``max_tokens``) is what ends a long string. Each prompt asks SmolLM2 (through its chat template, greedy) to extract a person's record
as JSON. Three runs of the same prompts, one stream at a time:

    free        no constraint (the prompt describes the schema)
    constrained json_schema, jump_forward=False
    jump        json_schema, jump_forward=True

With ``--llama-server PATH``, llama.cpp's server runs the same prompts (token ids, on the
same GGUF, to its native ``/completion``, greedy, same ``n_predict``, ``cache_prompt:
false``, one request at a time) as two more rows, engine ``llama-server``:

    free        no constraint
    constrained ``"json_schema": SCHEMA`` in the body (llama.cpp turns it into a GBNF grammar)

Their tok/s is counted the same way (``timings.predicted_n`` summed / wall time of the
requests) and their outputs are checked by the same ``valid``; each nanoserve row gets its
tok/s ratio against the matching llama-server row (free against free, constrained and jump
against constrained). If llama-server is absent or fails, its rows are reported as skipped
with the reason; nanoserve's measurement goes on regardless.

Reported per run: output tok/s (all output tokens / wall time), forward passes per output
token (engine steps / output tokens), the share of output tokens jump-forward supplied,
and the validity rate of the outputs against the schema (``jsonschema``). Also: schema
compile time (regex -> DFA -> token index, a fresh cache) and the mask's cost per decode
step (the constrained run's time in ``Sampler.process`` over its steps, against the
mean step time). Results go to ``bench/results/structured.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, __file__.rsplit("/", 2)[0])

from bench.benchlib import environment, print_table, results_path, write_json  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "city": {"type": "string"},
        "country": {"type": "string"},
        "employed": {"type": "boolean"},
        "height_m": {"type": "number"},
        "languages": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "email", "city", "country", "employed", "height_m", "languages"],
}
PEOPLE = [
    "Maria Lopez is a 34-year-old engineer from Madrid, Spain. She is 1.68 m tall, speaks Spanish and English, "
    "and her email is maria.lopez@example.com.",
    "Kenji Sato, 51, lives in Osaka, Japan, where he works as a chef. Email: kenji@sato.jp. He is 1.75 m and speaks Japanese.",
    "Amara Okafor is 27 and currently unemployed. She lives in Lagos, Nigeria, is 1.62 m tall, and speaks English, "
    "Yoruba and French. Reach her at amara.o@mail.ng.",
    "Lars Nilsson (lars.n@example.se) is a 45-year-old teacher in Uppsala, Sweden. He is 1.91 m tall and speaks Swedish and German.",
]


def prompt_ids(tokenizer: Any, person: str) -> list[int]:
    keys = ", ".join(SCHEMA["properties"])
    text = f"Extract this person's record as a JSON object with the keys {keys}.\n\n{person}"
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)


def run(engine: Any, prompts: list[list[int]], max_tokens: int, **constraint: Any) -> dict[str, Any]:
    from nanoserve.sampling import Sampler, SamplingParams

    spent = [0.0]
    original = Sampler.process

    def timed(self, *args, **kwargs):  # the sampler's pre-sampling work: the mask lives here
        t = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    Sampler.process = timed  # type: ignore[method-assign]
    texts, tokens, steps, forced = [], 0, 0, 0
    start = time.perf_counter()
    try:
        for ids in prompts:  # one stream at a time
            before = engine.stats().num_steps
            params = SamplingParams(temperature=0, max_tokens=max_tokens, **constraint)
            rid = engine.add_request(ids, params)
            n_before = 0
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id == rid:
                        forced += max(0, len(out.token_ids) - n_before - 1)
                        n_before = len(out.token_ids)
                        if out.finished:
                            texts.append(out.text)
                            tokens += len(out.token_ids)
            steps += engine.stats().num_steps - before
    finally:
        Sampler.process = original  # type: ignore[method-assign]
    wall = time.perf_counter() - start
    return {"texts": texts, "tokens": tokens, "steps": steps, "forced": forced, "wall": wall, "process": spent[0]}


def valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def llama_server_runs(path: str, gguf: str, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """The same prompts through llama-server, free and with ``json_schema``; raises on any failure."""
    import httpx

    from bench.serve import free_port, stop, wait_ready

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    if not gguf.endswith(".gguf"):
        raise ValueError(f"llama-server needs a .gguf model, not {gguf}")
    port = free_port()
    ctx = max(len(p) for p in prompts) + max_tokens + 16
    cmd = [path, "-m", gguf, "--port", str(port), "--host", "127.0.0.1", "--parallel", "1",
           "--ctx-size", str(ctx), "--threads", str(os.cpu_count() or 2)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    try:
        wait_ready(url, proc, 120)
        with httpx.Client(base_url=url, timeout=600) as client:

            def complete(ids: list[int], n: int, **constraint: Any) -> dict[str, Any]:
                body = {"prompt": ids, "n_predict": n, "temperature": 0, "cache_prompt": False, **constraint}
                response = client.post("/completion", json=body)
                response.raise_for_status()
                return response.json()

            for name, constraint in [("free", {}), ("constrained", {"json_schema": SCHEMA})]:
                complete(prompts[0], 4, **constraint)  # warm up
                start = time.perf_counter()
                answers = [complete(ids, max_tokens, **constraint) for ids in prompts]  # one stream at a time
                wall = time.perf_counter() - start
                results[name] = {
                    "texts": [a["content"] for a in answers],
                    "tokens": sum(a["timings"]["predicted_n"] for a in answers),
                    "wall": wall,
                    "predicted_per_second": [a["timings"]["predicted_per_second"] for a in answers],
                }
    finally:
        stop(proc)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--llama-server", metavar="PATH", default=None, help="also run llama.cpp's llama-server (the peer)")
    args = parser.parse_args()
    from nanoserve import structured
    from nanoserve.engine import LLMEngine
    from nanoserve.model import load_checkpoint
    from nanoserve.model.registry import resolve_model
    from nanoserve.sampling import SamplingParams

    model_path = resolve_model(None)
    loaded = load_checkpoint(model_path)
    engine = LLMEngine(loaded=loaded, num_blocks=256)
    tok = engine.tokenizer
    people = PEOPLE[:2] if args.quick else PEOPLE
    max_tokens = args.max_tokens or (48 if args.quick else 96)
    prompts = [prompt_ids(tok, p) for p in people]
    t = time.perf_counter()
    structured.vocabulary_of(tok)  # once per tokenizer: every token's bytes
    vocab_s = time.perf_counter() - t
    t = time.perf_counter()
    index = structured.prepare(SamplingParams(json_schema=SCHEMA, max_tokens=max_tokens), tok)
    compile_s = time.perf_counter() - t
    assert index is not None
    run(engine, prompts[:1], 4)  # warm up
    results = {
        "free": run(engine, prompts, max_tokens),
        "constrained": run(engine, prompts, max_tokens, json_schema=SCHEMA, jump_forward=False),
        "jump": run(engine, prompts, max_tokens, json_schema=SCHEMA, jump_forward=True),
    }
    peer: dict[str, Any] = {}
    skipped = None
    if args.llama_server:
        try:
            peer = llama_server_runs(args.llama_server, model_path, prompts, max_tokens)
        except (Exception, SystemExit) as e:  # wait_ready raises SystemExit; never stop nanoserve's report
            skipped = f"{type(e).__name__}: {e}"
    peer_of = {"free": "free", "constrained": "constrained", "jump": "constrained"}
    rows = []
    for name, r in results.items():
        p = peer.get(peer_of[name])
        ratio = None if not p else f"{(r['tokens'] / r['wall']) / (p['tokens'] / p['wall']):.2f}x"
        rows.append(
            [
                "nanoserve",
                name,
                f"{r['tokens'] / r['wall']:.1f}",
                f"{r['steps'] / max(1, r['tokens']):.2f}",
                f"{r['forced'] / max(1, r['tokens']):.0%}",
                f"{sum(map(valid, r['texts']))}/{len(r['texts'])}",
                f"{1000 * r['process'] / max(1, r['steps']):.2f}",
                f"{1000 * r['wall'] / max(1, r['steps']):.1f}",
                ratio,
            ]
        )
    for name, p in peer.items():
        valid_n = f"{sum(map(valid, p['texts']))}/{len(p['texts'])}"
        rows.append(["llama-server", name, f"{p['tokens'] / p['wall']:.1f}", None, None, valid_n, None, None, None])
    print(environment())
    print(f"vocabulary (once per tokenizer): {vocab_s * 1000:.0f} ms")
    print(f"schema compile (8 fields, fresh cache): {compile_s * 1000:.0f} ms; {index.num_states} states, {index.tokens.size} entries")
    headers = ["engine", "run", "tok/s", "passes/token", "jump-forward share", "valid", "process ms/step", "step ms", "vs llama-server"]
    print_table(headers, rows)
    if skipped:
        print(f"llama-server: skipped ({skipped})")
    free_process = results["free"]["process"] / max(1, results["free"]["steps"])
    mask = results["constrained"]["process"] / max(1, results["constrained"]["steps"]) - free_process
    step = results["constrained"]["wall"] / max(1, results["constrained"]["steps"])
    print(f"mask overhead: {1000 * mask:.2f} ms/step = {mask / step:.1%} of a decode step")
    peer_json = {"skipped": skipped} if skipped else peer or None
    report = {"compile_s": compile_s, "runs": results, "mask_overhead_s": mask, "step_s": step, "llama_server": peer_json}
    write_json(results_path("structured.json"), report)


if __name__ == "__main__":
    main()

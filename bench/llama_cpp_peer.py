"""The llama.cpp side of the benchmarks, runnable in any Python that has ``llama_cpp``.

It imports only ``llama_cpp`` and NumPy (never nanoserve), so it also runs in a separate
virtual environment that holds llama-cpp-python: the bench scripts then start it with
that environment's interpreter, send the job as JSON on stdin and read the result as
JSON from the last line of stdout.

    echo '{"mode": "single", ...}' | /path/to/other/python bench/llama_cpp_peer.py

Two jobs:

``single``   one stream, as ``bench/prefill_decode.py`` measures nanoserve: evaluate the
             prompt in one call (prefill), then greedy decode, one token per call.
``batched``  a whole workload (prompts + output lengths) with up to ``parallel`` sequences
             in flight: every step is one ``llama_decode`` of a batch holding one token of
             each decoding sequence and prompt chunks of the others (continuous batching,
             as llama-server does it), under a budget of ``n_batch`` tokens.

Greedy choice is a NumPy argmax over the last logits, as on the nanoserve side, so both
sides pay the same per-token sampling cost.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from typing import Any

import numpy as np


def _quiet_logs() -> None:
    """Silence llama.cpp's own log lines (they go to stderr and drown the table)."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _drop(level: int, text: bytes, user_data: Any) -> None:
        return None

    llama_cpp.llama_log_set(_drop, ctypes.c_void_p(0))
    _quiet_logs.keep = _drop  # type: ignore[attr-defined]  # the callback must outlive this call


def _load(model_path: str, threads: int, n_ctx: int) -> Any:
    from llama_cpp import Llama

    _quiet_logs()
    return Llama(model_path=model_path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False)


def _argmax_logits(ctx: Any, row: int, n_vocab: int) -> int:
    """Greedy token from the logits of batch row ``row`` (-1: the last row with logits)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(ctx, row)
    return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))


def run_single(model_path: str, prompt_ids: list[int], new_tokens: int, runs: int, threads: int) -> dict[str, Any]:
    """Per run: seconds for the prompt's forward pass, and for ``new_tokens`` one-token steps.

    The first output token comes from the prefill's logits; each of the ``new_tokens``
    decode steps then evaluates the previous token and picks the next one.
    """
    llm = _load(model_path, threads, n_ctx=max(512, len(prompt_ids) + new_tokens + 8))
    n_vocab = llm.n_vocab()
    prefill_s, decode_s, tokens = [], [], []
    for _ in range(runs):
        llm.reset()  # the next eval drops the cached K/V from position 0 on
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        token = _argmax_logits(llm.ctx, -1, n_vocab)
        t1 = time.perf_counter()
        out = [token]
        for _ in range(new_tokens):
            llm.eval([token])
            token = _argmax_logits(llm.ctx, -1, n_vocab)
            out.append(token)
        t2 = time.perf_counter()
        prefill_s.append(t1 - t0)
        decode_s.append(t2 - t1)
        tokens = out
    import llama_cpp

    return {"prefill_s": prefill_s, "decode_s": decode_s, "token_ids": tokens, "version": llama_cpp.__version__}


class _Seq:
    def __init__(self, index: int, prompt: list[int], output_len: int) -> None:
        self.index = index
        self.prompt = prompt
        self.output_len = output_len
        self.slot = -1  # llama.cpp sequence id while in flight
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.output: list[int] = []
        self.first_token_time: float | None = None
        self.finish_time: float | None = None


def run_batched(
    model_path: str, prompts: list[list[int]], output_lens: list[int], parallel: int, threads: int, n_batch: int = 2048, n_ubatch: int = 512
) -> dict[str, Any]:
    """Run the workload with continuous batching; per-request timings relative to the start."""
    import llama_cpp

    max_len = max(len(p) + n for p, n in zip(prompts, output_lens, strict=True))
    llm = _load(model_path, threads, n_ctx=512)  # loads the weights; the context below is ours
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = parallel * max_len
    params.n_batch = n_batch
    params.n_ubatch = n_ubatch
    params.n_seq_max = parallel
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = True  # one K/V buffer shared by all sequences, like a block pool
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    memory = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    n_vocab = llm.n_vocab()

    waiting = [_Seq(i, list(p), n) for i, (p, n) in enumerate(zip(prompts, output_lens, strict=True))]
    running: list[_Seq] = []
    free_slots = list(range(parallel))
    done: list[_Seq] = []
    start = time.perf_counter()
    steps = 0
    try:
        while waiting or running:
            while waiting and free_slots:
                seq = waiting.pop(0)
                seq.slot = free_slots.pop(0)
                running.append(seq)
            # decodes first (one token each), then prompt chunks under what is left of the budget
            entries: list[tuple[_Seq, int, int, bool]] = []  # (sequence, token, position, row gives its next token)
            for seq in running:
                if seq.num_computed >= len(seq.prompt):
                    entries.append((seq, seq.output[-1], seq.num_computed, True))
            for seq in running:
                remaining = len(seq.prompt) - seq.num_computed
                chunk = min(remaining, n_batch - len(entries))
                for j in range(max(chunk, 0)):
                    pos = seq.num_computed + j
                    entries.append((seq, seq.prompt[pos], pos, j == remaining - 1))
            for row, (seq, token, pos, wants_logits) in enumerate(entries):
                batch.token[row] = token
                batch.pos[row] = pos
                batch.n_seq_id[row] = 1
                batch.seq_id[row][0] = seq.slot
                batch.logits[row] = wants_logits
            batch.n_tokens = len(entries)
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            steps += 1
            now = time.perf_counter()
            for row, (seq, _, _, wants_logits) in enumerate(entries):
                seq.num_computed += 1
                if wants_logits:
                    seq.output.append(_argmax_logits(ctx, row, n_vocab))
                    if seq.first_token_time is None:
                        seq.first_token_time = now - start
            for seq in [s for s in running if len(s.output) >= s.output_len]:
                seq.finish_time = now - start
                llama_cpp.llama_memory_seq_rm(memory, seq.slot, -1, -1)
                free_slots.append(seq.slot)
                running.remove(seq)
                done.append(seq)
        wall = time.perf_counter() - start
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    done.sort(key=lambda s: s.index)
    return {
        "wall_s": wall,
        "steps": steps,
        "output_tokens": sum(len(s.output) for s in done),
        "ttft_s": [s.first_token_time for s in done],
        "tpot_s": [(s.finish_time - s.first_token_time) / (len(s.output) - 1) if len(s.output) > 1 else None for s in done],
        "version": llama_cpp.__version__,
    }


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    mode = job.pop("mode")
    if mode == "single":
        return run_single(**job)
    if mode == "batched":
        return run_batched(**job)
    raise ValueError(f"unknown mode {mode!r}: use 'single' or 'batched'")


def main() -> None:
    result = run_job(json.load(sys.stdin))
    sys.stdout.write("\n" + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

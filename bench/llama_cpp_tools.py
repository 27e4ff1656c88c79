"""llama.cpp's command-line tools as peers: run one, parse its figures, or say why not.

Each function returns ``(figures, note)``: the parsed numbers and the command line that
produced them, or ``None`` and a one-line reason (binary missing, non-zero exit, no
figure in its output). ``bench/quant.py`` prints the reason in place of the peer's row.

    llama_bench        llama-bench pp128 / tg128 on a GGUF (tokens/s)
    llama_bench_kv     llama-bench tg at a context depth, per KV cache type (-ctk/-ctv)
    llama_perplexity   llama-perplexity on a text, a ctx and a number of windows

Build the binaries with ``shared/tools/install-llamacpp.sh``; pass their paths, or put
them on PATH.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess

INSTALL_HINT = "build it with shared/tools/install-llamacpp.sh"


def _find(path: str | None, name: str) -> str | None:
    exe = path or shutil.which(name)
    return exe if exe and os.path.exists(exe) else None


def _run(cmd: list[str], timeout: float) -> tuple[subprocess.CompletedProcess | None, str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout), " ".join(cmd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{' '.join(cmd)} failed: {exc}"


def _bench_rows(path: str | None, args: list[str], timeout: float) -> tuple[list[dict[str, str]] | None, str]:
    exe = _find(path, "llama-bench")
    if exe is None:
        return None, f"llama-bench not found (pass --llama-bench PATH; {INSTALL_HINT})"
    proc, note = _run([exe, *args, "-o", "csv"], timeout)
    if proc is None:
        return None, note
    if proc.returncode != 0:
        return None, f"{note} exited {proc.returncode}: {proc.stderr.strip()[-200:]}"
    return list(csv.DictReader(io.StringIO(proc.stdout))), note


def llama_bench(path: str | None, gguf: str, threads: int) -> tuple[dict[str, float] | None, str]:
    """llama.cpp's pp128 / tg128 tokens/s on the same file: ``{"pp128": .., "tg128": ..}``."""
    rows, note = _bench_rows(path, ["-m", gguf, "-p", "128", "-n", "128", "-t", str(threads)], 1200)
    if rows is None:
        return None, note
    figures = {("pp128" if row.get("n_prompt") == "128" else "tg128"): float(row["avg_ts"]) for row in rows}
    return figures, note


def llama_bench_kv(path: str | None, gguf: str, threads: int, depth: int, new_tokens: int,
                   cache_types: tuple[str, ...] = ("f16", "q8_0")) -> tuple[dict[str, float] | None, str]:
    """Decode tokens/s with ``depth`` tokens already in the cache, per KV cache type.

    ``{"f16": .., "q8_0": ..}`` from ``llama-bench -p 0 -n NEW -d DEPTH -ctk T -ctv T -fa 1``:
    flash attention on, which llama.cpp needs for a quantized V cache, for every type alike.
    """
    figures: dict[str, float] = {}
    notes = []
    for kind in cache_types:
        args = ["-m", gguf, "-p", "0", "-n", str(new_tokens), "-d", str(depth), "-t", str(threads),
                "-fa", "1", "-ctk", kind, "-ctv", kind, "-r", "3"]  # fmt: skip
        rows, note = _bench_rows(path, args, 1800)
        if rows is None:
            return None, note
        figures[kind] = float(rows[0]["avg_ts"])
        notes.append(note)
    return figures, "; ".join(notes)


def llama_perplexity(path: str | None, gguf: str, text: str, ctx: int, chunks: int, threads: int) -> tuple[dict[str, float] | None, str]:
    """llama.cpp's perplexity of the same file on the same text and windows: ``{"ppl", "ppl_stderr"}``."""
    exe = _find(path, "llama-perplexity")
    if exe is None:
        return None, f"llama-perplexity not found (pass --llama-perplexity PATH; {INSTALL_HINT})"
    cmd = [exe, "-m", gguf, "-f", text, "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads)]
    proc, note = _run(cmd, 3600)
    if proc is None:
        return None, note
    found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or not found:
        return None, f"{note} exited {proc.returncode} without a final estimate: {proc.stderr.strip()[-200:]}"
    return {"ppl": float(found.group(1)), "ppl_stderr": float(found.group(2))}, note

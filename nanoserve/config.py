"""Configuration, written once: the engine's and the server's settings as dataclasses.

Each field carries its default, its help text and (where it has them) its choices. The
command-line flags of ``generate``, ``chat``, ``serve`` and the benchmarks are generated
from these fields by :func:`add_arguments`, and :func:`from_args` reads them back:

    EngineConfig.kv_cache_dtype   ->   --kv-cache-dtype {float32,float16,int8}  (help from the field)

This is a leaf module: it imports nothing from nanoserve, so anything may import it.
The component fields (``block_allocator``, ``kv_manager``, ``scheduler``, ``sampler``)
name an implementation the way ``backend`` names kernels: a registered name, or
``path/to/file.py:Name`` (see :mod:`nanoserve.components`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

KV_CACHE_DTYPES: tuple[str, ...] = ("float32", "float16", "int8")  # KV page formats (nanoserve.cache.paged)
WEIGHT_FORMATS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4", "q8_0", "q4_0", "q4_1", "gguf")  # nanoserve.quant
LOG_LEVELS: tuple[str, ...] = ("critical", "error", "warning", "info", "debug")
SPECULATIVE_METHODS: tuple[str, ...] = ("none", "ngram", "draft")  # nanoserve.spec
ACTIVATIONS: tuple[str, ...] = ("float", "int8")  # what the matmuls multiply the weights with (nanoserve.quant)
INT8_ACTIVATION_WEIGHTS: tuple[str, ...] = ("gguf", "q8_0", "q4_0", "q4_1")  # the block formats int8 activations pair with


def setting(
    default: Any, help: str, choices: tuple[str, ...] | None = None, env: str | None = None, aliases: tuple[str, ...] = ()
) -> Any:
    """A config field: ``default``, the ``--help`` text, optional choices, an optional
    environment variable that supplies the default on the command line, and other flag
    names that mean the same (another engine's name for it)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "env": env, "aliases": aliases})


@dataclass
class EngineConfig:
    """Everything that decides how an :class:`~nanoserve.engine.LLMEngine` is built."""

    model: str | None = setting(
        None,
        "a known name (default: SmolLM2-135M-Instruct), a .gguf file, or an HF directory "
        "with config.json + *.safetensors + tokenizer.json",
    )
    backend: str = setting(
        "cpu",
        "kernel backend: cpu (Numba-compiled, the default), ref (NumPy reference), cuda (Numba CUDA "
        "+ CuPy), a registered name, or a path to a .py file defining kernels",
    )
    weights: str = setting(
        "gguf",
        "weight format in memory: gguf (the default) keeps the file's quantized blocks, as llama.cpp and "
        "Ollama run them; fp32 dequantizes them on load (the same numbers: logits differ only by summation "
        "order); fp16, int8, int4, q8_0, q4_0, q4_1 re-quantize (the 4-bit ones keep the LM head at 8 bits, "
        "as llama-quantize does)",
        choices=WEIGHT_FORMATS,
    )
    activations: str = setting(
        "float",
        "activations into the quantized matmuls: float, or int8 (quantized per 32 values with integer dot "
        "products, as llama.cpp does; changes outputs slightly; needs --weights gguf, q8_0, q4_0 or q4_1)",
        choices=ACTIVATIONS,
    )
    block_size: int = setting(16, "tokens per KV-cache block")
    num_blocks: int | None = setting(None, "KV-cache blocks in the pool (default: from --kv-cache-memory)")
    kv_cache_memory: float = setting(1.0, "GiB of memory for KV-cache blocks, used when --num-blocks is not given")
    kv_cache_dtype: str = setting(
        "float32",
        "KV-cache page format; float16 holds twice the tokens in the same memory, rounding each key and value; "
        "int8 holds 3.8x (SmolLM2), one float32 scale per token per KV head",
        choices=KV_CACHE_DTYPES,
    )
    max_num_batched_tokens: int = setting(512, "token budget per step; longer prompts are chunked")
    max_num_seqs: int = setting(32, "most requests running at once")
    max_model_len: int | None = setting(None, "context length limit (default: the model's)")
    block_allocator: str = setting(
        "lru", "block pool implementation: lru (reuse the longest-free block), or FILE.py:NAME"
    )
    kv_manager: str = setting("paged", "KV-cache manager implementation: paged (block tables), or FILE.py:NAME")
    prefix_cache: str = setting(
        "radix",
        "reuse the KV blocks of earlier requests' prefixes: radix (a radix tree, SGLang-style), "
        "hash (hash-chained blocks, vLLM-style), none, or FILE.py:NAME",
    )
    scheduler: str = setting(
        "fcfs",
        "scheduler: fcfs (admit in arrival order), lpm (admit the longest cached prefix first, "
        "never passing a request over more than 32 times), or FILE.py:NAME",
        aliases=("--schedule-policy",),  # SGLang's name
    )
    sampler: str = setting("default", "sampler implementation: default (seeded, per request), or FILE.py:NAME")
    threads: int | None = setting(
        None, "CPU threads for matrix products (OpenBLAS and the compiled linears); default: the thread policy (see docs/threads.md)"
    )
    speculative: str = setting(
        "none",
        "speculative decoding: none, ngram (propose tokens that followed the same n-gram earlier in "
        "prompt + output), or draft (a smaller or quantized model proposes them)",
        choices=SPECULATIVE_METHODS,
    )
    num_speculative_tokens: int = setting(4, "most tokens proposed per step when --speculative is on")
    prompt_lookup_min: int = setting(2, "ngram: shortest suffix n-gram to look up")
    prompt_lookup_max: int = setting(4, "ngram: longest suffix n-gram to look up")
    spec_draft_cost: float = setting(
        0.2,
        "what one draft adds to a verification, as a fraction of a one-token decode step: the policy "
        "models r(k) = 1 + cost * k and proposes only the drafts expected to pay (bench/speculative.py measures r(k))",
    )
    draft_model: str | None = setting(None, "draft: the proposing model (default: the target model's file)")
    draft_weights: str = setting("int8", "draft: the draft model's weight format", choices=WEIGHT_FORMATS)
    proposer: str | None = setting(
        None,
        "the proposer class when --speculative is on: the one --speculative names (default), or "
        "FILE.py:NAME built with the same arguments (ngram: prompt_lookup_min, prompt_lookup_max)",
    )
    acceptance: str = setting(
        "default",
        "the rejection sampler's accept_greedy and accept_random: default (nanoserve.spec.rejection's), "
        "or a FILE.py or module defining both",
    )


@dataclass
class ServerConfig:
    """How ``python -m nanoserve serve`` listens and admits requests (the engine's are separate)."""

    host: str = setting("127.0.0.1", "address to bind (127.0.0.1: this machine only; 0.0.0.0 for all)")
    port: int = setting(8000, "TCP port")
    api_key: str | None = setting(
        None, "require 'Authorization: Bearer KEY' on /v1/* (default: $NANOSERVE_API_KEY, else no key)",
        env="NANOSERVE_API_KEY",
    )
    served_model_name: str | None = setting(
        None, "the model id clients use (default: SmolLM2-135M-Instruct, or the name of --model)"
    )
    allowed_hosts: str | None = setting(
        None, "Host header names accepted besides --host and loopback, comma-separated ('*': any)"
    )
    allowed_origins: str | None = setting(
        None, "browser origins allowed by CORS, comma-separated ('*': any; default: CORS off)"
    )
    max_waiting: int = setting(
        256, "most queued requests, at least 16 (prompts x n of one request); more are refused with 503"
    )
    max_body_bytes: int | None = setting(None, "largest request body; larger gets 413 (default: 1 MiB)")
    limit_concurrency: int = setting(
        1000, "most open connections and in-flight HTTP requests; more get 503 at once (uvicorn's limit)"
    )
    timeout_keep_alive: float = setting(5.0, "seconds an idle keep-alive connection stays open")
    shutdown_timeout: float = setting(10.0, "seconds in-flight requests may take to finish on SIGINT/SIGTERM")
    log_level: str = setting("info", "uvicorn log level", choices=LOG_LEVELS)
    no_access_log: bool = setting(False, "do not log every HTTP request")


Config = TypeVar("Config")


def flag(name: str) -> str:
    """``kv_cache_dtype`` -> ``--kv-cache-dtype``."""
    return "--" + name.replace("_", "-")


def add_arguments(
    parser: argparse.ArgumentParser,
    config_class: type,
    title: str,
    only: tuple[str, ...] | None = None,
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add one flag per field of ``config_class`` (or of the fields named in ``only``).

    ``defaults`` overrides a field's default for this parser (a benchmark's own choice);
    the help text always states the default in effect.
    """
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if only is not None and f.name not in only:
            continue
        default = (defaults or {}).get(f.name, f.default)
        if f.metadata.get("env"):
            default = os.environ.get(f.metadata["env"], default)
        help_text = f.metadata["help"]
        kind = _value_type(hints[f.name])
        names = (flag(f.name), *f.metadata.get("aliases", ()))
        if kind is bool:
            group.add_argument(*names, action="store_true", default=default, help=help_text)
            continue
        if default is not None and f.metadata.get("env") is None:
            help_text += f" (default: {default})"
        group.add_argument(*names, type=kind, default=default, choices=f.metadata.get("choices"), help=help_text)


def from_args(config_class: type[Config], args: argparse.Namespace, **overrides: Any) -> Config:
    """Build ``config_class`` from parsed arguments; fields the parser lacks keep their defaults."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}  # type: ignore[arg-type]
    values.update(overrides)
    return config_class(**values)


def _value_type(hint: Any) -> type:
    """``int | None`` -> ``int``: the type argparse converts a flag's text to."""
    options = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    assert len(options) == 1, f"a config field must have one value type, got {hint}"
    return options[0]

"""``python -m nanoserve``: generate, chat, serve, check-kernels.

    python -m nanoserve generate "Why is the sky blue?"          # streamed answer
    python -m nanoserve generate --file prompts.txt --raw        # a batch, one prompt per line
    python -m nanoserve chat                                     # interactive, chat template
    python -m nanoserve serve --port 8000                        # OpenAI-compatible HTTP API
    python -m nanoserve check-kernels --backend cuda             # grade a kernel backend

The CLI is a thin shell over :class:`nanoserve.engine.LLMEngine`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from nanoserve import config
from nanoserve.config import EngineConfig, ServerConfig
from nanoserve.errors import NanoserveError


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float = 0.7) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most new tokens per answer (default: 256)")
    g.add_argument("--temperature", type=float, default=temperature, help=f"randomness; 0 = greedy, always the most likely token (default: {temperature})")
    g.add_argument("--top-k", type=int, default=0, help="sample only among the k most likely tokens; 0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens holding this much probability, in (0, 1]; 1 = off")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than min_p times the top token, in [0, 1]; 0 = off")
    g.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop when this text appears (not included in the output); repeatable")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def sampling_params(args: argparse.Namespace) -> Any:
    from nanoserve.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def build_engine(args: argparse.Namespace) -> Any:
    """The engine the command-line flags describe (the config's fields, generated as flags)."""
    from nanoserve.engine import LLMEngine

    engine = LLMEngine(config.from_args(EngineConfig, args))
    if engine.backend.fallbacks:
        print(f"note: backend {engine.backend.name!r} lacks {', '.join(engine.backend.fallbacks)}; using the reference kernels for them", file=sys.stderr)
    return engine


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.file:
        if not os.path.isfile(args.file):
            raise NanoserveError(f"--file {args.file}: no such file")
        with open(args.file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if args.file.endswith(".jsonl"):
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise NanoserveError(f"{args.file}:{line_no}: not valid JSON ({exc})") from exc
                    line = item["prompt"] if isinstance(item, dict) and "prompt" in item else item
                    if not isinstance(line, str):
                        raise NanoserveError(f'{args.file}:{line_no}: expected a string or {{"prompt": "..."}}')
                prompts.append(line)
    if not prompts:
        raise NanoserveError("give a prompt, several prompts, or --file FILE")
    return prompts


def stream_one(engine: Any, prompt: str, params: Any) -> Any:
    """Run one request, printing its text as it is generated; returns the final output."""
    request_id = engine.add_request(prompt, params)
    final = None
    while final is None:
        for out in engine.step():
            if out.request_id == request_id:
                print(out.delta, end="", flush=True)
                if out.finished:
                    final = out
    print(flush=True)
    if final.finish_reason == "error":
        raise NanoserveError(f"generation failed: {final.error}")
    return final


def cmd_generate(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    params = sampling_params(args)
    engine = build_engine(args)
    if not args.raw:
        prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) if engine.tokenizer.chat_template else p for p in prompts]
    if len(prompts) == 1:
        stream_one(engine, prompts[0], params)
        return 0
    from nanoserve.llm import LLM

    outputs = LLM(engine=engine).generate(prompts, params, use_tqdm=True)
    for i, out in enumerate(outputs):
        if args.jsonl:
            print(json.dumps({"index": i, "text": out.text, "finish_reason": out.finish_reason, "num_tokens": len(out.token_ids)}))
        else:
            print(f"--- [{i}] ({len(out.token_ids)} tokens, {out.finish_reason}) ---\n{out.text}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    engine = build_engine(args)
    params = sampling_params(args)
    if not engine.tokenizer.chat_template:
        raise NanoserveError("this model has no chat template; use `generate --raw` instead")
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print("nanoserve chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = engine.tokenizer.apply_chat_template(messages)
        try:
            out = stream_one(engine, prompt, params)
        except NanoserveError as exc:
            messages.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": out.text})


def cmd_serve(args: argparse.Namespace) -> int:
    from nanoserve.server.cli import check_server_config, run  # FastAPI and uvicorn load only here

    server = config.from_args(ServerConfig, args)
    check_server_config(server)  # limits, the port, exposure: before the model loads
    return run(build_engine(args), server, default_model_name=args.model is None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanoserve", description="nanoserve: a readable LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate answers for one or more prompts (streamed when there is one)")
    gen.add_argument("prompts", nargs="*", help="prompt text(s)")
    gen.add_argument("--file", help="read prompts from a file: one per line, or JSONL (strings or {\"prompt\": ...})")
    gen.add_argument("--raw", action="store_true", help="send prompts as they are, without the chat template")
    gen.add_argument("--jsonl", action="store_true", help="print batch results as JSON lines")
    config.add_arguments(gen, EngineConfig, "model and engine")
    add_sampling_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="an interactive chat in the terminal")
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")
    config.add_arguments(chat, EngineConfig, "model and engine")
    add_sampling_arguments(chat)
    chat.set_defaults(func=cmd_chat)

    from nanoserve import check_kernels

    serve = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    config.add_arguments(serve, EngineConfig, "model and engine")
    config.add_arguments(serve, ServerConfig, "server")
    serve.set_defaults(func=cmd_serve)

    ck = sub.add_parser("check-kernels", help="check a kernel backend against the reference kernels")
    check_kernels.add_arguments(ck)
    ck.set_defaults(func=check_kernels.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NanoserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``python -m nanoserve``: generate, chat, serve, perplexity, check-kernels, lab.

    python -m nanoserve generate "Why is the sky blue?"          # streamed answer
    python -m nanoserve generate --file prompts.txt --raw        # a batch, one prompt per line
    python -m nanoserve chat                                     # interactive, chat template
    python -m nanoserve serve --port 8000                        # OpenAI-compatible HTTP API
    python -m nanoserve perplexity plays.txt --weights int8      # llama-perplexity's protocol
    python -m nanoserve check-kernels --backend cuda             # grade a kernel backend
    python -m nanoserve lab check 04 labs_04/student.py          # grade a teaching lab

The CLI is a thin shell over :class:`nanoserve.engine.LLMEngine`. Every command first
applies the thread policy (``--threads``, :mod:`nanoserve.threads`) and prints its line to
stderr (``serve`` logs it once, with the rest of its startup configuration); ``--verbose`` ends ``generate`` with llama.cpp's kind of timing line. ``chat`` is a
REPL with ``/help``, ``/reset``, ``/stats``, Ollama's triple-quote multi-line input, and
Ctrl-C that stops an answer without leaving anything in the engine (:func:`chat_repl`).
Errors are one ``error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from nanoserve import config, threads
from nanoserve.config import EngineConfig, ServerConfig
from nanoserve.errors import NanoserveError

#: chat's default repetition penalty: mild, as Ollama's ``repeat_penalty`` default (1.1), so a small
#: model at low temperature does not loop; applied as vLLM does, over prompt and output tokens.
CHAT_REPETITION_PENALTY = 1.1


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float = 0.7, repetition_penalty: float = 1.0) -> None:
    """The sampling flags (SamplingParams' fields); ``chat`` passes its own defaults."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most new tokens per answer (default: 256)")
    g.add_argument("--temperature", type=float, default=temperature, help=f"randomness; 0 = greedy, always the most likely token (default: {temperature})")
    g.add_argument("--top-k", type=int, default=0, help="sample only among the k most likely tokens; 0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens holding this much probability, in (0, 1]; 1 = off")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than min_p times the top token, in [0, 1]; 0 = off")
    g.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop when this text appears (not included in the output); repeatable")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]: minus this from the logit of every token already in the output (OpenAI's); 0 = off")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]: minus this times the token's count in the output (OpenAI's); 0 = off")
    g.add_argument(
        "--repetition-penalty", type=float, default=repetition_penalty,
        help=f"in [0.01, 100]: divide a positive logit (multiply a negative one) of every token seen in the prompt or output by this (vLLM's); 1 = off (default: {repetition_penalty:g})",
    )


def add_constraint_arguments(parser: argparse.ArgumentParser) -> None:
    """Structured-output flags (``generate``): at most one constraint (docs/structured.md)."""
    g = parser.add_argument_group("structured output (at most one)")
    g.add_argument("--regex", default=None, help="the answer must match this regular expression")
    g.add_argument("--json-schema", metavar="JSON_OR_FILE", default=None, help="the answer must be JSON valid against this schema (inline JSON, or a file holding it)")
    g.add_argument("--json-object", action="store_true", help="the answer must be a JSON object")
    g.add_argument("--choice", action="append", default=None, help="the answer must be exactly one of these strings; repeatable")
    g.add_argument("--no-jump-forward", action="store_true", help="sample every token, even those the constraint forces")


def constraint_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The SamplingParams fields the structured-output flags set (none when they are absent)."""
    import json

    from nanoserve.errors import InvalidSamplingParams

    fields: dict[str, Any] = {}
    if getattr(args, "regex", None) is not None:
        fields["regex"] = args.regex
    schema = getattr(args, "json_schema", None)
    if schema is not None:
        try:
            if os.path.isfile(schema):
                with open(schema) as f:
                    fields["json_schema"] = json.load(f)
            else:
                fields["json_schema"] = json.loads(schema)
        except (OSError, ValueError) as exc:
            raise InvalidSamplingParams(f"invalid --json-schema: neither a readable file nor JSON ({exc})") from None
    if getattr(args, "json_object", False):
        fields["json_schema"] = {"type": "object"}
    if getattr(args, "choice", None):
        fields["choice"] = list(args.choice)
    if fields and getattr(args, "no_jump_forward", False):
        fields["jump_forward"] = False
    return fields


def sampling_params(args: argparse.Namespace) -> Any:
    from nanoserve.sampling import SamplingParams

    return SamplingParams(
        **constraint_fields(args),
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
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


def timing_line(out: Any) -> str:
    """One request's counts and speeds, the way llama.cpp closes a run (printed to stderr).

    TTFT runs from ``add_request`` to the first token. prefill tok/s = the prompt tokens the
    engine computed (not taken from the prefix cache) / TTFT; decode tok/s = the output
    tokens after the first / the time from the first token to the last.
    """
    prompt, cached, n = len(out.prompt_token_ids), out.num_cached_tokens, len(out.token_ids)
    parts = [f"prompt {prompt} tokens" + (f" ({cached} cached)" if cached else "") + f", output {n} tokens"]
    ttft = out.time_to_first_token
    if ttft is None:
        return parts[0] + "; no token generated"
    parts += [f"TTFT {1000 * ttft:.1f} ms", f"prefill {(prompt - cached) / ttft:.1f} tok/s"]
    if n >= 2 and out.finish_time is not None and out.finish_time > out.first_token_time:
        decode_s = out.finish_time - out.first_token_time
        parts.append(f"decode {(n - 1) / decode_s:.1f} tok/s ({n - 1} token{'s' if n > 2 else ''} in {1000 * decode_s:.1f} ms)")
    return "; ".join(parts)


def batch_timing_line(outputs: list[Any], wall_s: float) -> str:
    """A batch's totals: tokens in and out, output tok/s over the wall time, mean TTFT."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    generated = sum(len(o.token_ids) for o in outputs)
    ttfts = [o.time_to_first_token for o in outputs if o.time_to_first_token is not None]
    mean_ttft = f"; mean TTFT {1000 * sum(ttfts) / len(ttfts):.1f} ms" if ttfts else ""
    return (
        f"{len(outputs)} prompts: prompt {prompt} tokens, output {generated} tokens in {wall_s:.2f} s "
        f"({generated / wall_s:.1f} output tok/s){mean_ttft}"
    )


class CtrlC:
    """While active, Ctrl-C (SIGINT) sets ``pressed`` instead of raising KeyboardInterrupt.

    The streaming loop looks at ``pressed`` between engine steps, so an interrupt never lands
    in the middle of a step (where it could leave a request half-updated). Outside the main
    thread, where Python delivers no signals, it installs nothing.
    """

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.pressed = True

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def stream_one(engine: Any, prompt: str, params: Any, out: TextIO | None = None, ctrl_c: CtrlC | None = None) -> Any:
    """Run one request, writing its text to ``out`` (stdout) as it is generated; returns the final output.

    With ``ctrl_c``, a Ctrl-C aborts the request after the step in flight: the final output
    then has ``finish_reason == "abort"`` and the engine holds nothing of it.
    """
    out = out or sys.stdout
    request_id = engine.add_request(prompt, params)
    final = None
    while final is None:
        if ctrl_c is not None and ctrl_c.pressed:
            engine.abort(request_id)  # its final output comes with the next step
        for o in engine.step():
            if o.request_id == request_id:
                out.write(o.delta)
                out.flush()
                if o.finished:
                    final = o
    out.write("\n")
    out.flush()
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
        final = stream_one(engine, prompts[0], params)
        if args.verbose:
            print(timing_line(final), file=sys.stderr)
        return 0
    from nanoserve.llm import LLM

    start = time.monotonic()
    outputs = LLM(engine=engine).generate(prompts, params, use_tqdm=True)
    wall_s = time.monotonic() - start
    for i, out in enumerate(outputs):
        if args.jsonl:
            print(json.dumps({"index": i, "text": out.text, "finish_reason": out.finish_reason, "num_tokens": len(out.token_ids)}))
        else:
            print(f"--- [{i}] ({len(out.token_ids)} tokens, {out.finish_reason}) ---\n{out.text}")
    if args.verbose:
        print(batch_timing_line(outputs, wall_s), file=sys.stderr)
    return 0


# --- chat ---------------------------------------------------------------------------------
CHAT_COMMANDS = {
    "/help": "list these commands (also /?)",
    "/reset": "clear the conversation, after asking",
    "/stats": "the last answer's tokens, time to first token and tokens/s",
    "/exit": "quit (also /bye, /quit, Ctrl-D, or Ctrl-C twice)",
}
MULTILINE = '"""'


def chat_help() -> str:
    """The text ``/help`` prints: every command, then how to type a multi-line message."""
    lines = [f"  {name:<8}{what}" for name, what in CHAT_COMMANDS.items()]
    lines.append(f"  {MULTILINE:<8}begin a multi-line message; end it with a line that ends in {MULTILINE}")
    lines.append("  Ctrl-C  stop the answer being written (at the prompt: press it twice to quit)")
    return "\n".join(lines)


def read_message(read: Callable[[str], str]) -> tuple[str, bool]:
    """One message from ``read`` (``input``): ``(text, typed over several lines)``.

    Ollama's convention: a line starting with three double quotes opens a multi-line message,
    and the first line ending with them closes it; the quotes are not part of the text.
    EOFError and KeyboardInterrupt pass through (the message so far is dropped).
    """
    line = read("> ")
    if not line.lstrip().startswith(MULTILINE):
        return line, False
    rest = line.lstrip()[len(MULTILINE) :]
    if rest.endswith(MULTILINE):  # opened and closed on one line
        return rest[: -len(MULTILINE)], True
    lines = [rest]
    while True:
        line = read("... ")
        if line.endswith(MULTILINE):
            lines.append(line[: -len(MULTILINE)])
            return "\n".join(lines).strip("\n"), True
        lines.append(line)


def confirm(read: Callable[[str], str], question: str) -> bool:
    """``question [y/N]``: True only for y or yes; Ctrl-C or Ctrl-D count as no."""
    try:
        return read(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except (EOFError, KeyboardInterrupt):
        return False


def chat_repl(
    engine: Any,
    params: Any,
    system: str | None = None,
    verbose: bool = False,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """The interactive chat: read a message, stream the answer, keep the conversation; returns 0.

    - Ctrl-C while an answer streams stops it: the request is aborted (the engine keeps
      nothing of it) and that question and partial answer are left out of the conversation.
    - Ctrl-C at the prompt once says how to quit; a second one in a row (also right after a
      stopped answer), Ctrl-D, or ``/exit`` quits.
    - A line starting with ``/`` is a command (``/help``), never sent to the model; a
      multi-line message (``read_message``) is always sent.
    - ``/stats``, and with ``verbose`` a line after every answer, give :func:`timing_line`.

    ``read`` is ``input`` (it shows the prompt); the answers go to ``out`` (stdout) and
    everything else to ``err`` (stderr).
    """
    out, err = out or sys.stdout, err or sys.stderr
    start: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    last = None  # the last answer's final output
    ctrl_c_before = False  # the previous event was a Ctrl-C: another one quits
    while True:
        try:
            text, multiline = read_message(read)
        except EOFError:
            err.write("\n")
            return 0
        except KeyboardInterrupt:
            if ctrl_c_before:
                err.write("\n")
                return 0
            err.write("\n(Ctrl-C again, Ctrl-D or /exit quits)\n")
            ctrl_c_before = True
            continue
        ctrl_c_before = False
        if not text.strip():
            continue
        if text.strip().startswith("/") and not multiline:
            command = text.strip().split()[0].lower()
            if command in ("/exit", "/quit", "/bye"):
                return 0
            if command in ("/help", "/?"):
                err.write(chat_help() + "\n")
            elif command == "/reset":
                turns = len(messages) - len(start)
                if confirm(read, f"clear the conversation ({turns} messages)?"):
                    messages = list(start)
                    err.write("conversation cleared\n")
                else:
                    err.write("kept the conversation\n")
            elif command == "/stats":
                err.write((timing_line(last) if last is not None else "no answer yet") + "\n")
            else:
                err.write(f"unknown command {command}; /help lists the commands\n")
            continue
        messages.append({"role": "user", "content": text})
        prompt = engine.tokenizer.apply_chat_template(messages)
        try:
            with CtrlC() as ctrl_c:
                final = stream_one(engine, prompt, params, out, ctrl_c)
        except NanoserveError as exc:
            messages.pop()
            err.write(f"error: {exc}\n")
            continue
        last = final
        if final.finish_reason == "abort":
            messages.pop()
            err.write("(answer stopped; left out of the conversation)\n")
            ctrl_c_before = True
            continue
        messages.append({"role": "assistant", "content": final.text})
        if verbose:
            err.write(timing_line(final) + "\n")


def cmd_chat(args: argparse.Namespace) -> int:
    engine = build_engine(args)
    params = sampling_params(args)
    if not engine.tokenizer.chat_template:
        raise NanoserveError("this model has no chat template; use `generate --raw` instead")
    print(f'nanoserve chat: type a message ({MULTILINE} for several lines); /help lists the commands, Ctrl-D quits.', file=sys.stderr)
    return chat_repl(engine, params, args.system, args.verbose)


def cmd_serve(args: argparse.Namespace) -> int:
    from nanoserve.server.cli import check_server_config, run  # FastAPI and uvicorn load only here

    server = config.from_args(ServerConfig, args)
    check_server_config(server)  # limits, the port, exposure: before the model loads
    return run(build_engine(args), server, default_model_name=args.model is None)


def cmd_perplexity(args: argparse.Namespace) -> int:
    """llama-perplexity's protocol on FILE (:mod:`nanoserve.perplexity`): the figures, or one JSON object."""
    from nanoserve import perplexity as ppl

    ppl.check_settings(args.ctx, args.chunks)  # before the model loads: a bad flag fails in a moment
    text = ppl.read_text(args.file)
    engine = build_engine(args)
    try:
        result = ppl.perplexity(engine, text, ctx=args.ctx, chunks=args.chunks, use_tqdm=True)
    except ppl.PerplexityError as exc:
        raise ppl.PerplexityError(f"{args.file}: {exc}") from None
    run = {"file": args.file, "model": engine.model_name, "weights": engine.config.weights,
           "kv_cache_dtype": engine.config.kv_cache_dtype, "backend": engine.backend.name}  # fmt: skip
    if args.json:
        print(json.dumps({**run, **result.to_dict()}))
        return 0
    first = ppl.first_scored(result.ctx)
    print(f"{run['model']} ({run['weights']} weights, {run['kv_cache_dtype']} KV, {run['backend']} backend): "
          f"{result.num_tokens} tokens, {result.windows} windows of {result.ctx}, {result.ctx - first - 1} scored in each")  # fmt: skip
    running = [sum(result.window_nll[: i + 1]) / (i + 1) for i in range(result.windows)]  # windows score alike
    print(",".join(f"[{i + 1}]{math.exp(nll):.4f}" for i, nll in enumerate(running)))  # llama-perplexity's progress line
    print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.stderr:.5f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanoserve", description="nanoserve: a readable LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate answers for one or more prompts (streamed when there is one)")
    gen.add_argument("prompts", nargs="*", help="prompt text(s)")
    gen.add_argument("--file", help="read prompts from a file: one per line, or JSONL (strings or {\"prompt\": ...})")
    gen.add_argument("--raw", action="store_true", help="send prompts as they are, without the chat template")
    gen.add_argument("--jsonl", action="store_true", help="print batch results as JSON lines")
    gen.add_argument("--verbose", action="store_true", help="end with a stderr line: prompt and output tokens, TTFT, prefill and decode tok/s")
    config.add_arguments(gen, EngineConfig, "model and engine")
    add_sampling_arguments(gen)
    add_constraint_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="an interactive chat in the terminal")
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")
    chat.add_argument("--verbose", action="store_true", help="after every answer, a stderr line: its tokens, TTFT and tok/s (as /stats)")
    config.add_arguments(chat, EngineConfig, "model and engine")
    add_sampling_arguments(chat, repetition_penalty=CHAT_REPETITION_PENALTY)
    chat.set_defaults(func=cmd_chat)

    from nanoserve import check_kernels

    serve = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    config.add_arguments(serve, EngineConfig, "model and engine")
    config.add_arguments(serve, ServerConfig, "server")
    serve.set_defaults(func=cmd_serve)

    pp = sub.add_parser("perplexity", help="perplexity of a text file, by llama-perplexity's protocol")
    pp.add_argument("file", help="a UTF-8 text file")
    pp.add_argument("--ctx", type=int, default=512, help="tokens per window; the second half of each is scored (default: 512)")
    pp.add_argument("--chunks", type=int, default=None, metavar="N", help="score only the first N windows (default: every whole window)")
    pp.add_argument("--json", action="store_true", help="print one JSON object: ppl, stderr, windows, tokens scored, NLL per window")
    config.add_arguments(pp, EngineConfig, "model and engine", only=("model", "backend", "weights", "activations", "kv_cache_dtype", "threads"))
    pp.set_defaults(func=cmd_perplexity, num_blocks=1)  # the engine's own pool stays unused: one block

    ck = sub.add_parser("check-kernels", help="check a kernel backend against the reference kernels")
    check_kernels.add_arguments(ck)
    ck.set_defaults(func=check_kernels.run)

    from nanoserve.labs import cli as labs_cli

    lab = sub.add_parser("lab", help="teaching labs: list them, start one, check your work")
    labs_cli.add_arguments(lab)
    lab.set_defaults(func=labs_cli.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        line = threads.apply(getattr(args, "threads", None))  # every command: the threads first
        if args.command != "serve":  # serve logs the same line with the rest of its configuration
            print(line, file=sys.stderr)
        return int(args.func(args) or 0)
    except NanoserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

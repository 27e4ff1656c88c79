"""The chat REPL (``nanoserve.cli.chat_repl``) driven by a scripted keyboard on the tiny model.

Each answer is checked against ``LLM.chat`` on the conversation the REPL should be holding,
so a test of ``/reset`` or of a stopped answer is a test of what the model is really sent.
Ctrl-C is simulated as the terminal sends it: SIGINT to this process while an answer
streams, KeyboardInterrupt from ``input`` at the prompt.
"""

from __future__ import annotations

import io
import signal

import pytest

from nanoserve.cli import CHAT_COMMANDS, chat_repl
from nanoserve.llm import LLM
from nanoserve.sampling import SamplingParams
from tests.test_engine import make_engine

PARAMS = SamplingParams(temperature=0, max_tokens=6)
LONG = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


class Keyboard:
    """``input`` replaced by a script: each item is a line typed, or an exception (Ctrl-C, Ctrl-D)
    raised at that prompt; after the last item, Ctrl-D."""

    def __init__(self, *items: str | BaseException) -> None:
        self.items = list(items)
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if not self.items:
            raise EOFError
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


class CountingEngine:
    """The real engine, counting the requests it is sent."""

    def __init__(self, engine) -> None:
        self.engine, self.requests = engine, 0

    def add_request(self, *args, **kwargs):
        self.requests += 1
        return self.engine.add_request(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


class CtrlCWhileStreaming(io.StringIO):
    """stdout that sends this process SIGINT (Ctrl-C) at its ``at``-th write of an answer."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.writes = at, 0

    def write(self, text: str) -> int:
        self.writes += 1
        if self.writes == self.at:
            signal.raise_signal(signal.SIGINT)
        return super().write(text)


@pytest.fixture()
def engine(tiny_loaded):
    return CountingEngine(make_engine(tiny_loaded))


def answer(engine: CountingEngine, conversation: list[tuple[str, str]], params: SamplingParams = PARAMS) -> str:
    """What the model answers to ``conversation`` ((role, content) pairs), through ``LLM.chat``."""
    messages = [{"role": role, "content": content} for role, content in conversation]
    return LLM(engine=engine.engine).chat(messages, params)[0].text


def run(engine: CountingEngine, keyboard: Keyboard, params: SamplingParams = PARAMS, out: io.StringIO | None = None, **kw) -> tuple[int, str, str]:
    out, err = out if out is not None else io.StringIO(), io.StringIO()
    status = chat_repl(engine, params, read=keyboard, out=out, err=err, **kw)
    return status, out.getvalue(), err.getvalue()


def assert_idle(engine: CountingEngine) -> None:
    engine.check_invariants()
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.num_used_blocks) == ((), (), 0)
    assert not engine.has_unfinished_requests()


def test_help_lists_every_command_and_is_never_sent_to_the_model(engine) -> None:
    status, out, err = run(engine, Keyboard("/help", "/?", "/nope", "/exit", "never read"))
    assert status == 0 and engine.requests == 0 and out == ""
    for command in CHAT_COMMANDS:
        assert err.count(command) >= 2, command  # listed by /help and by /?
    assert '"""' in err and "Ctrl-C" in err
    assert "unknown command /nope; /help lists the commands" in err


def test_answers_keep_the_conversation(engine) -> None:
    first = answer(engine, [("user", "hello")])
    second = answer(engine, [("user", "hello"), ("assistant", first), ("user", "again")])
    status, out, _ = run(engine, Keyboard("hello", "again"))
    assert status == 0
    assert out == f"{first}\n{second}\n"


def test_triple_quotes_make_one_multi_line_message(engine) -> None:
    expected = answer(engine, [("user", "first line\nsecond line")])
    keyboard = Keyboard('"""first line', 'second line"""', '"""one line"""', '"""', "/help", '"""')
    status, out, err = run(engine, keyboard)
    assert status == 0
    assert keyboard.prompts[:2] == ["> ", "... "]  # the continuation prompt
    one_line = answer(engine, [("user", "first line\nsecond line"), ("assistant", expected), ("user", "one line")])
    assert out.splitlines()[:2] == [expected, one_line]
    assert engine.requests == 3 and "/help" not in err  # inside quotes, /help is text for the model


def test_ctrl_c_while_streaming_stops_the_answer_and_leaves_it_out_of_the_conversation(engine) -> None:
    full = answer(engine, [("user", "tell me a story")], LONG)
    after = answer(engine, [("user", "hello")], LONG)  # as if the stopped exchange never happened
    out = CtrlCWhileStreaming(at=3)
    status, _, err = run(engine, Keyboard("tell me a story", "hello"), LONG, out=out)
    assert status == 0
    stopped, rest = out.getvalue().split("\n", 1)
    assert full.startswith(stopped) and len(stopped) < len(full)
    assert "(answer stopped; left out of the conversation)" in err
    assert rest == after + "\n"
    assert_idle(engine)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C raises again at the prompt


def test_ctrl_c_at_the_prompt_once_warns_twice_quits(engine) -> None:
    status, out, err = run(engine, Keyboard(KeyboardInterrupt(), "hello", KeyboardInterrupt(), KeyboardInterrupt(), "never read"))
    assert status == 0
    assert err.count("(Ctrl-C again, Ctrl-D or /exit quits)") == 2  # a message in between starts the count again
    assert engine.requests == 1 and out == answer(engine, [("user", "hello")]) + "\n"


def test_ctrl_c_right_after_a_stopped_answer_quits(engine) -> None:
    keyboard = Keyboard("tell me a story", KeyboardInterrupt(), "never read")
    status, _, err = run(engine, keyboard, LONG, out=CtrlCWhileStreaming(at=2))
    assert status == 0 and "Ctrl-C again" not in err
    assert keyboard.items == ["never read"]
    assert_idle(engine)


def test_ctrl_d_quits_even_inside_a_multi_line_message(engine) -> None:
    assert run(engine, Keyboard(EOFError()))[0] == 0
    assert run(engine, Keyboard('"""half a', EOFError(), "never read"))[0] == 0
    assert engine.requests == 0


def test_reset_asks_first_and_clears_only_on_yes(engine) -> None:
    a1 = answer(engine, [("user", "hello")])
    kept = answer(engine, [("user", "hello"), ("assistant", a1), ("user", "again")])
    fresh = answer(engine, [("user", "again")])
    keyboard = Keyboard("hello", "/reset", "n", "/reset", "yes", "again")
    status, out, err = run(engine, keyboard)
    assert status == 0
    assert out == f"{a1}\n{fresh}\n"
    assert "clear the conversation (2 messages)? [y/N] " in keyboard.prompts
    assert "kept the conversation" in err and "conversation cleared" in err
    status, out, _ = run(engine, Keyboard("hello", "/reset", KeyboardInterrupt(), "again"))
    assert out == f"{a1}\n{kept}\n"  # Ctrl-C at the question is a no


def test_reset_keeps_the_system_message(engine) -> None:
    expected = answer(engine, [("system", "be brief"), ("user", "again")])
    _, out, _ = run(engine, Keyboard("hello", "/reset", "y", "again"), system="be brief")
    assert out.splitlines()[1] == expected


def test_stats_gives_the_last_answers_tokens_ttft_and_speed(engine) -> None:
    _, out, err = run(engine, Keyboard("/stats", "hello", "/stats"))
    lines = err.splitlines()
    assert lines[0] == "no answer yet"
    n = len(LLM(engine=engine.engine).chat([{"role": "user", "content": "hello"}], PARAMS)[0].token_ids)
    assert lines[1].startswith("prompt ") and f"output {n} tokens; TTFT " in lines[1]
    assert "prefill " in lines[1] and "decode " in lines[1] and lines[1].count("tok/s") == 2


def test_verbose_prints_the_stats_line_after_every_answer(engine) -> None:
    _, out, err = run(engine, Keyboard("hello", "again"), verbose=True)
    assert len(out.splitlines()) == 2
    assert [line.startswith("prompt ") and "TTFT" in line for line in err.strip().splitlines()] == [True, True]

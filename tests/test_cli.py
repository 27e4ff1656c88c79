"""``python -m nanoserve generate`` run as a user runs it: a subprocess on the tiny model.

Greedy output is checked against the :class:`nanoserve.LLM` API on the same model, so the
CLI is held to printing exactly what the engine generates; errors exit with status 2 and
end with one ``error:`` line that says what was wrong.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from nanoserve import LLM, SamplingParams
from nanoserve.cli import CHAT_REPETITION_PENALTY, build_parser, sampling_params

GREEDY = ["--temperature", "0", "--max-tokens", "8"]
PROMPTS = ["Hello world", "The quick brown fox", "Paris is the capital of"]
SAMPLING_FLAGS = [
    "--max-tokens", "--temperature", "--top-k", "--top-p", "--min-p", "--seed", "--stop", "--ignore-eos",
    "--presence-penalty", "--frequency-penalty", "--repetition-penalty",
]


def nanoserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanoserve", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def llm(tiny_model_dir: str) -> LLM:
    return LLM(model=tiny_model_dir, num_blocks=64)


def greedy_texts(llm: LLM, prompts: list[str], chat: bool) -> list:
    if chat:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    return llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)


# --- generating ----------------------------------------------------------------------------


def test_generate_raw_streams_the_greedy_answer_of_one_prompt(tiny_model_dir: str, llm: LLM) -> None:
    result = nanoserve("generate", "--model", tiny_model_dir, *GREEDY, "--raw", PROMPTS[0])
    assert result.returncode == 0, result.stderr
    (expected,) = greedy_texts(llm, PROMPTS[:1], chat=False)
    assert result.stdout == expected.text + "\n"
    assert len(expected.token_ids) == 8


def test_generate_with_float16_kv_pages_matches_the_engine_run_alike(tiny_model_dir: str) -> None:
    result = nanoserve("generate", "--model", tiny_model_dir, *GREEDY, "--raw", "--kv-cache-dtype", "float16", PROMPTS[0])
    assert result.returncode == 0, result.stderr
    llm16 = LLM(model=tiny_model_dir, num_blocks=64, kv_cache_dtype="float16")
    assert llm16.engine.cache.k.dtype == np.float16
    (expected,) = greedy_texts(llm16, PROMPTS[:1], chat=False)
    assert result.stdout == expected.text + "\n"
    bad = nanoserve("generate", "--model", tiny_model_dir, "--kv-cache-dtype", "bfloat16", PROMPTS[0])
    assert bad.returncode == 2 and "--kv-cache-dtype" in bad.stderr


def test_generate_applies_the_chat_template_unless_raw(tiny_model_dir: str, llm: LLM) -> None:
    result = nanoserve("generate", "--model", tiny_model_dir, *GREEDY, PROMPTS[0])
    assert result.returncode == 0, result.stderr
    (chat,) = greedy_texts(llm, PROMPTS[:1], chat=True)
    (raw,) = greedy_texts(llm, PROMPTS[:1], chat=False)
    assert result.stdout == chat.text + "\n"
    assert chat.token_ids != raw.token_ids  # the template really changed the prompt


def test_generate_file_of_lines_prints_one_block_per_prompt_in_order(tiny_model_dir: str, llm: LLM, tmp_path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join([PROMPTS[0], "", PROMPTS[1], PROMPTS[2]]) + "\n", encoding="utf-8")  # blank lines are skipped
    result = nanoserve("generate", "--model", tiny_model_dir, *GREEDY, "--raw", "--file", str(path))
    assert result.returncode == 0, result.stderr
    outputs = greedy_texts(llm, PROMPTS, chat=False)
    expected = "".join(
        f"--- [{i}] ({len(o.token_ids)} tokens, {o.finish_reason}) ---\n{o.text}\n" for i, o in enumerate(outputs)
    )
    assert result.stdout == expected


def test_generate_jsonl_file_prints_json_lines_with_chat_prompts(tiny_model_dir: str, llm: LLM, tmp_path) -> None:
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps(PROMPTS[0]), json.dumps({"prompt": PROMPTS[1]}), json.dumps({"prompt": PROMPTS[2], "id": 7})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = nanoserve("generate", "--model", tiny_model_dir, *GREEDY, "--file", str(path), "--jsonl")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    outputs = greedy_texts(llm, PROMPTS, chat=True)
    assert rows == [
        {"index": i, "text": o.text, "finish_reason": o.finish_reason, "num_tokens": len(o.token_ids)}
        for i, o in enumerate(outputs)
    ]


def test_generate_verbose_ends_with_a_timing_line_on_stderr(tiny_model_dir: str, llm: LLM) -> None:
    result = nanoserve("generate", "--model", tiny_model_dir, *GREEDY, "--raw", "--ignore-eos", "--verbose", PROMPTS[0])
    assert result.returncode == 0, result.stderr
    expected = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert result.stdout == expected.text + "\n"  # stdout is the answer alone
    last = result.stderr.strip().splitlines()[-1]
    number = r"[0-9]+(\.[0-9])?"
    assert re.fullmatch(
        rf"prompt {len(expected.prompt_token_ids)} tokens, output 8 tokens; TTFT {number} ms; prefill {number} tok/s; "
        rf"decode {number} tok/s \(7 tokens in {number} ms\)",
        last,
    ), last


def test_generate_verbose_on_a_batch_ends_with_its_totals(tiny_model_dir: str, llm: LLM, tmp_path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    result = nanoserve("generate", "--model", tiny_model_dir, *GREEDY, "--raw", "--verbose", "--file", str(path))
    assert result.returncode == 0, result.stderr
    outputs = greedy_texts(llm, PROMPTS, chat=False)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.token_ids) for o in outputs)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"3 prompts: prompt {prompt_tokens} tokens, output {output_tokens} tokens in "), last
    assert "output tok/s" in last and "mean TTFT" in last


def test_generate_without_verbose_prints_only_the_thread_line_on_stderr(tiny_model_dir: str) -> None:
    result = nanoserve("generate", "--model", tiny_model_dir, *GREEDY, "--raw", PROMPTS[0])
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [result.stderr.splitlines()[0]]
    assert result.stderr.startswith("threads: ")


def test_penalty_flags_reach_the_sampler_as_the_llm_api_applies_them(tiny_model_dir: str, llm: LLM) -> None:
    flags = ["--repetition-penalty", "1.5", "--presence-penalty", "0.5", "--frequency-penalty", "0.25"]
    result = nanoserve("generate", "--model", tiny_model_dir, "--temperature", "0", "--max-tokens", "16", "--ignore-eos", "--raw", *flags, PROMPTS[1])
    assert result.returncode == 0, result.stderr
    params = dict(temperature=0, max_tokens=16, ignore_eos=True)
    penalised = llm.generate(PROMPTS[1:2], SamplingParams(**params, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25), use_tqdm=False)[0]
    plain = llm.generate(PROMPTS[1:2], SamplingParams(**params), use_tqdm=False)[0]
    assert result.stdout == penalised.text + "\n"
    assert penalised.token_ids != plain.token_ids  # the flags really changed what was generated


def test_chat_has_a_mild_default_repetition_penalty_and_generate_none() -> None:
    chat = sampling_params(build_parser().parse_args(["chat"]))
    generate = sampling_params(build_parser().parse_args(["generate", "hi"]))
    assert chat.repetition_penalty == CHAT_REPETITION_PENALTY == 1.1
    assert generate.repetition_penalty == 1.0
    assert (chat.presence_penalty, chat.frequency_penalty) == (generate.presence_penalty, generate.frequency_penalty) == (0.0, 0.0)
    assert sampling_params(build_parser().parse_args(["chat", "--repetition-penalty", "1"])).repetition_penalty == 1.0
    help_text = " ".join(nanoserve("chat", "--help").stdout.split())
    assert "(vLLM's); 1 = off (default: 1.1)" in help_text


# --- errors --------------------------------------------------------------------------------
# One error runs as a subprocess (the real exit status); the others call the same main()
# in-process, which returns the status the process exits with.


def run_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """``nanoserve.cli.main(args)`` -> (exit status, stderr); argparse errors exit via SystemExit."""
    from nanoserve.cli import main

    try:
        status = main(list(args))
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


def assert_error(status: int, stderr: str, *fragments: str) -> None:
    assert status == 2, stderr
    last = stderr.strip().splitlines()[-1]
    assert "error:" in last, stderr
    for fragment in fragments:
        assert fragment in last, stderr
    assert "Traceback" not in stderr


def test_prompt_longer_than_the_context_exits_2(tiny_model_dir: str) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    result = nanoserve("generate", "--model", tiny_model_dir, *GREEDY, "--raw", "--max-model-len", "8", prompt)
    assert result.stdout == ""
    assert_error(result.returncode, result.stderr, "context holds 8", "shorten the prompt")


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--temperature", "-1"], ["temperature", ">= 0"]),
        (["--top-p", "1.5"], ["top_p", "(0, 1]"]),
        (["--top-k", "-2"], ["top_k"]),
        (["--min-p", "2"], ["min_p"]),
        (["--max-tokens", "0"], ["max_tokens"]),
        (["--temperature", "warm"], ["--temperature", "invalid float value"]),
        (["--repetition-penalty", "0"], ["repetition_penalty", "[0.01, 100]"]),
        (["--presence-penalty", "3"], ["presence_penalty", "[-2, 2]"]),
        (["--frequency-penalty", "-2.5"], ["frequency_penalty", "[-2, 2]"]),
    ],
)
def test_bad_sampling_flags_exit_2_with_an_error_naming_the_parameter(
    flags: list[str], fragments: list[str], tiny_model_dir: str, capsys: pytest.CaptureFixture
) -> None:
    assert_error(*run_main(capsys, "generate", "--model", tiny_model_dir, *flags, "hi"), *fragments)


def test_missing_model_exits_2_naming_the_path(tmp_path, capsys: pytest.CaptureFixture) -> None:
    missing = str(tmp_path / "no-such-model")
    assert_error(*run_main(capsys, "generate", "--model", missing, "hi"), missing, "not found")


def test_no_prompt_at_all_exits_2(tiny_model_dir: str, capsys: pytest.CaptureFixture) -> None:
    assert_error(*run_main(capsys, "generate", "--model", tiny_model_dir), "give a prompt")


def test_bad_jsonl_line_exits_2_naming_file_and_line(tiny_model_dir: str, tmp_path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{not json\n', encoding="utf-8")
    assert_error(*run_main(capsys, "generate", "--model", tiny_model_dir, "--file", str(path)), f"{path}:2", "not valid JSON")


# --- help --------------------------------------------------------------------------------------


def test_generate_help_mentions_every_sampling_flag() -> None:
    result = nanoserve("generate", "--help")
    assert result.returncode == 0
    for flag in SAMPLING_FLAGS:
        assert flag in result.stdout, flag


def test_chat_repl_answers_keeps_history_and_exits_on_command(tiny_model_dir: str, llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, repetition_penalty=CHAT_REPETITION_PENALTY)  # chat's default
    first = llm.chat([{"role": "user", "content": "hello"}], params)[0].text
    second = llm.chat(
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first}, {"role": "user", "content": "again"}], params
    )[0].text
    result = subprocess.run(
        [sys.executable, "-m", "nanoserve", "chat", "--model", tiny_model_dir, "--temperature", "0", "--max-tokens", "6"],
        input="hello\nagain\n/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"> {first}\n> {second}\n> "


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--max-num-seqs", "0"], ["max_num_seqs must be an integer >= 1, got 0"]),
        (["--block-size", "0"], ["block_size must be an integer >= 1"]),
        (["--max-num-batched-tokens", "-3"], ["max_num_batched_tokens must be an integer >= 1"]),
        (["--kv-cache-memory", "0"], ["kv_cache_memory must be > 0 GiB"]),
        (["--kv-cache-memory", "-1"], ["kv_cache_memory must be > 0 GiB"]),
        (["--kv-cache-memory", "100000"], ["the KV pool needs", "GiB of memory is available"]),
        (["--kv-cache-memory", "1e-9"], ["holds no KV block"]),
        (["--max-model-len", "100000"], ["max_model_len=100000 is longer than the model's context"]),
        (["--file", "/no/such/prompts.txt"], ["--file /no/such/prompts.txt: no such file"]),
    ],
)
def test_bad_engine_flags_exit_2_with_one_line_naming_the_setting(
    flags: list[str], fragments: list[str], tiny_model_dir: str, capsys: pytest.CaptureFixture
) -> None:
    assert_error(*run_main(capsys, "generate", "--model", tiny_model_dir, *flags, "hi"), *fragments)


def test_serve_refuses_a_bad_or_busy_port_before_loading_the_model(tiny_model_dir: str, capsys: pytest.CaptureFixture) -> None:
    import socket

    assert_error(*run_main(capsys, "serve", "--model", "/no/model/needed", "--port", "99999"), "--port must be in [1, 65535]")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = str(busy.getsockname()[1])
        assert_error(*run_main(capsys, "serve", "--model", "/no/model/needed", "--port", port), f"cannot listen on 127.0.0.1:{port}")


def test_schedule_policy_is_sglangs_name_for_scheduler():
    import argparse

    from nanoserve import config

    parser = argparse.ArgumentParser()
    config.add_arguments(parser, config.EngineConfig, "engine")
    assert parser.parse_args(["--schedule-policy", "lpm"]).scheduler == "lpm"
    assert parser.parse_args(["--scheduler", "lpm"]).scheduler == "lpm"


def test_generate_constraint_flags(tiny_model_dir: str, tmp_path) -> None:
    """--choice, --regex and --json-schema (inline or a file) constrain the answer; bad JSON is one line, exit 2."""
    import re

    choice = nanoserve("generate", "--model", tiny_model_dir, "--raw", "--temperature", "0", "--choice", "yes", "--choice", "no", PROMPTS[0])
    assert choice.returncode == 0, choice.stderr
    assert choice.stdout.strip() in {"yes", "no"}
    regex = nanoserve("generate", "--model", tiny_model_dir, "--raw", "--temperature", "1", "--seed", "3", "--regex", "[0-9]{3}-[a-c]{2}", PROMPTS[1])
    assert regex.returncode == 0, regex.stderr
    assert re.fullmatch("[0-9]{3}-[a-c]{2}", regex.stdout.strip())
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}))
    answer = nanoserve("generate", "--model", tiny_model_dir, "--raw", "--temperature", "0", "--max-tokens", "40", "--json-schema", str(schema), PROMPTS[2])
    assert answer.returncode == 0, answer.stderr
    assert isinstance(json.loads(answer.stdout)["n"], int)
    bad = nanoserve("generate", "--model", tiny_model_dir, "--json-schema", "{bad", PROMPTS[0])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: invalid --json-schema")


def test_serve_leaves_the_thread_line_to_its_startup_log_and_other_commands_print_it_once(monkeypatch, capsys) -> None:
    from nanoserve import cli

    monkeypatch.setattr(cli, "cmd_serve", lambda args: 0)  # the startup log (tested in tests/server) carries it
    assert cli.main(["serve"]) == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("threads: ")]
    assert cli.main(["lab", "list"]) == 0
    assert len([line for line in capsys.readouterr().err.splitlines() if line.startswith("threads: ")]) == 1

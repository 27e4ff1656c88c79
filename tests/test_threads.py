"""The thread policy: ``threads.apply`` really sets BLAS threads, bad values are one clear error,
and the CLI and ``LLM`` apply it (the CLI prints its line at startup)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from threadpoolctl import ThreadpoolController

from kernels_cpu import split
from nanoserve import threads
from nanoserve.errors import ConfigError


def blas_threads() -> list[int]:
    """Threads of every loaded BLAS library, as threadpoolctl reads them from the library."""
    return [lib["num_threads"] for lib in ThreadpoolController().info() if lib["user_api"] == "blas"]


@pytest.fixture(autouse=True)
def restore_blas_threads(monkeypatch: pytest.MonkeyPatch):
    """Each test leaves the process's BLAS threads, the kernels' threads (and the policy's
    record) as it found them."""
    for name in threads.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    before, kernels, source = threads.current(), split.threads(), threads._source
    yield
    ThreadpoolController().limit(limits=before, user_api="blas")
    split.set_threads(kernels)
    threads._source = source


def test_apply_1_sets_every_blas_library_to_one_thread() -> None:
    assert blas_threads(), "NumPy's BLAS should be visible to threadpoolctl"
    line = threads.apply(1)
    assert blas_threads() == [1] * len(blas_threads())
    assert line.startswith("threads: 1 BLAS thread (") and line.endswith("from --threads")
    assert threads.describe() == line


@pytest.mark.skipif(threads.usable_cpus() < 2, reason="needs 2 usable CPUs")
def test_apply_2_then_none_gives_the_default_policy() -> None:
    threads.apply(2)
    assert set(blas_threads()) == {2} and split.threads() == 2
    line = threads.apply(None)
    assert set(blas_threads()) == {threads.DEFAULT_THREADS} and split.threads() == threads.DEFAULT_THREADS
    assert "from the default policy" in line


@pytest.mark.skipif(threads.usable_cpus() < 2, reason="needs 2 usable CPUs")
def test_the_environment_overrides_the_default_but_not_an_explicit_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert threads.apply(None).endswith("from OPENBLAS_NUM_THREADS")
    assert set(blas_threads()) == {2}
    threads.apply(1)
    assert set(blas_threads()) == {1}


@pytest.mark.parametrize("bad", [0, -1, threads.usable_cpus() + 1, 1.5, True, "2"])
def test_bad_thread_counts_are_a_config_error_naming_the_range_and_change_nothing(bad: object) -> None:
    threads.apply(1)
    with pytest.raises(ConfigError, match=rf"^threads must be an integer in \[1, {threads.usable_cpus()}\] .*, got {bad!r}$"):
        threads.apply(bad)  # type: ignore[arg-type]
    assert set(blas_threads()) == {1}


def test_every_cli_command_prints_the_thread_line_at_startup(tiny_model_dir: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in threads.ENV_VARS}
    result = subprocess.run(
        [sys.executable, "-m", "nanoserve", "generate", "--model", tiny_model_dir, "--threads", "1", "--raw",
         "--temperature", "0", "--max-tokens", "2", "hi"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0].startswith("threads: 1 BLAS thread (")
    assert "threads:" not in result.stdout


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_bad_threads_flag_exits_2_with_one_line_before_the_model_loads(command: str, value: str, capsys: pytest.CaptureFixture) -> None:
    from nanoserve.cli import main

    status = main([command, "--model", "/no/model/needed", "--threads", value] + (["hi"] if command == "generate" else []))
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip().splitlines() == [f"error: threads must be an integer in [1, {threads.usable_cpus()}] (the CPUs this process may use), got {value}"]


def test_llm_applies_the_setting_before_loading_the_model(tiny_model_dir: str) -> None:
    from nanoserve.llm import LLM

    with pytest.raises(ConfigError, match="threads must be"):
        LLM(model="/no/model/needed", threads=0)  # a ModelLoadError would mean the model loaded first
    llm = LLM(model=tiny_model_dir, num_blocks=16, threads=1)
    assert set(blas_threads()) == {1}
    assert llm.threads == threads.describe()

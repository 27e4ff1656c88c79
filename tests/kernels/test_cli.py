"""``check-kernels`` as students run it: a table, the minimal failing example, an exit code."""

from __future__ import annotations

import argparse

import pytest

from nanoserve import check_kernels


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    check_kernels.add_arguments(parser)
    return check_kernels.run(parser.parse_args(list(argv)))


def test_reference_passes_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("--backend", "ref", "--kernel", "rms_norm,softmax", "--examples", "5", "--seed", "0") == 0
    out = capsys.readouterr().out
    assert "rms_norm" in out and "softmax" in out and "pass" in out


def test_without_a_backend_it_grades_the_engines_default_and_explains_the_dash(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("--kernel", "rms_norm", "--examples", "3", "--seed", "0") == 0
    out = capsys.readouterr().out
    assert "backend 'cpu'" in out and "'-' in an error column: the largest error was exactly zero." in out


def test_a_failing_backend_exits_one_and_prints_the_minimal_example(capsys: pytest.CaptureFixture[str]) -> None:
    from nanoserve.kernels import register_backend
    from tests.kernels import planted_bugs

    register_backend("planted-cli-ties", planted_bugs.TIES_DROPPED)
    code = _run("--backend", "planted-cli-ties", "--kernel", "top_k_filter", "--examples", "30", "--seed", "0")
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out and "minimal failing example" in out and "'ties': True" in out


def test_a_backend_given_as_a_path_is_loaded(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    lab = tmp_path / "lab_backend.py"
    lab.write_text(
        '"""A lab backend: SwiGLU only."""\n'
        "import numpy as np\n\n\n"
        "def silu_mul(gate, up):\n"
        "    return (gate / (1.0 + np.exp(-gate.astype(np.float64))) * up).astype(np.float32)\n"
    )
    assert _run("--backend", str(lab), "--kernel", "silu_mul,rope", "--examples", "5") == 0
    out = capsys.readouterr().out
    assert "silu_mul" in out and "ref" in out  # rope is not defined: reported as the reference


def test_unknown_kernel_is_refused() -> None:
    with pytest.raises(SystemExit):
        _run("--kernel", "no_such_kernel")

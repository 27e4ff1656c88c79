"""Shared fixtures: a tiny random model (fast tests) and the real default model (parity tests)."""

from __future__ import annotations

import os

import pytest

from tests.tiny_model import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An HF-layout directory holding a tiny random Llama (2 layers, hidden 64, GQA 4:2)."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir: str):
    """The tiny model loaded once (config, fp32 weights, tokenizer)."""
    from nanoserve.model import load_checkpoint

    return load_checkpoint(tiny_model_dir)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file (installed package or fetched once)."""
    from nanoserve.model.registry import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_path: str):
    from nanoserve.model import load_checkpoint

    return load_checkpoint(smollm2_path)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")

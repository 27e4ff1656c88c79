"""What the lab tests share: a student file written from source, and a planted bug."""

from __future__ import annotations


def write(tmp_path, source: str, name: str = "student.py") -> str:
    """Write ``source`` as ``tmp_path / name``; returns its path."""
    path = tmp_path / name
    path.write_text(source)
    return str(path)


def mutate(source: str, old: str, new: str) -> str:
    """``source`` with its first ``old`` replaced by ``new`` (the planted bug); ``old`` must be there."""
    assert old in source, f"the planted bug's target {old!r} is not in the reference"
    return source.replace(old, new, 1)

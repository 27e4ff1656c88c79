"""The labs, by number: where each one's lesson and stub live, and its grader's criteria.

    01  pointwise_kernels   rms_norm, rope, silu_mul, softmax    nanoserve.labs.lab01
    04  block_pool          the BlockAllocator seam              nanoserve.labs.lab04

A lab's folder, ``labs/NN_name/`` at the top of the repository, holds ``README.md`` (the
lesson, the tasks, what the grader checks, hints) and ``student.py`` (the stub).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from nanoserve.errors import NanoserveError
from nanoserve.labs import lab01, lab04
from nanoserve.labs.grader import Criterion, LabReport, Submission, one_line, run_criteria

LABS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "labs")


class LabError(NanoserveError):
    """A lab command was given something it cannot use (unknown lab, bad path)."""


@dataclass(frozen=True)
class Lab:
    number: str  # "01"
    name: str  # the folder's suffix: labs/01_pointwise_kernels
    title: str
    module: str  # what the student's piece replaces
    criteria: tuple[Criterion, ...]
    speed: Callable[[Submission], str]

    @property
    def folder(self) -> str:
        """``labs/NN_name`` of the source tree; the labs ship with the repository, not the wheel."""
        folder = os.path.join(LABS_DIR, f"{self.number}_{self.name}")
        if not os.path.isdir(folder):
            raise LabError(
                f"lab {self.number}'s lesson and stub are not here ({folder}): the labs come with the source; "
                "clone the repository and install it with pip install -e ."
            )
        return folder

    @property
    def stub(self) -> str:
        return os.path.join(self.folder, "student.py")


LABS: dict[str, Lab] = {
    lab.number: lab
    for lab in (
        Lab("01", "pointwise_kernels", "pointwise kernels: rms_norm, rope, silu_mul, softmax", "kernels_ref", tuple(lab01.CRITERIA), lab01.speed),
        Lab("04", "block_pool", "the block pool: refcounts and a free list", "nanoserve.cache.block_pool", tuple(lab04.CRITERIA), lab04.speed),
    )
}


def get_lab(number: str) -> Lab:
    """The lab numbered ``number`` ("4" and "04" both work)."""
    key = number.zfill(2)
    if key not in LABS:
        raise LabError(f"no lab {number!r}; the labs are {', '.join(LABS)} (python -m nanoserve lab list)")
    return LABS[key]


def grade(lab: Lab | str, path: str, loaded: object = None, quick: bool = False) -> LabReport:
    """Grade the student's file at ``path``; ``loaded`` is the model the integration serves."""
    lab = get_lab(lab) if isinstance(lab, str) else lab
    if not os.path.isfile(path):
        raise LabError(f"{path}: no such file")
    if not path.endswith(".py"):
        raise LabError(f"{path}: not a Python file (give the lab's .py, e.g. {lab.number}_{lab.name}/student.py)")
    submission = Submission(path=os.path.abspath(path), loaded=loaded, quick=quick)
    report = run_criteria(list(lab.criteria), submission, LabReport(lab.number, lab.title, path))
    if report.status == "pass":
        try:
            report.speed = lab.speed(submission)
        except Exception as exc:
            report.speed = f"not measured: {one_line(exc)}"
    return report

"""The labs, by number: where each one's lesson and stub live, and its grader's criteria.

    01  pointwise_kernels   rms_norm, rope, silu_mul, softmax    nanoserve.labs.lab01
    02  contiguous_attention causal GQA attention, contiguous KV  nanoserve.labs.lab02
    03  paged_attention     store_kv and paged_attention         nanoserve.labs.lab03
    04  block_pool          the BlockAllocator seam              nanoserve.labs.lab04
    05  scheduler           token budget, chunks, preemption     nanoserve.labs.lab05
    06  radix_cache         the radix prefix cache               nanoserve.labs.lab06
    07  speculative         n-gram proposer, acceptance rules    nanoserve.labs.lab07
    08  quantized_linear    a fused int4 group-wise linear       nanoserve.labs.lab08
    09  gpu_paged_attention paged attention in numba.cuda        nanoserve.labs.lab09

A lab's folder, ``labs/NN_name/`` at the top of the repository, holds ``README.md`` (the
lesson, the tasks, what the grader checks, hints) and ``student.py`` (the stub).
"""

from __future__ import annotations

import os

from nanoserve.labs import lab01, lab02, lab03, lab04, lab05, lab06, lab07, lab08, lab09
from nanoserve.labs.grader import Lab, LabError, LabReport, Submission, one_line, run_criteria

__all__ = ["LABS", "Lab", "LabError", "get_lab", "grade"]

LABS: dict[str, Lab] = {lab.number: lab for lab in (lab01.LAB, lab02.LAB, lab03.LAB, lab04.LAB, lab05.LAB, lab06.LAB, lab07.LAB, lab08.LAB, lab09.LAB)}


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
    if report.status in ("pass", "blocked"):  # measured unless something failed
        try:
            report.speed = lab.speed(submission)
        except Exception as exc:
            report.speed = f"not measured: {one_line(exc)}"
    return report

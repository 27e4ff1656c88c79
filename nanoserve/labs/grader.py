"""The grader framework: a lab's criteria, run in order over a student's file, and the report.

A lab (:class:`Lab`, one per ``nanoserve/labs/labNN.py``, listed in ``registry``) lists its :class:`Criterion` objects in the
order the course grades them:

    1 signatures    the student's names and parameters match the reference       gate
    2 imports       the file does not import the piece it replaces              gate
    3 property      the property suite; a failure prints the shrunk counterexample and a hint
    4 invariants    the piece's invariants hold (and its own checks catch a broken state)
    5 integration   the piece swapped into the real engine: greedy tokens equal the reference's
    6 counters      deterministic counts (blocks used, preemptions) equal the reference's
      speed         a measured comparison, printed and never graded

A gate is worth no points: a file that fails one is not graded further (its other criteria
are "not run"). Every other criterion is worth points when it passes. A criterion fails by
raising :class:`CriterionFailed` (what was wrong, and a hint), or any exception: a stub's
``NotImplementedError("Lab NN: ...")`` becomes a failure carrying that message, never a
traceback. :class:`Blocked` says the criterion cannot run here (no GPU, say).

The report's status is ``pass`` (every criterion passed), ``FAIL`` or ``blocked``, and the
exit code of ``python -m nanoserve lab check`` is 0, 1 or 2 accordingly.
"""

from __future__ import annotations

import json
import os
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from nanoserve.errors import NanoserveError

PASS, FAIL, BLOCKED, NOT_RUN = "pass", "FAIL", "blocked", "not run"
LABS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "labs")


class LabError(NanoserveError):
    """A lab command was given something it cannot use (unknown lab, bad path)."""


class CriterionFailed(Exception):
    """A criterion's verdict: ``detail`` says what was wrong, ``hint`` what to look at."""

    def __init__(self, detail: str, hint: str = "") -> None:
        super().__init__(detail)
        self.detail, self.hint = detail, hint


class Blocked(Exception):
    """The criterion cannot run on this machine (the reason is the message)."""


@dataclass
class Submission:
    """What every criterion sees: the student's file, its loaded module, and the model to serve."""

    path: str
    module: types.ModuleType | None = None
    loaded: Any = None  # a nanoserve.model.LoadedModel, for the integration criteria
    quick: bool = False  # fewer property examples (tests)
    scratch: dict[str, Any] = field(default_factory=dict)  # what one criterion leaves for a later one


@dataclass(frozen=True)
class Criterion:
    """One graded check: ``check(submission)`` returns a one-line detail, or raises."""

    name: str
    description: str
    check: Callable[[Submission], str]
    points: int = 0
    gate: bool = False


@dataclass(frozen=True)
class Lab:
    """One lab: its number and folder, what the student's piece replaces, and its grader."""

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


@dataclass
class CriterionResult:
    name: str
    status: str  # PASS, FAIL, BLOCKED or NOT_RUN
    points: int
    max_points: int
    detail: str = ""
    hint: str = ""


@dataclass
class LabReport:
    """Every criterion's result, in grading order, and the ungraded speed line."""

    lab: str
    name: str
    path: str
    results: list[CriterionResult] = field(default_factory=list)
    speed: str = ""

    @property
    def score(self) -> int:
        return sum(r.points for r in self.results)

    @property
    def max_score(self) -> int:
        return sum(r.max_points for r in self.results)

    @property
    def status(self) -> str:
        statuses = {r.status for r in self.results}
        if FAIL in statuses or NOT_RUN in statuses:
            return FAIL
        return BLOCKED if BLOCKED in statuses else PASS

    @property
    def exit_code(self) -> int:
        return {PASS: 0, FAIL: 1, BLOCKED: 2}[self.status]

    def result(self, name: str) -> CriterionResult:
        """The result of the criterion called ``name``."""
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"lab {self.lab} has no criterion {name!r}")

    @property
    def failed(self) -> list[str]:
        """The names of the criteria that failed, in order."""
        return [r.name for r in self.results if r.status == FAIL]

    def to_json(self) -> str:
        body = {
            "lab": self.lab, "name": self.name, "path": self.path, "status": self.status,
            "score": self.score, "max_score": self.max_score, "exit_code": self.exit_code,
            "criteria": [asdict(r) for r in self.results], "speed": self.speed,
        }
        return json.dumps(body, indent=2)


def one_line(exc: BaseException) -> str:
    """``NotImplementedError: Lab 04: ...`` -> the message alone; others keep their type."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, NotImplementedError) and text.startswith("Lab "):
        return f"not implemented yet ({text})"
    return f"raised {type(exc).__name__}: {text}" if text else f"raised {type(exc).__name__}"


def run_criteria(criteria: list[Criterion], submission: Submission, report: LabReport) -> LabReport:
    """Run ``criteria`` in order into ``report``; after a failed gate the rest are not run."""
    stopped = ""
    for c in criteria:
        if stopped:
            report.results.append(CriterionResult(c.name, NOT_RUN, 0, c.points, f"{stopped} failed"))
            continue
        try:
            detail = c.check(submission)
            result = CriterionResult(c.name, PASS, c.points, c.points, detail)
        except CriterionFailed as failed:
            result = CriterionResult(c.name, FAIL, 0, c.points, failed.detail, failed.hint)
        except Blocked as blocked:
            result = CriterionResult(c.name, BLOCKED, 0, c.points, str(blocked))
        except Exception as exc:  # the student's code raised: a failure like any other
            result = CriterionResult(c.name, FAIL, 0, c.points, one_line(exc))
        report.results.append(result)
        if c.gate and result.status == FAIL:
            stopped = c.name
    return report


def print_report(report: LabReport, file: Any = None) -> None:
    """The report as a rich table (criterion, result, points, detail) and the speed line."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file, highlight=False, soft_wrap=True)
    table = Table(title=f"Lab {report.lab}: {report.name} ({report.path})")
    for column in ("criterion", "result", "points", "detail"):
        table.add_column(column, overflow="fold")
    style = {PASS: "green", FAIL: "bold red", BLOCKED: "yellow", NOT_RUN: "dim"}
    for r in report.results:
        points = f"{r.points}/{r.max_points}" if r.max_points else "gate"
        detail = r.detail + (f"\nhint: {r.hint}" if r.hint else "")
        table.add_row(r.name, f"[{style[r.status]}]{r.status}[/]", points, detail)
    console.print(table)
    if report.speed:
        console.print(f"speed (not graded): {report.speed}")
    console.print(f"score {report.score}/{report.max_score}: {report.status}")

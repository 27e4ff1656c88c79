"""Teaching labs: build one piece of the engine, then prove it right inside the real engine.

Each lab (``labs/NN_name/`` at the top of the repository) is a lesson and a stub. The
grader plugs the student's file into nanoserve through the same seams nanoserve uses for
its own parts (a kernel backend by path, or an ``EngineConfig`` component such as
``block_allocator = "FILE.py:Name"``), runs the project's own property suites and
invariants on it, and serves a model with it (SmolLM2 by default, the tiny random model
in the tests), comparing greedy tokens with the reference engine's.

    python -m nanoserve lab list
    python -m nanoserve lab start 04 my_labs/04        # copy the stub into a folder you own
    python -m nanoserve lab check 04 my_labs/04/student.py [--json] [--model DIR]

The modules:

    grader      Lab, Criterion, run_criteria, LabReport (rich table, --json, exit codes)
    common      shared checks: signatures, imports, engine runs
    lab01..09   one grader each: its criteria, its speed line, and its ``LAB``
    registry    LABS: number -> Lab (folder, stub, criteria); grade()
    cli         ``lab list | start | check``
"""

from nanoserve.labs.grader import Blocked, Criterion, CriterionFailed, CriterionResult, LabReport, Submission
from nanoserve.labs.registry import LABS, Lab, LabError, get_lab, grade

__all__ = ["LABS", "Blocked", "Criterion", "CriterionFailed", "CriterionResult", "Lab", "LabError", "LabReport", "Submission", "get_lab", "grade"]

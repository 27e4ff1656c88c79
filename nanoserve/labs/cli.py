"""``python -m nanoserve lab list | start NN [DIR] | check NN [PATH]``.

``start`` copies a lab's stub and lesson into a folder the student owns (``labs_NN`` by
default), refusing one that exists. ``check`` grades a file (the started folder's
``student.py`` by default) and prints the report, or ``--json``; its exit code is the
report's (0 pass, 1 fail, 2 blocked).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from nanoserve.labs.registry import LABS, LabError, get_lab, grade


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lab_command", required=True)
    sub.add_parser("list", help="the labs, by number")
    start = sub.add_parser("start", help="copy a lab's stub and lesson into a new folder you own")
    start.add_argument("number", help="the lab's number, e.g. 04")
    start.add_argument("dir", nargs="?", default=None, help="the folder to create (default: ./labs_NN)")
    check = sub.add_parser("check", help="grade your file against the lab's criteria")
    check.add_argument("number", help="the lab's number, e.g. 04")
    check.add_argument("path", nargs="?", default=None, help="your .py file (default: ./labs_NN/student.py)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--model", default=None, help="the model the integration criteria serve (default: the engine's default model)")
    check.add_argument("--quick", action="store_true", help="fewer property examples")


def cmd_list() -> int:
    for lab in LABS.values():
        print(f"{lab.number}  {lab.name:<20} {lab.title}  (replaces {lab.module})")
    return 0


def cmd_start(number: str, folder: str | None) -> int:
    lab = get_lab(number)
    folder = folder or f"labs_{lab.number}"
    if os.path.exists(folder):
        raise LabError(f"{folder} already exists; pick a new folder (python -m nanoserve lab start {lab.number} DIR)")
    shutil.copytree(lab.folder, folder)
    print(f"lab {lab.number} ({lab.title}) is in {folder}: read {os.path.join(folder, 'README.md')}, then edit {os.path.join(folder, 'student.py')}")
    print(f"grade it with: python -m nanoserve lab check {lab.number} {os.path.join(folder, 'student.py')}")
    return 0


def cmd_check(number: str, path: str | None, as_json: bool, model: str | None, quick: bool) -> int:
    from nanoserve.labs.grader import print_report
    from nanoserve.model import load_checkpoint

    lab = get_lab(number)
    path = path or os.path.join(f"labs_{lab.number}", "student.py")
    if not os.path.isfile(path):
        raise LabError(f"{path}: no such file")
    if not path.endswith(".py"):
        raise LabError(f"{path}: not a Python file (give the lab's .py, e.g. student.py)")
    report = grade(lab, path, load_checkpoint(model), quick=quick)
    if as_json:
        print(report.to_json())
    else:
        print_report(report, file=sys.stdout)
    return report.exit_code


def run(args: argparse.Namespace) -> int:
    if args.lab_command == "list":
        return cmd_list()
    if args.lab_command == "start":
        return cmd_start(args.number, args.dir)
    return cmd_check(args.number, args.path, args.json, args.model, args.quick)

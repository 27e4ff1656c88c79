"""``python -m nanoserve.check_kernels``: the same as ``python -m nanoserve check-kernels``."""

import argparse
import sys

import nanoserve.check_kernels
from nanoserve.check_kernels.cli import add_arguments, run

description = nanoserve.check_kernels.__doc__.splitlines()[0]
parser = argparse.ArgumentParser(prog="check-kernels", description=description)
add_arguments(parser)
sys.exit(run(parser.parse_args()))

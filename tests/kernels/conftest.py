"""Kernel-suite setup: the CUDA simulator, hypothesis profiles, and shape limits per backend.

numba reads NUMBA_ENABLE_CUDASIM once, when it is first imported, so it is set here,
before any test module imports numba: the ``cuda`` backend runs its kernels on numba's
CPU simulator unless the environment says otherwise (``NUMBA_ENABLE_CUDASIM=0`` on a GPU
machine runs them on the device). Tests that need a real GPU are marked ``gpu``.

Hypothesis profiles, chosen with NANOSERVE_HYPOTHESIS_PROFILE (default ``ci``):

    ci    25 examples per property, derandomized (the same examples every run), tiny
          shapes (``check_kernels.SMALL``): the whole directory runs in a few minutes
    gpu   200 examples, random, shapes up to the default model's (``check_kernels.LARGE``)
          except on the simulator, which always gets the tiny shapes

The profiles are registered but not loaded globally; the tests here pass them explicitly
so other test directories keep their own hypothesis settings.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from nanoserve import check_kernels  # noqa: E402

settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None, print_blob=False)
settings.register_profile("gpu", max_examples=200, deadline=None)

PROFILE_NAME = os.environ.get("NANOSERVE_HYPOTHESIS_PROFILE", "ci")
PROFILE = settings.get_profile(PROFILE_NAME)
SIMULATOR = os.environ["NUMBA_ENABLE_CUDASIM"] == "1"

if SIMULATOR:
    sys.setswitchinterval(check_kernels.SIMULATOR_SWITCH_INTERVAL)


def limits_for(backend: str) -> check_kernels.Limits:
    """Tiny shapes for ci and for the simulator; the default model's shapes otherwise."""
    if PROFILE_NAME == "gpu" and not (backend == "cuda" and SIMULATOR):
        return check_kernels.LARGE
    return check_kernels.SMALL


@pytest.fixture(scope="session")
def profile() -> settings:
    """The selected hypothesis profile (pass it as ``parent`` / apply it with ``settings``)."""
    return PROFILE

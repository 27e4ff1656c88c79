#!/usr/bin/env bash
# The one-command GPU check: what runs only on a real NVIDIA GPU, in at most 7.5 minutes
# (the steps' time limits add up to 450 s),
# with no network (every package it needs is already in a CUDA machine's usual Python
# image: numba, numba-cuda, cupy, numpy, hypothesis, pytest, safetensors, tokenizers).
#
#   bash bench/gpu_check.sh [OUT_DIR]          # OUT_DIR default: bench/results/gpu_check
#
# It runs from the repository root without installing nanoserve (PYTHONPATH=.), and
# writes one log per step into OUT_DIR plus summary.txt:
#   1 device      nvidia-smi, and the versions numba and cupy report
#   2 kernels     the kernel suite, cuda backend against the NumPy reference, at the
#                 model's shapes (python -m nanoserve.check_kernels --size large)
#   3 gpu tests   the pytest tests marked gpu (CuPy arrays stay on the device; lab 09's
#                 gpu criterion passes with the reference kernel)
#   4 timings     per-kernel medians at SmolLM2's shapes, cpu and cuda (bench/kernels.py)
#   5 engine      the tiny random model served greedily on cuda and on cpu: the same tokens
# Each step has its own time limit; a failing step is reported and the next one runs.
# The exit code is the number of steps that failed.
set -uo pipefail
out=${1:-bench/results/gpu_check}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD NUMBA_ENABLE_CUDASIM=0 PYTHONUNBUFFERED=1
failed=0
: >"$out/summary.txt"

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  local line="$name: rc=$rc in $((SECONDS - start)) s"
  [ $rc -eq 0 ] || failed=$((failed + 1))
  echo "$line" | tee -a "$out/summary.txt"
  tail -n 5 "$out/$name.log"
}

step device 30 bash -c "nvidia-smi -L && $py -c 'import numba, cupy; print(\"numba\", numba.__version__, \"cupy\", cupy.__version__, \"gpu ok:\", cupy.is_available())'"
step kernels 150 "$py" -m nanoserve.check_kernels --backend cuda --size large --examples 50
step gpu_tests 120 "$py" -m pytest -q -m gpu tests/kernels/test_gpu.py tests/test_lab09.py -p no:cacheprovider
step timings 90 "$py" bench/kernels.py --backend cuda --repeats 20 --workload both
step engine 60 "$py" - <<'EOF'
import sys, tempfile
sys.path.insert(0, "tests")
from tiny_model import make_tiny_model
from nanoserve import LLM, SamplingParams

path = make_tiny_model(tempfile.mkdtemp())
params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [20, 21]]
tokens = {}
for backend in ("cpu", "cuda"):
    outs = LLM(path, backend=backend).generate(prompts, params)
    tokens[backend] = [list(o.token_ids) for o in outs]
    print(backend, tokens[backend])
assert tokens["cpu"] == tokens["cuda"], "cuda's greedy tokens differ from cpu's"
print("the tiny model's greedy tokens are the same on cuda and cpu")
EOF
echo "steps failed: $failed" | tee -a "$out/summary.txt"
exit "$failed"

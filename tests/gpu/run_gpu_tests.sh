#!/usr/bin/env bash
# GPU correctness suite: tests/test_kernels.py, tests/test_kernels_wgmma.py, tests/test_attention.py and
# tests/test_norm_fold.py (and tests/test_platform.py) with the kernels compiled (jax.default_backend() == "gpu"), in
# parallel processes. Run from the repository root on a CUDA machine:  bash tests/gpu/run_gpu_tests.sh
set -euo pipefail
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
# tests/conftest.py looks for the shared data; the kernel tests use none, so point it at a stub when absent
if [ -z "${GPTQ_JAX_SHARED_DATA:-}" ] && [ ! -f ../shared/data/SOURCES.md ] && [ ! -f shared/data/SOURCES.md ]; then
  export GPTQ_JAX_SHARED_DATA=$(mktemp -d); touch "$GPTQ_JAX_SHARED_DATA/SOURCES.md"
fi
PY=${PYTHON:-python3}
NPROC=${NPROC:-8}
PYTHONPATH=. $PY -m pytest -q -p no:cacheprovider -n "$NPROC" tests/test_kernels.py tests/test_kernels_wgmma.py tests/test_attention.py \
  tests/test_norm_fold.py tests/test_platform.py "$@"

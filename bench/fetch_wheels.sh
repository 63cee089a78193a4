#!/usr/bin/env bash
# Download the pure-Python wheels the GPU machine lacks (it has torch, transformers, peft and accelerate, no
# internet) into bench/wheels/ (gitignored), so `bench/gpu_check.sh` can install them offline there.
# Run it here, before handing the repo to the `run` tool: bash bench/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../.venv/bin/python}
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d wheels \
    diffusers==0.42.1 pydicom==3.0.2 open-clip-torch==3.3.0
ls -l wheels/*.whl

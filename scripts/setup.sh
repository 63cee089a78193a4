#!/usr/bin/env bash
# Create .venv and install synthcxr (idempotent: a second run only checks).
#
# torch: PyPI's torch 2.14.1 / torchvision 0.29.1 wheels run on CUDA 13 GPUs and on plain CPUs, and
# torchvision is needed by segment-anything and the Inception FID backbone, so that pair is the default
# everywhere. Override with TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cu126 or .../whl/xpu)
# or TORCH_SPEC (e.g. "torch==2.13.0" for a CPU-only install without SAM / Inception FID).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
STAMP="$VENV/.synthcxr-installed"
want="$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16) ${TORCH_SPEC} ${TORCH_INDEX_URL:-}"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || { echo "[setup] creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then echo "[setup] NVIDIA GPU found"; else echo "[setup] no CUDA GPU found: torch will run on the CPU"; fi
  echo "[setup] installing ${TORCH_SPEC}"
  # shellcheck disable=SC2086
  if [ -n "${TORCH_INDEX_URL:-}" ]; then "${PIP[@]}" ${TORCH_SPEC} --index-url "$TORCH_INDEX_URL"; else "${PIP[@]}" ${TORCH_SPEC}; fi
fi
echo "[setup] installing requirements.txt"
"${PIP[@]}" -r requirements.txt
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" -c "import torch; print('[setup] torch', torch.__version__, '| cuda:', torch.cuda.is_available())"
echo "$want" > "$STAMP"

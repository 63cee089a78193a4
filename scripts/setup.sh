#!/usr/bin/env bash
# Create .venv and install synthcxr (idempotent: a second run only checks).
#
# Two torch routes (README "Install"):
#   full  PyPI's torch 2.14.1 + torchvision 0.29.1 (about 7 GB with its CUDA 13 libraries; runs on GPU and CPU).
#         Everything works, including Segment Anything masks, the Inception FID backbone and eval.augment,
#         which need torchvision.
#   cpu   the CPU-only torch 2.13.0 wheel (a 2.3 GB venv in all). PyPI has no CPU torchvision, so the three
#         features above are left out and say so, with this fix, when asked for.
# TORCH_ROUTE=full|cpu picks one; unset, a machine with an NVIDIA GPU or 20 GiB of free disk gets full,
# any other gets cpu, and a full install picked for free disk alone that fails (the disk filled up) is
# replaced by the cpu route. Both apply to a new .venv: `rm -rf .venv` to switch. TORCH_SPEC (and TORCH_INDEX_URL, e.g. https://download.pytorch.org/whl/xpu) install
# another torch build instead; the torchvision extras follow whether torchvision imports afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
FULL_SPEC="torch==2.14.1 torchvision==0.29.1"
CPU_SPEC="torch==2.13.0"
# Packages that need torchvision: left out of the cpu route (open-clip-torch is kept, without its
# dependencies, because the tokenizer reads only its BPE vocabulary file).
VISION_ONLY="torch-fidelity"
NO_DEPS="open-clip-torch"

STAMP="$VENV/.synthcxr-installed"
want="$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) ${TORCH_SPEC:-${TORCH_ROUTE:-auto}} ${TORCH_INDEX_URL:-}"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
# --no-cache-dir: the CUDA wheels are GBs and would otherwise stay in ~/.cache/pip as a second copy.
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q)

install() {  # $1: the torch spec to install when .venv has no torch yet (`|| return`: set -e is off in `if !`)
  [ -x "$VENV/bin/python" ] || { echo "[setup] creating $VENV"; "$PYTHON" -m venv "$VENV" || return; }
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "[setup] installing $1"
    # shellcheck disable=SC2086
    if [ -n "${TORCH_INDEX_URL:-}" ]; then "${PIP[@]}" $1 --index-url "$TORCH_INDEX_URL" || return; else "${PIP[@]}" $1 || return; fi
  fi
  echo "[setup] installing requirements.txt"
  if "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
    "${PIP[@]}" -r requirements.txt || return
  else
    echo "[setup] no torchvision: leaving out ${VISION_ONLY} (SAM masks, Inception FID and eval.augment need the full route)"
    local reqs status=0
    reqs=$(mktemp) || return
    grep -v -E "^(${VISION_ONLY// /|}|${NO_DEPS// /|})==" requirements.txt > "$reqs" \
      && grep -q "^diffusers==" "$reqs" && "${PIP[@]}" -r "$reqs" || status=$?
    rm -f "$reqs"
    [ "$status" = 0 ] || return "$status"
    # shellcheck disable=SC2046
    "${PIP[@]}" --no-deps $(grep -E "^(${NO_DEPS// /|})==" requirements.txt) || return
  fi
  "${PIP[@]}" --no-deps -e . || return
}

spec=${TORCH_SPEC:-}
route=${TORCH_ROUTE:-auto}
gpu=no
command -v nvidia-smi >/dev/null 2>&1 && gpu=yes
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}${TORCH_ROUTE:-}" ]; then
    echo "[setup] $VENV already has torch $("$VENV/bin/python" -c "import torch; print(torch.__version__)"): TORCH_SPEC/TORCH_ROUTE apply to a new one (rm -rf $VENV first)"
  fi
elif [ -z "$spec" ]; then
  if [ "$gpu" = yes ]; then echo "[setup] NVIDIA GPU found"; else echo "[setup] no CUDA GPU found: torch will run on the CPU"; fi
  if [ "$route" = auto ]; then
    mkdir -p "$VENV"
    free_gib=$(( $(df -Pk "$VENV" | awk 'NR==2 {print $4}') / 1048576 ))
    if [ "$gpu" = yes ] || [ "$free_gib" -ge 20 ]; then picked=full; else picked=cpu; fi
    echo "[setup] route $picked (${free_gib} GiB free disk; TORCH_ROUTE=full|cpu picks one)"
  else
    picked=$route
  fi
  case "$picked" in
    full) spec=$FULL_SPEC ;;
    cpu) spec=$CPU_SPEC ;;
    *) echo "[setup] TORCH_ROUTE=$route: use full or cpu" >&2; exit 2 ;;
  esac
fi
if ! install "$spec"; then
  # A full install picked for free disk alone can still run out of it on a shared machine: start again, lean.
  # (Never on a GPU machine, whose failure should be seen and fixed, not hidden behind a CPU torch.)
  [ "$route" = auto ] && [ "$spec" = "$FULL_SPEC" ] && [ "$gpu" = no ] || exit 1
  echo "[setup] the full route failed; removing $VENV and installing the CPU route instead"
  rm -rf "$(readlink -f "$VENV")" "$VENV"
  install "$CPU_SPEC"
fi
"$VENV/bin/python" -c "import torch, importlib.util as u; print('[setup] torch', torch.__version__, '| cuda:', torch.cuda.is_available(), '| torchvision:', u.find_spec('torchvision') is not None)"
echo "$want" > "$STAMP"

#!/usr/bin/env bash
# Set up from nothing and generate synthetic CXRs from examples/prompts.txt on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# 20 steps at guidance 2: the embedded model's measured best (later flags in "$@" override them)
exec .venv/bin/python -m inference.generate --prompts examples/prompts.txt --out out/demo --steps 20 --guidance 2 "$@"

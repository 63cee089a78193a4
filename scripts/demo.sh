#!/usr/bin/env bash
# Set up from nothing and generate synthetic CXRs from examples/prompts.txt on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec .venv/bin/python -m inference.generate --prompts examples/prompts.txt --out out/demo "$@"

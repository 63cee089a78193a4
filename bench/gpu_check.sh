#!/usr/bin/env bash
# Issue #15's whole GPU table in one go (one H100, <= 8 min): sampler at 75 DDIM and at 25 DPM++ steps (stock
# diffusers and ours with its defaults, at stock's best batch, 32), then LoRA training at 512^2 (the stock
# example loop, ours uncached, ours with cached latents + text). Writes gpu_check.md and gpu_check.json
# (plus each part's JSON and log) into OUT_DIR.
#
#   bash bench/fetch_wheels.sh                  # here, once: wheels the GPU machine lacks -> bench/wheels/
#   bash bench/gpu_check.sh OUT_DIR             # on the GPU machine (run tool: carry bench/wheels)
#   bash bench/gpu_check.sh OUT_DIR --smoke     # CPU, tiny models, seconds: checks the wiring (tests use it)
set -euo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--smoke]}
mode=${2:-full}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

if [ "$mode" = "--smoke" ]; then
    sample=(--config-dir configs/embedded --device cpu --dtype fp32 --size 64 --batches 2 --reps 1)
    runs=(--steps 2 2 --scheduler ddim dpmpp)
    train=(--device cpu --resolution 16 --batch 2 --steps 2 --warmup 1 --variants stock cached)  # < 60 s in all
    limit=120
else
    if ! "$PY" -c "import diffusers, pydicom" 2>/dev/null; then
        ls bench/wheels/*.whl >/dev/null 2>&1 || { echo "no bench/wheels/*.whl: run bash bench/fetch_wheels.sh" >&2; exit 2; }
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/site bench/wheels/*.whl
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" || true
    sample=(--device cuda:0 --dtype bf16 --batches 32)
    runs=(--steps 75 25 --scheduler ddim dpmpp --reps 2)  # one process: the UNet compiles once for both
    train=(--config-dir configs/sd21base --device cuda --resolution 512 --batch 16 --steps 20 --warmup 5)
    limit=270
fi

part() {  # name, seconds, command...: run one part under a time limit, keep its log, go on if it fails
    local name=$1 secs=$2; shift 2
    local t0=$SECONDS
    if timeout "$secs" "$@" > "$out/$name.log" 2>&1; then
        echo "- $name: ok in $((SECONDS - t0)) s" >> "$out/parts.txt"
    else
        echo "- $name: FAILED or timed out (limit $secs s) after $((SECONDS - t0)) s, see $name.log" >> "$out/parts.txt"
    fi
}
: > "$out/parts.txt"
part sample "$limit" "$PY" bench/bench_fullsize.py "${sample[@]}" "${runs[@]}" --json "$out/sample.json"
part train "$limit" "$PY" bench/bench_train.py "${train[@]}" --json "$out/train.json"

"$PY" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
md = ["# GPU check (issue #15)", "", (out / "parts.txt").read_text()]
if (out / "gpu.txt").exists():
    md += ["GPU: " + (out / "gpu.txt").read_text().strip(), ""]
merged = {}
for name in ("sample", "train"):
    log = (out / f"{name}.log").read_text(errors="replace").splitlines()
    keep = ("|", "#", "best", "FLOP", "ours:", "host syncs", "cached /", "command", "machine", "Peak")
    table = [l for l in log if l.startswith(keep)]
    md += [f"## {name}", ""] + [l + ("\n" if not l.startswith("|") else "") for l in table] + [""]
    if (out / f"{name}.json").exists():
        merged[name] = json.loads((out / f"{name}.json").read_text())
(out / "gpu_check.md").write_text("\n".join(md) + "\n")
(out / "gpu_check.json").write_text(json.dumps(merged, indent=1))
print("\n".join(md))
PY
! grep -q FAILED "$out/parts.txt"

#!/usr/bin/env bash
# Seconds from `inference.generate` start to its first PNG on a prompt file of 20,000 MIMIC-length reports,
# and the log written by then (issue #24 item 12). Usage: bash bench/time_to_first_image.sh REPO_ROOT
# (REPO_ROOT: this checkout, or a `git worktree` of an older commit to compare, run with this venv).
set -u
PY="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
mkdir -p /tmp/ttfi
"$PY" - <<'PY'
import random
r = random.Random(0)
S = ["The cardiomediastinal silhouette is within normal limits.", "There is a small left pleural effusion with "
     "adjacent atelectasis.", "No pneumothorax is seen.", "Degenerative changes of the thoracic spine are noted.",
     "Lines and tubes are unchanged in position.", "Mild pulmonary vascular congestion without frank edema.",
     "Patchy opacity at the right lung base may reflect aspiration or pneumonia."]
with open("/tmp/ttfi/reports.txt", "w") as f:
    for i in range(20000):
        body = " ".join(r.choice(S) for _ in range(r.randint(6, 20)))
        f.write(f"FINDINGS: {body} IMPRESSION: {' '.join(r.choice(S) for _ in range(r.randint(1, 6)))}\n")
PY
cd "$1"; rm -rf /tmp/ttfi/out; start=$(date +%s.%N)
HF_HUB_OFFLINE=1 PYTHONPATH="$1" "$PY" -m inference.generate --prompts /tmp/ttfi/reports.txt --out /tmp/ttfi/out --steps 2 --height 64 --width 64 --batch-size 1 > /tmp/ttfi/log.txt 2>&1 &
pid=$!
while [ -z "$(find /tmp/ttfi/out -name '*.png' 2>/dev/null | head -1)" ]; do sleep 0.2; kill -0 $pid 2>/dev/null || break; done
end=$(date +%s.%N); kill $pid 2>/dev/null; wait $pid 2>/dev/null
echo "$1: first image after $(echo "$end - $start" | bc) s; log $(wc -l < /tmp/ttfi/log.txt) lines, $(wc -c < /tmp/ttfi/log.txt) bytes"

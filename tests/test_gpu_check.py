"""bench/gpu_check.sh --smoke: the prepared GPU check runs end to end on CPU with tiny models."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_writes_markdown_and_json(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out"), "--smoke"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "FAILED" not in md and "2 ddim steps" in md and "2 dpmpp steps" in md and "| cached |" in md
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert set(data["sample"]["runs"]) == {"2-ddim", "2-dpmpp"}
    for run in data["sample"]["runs"].values():
        assert {"ours", "stock"} <= set(run["rows"]["2"]) and run["rows"]["2"]["ours"]["images_per_s"] > 0
    assert {"stock", "cached"} <= set(data["train"]["rows"]) and data["train"]["rows"]["cached"]["ips"] > 0

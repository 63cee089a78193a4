"""Feature cache keyed by file content (SHA-256), so re-running a metric on the same images is fast.

One safetensors file per (cache folder, backbone): a (N, D) float32 `features` matrix and a (N, 32) uint8
`sha256` matrix naming the file content each row came from. Renamed files still hit; edited files miss."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cxrcommon.atomic import atomic_path


def default_cache_dir(source: str | Path) -> Path:
    """A folder per image source under the user cache ($SYNTHCXR_CACHE or ~/.cache/synthcxr), so
    evaluating someone's read-only or shared data never writes beside it."""
    src = Path(source).resolve()
    root = Path(os.environ.get("SYNTHCXR_CACHE", Path.home() / ".cache" / "synthcxr"))
    tag = hashlib.sha256(str(src).encode()).hexdigest()[:12]
    return root / "features" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', src.name)[:40]}-{tag}"


def cache_file(cache_dir: str | Path, backbone_key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", backbone_key)[:80]
    digest = hashlib.sha256(backbone_key.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{safe}-{digest}.safetensors"


def load(path: str | Path) -> dict[str, torch.Tensor]:
    """sha256 hex -> feature vector; an absent file is an empty cache."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = load_file(str(path))
    except Exception as exc:  # a torn or foreign file: rebuild rather than stop the evaluation
        raise ValueError(f"{path}: feature cache is unreadable ({exc}); delete it and re-run") from exc
    keys = [bytes(row.tolist()).hex() for row in data["sha256"]]
    return dict(zip(keys, data["features"]))


def save(path: str | Path, table: dict[str, torch.Tensor], backbone_key: str) -> None:
    """Write the whole table atomically (last writer wins if two runs share a cache)."""
    if not table:
        return
    keys = list(table)
    hashes = torch.tensor([list(bytes.fromhex(k)) for k in keys], dtype=torch.uint8)
    feats = torch.stack([table[k].float().cpu() for k in keys]).contiguous()
    with atomic_path(path) as tmp:
        save_file({"features": feats, "sha256": hashes}, str(tmp), metadata={"backbone": backbone_key})
    os.chmod(path, 0o644)

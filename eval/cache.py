"""Feature cache keyed by file content (SHA-256), so re-running a metric on the same images is fast.

One safetensors file per (cache folder, backbone key): a (N, D) float32 `features` matrix and a (N, 32) uint8
`sha256` matrix naming the file content each row came from. Renamed files still hit; edited files miss.
A backbone's key holds the SHA-256 of its weights (`weights_sha256`) and of its preprocessing, so new
weights or another resize start a new cache file instead of reusing stale features."""
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


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# the files of a transformers folder that decide its features (a hub download also holds READMEs, .gitattributes
# and a .cache/ of download metadata, which must not invalidate the cache)
WEIGHT_FILES = ("config.json", "preprocessor_config.json", "*.safetensors")


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a weights file, or of a model folder's config, preprocessor config and safetensors files
    (names and contents, in sorted order)."""
    from cxrcommon.provenance import file_sha256
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted({f for pattern in WEIGHT_FILES for f in path.glob(pattern) if f.is_file()}):
        h.update(f"{f.name}\0{file_sha256(f)}\0".encode())
    return h.hexdigest()


def cache_file(cache_dir: str | Path, backbone_key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", backbone_key)[:80]
    return Path(cache_dir) / f"{safe}-{digest(backbone_key)[:12]}.safetensors"


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

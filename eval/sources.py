"""Where images come from: a folder (searched recursively) or a manifest (CSV / JSONL)."""
from __future__ import annotations

import logging
import random
from pathlib import Path

from cxrcommon.paths import walk_files

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".bmp")
MANIFEST_SUFFIXES = (".csv", ".jsonl")


def list_images(source: str | Path, image_column: str = "image") -> list[Path]:
    """Image files of a folder (recursive, hidden folders skipped, sorted) or the image column of a manifest."""
    src = Path(source)
    if src.is_dir():
        paths = sorted(p for p in walk_files(src) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(src).parts))
        if not paths:
            raise FileNotFoundError(f"{src}: no images ({', '.join(IMAGE_SUFFIXES)}) found in this folder")
        return paths
    if src.is_file() and src.suffix.lower() in MANIFEST_SUFFIXES:
        from cxrcommon.manifest import Columns, read_manifest
        records = read_manifest(src, Columns(image=image_column, text=None), on_error="skip")
        if not records:
            raise FileNotFoundError(f"{src}: the manifest lists no readable images (image column {image_column!r})")
        return [r.image for r in records]
    raise FileNotFoundError(f"{src}: not a folder of images nor a .csv/.jsonl manifest; check the path")


def subsample(paths: list[Path], n: int | None, seed: int = 0, what: str = "images") -> list[Path]:
    """A seeded random subset of n paths (all when n is None/0 or larger than the set), in stable order."""
    if not n or n >= len(paths):
        if n and n > len(paths):
            log.warning("asked for %d %s but only %d exist; using all", n, what, len(paths))
        return list(paths)
    keep = set(random.Random(seed).sample(range(len(paths)), n))
    return [p for i, p in enumerate(paths) if i in keep]

"""What a `--deidentify` run writes, and when it may resume. Outputs are named by a keyed hash, never by the
input's (possibly identifying) name; files that need a human look go under `needs_review/`; masks are
filled boxes, because a mask shaped like the erased glyphs is a readable copy of them; region texts are
blanked but for side markers; an image's files are written together; and every regions JSON carries the
settings fingerprint that stops a later run from mixing other settings into the same folder."""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from cxrcommon.atomic import atomic_path
from cxrcommon.errors import UserError
from cxrcommon.paths import walk_files

from .scrubber import normalize

REVIEW_DIR = "needs_review"  # under --out: files a person must check before sharing (the CLI exits 3)
MASK_PAD = 6                 # px a mask box grows beyond the erased pixels and boxes


def box_mask(mask: np.ndarray, regions: Sequence[Any]) -> np.ndarray:
    """The mask as filled rectangles: every erased box and every blob of erased pixels, grown by MASK_PAD
    and merged, so it shows where text was but not what it said."""
    grown = mask.astype(np.uint8)
    for r in regions:
        if r.action == "erased":
            x0, y0, x1, y1 = r.box
            grown[y0:y1, x0:x1] = 1
    grown = cv2.dilate(grown, np.ones((2 * MASK_PAD + 1,) * 2, np.uint8))
    _, _, stats, _ = cv2.connectedComponentsWithStats(grown, connectivity=8)
    boxes = np.zeros(mask.shape, bool)
    for x, y, w, h, _ in stats[1:]:
        boxes[y:y + h, x:x + w] = True
    return boxes


def blank_texts(regions: list[dict], marker_pattern: str) -> None:
    """Blank every region's text except an exact side marker: erased text may be PHI, and so may text kept
    by policy (a study date kept by --erase-pattern)."""
    marker = re.compile(marker_pattern, re.IGNORECASE)
    for r in regions:
        if not marker.fullmatch(normalize(r.get("text") or "")):
            r["text"] = ""


def image_bytes(arr: np.ndarray, suffix: str) -> bytes:
    """`arr` encoded as `suffix` (.png, .jpg) in memory; a failure raises instead of writing nothing."""
    ok, buf = cv2.imencode(suffix, arr)
    if not ok:
        raise OSError(f"could not encode a {arr.shape} {arr.dtype} image as {suffix}")
    return buf.tobytes()


def write_together(files: Sequence[tuple[Path, bytes]]) -> None:
    """Write every file to a temp beside it, then rename them in the given order (last the JSON that marks
    the image done): a failure while writing leaves none of them."""
    with contextlib.ExitStack() as stack:
        temps = {p: stack.enter_context(atomic_path(p)) for p, _ in reversed(files)}  # exits rename in order
        for p, data in files:
            temps[p].write_bytes(data)


def check_resume(out_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse an --out whose finished outputs were made with other de-identification settings (or key):
    resuming would mix them, and redoing would leave the old files (maybe identifying) beside the new."""
    if not out_dir.is_dir():
        return
    other = 0
    for p in (f for f in walk_files(out_dir) if f.name.endswith(".regions.json")):
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("settings", {"deidentify": "deidentify" in rec}) != fingerprint:
            other += 1
    if other:
        raise UserError(f"--out {out_dir} holds {other} output(s) made with other de-identification settings or "
                        "another key — use a new, empty --out (to resume, give the same --deid-secret and deid "
                        "options as the first run)")

"""Label plates: grow a text mask over the uniform box (and its outline) that the text was printed on.

Annotation on figure panels and some films sits on a white or black plate, often with a thin border.
Erasing only the glyphs leaves a blank plate that still reads as an annotation (and OCR re-detects it).
A plate is accepted only when all of these hold, so text printed straight on anatomy is left alone:
one side of the box's glyph/background split has a dominant grey level (the fill); the pixels near that
level form one connected region that spans at least 60 % of the box's width and height, stays inside the
box grown by `plate_max_growth` per side (image edges excepted) and encloses print as holes smaller
than itself; and both the fill and that print differ
from what lies outside the plate and its border by at least `plate_contrast` grey levels (a glyph's
counter shows the anatomy behind it, so a letter is not taken for a plate)."""
from __future__ import annotations

import cv2
import numpy as np
from scipy.ndimage import binary_fill_holes

from .config import TextRemovalConfig

Window = tuple[int, int, int, int]


def _ring(mask: np.ndarray, inner: int, outer: int) -> np.ndarray:
    """Pixels farther than `inner` and at most `outer` px (chessboard) from `mask`."""
    def grow(n: int) -> np.ndarray:
        return cv2.dilate(mask.astype(np.uint8), np.ones((2 * n + 1, 2 * n + 1), np.uint8)).astype(bool) \
            if n > 0 else mask
    return grow(outer) & ~grow(inner)


def _fill_level(values: np.ndarray, tol: float) -> tuple[float, float]:
    """(grey level with the most values within ±tol/2, the fraction of values within ±tol of it)."""
    hist = np.bincount(values.astype(np.int64), minlength=256).astype(np.float64)
    half = max(1, int(tol // 2))
    window = np.convolve(hist, np.ones(2 * half + 1), mode="same")
    level = float(np.argmax(window))
    return level, float(np.mean(np.abs(values.astype(np.float32) - level) <= tol))


def plate_mask(gray: np.ndarray, box: tuple[int, int, int, int], glyph: np.ndarray,
               cfg: TextRemovalConfig) -> tuple[Window, np.ndarray] | None:
    """The label plate (fill + border) behind the text of one box, as (window x0, y0, x1, y1, bool mask
    of the window's shape), or None when the text is not on a plate. `glyph`: the box's glyph mask, whose
    two sides both get tried as the fill (Otsu may call a white plate the "glyph" class on grey anatomy)."""
    x0, y0, x1, y1 = box
    crop = gray[y0:y1, x0:x1]
    if crop.size == 0 or glyph.all() or not glyph.any():
        return None
    for side in (~glyph, glyph):
        fill, share = _fill_level(crop[side], cfg.plate_tolerance)
        if share >= 0.3:  # else no dominant level: text on texture
            found = _plate_at(gray, box, fill, cfg)
            if found is not None:
                return found
    return None


def _plate_at(gray: np.ndarray, box: tuple[int, int, int, int], fill: float,
              cfg: TextRemovalConfig) -> tuple[Window, np.ndarray] | None:
    """The plate of grey level `fill` around the box's text, if the acceptance rules hold."""
    x0, y0, x1, y1 = box
    h, w = gray.shape
    gx, gy = int(round(cfg.plate_max_growth * (x1 - x0))), int(round(cfg.plate_max_growth * (y1 - y0)))
    wx0, wy0, wx1, wy1 = max(0, x0 - gx), max(0, y0 - gy), min(w, x1 + gx), min(h, y1 + gy)
    win = gray[wy0:wy1, wx0:wx1].astype(np.float32)
    near = (np.abs(win - fill) <= cfg.plate_tolerance).astype(np.uint8)
    _, labels = cv2.connectedComponents(near, connectivity=4)
    in_box = labels[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0].ravel()
    counts = np.bincount(in_box[in_box > 0])
    if counts.size == 0:
        return None
    comp = labels == int(np.argmax(counts))
    edges = [(comp[:, 0].any(), wx0 > 0), (comp[:, -1].any(), wx1 < w),
             (comp[0].any(), wy0 > 0), (comp[-1].any(), wy1 < h)]
    if any(touches and inner for touches, inner in edges):  # runs on past the window: anatomy, not a plate
        return None
    plate = binary_fill_holes(comp)
    holes = plate & ~comp
    if holes.sum() < max(10, 0.02 * plate.sum()) or holes.sum() > comp.sum():
        return None  # nothing printed on it, or more print than fill: a glyph's own counter, not a plate
    ys, xs = np.nonzero(plate)
    if np.ptp(xs) + 1 < 0.6 * (x1 - x0) or np.ptp(ys) + 1 < 0.6 * (y1 - y0):
        return None  # much smaller than the text box: a glyph (a blurred "0", "8") inside a line, not a plate
    max_border = max(3, int(min(np.ptp(ys), np.ptp(xs)) + 1) // 6)
    outer_ring = _ring(plate, max_border + 2, max_border + 6)
    if not outer_ring.any():
        return None
    outside = float(np.median(win[outer_ring]))
    if abs(outside - fill) < cfg.plate_contrast or abs(float(np.median(win[holes])) - outside) < cfg.plate_contrast:
        return None  # fill like its surroundings, or "print" like the surroundings (anatomy seen through a glyph)
    for _ in range(max_border):  # the outline: rings unlike both the fill and the outside
        ring = _ring(plate, 0, 1)
        level = float(np.median(win[ring]))
        if abs(level - fill) <= cfg.plate_tolerance or abs(level - outside) <= cfg.plate_tolerance:
            break
        plate = plate | ring
    return (wx0, wy0, wx1, wy1), plate

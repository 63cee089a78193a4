"""Render realistic burnt-in text onto clean CXRs, keeping the original and the ground-truth boxes/mask.

The ground truth for measuring text removal: side markers, PORTABLE, AP SUPINE, dates, kV/mAs lines in
several fonts, sizes, contrasts and positions, with slight blur and noise on the glyphs like a print."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIRS = [Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation")]
FONT_NAMES = ["DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf",
              "LiberationSans-Regular.ttf", "LiberationSans-Bold.ttf", "LiberationMono-Regular.ttf",
              "LiberationSerif-Regular.ttf"]
MARKERS = ["L", "R", "D", "I", "Sx"]
LINES = ["PORTABLE", "AP SUPINE", "AP ERECT", "SEMI-SENTADO", "PA", "UPRIGHT", "AP"]


@dataclass
class SynthSample:
    image: np.ndarray                       # uint8 with text
    original: np.ndarray                    # uint8 without text
    boxes: list[tuple[int, int, int, int]]  # x0, y0, x1, y1 (exclusive): every pixel an item changed
    texts: list[str]
    mask: np.ndarray                        # bool, glyph pixels (alpha > 0.1)


def font_files() -> list[Path]:
    return [d / n for d in FONT_DIRS for n in FONT_NAMES if (d / n).is_file()]


def load_font(rng: np.random.Generator, size: int, fonts: list[Path]) -> ImageFont.FreeTypeFont:
    if fonts:
        return ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), size)
    return ImageFont.load_default(size=size)


def random_text(rng: np.random.Generator) -> tuple[str, bool]:
    """(text, is_marker): a side marker, a view/position word, a date/time or an exposure line."""
    kind = rng.choice(["marker", "line", "date", "exposure"], p=[0.35, 0.3, 0.2, 0.15])
    if kind == "marker":
        return str(rng.choice(MARKERS)), True
    if kind == "line":
        return str(rng.choice(LINES)), False
    if kind == "date":
        y, m, d, hh, mm = (rng.integers(2015, 2024), rng.integers(1, 13), rng.integers(1, 29),
                           rng.integers(0, 24), rng.integers(0, 60))
        return str(rng.choice([f"{d:02d}/{m:02d}/{y}", f"{y}-{m:02d}-{d:02d} {hh:02d}:{mm:02d}",
                               f"{d:02d}.{m:02d}.{y % 100:02d}"])), False
    kv, mas = rng.integers(60, 126), rng.uniform(0.5, 12)
    return str(rng.choice([f"{kv} kV  {mas:.1f} mAs", f"{kv}kVp {mas:.2f}mAs", f"kV {kv} mAs {mas:.1f}"])), False


def _place(rng: np.random.Generator, w: int, h: int, tw: int, th: int,
           taken: list[tuple[int, int, int, int]]) -> tuple[int, int] | None:
    """A top-left corner near an edge/corner (where prints put text), not overlapping earlier items."""
    m = max(4, int(0.02 * min(w, h)))
    for _ in range(30):
        if rng.random() < 0.75:  # corners and edges
            x = int(rng.choice([rng.integers(m, max(m + 1, w // 4)),
                                rng.integers(max(m, 3 * w // 4 - tw), max(m + 1, w - tw - m))]))
            y = int(rng.choice([rng.integers(m, max(m + 1, h // 5)),
                                rng.integers(max(m, 4 * h // 5 - th), max(m + 1, h - th - m))]))
        else:
            x, y = int(rng.integers(m, max(m + 1, w - tw - m))), int(rng.integers(m, max(m + 1, h - th - m)))
        box = (x - m, y - m, x + tw + m, y + th + m)
        if x + tw < w and y + th < h and all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1]
                                             for b in taken):
            return x, y
    return None


def render(original: np.ndarray, rng: np.random.Generator, n_items: tuple[int, int] = (1, 4),
           fonts: list[Path] | None = None) -> SynthSample:
    """Draw 1-4 text items onto an 8-bit grayscale image."""
    fonts = font_files() if fonts is None else fonts
    h, w = original.shape
    out = original.astype(np.float32)
    mask = np.zeros((h, w), bool)
    boxes, texts = [], []
    for _ in range(int(rng.integers(n_items[0], n_items[1] + 1))):
        text, marker = random_text(rng)
        size = max(10, int(h * (rng.uniform(0.035, 0.07) if marker else rng.uniform(0.02, 0.045))))
        font = load_font(rng, size, fonts)
        x0, y0, x1, y1 = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
        pos = _place(rng, w, h, x1 - x0, y1 - y0, boxes)
        if pos is None:
            continue
        layer = Image.new("L", (w, h), 0)
        ImageDraw.Draw(layer).text((pos[0] - x0, pos[1] - y0), text, font=font, fill=255)
        alpha = np.asarray(layer, np.float32) / 255.0
        if rng.random() < 0.5:
            alpha = cv2.GaussianBlur(alpha, (0, 0), rng.uniform(0.4, 1.0))
        alpha[alpha < 0.01] = 0  # so the box below bounds every changed pixel
        glyph = alpha > 0.1
        ys, xs = np.nonzero(alpha)
        if not len(xs):
            continue
        region = out[glyph]
        bright = rng.random() < 0.8  # most prints are white; some are black on bright anatomy
        level = rng.uniform(200, 255) if bright else rng.uniform(0, 50)
        if abs(level - float(np.median(region))) < 60:
            level = 255.0 if np.median(region) < 128 else 0.0
        out = out * (1 - alpha) + level * alpha
        out[glyph] += rng.normal(0, rng.uniform(0, 4), int(glyph.sum()))
        mask |= glyph
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        texts.append(text)
    return SynthSample(np.clip(np.rint(out), 0, 255).astype(np.uint8), original, boxes, texts, mask)

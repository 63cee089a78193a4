"""Stage 1b: find isolated marker glyphs (L, R, D, I, Sx) that PP-OCR's text-line detector does not see.

DBNet is trained on lines of text and gives a lone letter zero response at some scales. A burnt-in marker
is easy to see classically, though: a thin, flat, high-contrast shape on smooth anatomy. Candidates are the
compact components of a white (bright text) or black (dark text) top-hat that stand out from an uncluttered
surrounding; each is then read by the PP-OCR recogniser and kept only if it reads, with high confidence,
as a marker (L, R, D, I, S, X, Sx...; a lone "I" often reads as "1"), which rejects bone edges, wires and
other bright blobs that read as some other character or as nothing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

REC_HEIGHT = 48      # the PP-OCR recogniser's input height
WORK_SIDE = 1024     # candidates are searched on a copy no larger than this (px, longest side)


@dataclass
class Candidate:
    box: tuple[int, int, int, int]   # x0, y0, x1, y1 (exclusive) in full-size pixels
    polarity: int                    # +1 bright glyph on darker ground, -1 dark glyph on brighter ground
    contrast: float                  # glyph mean minus surrounding median (grey levels, signed by polarity)


def find_candidates(gray: np.ndarray, *, min_contrast: float = 40.0, max_clutter: float = 0.1,
                    tophat_fraction: float = 0.025, min_height: int = 8,
                    max_height_fraction: float = 0.1) -> list[Candidate]:
    """Compact, isolated, high-contrast components of the white/black top-hat of an 8-bit image.

    The top-hat kernel (`tophat_fraction` of the longest side) is wider than a glyph stroke, so strokes
    survive and smooth anatomy does not. A component is kept when its height is plausible for a marker, it
    is not much wider than tall, few other top-hat pixels lie in a ring around it (`max_clutter`), and its
    mean differs from the ring's median by at least `min_contrast` grey levels."""
    h0, w0 = gray.shape
    scale = min(1.0, WORK_SIDE / max(h0, w0))
    img = cv2.resize(gray, (round(w0 * scale), round(h0 * scale)), interpolation=cv2.INTER_AREA) \
        if scale < 1 else gray
    h, w = img.shape
    k = max(7, int(tophat_fraction * max(h, w)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))
    out = []
    for op, polarity in ((cv2.MORPH_TOPHAT, 1), (cv2.MORPH_BLACKHAT, -1)):
        binary = (cv2.morphologyEx(img, op, kernel) > min_contrast).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        for i in range(1, n):
            x, y, bw, bh, area = (int(v) for v in stats[i])
            if bh < max(min_height, 0.01 * h) or bh > max_height_fraction * h or bw > 1.3 * bh \
                    or area < 0.08 * bw * bh:
                continue
            m = max(2, int(0.4 * bh))
            X0, Y0, X1, Y1 = max(0, x - m), max(0, y - m), min(w, x + bw + m), min(h, y + bh + m)
            win = labels[Y0:Y1, X0:X1]
            ring = np.ones(win.shape, bool)
            ring[y - Y0:y - Y0 + bh, x - X0:x - X0 + bw] = False
            others = (win > 0) & (win != i) & ring
            if others.mean() > max_clutter:
                continue
            ground = img[Y0:Y1, X0:X1][ring & ~others]
            if not ground.size:
                continue
            contrast = polarity * (float(img[y:y + bh, x:x + bw][labels[y:y + bh, x:x + bw] == i].mean())
                                   - float(np.median(ground)))
            if contrast < min_contrast:
                continue
            box = (int(x / scale), int(y / scale), min(w0, int(np.ceil((x + bw) / scale))),
                   min(h0, int(np.ceil((y + bh) / scale))))
            out.append(Candidate(box, polarity, round(contrast, 1)))
    return out


def rec_batch(gray: np.ndarray, cands: list[Candidate]) -> np.ndarray:
    """Crops around candidates as the recogniser's input: dark glyph on light ground, 48 px high, padded."""
    h, w = gray.shape
    crops = []
    for c in cands:
        x0, y0, x1, y1 = c.box
        m = int(0.35 * (y1 - y0)) + 2
        crop = gray[max(0, y0 - m):min(h, y1 + m), max(0, x0 - m):min(w, x1 + m)]
        crop = 255 - crop if c.polarity > 0 else crop
        width = int(np.clip(np.ceil(REC_HEIGHT * crop.shape[1] / crop.shape[0]), 16, 2 * REC_HEIGHT))
        crops.append(cv2.resize(crop, (width, REC_HEIGHT), interpolation=cv2.INTER_LINEAR))
    batch = np.zeros((len(crops), 3, REC_HEIGHT, max(c.shape[1] for c in crops)), np.float32)
    for b, crop in zip(batch, crops):
        b[:, :, :crop.shape[1]] = crop.astype(np.float32) * np.float32(2 / 255) - np.float32(1)
    return batch


def confirm(rec, gray: np.ndarray, cands: list[Candidate], accept: Sequence[str],
            min_score: float) -> list[tuple[Candidate, str, float]]:
    """(candidate, text, score) for candidates the recogniser reads as one of `accept` (case-insensitive).

    The score is the probability mass on the characters of `accept` (both cases) at each decoded step,
    averaged: a lone bar splits its mass between "1" and "I" (e.g. 0.70 / 0.30), which is one verdict,
    not two weak ones."""
    if not cands:
        return []
    probs = rec.session(rec_batch(gray, cands))                     # (N, steps, classes), softmaxed
    reads, _ = rec.postprocess_op(probs)
    chars = rec.postprocess_op.character
    wanted = {ch for word in accept for ch in word.upper() + word.lower()}
    alphabet = [i for i, ch in enumerate(chars) if ch in wanted]
    mass = probs[..., alphabet].sum(axis=-1)                        # (N, steps)
    best = probs.argmax(axis=-1)
    words = {word.upper() for word in accept}
    out = []
    for c, (text, _), ids, m in zip(cands, reads, best, mass):
        steps = (ids != 0) & np.r_[True, ids[1:] != ids[:-1]]       # CTC: non-blank, not a repeat
        score = float(m[steps].mean()) if steps.any() else 0.0
        if text.strip().upper() in words and score >= min_score:
            out.append((c, text.strip(), score))
    return out

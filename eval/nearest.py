"""Nearest-neighbour distances for copy detection: pixel RMS of thumbnails (always in float, never wrapping
unsigned integers), cosine of features, each divided by the bank's own k-th-neighbour scale, and the cropped
views a trimmed copy is matched against. eval.privacy composes them; they hold no state."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .features import to_square_tensor

CROP_FRACTIONS = (0.025, 0.05, 0.075, 0.1)   # crops (share of each side removed) a copy is matched against
CHUNK = 2048


def unit_float(img: np.ndarray) -> np.ndarray:
    """Gray pixels as float in [0, 1]: integer images are divided by their type's maximum, so a difference of
    two images is never taken in (wrapping) unsigned integers."""
    if np.issubdtype(img.dtype, np.integer):
        return img.astype(np.float64) / np.iinfo(img.dtype).max
    return img


def thumb(img: np.ndarray, size: int) -> torch.Tensor:
    """(1, size * size) float64 pixels of `img` resized to size x size (antialiased, aspect not kept)."""
    return to_square_tensor(unit_float(img), size).flatten(1).double()


def pixel_distance(a: np.ndarray, b: np.ndarray, size: int = 64) -> float:
    """RMS difference in [0, 1] of two gray images after both are resized to size x size."""
    return float((thumb(a, size) - thumb(b, size)).pow(2).mean().sqrt())


def distance_matrix(q: torch.Tensor, bank: torch.Tensor, metric: str) -> torch.Tensor:
    """(len(q), len(bank)) distances: "rms" (pixel RMS of flattened thumbnails) or "cosine" (1 - cosine)."""
    if metric == "rms":
        return torch.cdist(q.double(), bank.double()) / math.sqrt(q.shape[1])
    return 1.0 - F.normalize(q.double(), dim=1) @ F.normalize(bank.double(), dim=1).T


def kth_neighbour(bank: torch.Tensor, k: int, metric: str) -> torch.Tensor:
    """Each row's distance to its k-th nearest OTHER row (duplicates count as neighbours at distance 0)."""
    out = []
    for start in range(0, len(bank), CHUNK):
        d = distance_matrix(bank[start:start + CHUNK], bank, metric)
        d[torch.arange(len(d)), torch.arange(start, start + len(d))] = math.inf
        out.append(d.topk(k, dim=1, largest=False).values[:, -1])
    return torch.cat(out)


def nearest_ratio(q: torch.Tensor, bank: torch.Tensor, scale: torch.Tensor,
                  metric: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query row: the smallest distance / scale over the bank, its index and its distance."""
    ratios, idx, dist = [], [], []
    for start in range(0, len(q), CHUNK):
        d = distance_matrix(q[start:start + CHUNK], bank, metric)
        r = d / scale.clamp_min(1e-12)
        best = r.min(dim=1)
        ratios.append(best.values)
        idx.append(best.indices)
        dist.append(d.gather(1, best.indices[:, None])[:, 0])
    return torch.cat(ratios), torch.cat(idx), torch.cat(dist)


def crop_views(img: np.ndarray, fractions: Sequence[float] = CROP_FRACTIONS) -> list[tuple[str, np.ndarray]]:
    """The image and its crops: each fraction of height and width removed, kept at 3 x 3 positions."""
    h, w = img.shape[:2]
    views = [("", img)]
    for f in fractions:
        ch, cw = round(h * f), round(w * f)
        for top in (0, ch // 2, ch):
            for left in (0, cw // 2, cw):
                views.append((f"crop {f:.1%}", img[top:top + h - ch, left:left + w - cw]))
    return views

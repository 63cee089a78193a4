"""Stage 2: turn text boxes into a pixel mask, so inpainting touches glyphs, not whole rectangles.

`glyph` (default, no weights): Otsu threshold inside each box, the glyph side being the class that is
not the box's border, plus the whole label plate when the text sits on one (plates.py). `sam`: Segment
Anything box prompts, one image embedding per image. `box`: the detector's quadrilateral as is. Every
mask is grown by `dilate` px to cover anti-aliased edges."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch

from cxrcommon.errors import MissingFileError, UserError
from cxrcommon.optional import require

from .config import TextRemovalConfig
from .detect import TextRegion
from .plates import plate_mask

log = logging.getLogger(__name__)
MIN_CONTRAST = 8       # grey levels between glyph and background below which Otsu is noise -> whole box
MAX_GLYPH_FRACTION = 0.7  # a "glyph" class this large means thresholding failed -> whole box


class Segmenter(Protocol):
    def __call__(self, gray: np.ndarray, regions: list[TextRegion]) -> np.ndarray: ...


def polygon_mask(shape: tuple[int, int], region: TextRegion) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.int32(region.polygon)], 1)
    return mask.astype(bool)


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0 or not mask.any():
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def glyph_mask(gray: np.ndarray, region: TextRegion) -> np.ndarray:
    """Glyph pixels inside one box (bool, box-sized): Otsu split, glyphs = the class unlike the border."""
    x0, y0, x1, y1 = region.box
    crop = gray[y0:y1, x0:x1]
    inside = polygon_mask(gray.shape, region)[y0:y1, x0:x1]
    if not inside.any():
        inside = np.ones_like(crop, bool)
    values = crop[inside]
    thr, _ = cv2.threshold(values.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    bright = crop > thr
    ring = np.concatenate([bright[0], bright[-1], bright[:, 0], bright[:, -1]])
    glyph = ~bright if ring.mean() > 0.5 else bright
    glyph &= inside
    fg, bg = values[glyph[inside]], values[~glyph[inside]]
    if not fg.size or not bg.size or abs(float(fg.mean()) - float(bg.mean())) < MIN_CONTRAST \
            or glyph.sum() > MAX_GLYPH_FRACTION * inside.sum():
        return inside
    return glyph


class GlyphSegmenter:
    """Glyph masks, grown over the label plate a box's text sits on when `label_plates` is set."""

    def __init__(self, cfg: TextRemovalConfig):
        self.cfg = cfg

    def __call__(self, gray: np.ndarray, regions: list[TextRegion]) -> np.ndarray:
        mask = np.zeros(gray.shape, bool)
        for r in regions:
            x0, y0, x1, y1 = r.box
            glyph = glyph_mask(gray, r)
            mask[y0:y1, x0:x1] |= glyph
            plate = plate_mask(gray, r.box, glyph, self.cfg) if self.cfg.label_plates else None
            if plate is not None:
                (wx0, wy0, wx1, wy1), m = plate
                mask[wy0:wy1, wx0:wx1] |= m
        return dilate(mask, self.cfg.dilate)


class BoxSegmenter:
    def __init__(self, cfg: TextRemovalConfig):
        self.dilate = cfg.dilate

    def __call__(self, gray: np.ndarray, regions: list[TextRegion]) -> np.ndarray:
        mask = np.zeros(gray.shape, bool)
        for r in regions:
            mask |= polygon_mask(gray.shape, r)
        return dilate(mask, self.dilate)


def load_sam(checkpoint: str | Path, model_type: str = "vit_b", device: torch.device | str = "cpu") -> torch.nn.Module:
    """A SAM model from an official checkpoint, read safely (safetensors, or torch.load weights_only)."""
    require("Segment Anything masks (--sam-checkpoint)", "torchvision")  # before asking for a download
    from segment_anything import sam_model_registry

    path = Path(checkpoint)
    if not path.is_file():
        raise MissingFileError(f"SAM checkpoint {path} not found; download sam_{model_type}_*.pth from the "
                                f"segment-anything release page and pass its path with --sam-checkpoint")
    if model_type not in sam_model_registry:
        raise UserError(f"--sam-model-type {model_type!r} is not one of vit_b, vit_l, vit_h")
    sam = sam_model_registry[model_type]()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        sam.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path} does not fit SAM {model_type}: pass the matching --sam-model-type "
                         f"({str(exc).splitlines()[0]})") from exc
    return sam.to(device).eval()


class SamSegmenter:
    """Box prompts through SamPredictor; the image embedding is computed once per image."""

    def __init__(self, sam: torch.nn.Module, cfg: TextRemovalConfig):
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(sam)
        self.dilate = cfg.dilate

    @torch.no_grad()
    def __call__(self, gray: np.ndarray, regions: list[TextRegion]) -> np.ndarray:
        mask = np.zeros(gray.shape, bool)
        if not regions:
            return mask
        p = self.predictor
        p.set_image(np.repeat(gray[..., None], 3, axis=2), image_format="RGB")
        boxes = torch.tensor([r.box for r in regions], dtype=torch.float32, device=p.device)
        boxes[:, 2:] -= 1  # SAM boxes are inclusive
        boxes = p.transform.apply_boxes_torch(boxes, gray.shape)
        masks, _, _ = p.predict_torch(None, None, boxes=boxes, multimask_output=False)
        masks = masks[:, 0].cpu().numpy()
        for r, m in zip(regions, masks):
            x0, y0, x1, y1 = r.box  # SAM may bleed into anatomy; text lives inside its box
            mask[y0:y1, x0:x1] |= m[y0:y1, x0:x1]
        p.reset_image()
        return dilate(mask, self.dilate)


def build_segmenter(cfg: TextRemovalConfig) -> Segmenter:
    kind = cfg.segmenter
    if kind == "auto":
        kind = "sam" if cfg.sam_checkpoint else "glyph"
    if kind == "glyph":
        return GlyphSegmenter(cfg)
    if kind == "box":
        return BoxSegmenter(cfg)
    if kind == "sam":
        if not cfg.sam_checkpoint:
            raise ValueError("--segmenter sam needs --sam-checkpoint PATH (or use --segmenter glyph)")
        from cxrcommon.device import pick_device
        return SamSegmenter(load_sam(cfg.sam_checkpoint, cfg.sam_model_type, pick_device(cfg.device)), cfg)
    raise ValueError(f"unknown segmenter {kind!r}; choose auto, glyph, box or sam")

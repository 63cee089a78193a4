"""Stage 3: fill masked pixels. Every inpainter returns an image whose pixels outside the mask are
bit-identical to the input (`paste`), in the input's own dtype (uint8, uint16, float, ...).

`telea`/`ns`: OpenCV, per connected mask component on a crop (same result as the full image, less work).
`sd`: Stable Diffusion inpainting on a model-resolution window around each group of components, pasted
back, so a 2048² radiograph is never squashed to 512²."""
from __future__ import annotations

import logging
from typing import Any, Protocol

import cv2
import numpy as np
from PIL import Image

from .config import TextRemovalConfig

log = logging.getLogger(__name__)


class Inpainter(Protocol):
    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray: ...


def paste(original: np.ndarray, filled: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Original outside the mask, `filled` inside, in the original dtype."""
    m = mask if original.ndim == 2 else mask[..., None]
    return np.where(m, filled.astype(original.dtype, copy=False), original)


def components(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x0, y0, x1, y1) of the mask's connected components."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return [(int(x), int(y), int(x + w), int(y + h)) for x, y, w, h, _ in stats[1:n]]


def _cast_back(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def _cv_inpaint(crop: np.ndarray, mask: np.ndarray, radius: int, flag: int) -> np.ndarray:
    """cv2.inpaint for any dtype/channels. OpenCV takes uint8 1/3-ch and uint16 1-ch; its float32 path
    overshoots (Telea returns values far outside the input range), so other dtypes go through uint16."""
    m = mask.astype(np.uint8)
    if crop.dtype == np.uint8 or (crop.ndim == 2 and crop.dtype == np.uint16):
        return cv2.inpaint(np.ascontiguousarray(crop), m, radius, flag)
    if crop.ndim == 3:
        return np.stack([_cv_inpaint(crop[..., c], mask, radius, flag) for c in range(crop.shape[2])], axis=2)
    lo, hi = float(crop.min()), float(crop.max())
    span = (hi - lo) or 1.0
    as16 = np.rint((crop.astype(np.float64) - lo) * (65535 / span)).astype(np.uint16)
    filled = cv2.inpaint(as16, m, radius, flag).astype(np.float64) * (span / 65535) + lo
    return _cast_back(filled, crop.dtype)


class OpenCVInpainter:
    def __init__(self, method: str = "telea", radius: int = 5):
        self.flag = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}[method]
        self.radius = radius

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = image.copy()
        h, w = mask.shape
        pad = 2 * self.radius + 2  # pixels Telea/NS may read around the hole
        for x0, y0, x1, y1 in components(mask):
            x0, y0, x1, y1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
            crop_mask = mask[y0:y1, x0:x1]
            filled = _cv_inpaint(out[y0:y1, x0:x1], crop_mask, self.radius, self.flag)
            out[y0:y1, x0:x1] = paste(out[y0:y1, x0:x1], filled, crop_mask)
        return out


def windows(mask: np.ndarray, size: int, margin: int) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Square windows (clamped to the image) of side >= `size`, each covering whole mask components.

    Components that fit in an earlier window are handled by it; one window per remaining component."""
    h, w = mask.shape
    todo = components(mask)
    out = []
    while todo:
        x0, y0, x1, y1 = todo.pop(0)
        side = max(size, x1 - x0 + 2 * margin, y1 - y0 + 2 * margin)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        wx0 = min(max(0, cx - side // 2), max(0, w - side))
        wy0 = min(max(0, cy - side // 2), max(0, h - side))
        win = (wx0, wy0, min(w, wx0 + side), min(h, wy0 + side))
        inside = [b for b in todo if b[0] >= win[0] and b[1] >= win[1] and b[2] <= win[2] and b[3] <= win[3]]
        todo = [b for b in todo if b not in inside]
        out.append((win, mask[win[1]:win[3], win[0]:win[2]]))
    return out


class SDInpainter:
    """diffusers StableDiffusionInpaintPipeline on crops at the model's resolution."""

    def __init__(self, pipe: Any, cfg: TextRemovalConfig):
        import torch

        self.pipe = pipe
        self.cfg = cfg
        self.size = cfg.sd_resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.generator = torch.Generator("cpu").manual_seed(cfg.seed)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        gray = image if image.ndim == 2 else image[..., :3].mean(axis=2)
        lo, hi = float(gray.min()), float(gray.max())
        span = hi - lo or 1.0
        out = image.copy()
        for (x0, y0, x1, y1), win_mask in windows(mask, self.size, margin=16):
            crop = (out[y0:y1, x0:x1] if out.ndim == 2 else out[y0:y1, x0:x1, :3].mean(axis=2)).astype(np.float32)
            crop = (crop - lo) / span
            ch, cw = crop.shape
            rgb = np.repeat(cv2.resize(crop, (self.size, self.size), interpolation=cv2.INTER_AREA)[..., None], 3, 2)
            m = cv2.resize(win_mask.astype(np.uint8) * 255, (self.size, self.size), interpolation=cv2.INTER_NEAREST)
            m = cv2.dilate(m, np.ones((3, 3), np.uint8))  # resizing must not lose thin mask pixels
            result = self.pipe(prompt=self.cfg.sd_prompt, image=rgb[None], mask_image=Image.fromarray(m),
                               height=self.size, width=self.size, num_inference_steps=self.cfg.sd_steps,
                               guidance_scale=self.cfg.sd_guidance, generator=self.generator,
                               output_type="np").images[0]
            filled = cv2.resize(result.mean(axis=2).astype(np.float32), (cw, ch), interpolation=cv2.INTER_CUBIC)
            filled = _cast_back(np.clip(filled, 0, 1) * span + lo, image.dtype)
            if out.ndim == 3:
                filled = np.repeat(filled[..., None], out.shape[2], axis=2)
            out[y0:y1, x0:x1] = paste(out[y0:y1, x0:x1], filled, win_mask)
        return out


def load_sd_pipe(cfg: TextRemovalConfig) -> Any:
    """The inpainting pipeline (plus optional CXR LoRA) through cxrcommon's safe loader."""
    from diffusers import StableDiffusionInpaintPipeline

    from cxrcommon.device import pick_device, pick_dtype
    from cxrcommon.models import load_pipeline

    device = pick_device(cfg.device)
    pipe = load_pipeline(StableDiffusionInpaintPipeline, cfg.sd_model, torch_dtype=pick_dtype(device, cfg.precision))
    if cfg.sd_lora:
        pipe.load_lora_weights(cfg.sd_lora, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def build_inpainter(cfg: TextRemovalConfig) -> Inpainter:
    if cfg.inpainter in ("telea", "ns"):
        return OpenCVInpainter(cfg.inpainter, cfg.inpaint_radius)
    if cfg.inpainter == "sd":
        return SDInpainter(load_sd_pipe(cfg), cfg)
    raise ValueError(f"unknown inpainter {cfg.inpainter!r}; choose telea, ns or sd")

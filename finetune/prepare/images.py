"""Source image -> square PNG at the training size, decoded no larger than it must be.

A MIMIC JPEG is about 3000x2500; shrinking it to 512 after a full decode spends most of the time on pixels
that are thrown away. libjpeg can decode at 1/2, 1/4 or 1/8 scale straight from the DCT coefficients
(PIL's `Image.draft`), so a JPEG whose target is at most half its size is decoded at the smallest such scale
that still covers the target, then area-resized the rest of the way (docs/BENCHMARKS.md measures both the
speed-up and the PSNR against a full decode + Lanczos). 16-bit sources (PadChest PNGs, DICOM after windowing,
JSRT raw) stay 16-bit; 8-bit ones stay 8-bit."""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from cxrcommon.imageio import DICOM_SUFFIXES, from_pil, read_dicom, to_square, to_uint, write_png
from cxrcommon.limits import check_pixels
from cxrcommon.manifest import MIN_IMAGE_SIDE

JPEG_SUFFIXES = (".jpg", ".jpeg")
PNG_COMPRESSION = 1  # zlib level: PIL's default 6 takes ~3x the time for ~10% smaller files of 512² radiographs


def target_scale(width: int, height: int, size: int, mode: str) -> float:
    """How much the source shrinks to reach `size`: the long side fits when padding, the short side when cropping."""
    return size / (max(width, height) if mode == "pad" else min(width, height))


def decode(path: Path, size: int, mode: str = "pad") -> np.ndarray:
    """Gray uint8 or uint16 pixels of a JPEG / PNG / TIFF / DICOM, JPEGs DCT-scaled to >= the needed size, turned
    upright as an EXIF orientation says (as every viewer shows it). An image over the project's pixel limit
    (cxrcommon.limits, as for DICOM) is refused before it is decoded."""
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        pixels, ds = read_dicom(path)
        return to_uint(pixels, 16 if int(ds.get("BitsStored", 16) or 16) > 8 else 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_pixels is the limit
        img = Image.open(path)
    with img:
        check_pixels(path, img.size[0] * img.size[1])
        if suffix in JPEG_SUFFIXES and img.format == "JPEG":
            scale = target_scale(*img.size, size, mode)
            if scale <= 0.5:
                img.draft("L", (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            return to_uint(from_pil(img), 16)
        return np.asarray(img if img.mode == "L" else img.convert("L"))


def prepare_image(src: Path, dst: Path, size: int, mode: str,
                  reader: Callable[[Path], np.ndarray] | None = None) -> int:
    """Write `dst` (atomically) from `src` unless it is already there; returns the PNG's bit depth
    (0 when it was already made). `reader` replaces `decode` for formats only a dataset knows (JSRT raw).
    ValueError for what no training image may be: not 2-D, a side under MIN_IMAGE_SIDE (finetune's manifest
    reader refuses those too), or one value throughout (a blank or failed export, not a film)."""
    if dst.is_file():
        return 0
    pixels = reader(src) if reader is not None else decode(src, size, mode)
    if pixels.ndim != 2 or min(pixels.shape) < MIN_IMAGE_SIDE:
        raise ValueError(f"{src}: decoded to shape {pixels.shape}, not a 2-D image of at least {MIN_IMAGE_SIDE} px")
    if pixels.min() == pixels.max():
        raise ValueError(f"{src}: blank, every pixel is {pixels.flat[0]}")
    square = to_square(pixels, size, mode=mode)
    bits = 16 if square.dtype == np.uint16 else 8
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_png(dst, square, bits=bits, compress_level=PNG_COMPRESSION)
    return bits

"""One size guard for everything that decodes user files: image pixels (Pillow, pydicom and OpenCV
paths alike) and byte counts (zip members, uploads), checked from headers before anything is decoded,
so a small file can never expand into gigabytes of memory."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image

from .errors import ImageReadError, UserError

# Largest image (rows x columns x frames) we decode; real CXRs are <= ~4k x 5k = 20 M pixels.
MAX_PIXELS = int(os.environ.get("SYNTHCXR_MAX_PIXELS", 100_000_000))
# Largest single file we unpack or accept (a zip member, an upload); real CXRs are < 100 MB.
MAX_BYTES = int(os.environ.get("SYNTHCXR_MAX_BYTES", 1 << 30))
# OpenCV's own decoder limit, for any cv2.imread that runs before `check_image_file` was called
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))


def check_pixels(source: str | os.PathLike, n_pixels: int, max_pixels: int | None = None) -> None:
    """Raise ImageReadError if an image of `n_pixels` would exceed the limit (default MAX_PIXELS)."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if n_pixels > limit:
        raise ImageReadError(f"{source}: {n_pixels} pixels exceeds the limit of {limit} (possible decompression "
                             f"bomb) — if the image is genuine, raise max_pixels or SYNTHCXR_MAX_PIXELS")


def check_bytes(source: str | os.PathLike, n_bytes: int, max_bytes: int | None = None) -> None:
    """Raise UserError if `n_bytes` (e.g. a zip member's declared size) exceeds the limit (default MAX_BYTES)."""
    limit = MAX_BYTES if max_bytes is None else max_bytes
    if n_bytes > limit:
        raise UserError(f"{source}: {n_bytes} bytes exceeds the limit of {limit} — split it or, if it is "
                        f"genuine, raise SYNTHCXR_MAX_BYTES")


def image_pixels(path: str | os.PathLike) -> int:
    """Pixel count (x frames) from the file's header only: DICOM via pydicom without pixel data, other
    formats via Pillow's lazy open. Raises ImageReadError if neither can read a header."""
    p = Path(path)
    with open(p, "rb") as fh:
        is_dicom = p.suffix.lower() in (".dcm", ".dicom") or fh.read(132)[128:] == b"DICM"
    try:
        if is_dicom:
            import pydicom
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            return int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * int(ds.get("NumberOfFrames", 1) or 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            with Image.open(p) as img:
                return img.size[0] * img.size[1] * getattr(img, "n_frames", 1)
    except Exception as exc:  # noqa: BLE001 - any header failure means the same thing to the user
        if isinstance(exc, Image.DecompressionBombError):  # Pillow refuses > 2x its own limit at open
            raise ImageReadError(f"{p}: {exc} (possible decompression bomb) — if the image is genuine, convert "
                                 f"it to a smaller image first") from exc
        raise ImageReadError(f"{p}: cannot read the image header ({type(exc).__name__}: {exc}) — is it a complete "
                             f"PNG/JPEG/TIFF/DICOM file?") from exc


def check_image_file(path: str | os.PathLike, max_pixels: int | None = None) -> Path:
    """Guard for decoders that do not check sizes themselves (cv2.imread): raise before decoding
    an image over the pixel limit. Returns the path, so a call can wrap the argument in place."""
    check_pixels(path, image_pixels(path), max_pixels)
    return Path(path)

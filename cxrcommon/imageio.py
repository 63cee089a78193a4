"""Read and write chest X-rays: PNG/JPEG/TIFF via Pillow, DICOM via pydicom, resizing via OpenCV.

Every reader returns float32 grayscale H×W in [0, 1] (bright = dense, i.e. MONOCHROME2 display), so
the stages never see bit depths, photometric interpretations or DICOM LUTs. Every writer is atomic.

Where provenance goes: PNG → one tEXt/iTXt chunk per tag; DICOM Secondary Capture →
`ImageComments` holds the synthetic warning, then a line `provenance: {json}` with all tags
(read back with `dicom_provenance`); `DerivationDescription` says SYNTHETIC as well.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pydicom
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from .atomic import atomic_path, atomic_write_bytes
from .errors import ImageReadError
from .limits import check_pixels
from .provenance import SOFTWARE, SYNTHETIC_WARNING

log = logging.getLogger(__name__)

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
PLUGIN_HINT = ("install a decoder plugin: `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` "
               "(JPEG, JPEG-LS, JPEG 2000) or `pip install python-gdcm`")
PROVENANCE_PREFIX = "provenance: "


# ---------------------------------------------------------------- reading

def read_image(path: str | os.PathLike, *, clip_percentile: float | None = None,
               max_pixels: int | None = None) -> np.ndarray:
    """Any supported image → float32 H×W in [0, 1], optionally with the brightest p % clipped.

    PNG/JPEG/TIFF are scaled by their bit depth (16-bit values survive exactly); DICOM goes
    through rescale, VOI LUT/window and MONOCHROME1 inversion (see `read_dicom`)."""
    p = _check_file(path)
    if _is_dicom(p):
        arr = read_dicom(p, max_pixels=max_pixels)[0]
    else:
        arr = _read_pil(p, max_pixels)
    return normalize(arr, clip_percentile) if clip_percentile else arr


def read_dicom(path: str | os.PathLike, *, max_pixels: int | None = None) -> tuple[np.ndarray, Dataset]:
    """DICOM → (float32 H×W display image in [0, 1], dataset). Multi-frame files give frame 0.

    Modality LUT / rescale slope+intercept first, then the VOI LUT or window (mapped onto its
    output range), else min-max over the image; MONOCHROME1 is inverted so bone is bright."""
    p = _check_file(path)
    try:
        ds = pydicom.dcmread(p)
    except InvalidDicomError as e:
        raise ImageReadError(f"{p}: not a DICOM file ({e}) — pass a DICOM Part 10 file or a PNG/JPEG/TIFF") from e
    except Exception as e:  # pydicom raises assorted errors on truncated headers
        raise ImageReadError(f"{p}: DICOM header is unreadable or truncated ({e}) — re-export or re-download it") from e
    stored = _stored_pixels(ds, p, max_pixels)
    return _display(stored, ds, stored).astype(np.float32), ds


def display_view(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values of one grayscale frame as the 8-bit image a reader sees (modality LUT, VOI LUT or
    window, MONOCHROME1 inverted), for detection while the stored values are what gets cleaned."""
    return (np.clip(_display(stored, ds, stored), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The tEXt/zTXt/iTXt chunks of a PNG (e.g. provenance written by `write_png`)."""
    p = _check_file(path)
    try:
        with Image.open(p) as img:
            img.load()
            return {str(k): str(v) for k, v in getattr(img, "text", {}).items()}
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{p}: cannot read PNG text chunks ({e}) — is it a complete PNG file?") from e


def dicom_provenance(ds: Dataset) -> dict[str, str]:
    """Provenance tags stored by `write_dicom` (the JSON line in ImageComments); {} if none."""
    for line in str(ds.get("ImageComments", "")).splitlines():
        if line.startswith(PROVENANCE_PREFIX):
            return json.loads(line[len(PROVENANCE_PREFIX):])
    return {}


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: file not found — check the path (relative paths resolve from {Path.cwd()})")
    if not p.is_file():
        raise ImageReadError(f"{p}: is not a regular file — pass an image file, not a folder")
    if p.stat().st_size == 0:
        raise ImageReadError(f"{p}: file is empty (0 bytes) — re-export or re-download it")
    return p


def _is_dicom(p: Path) -> bool:
    suffix = p.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in PIL_SUFFIXES:
        return False
    with open(p, "rb") as fh:  # extensionless DICOMs are common in PACS exports
        if fh.read(132)[128:] == b"DICM":
            return True
    raise ImageReadError(f"{p}: unsupported file type {suffix or '(no extension)'!r} — "
                         f"convert it to one of {', '.join(PIL_SUFFIXES + DICOM_SUFFIXES)}")


def _read_pil(p: Path, max_pixels: int | None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit
            with Image.open(p) as img:
                check_pixels(p, img.size[0] * img.size[1], max_pixels)
                img.load()
                return from_pil(img)
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{p}: {e} (possible decompression bomb) — if genuine, convert it to a smaller "
                             "image first") from e
    except UnidentifiedImageError as e:
        raise ImageReadError(f"{p}: not a recognisable image (wrong extension or not an image) — "
                             "check the file's real format with `file`") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if isinstance(e, ImageReadError):
            raise
        raise ImageReadError(f"{p}: image data is corrupt or truncated ({e}) — re-export or re-download it") from e


def from_pil(img: Image.Image) -> np.ndarray:
    """PIL image of any mode → float32 gray [0, 1]; integer depths scaled by their maximum."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0
    if img.mode == "I":  # 32-bit int; 16-bit TIFFs sometimes arrive like this
        a = np.asarray(img, dtype=np.float64)
        return _minmax(a) if a.min() < 0 or a.max() > 65535 else (a / 65535.0).astype(np.float32)
    if img.mode == "F":
        return _minmax(np.asarray(img, dtype=np.float64))
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.float32) / 255.0


def _stored_pixels(ds: Dataset, p: Path, max_pixels: int | None) -> np.ndarray:
    """Stored (raw) values of frame 0 as H×W, with clear errors for every way it fails."""
    if "PixelData" not in ds:
        kind = ds.get("SOPClassUID", "unknown SOP class")
        kind = getattr(kind, "name", kind)
        raise ImageReadError(f"{p}: DICOM has no pixel data ({kind}) — pass an image DICOM, not a report "
                             "or presentation state")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    check_pixels(p, int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * frames, max_pixels)
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        arr = ds.pixel_array
    except (RuntimeError, NotImplementedError) as e:
        name = getattr(ts, "name", ts)
        raise ImageReadError(f"{p}: cannot decode {name} pixel data ({e}) — {PLUGIN_HINT}") from e
    except Exception as e:
        raise ImageReadError(f"{p}: DICOM pixel data is corrupt or truncated ({e}) — re-export it "
                             "uncompressed or re-download it") from e
    if frames > 1:
        log.warning("%s: %d frames; using frame 0", p, frames)
        arr = arr[0]
    if arr.ndim == 3:  # colour (pydicom has already converted YBR to RGB)
        arr = cv2.cvtColor(arr.astype(np.float32), cv2.COLOR_RGB2GRAY)
    return arr


def _has_voi(ds: Dataset) -> bool:
    return bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)


def _display(stored: np.ndarray, ds: Dataset, reference: np.ndarray) -> np.ndarray:
    """Stored values → float64 display [0, 1]; `reference` (the whole image) sets the min-max range
    when there is no VOI, so `write_dicom_like` can evaluate the same mapping on any values."""
    if stored.ndim == 3 or ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
        lo, hi = float(reference.min()), float(reference.max())  # colour, already reduced to gray
        x = stored.astype(np.float64)
    elif _has_voi(ds):
        x = apply_voi_lut(apply_modality_lut(stored, ds), ds).astype(np.float64)
        if ds.get("VOILUTSequence"):
            lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
        else:  # the window's output range is what the extremes map to
            lo, hi = apply_windowing(np.array([-1e12, 1e12]), ds).tolist()
    else:
        x = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        ref = np.asarray(apply_modality_lut(reference, ds), dtype=np.float64)
        lo, hi = float(ref.min()), float(ref.max())
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(x)
    return 1.0 - x if ds.get("PhotometricInterpretation") == "MONOCHROME1" else x


# ---------------------------------------------------------------- array helpers

def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return ((a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)).astype(np.float32)


def normalize(arr: np.ndarray, clip_percentile: float | None = None) -> np.ndarray:
    """float32 [0, 1] by min-max, after clipping the brightest `clip_percentile` % of pixels
    (e.g. 1.0: burnt-in labels and markers stop compressing the lung contrast)."""
    a = np.asarray(arr, dtype=np.float64)
    if a.size == 0 or not np.isfinite(a).all():
        raise ValueError("normalize: array is empty or contains NaN/inf — check the image it came from")
    if clip_percentile:
        if not 0 < clip_percentile < 100:
            raise ValueError(f"clip_percentile must be in (0, 100), got {clip_percentile}")
        a = np.minimum(a, np.percentile(a, 100.0 - clip_percentile))
    return _minmax(a)


def to_square(arr: np.ndarray, size: int, *, mode: str = "pad", pad_value: float = 0.0) -> np.ndarray:
    """Resize to size×size keeping aspect: "pad" fits the long side and pads, "crop" fits the short
    side and centre-crops. Area interpolation when shrinking, linear when enlarging (no overshoot)."""
    if mode not in ("pad", "crop"):
        raise ValueError(f"to_square mode must be 'pad' or 'crop', got {mode!r}")
    h, w = arr.shape[:2]
    if h == 0 or w == 0:
        raise ValueError("to_square: empty image")
    scale = size / (max(h, w) if mode == "pad" else min(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(arr, (nw, nh), interpolation=interp).reshape((nh, nw) + arr.shape[2:])
    if small.dtype.kind == "f":  # float rounding in cv2 can step just outside [min, max]
        np.clip(small, arr.min(), arr.max(), out=small)
    if mode == "crop":
        top, left = (nh - size) // 2, (nw - size) // 2
        return small[top:top + size, left:left + size]
    out = np.full((size, size) + arr.shape[2:], pad_value, dtype=small.dtype)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = small
    return out


def _check_write(arr: np.ndarray, path: Path, *, allow_rgb: bool = False) -> np.ndarray:
    """Arrays we write: float in [0, 1] without NaN, or uint8/uint16; H×W (or H×W×3 if allowed)."""
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{path}: expected a numpy array, got {type(arr).__name__}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (allow_rgb and arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"{path}: expected a gray H×W{' or H×W×3' if allow_rgb else ''} array, "
                         f"got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{path}: refusing to write an empty {arr.shape} array — check the crop/resize before it")
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if arr.dtype.kind != "f":
        raise ValueError(f"{path}: unsupported dtype {arr.dtype} — pass float in [0, 1], uint8 or uint16")
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: array contains NaN or inf — fix the computation that produced it")
    if arr.min() < 0 or arr.max() > 1:
        raise ValueError(f"{path}: float values span [{arr.min():.3g}, {arr.max():.3g}], outside [0, 1] — "
                         "pass it through normalize() or np.clip first")
    return arr


def to_uint(arr: np.ndarray, bits: int = 8) -> np.ndarray:
    """float [0, 1] (or uint8/uint16) → uint8 or uint16, rounding to the nearest level."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    dtype, top = (np.uint8, 255) if bits == 8 else (np.uint16, 65535)
    if arr.dtype == dtype:
        return arr
    if arr.dtype in (np.uint8, np.uint16):
        arr = arr.astype(np.float64) / np.iinfo(arr.dtype).max
    return np.rint(np.clip(arr, 0.0, 1.0) * top).astype(dtype)


# ---------------------------------------------------------------- writing

def write_png(path: str | os.PathLike, arr: np.ndarray, *, bits: int = 8,
              text: dict[str, str] | None = None, compress_level: int = 6) -> Path:
    """Atomic 8- or 16-bit PNG with one text chunk per `text` item (tEXt, or iTXt if not latin-1);
    `compress_level` is zlib's 0-9 (lower: faster, larger). A gray image without text is encoded by OpenCV,
    about twice as fast as PIL at the same level (the pixels are the same)."""
    path = Path(path)
    arr = _check_write(arr, path, allow_rgb=bits == 8)
    if not text and arr.ndim == 2:
        ok, buf = cv2.imencode(".png", to_uint(arr, bits), [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
        if not ok:
            raise OSError(f"{path}: PNG encoding failed")
        atomic_write_bytes(path, buf.tobytes())
        return path
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(str(k), str(v))
    img = Image.fromarray(to_uint(arr, bits))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info, compress_level=compress_level)
    return path


def write_dicom(path: str | os.PathLike, arr: np.ndarray, *, bits: int = 16,
                tags: dict[str, str] | None = None) -> Path:
    """Atomic DICOM Secondary Capture of a synthetic image: DERIVED\\SECONDARY, ConversionType SYN,
    BurnedInAnnotation NO, SYNTHETIC^IMAGE patient, fresh UIDs, provenance JSON in ImageComments."""
    path = Path(path)
    pixels = to_uint(_check_write(arr, path), bits)
    tags = {str(k): str(v) for k, v in (tags or {}).items()}
    tags["synthetic"] = "true"
    now = _dt.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: prompts may hold any text
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "SYNTHETIC^IMAGE", "SYNTHETIC"
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "", "", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "OT", 1, 1
    ds.ConversionType = "SYN"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    ds.Manufacturer = ds.SoftwareVersions = SOFTWARE
    ds.SeriesDescription = "SYNTHETIC"
    ds.DerivationDescription = f"SYNTHETIC: {SYNTHETIC_WARNING}"
    ds.ImageComments = f"{SYNTHETIC_WARNING}\n{PROVENANCE_PREFIX}{json.dumps(tags, sort_keys=True)}"
    ds.set_pixel_data(pixels, "MONOCHROME2", bits)  # also sets SOPInstanceUID
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def write_dicom_like(path: str | os.PathLike, template: Dataset, arr: np.ndarray, *, note: str) -> Path:
    """Write `arr` (a display image as `read_dicom` returns, same size) into a copy of `template`.

    All tags are kept; pixels go back at the template's bit depth and photometric interpretation.
    Pixels whose display value is unchanged keep their exact stored value; changed ones get the
    stored value whose display is nearest. BurnedInAnnotation=NO, a DerivationDescription note,
    new SOPInstanceUID, written uncompressed (Explicit VR Little Endian if the source was compressed)."""
    path = Path(path)
    arr = _check_write(arr, path)
    arr = arr / np.iinfo(arr.dtype).max if arr.dtype.kind == "u" else arr.astype(np.float64)
    ds = copy.deepcopy(template)
    src = Path(str(getattr(template, "filename", None) or "<template>"))
    if int(ds.get("NumberOfFrames", 1) or 1) > 1 or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"{path}: write_dicom_like supports single-frame grayscale templates only ({src})")
    if int(ds.BitsAllocated) not in (8, 16):
        raise ValueError(f"{path}: template has BitsAllocated={ds.BitsAllocated}; only 8 or 16 can be written back")
    stored = _stored_pixels(ds, src, None)
    if arr.shape != stored.shape:
        raise ValueError(f"{path}: image is {arr.shape} but the template is {stored.shape} — "
                         "resize back to the template's size before writing")
    bits, signed = int(ds.BitsStored), int(ds.get("PixelRepresentation", 0)) == 1
    values = np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else np.arange(2 ** bits)
    table = _display(values, ds, stored)  # display value of every possible stored value
    order = np.argsort(table, kind="stable")
    sorted_table = table[order]
    idx = np.clip(np.searchsorted(sorted_table, arr), 1, len(order) - 1)
    nearer_left = np.abs(arr - sorted_table[idx - 1]) <= np.abs(sorted_table[idx] - arr)
    inverse = values[order[np.where(nearer_left, idx - 1, idx)]]
    changed = np.abs(arr - _display(stored, ds, stored)) > 1e-6
    new = np.where(changed, inverse, stored)
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}
    return write_dicom_stored(path, template, new.astype(dtype[(int(ds.BitsAllocated), signed)]), note=note)


def write_dicom_stored(path: str | os.PathLike, template: Dataset, stored: np.ndarray, *, note: str) -> Path:
    """Write stored values (the template's dtype and shape) into a copy of `template`: uncompressed,
    BurnedInAnnotation=NO, a DerivationDescription note, ImageType DERIVED, a new SOPInstanceUID. Cleaning
    in stored values keeps an erased patch at its neighbours' stored level, which a display-space inverse
    cannot where the window clips (every clipped level shows alike)."""
    ds = copy.deepcopy(template)
    if ds.original_encoding[1] is False:  # pydicom writes big-endian sources back little-endian
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.set_original_encoding(False, True)
    stored = stored.astype(stored.dtype.newbyteorder("<"), copy=False)  # set_pixel_data writes the array's bytes
    ds.set_pixel_data(stored, ds.PhotometricInterpretation, int(ds.BitsStored))  # uncompressed TS if it was compressed
    ds.BurnedInAnnotation = "NO"
    mark_derived(ds, note)
    with atomic_path(Path(path)) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return Path(path)


def mark_derived(ds: Dataset, note: str) -> None:
    """DerivationDescription gets `note` and ImageType says DERIVED: these pixels are no longer the device's."""
    old = str(ds.get("DerivationDescription", ""))
    ds.DerivationDescription = (f"{old}; {note}" if old else note)[:1024]
    if "ImageType" in ds:
        ds.ImageType = ["DERIVED"] + list(ds.ImageType)[1:] if ds["ImageType"].VM > 1 else "DERIVED"


def save_image(path: str | os.PathLike, arr: np.ndarray, *, fmt: str = "png",
               tags: dict[str, str] | None = None) -> Path:
    """Write one generated image as 8-bit PNG, 16-bit PNG or DICOM SC, with `tags` as provenance."""
    if fmt == "png":
        return write_png(path, arr, bits=8, text=tags)
    if fmt == "png16":
        return write_png(path, arr, bits=16, text=tags)
    if fmt == "dcm":
        return write_dicom(path, arr, tags=tags)
    raise ValueError(f"unknown image format {fmt!r} — use 'png', 'png16' or 'dcm'")

"""One file through `--deidentify`: header profile, pixel pass, review verdict and audit entry, written
together under a keyed name.

Every DICOM object gets a de-identified header. Its pixels, of any kind (single or multi-frame, grey or colour,
8 to 32 bits, big- or little-endian), are cleaned in their stored values, each frame seen through its display
or luminance; an object whose pixels cannot be cleaned (none decodable, bitmaps, palettes, floats) is written
with its pixels as they were and sent to needs_review/, never marked BurnedInAnnotation=NO."""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

from cxrcommon.errors import ImageReadError
from cxrcommon.imageio import PLUGIN_HINT, display_view, mark_derived
from cxrcommon.limits import check_pixels

from ..detect import TextRegion, to_uint8_view
from ..files import DICOM, NOTE, output_paths, read_for_cleaning
from ..remover import TextRemover
from . import audit
from . import files as deid_files
from .pixels import clean_verified, pixel_review
from .profile import HeaderResult, deidentify_dataset, finish_dataset, mark_method, settings_fingerprint
from .pseudonyms import Pseudonymizer

LUMINANCE = np.float32([0.299, 0.587, 0.114])  # ITU-R BT.601: what a colour frame's text is detected on


def write_deidentified(path: Path, out_dir: Path, rel: Path, remover: TextRemover,
                       pseudo: Pseudonymizer) -> dict[str, Any]:
    """clean_file under --deidentify: outputs named by a keyed hash of `rel` (input->output only in the
    mapping), under needs_review/ when a person must look, mask as boxes, region texts blanked but for
    side markers, BurnedInAnnotation=NO only when the verify pass read nothing; all files written together."""
    pseudo.mapping.clear()
    name = pseudo.file_name(rel)
    if path.suffix.lower() not in DICOM:
        return _write_raster(path, out_dir, name, remover, pseudo)
    with values_unquoted():
        ds = read_header(path)
        why = uncleanable(ds)
        if why is None:
            try:
                return _write_image(ds, out_dir, name, remover, pseudo)
            except ImageReadError as exc:  # no installed decoder could read these pixels
                why = str(exc)
        return _write_header_only(ds, why, out_dir, name, remover.config, pseudo)


@contextlib.contextmanager
def values_unquoted() -> Iterator[None]:
    """pydicom's value validation off while a file is de-identified: its warnings quote the invalid value
    ('Invalid value for VR DA: 15/01/1961 SMITH'), which is PHI, into the log and onto stderr."""
    from pydicom import config

    settings = config.settings
    old = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = old


def read_header(path: Path) -> Dataset:
    """The whole dataset, pixels not decoded; an unreadable file is one line that names no path (the batch
    runner puts the file's label before it)."""
    import pydicom

    try:
        return pydicom.dcmread(path)
    except Exception:  # pydicom raises assorted errors on non-DICOM and truncated files
        pass
    try:  # no preamble or file meta (old toolkits): read as a bare dataset if it looks like one
        ds = pydicom.dcmread(path, force=True)
        if any(k in ds for k in ("SOPClassUID", "PatientID", "PatientName", "Modality", "StudyInstanceUID")):
            return ds
    except Exception:
        pass
    raise ImageReadError("not a readable DICOM file (truncated, corrupt or not DICOM) — re-export it, or remove "
                         "it from the input")


def uncleanable(ds: Dataset) -> str | None:
    """Why the pixel pass cannot clean this object (its pixels are then kept as they are and the file goes to
    review), '' for an object without pixels, None when it can be cleaned."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return ""
    if "PixelData" not in ds:
        return "floating-point pixel data is not cleaned"
    try:
        samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 16) or 16)
        int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return "the pixel description (frames, samples or bits) is not a number, so the pixels are not cleaned"
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if samples not in (1, 3) or photometric.startswith("PALETTE"):
        return f"{photometric or samples} pixels are not cleaned"
    if bits == 1:
        return "1-bit (bitmap) pixels are not cleaned"
    return None


def decoded_pixels(ds: Dataset, label: str) -> np.ndarray:
    """Every frame's stored values (colour as RGB), or an ImageReadError naming the transfer syntax and the fix."""
    check_pixels(Path(label), int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * int(ds.get("NumberOfFrames", 1)
                                                                                      or 1), None)
    try:
        arr = ds.pixel_array
    except Exception:  # each decoder plugin raises its own kind
        ts = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
        if ts and not UID(str(ts)).is_compressed:
            raise ImageReadError(f"pixel data in {getattr(ts, 'name', ts)} is truncated or does not match its "
                                 "description (rows, columns, bits), so it was not cleaned — re-export the file"
                                 ) from None
        raise ImageReadError(f"pixel data in {getattr(ts, 'name', ts) or 'an unknown transfer syntax'} could not "
                             f"be decoded, so it was not cleaned — {PLUGIN_HINT}") from None
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)  # a big-endian source decodes to >u2 / >i2


def _write_image(ds: Dataset, out_dir: Path, name: Path, remover: TextRemover,
                 pseudo: Pseudonymizer) -> dict[str, Any]:
    """A DICOM image: each frame detected on its display (grey) or luminance (colour) view, cleaned in its
    stored values in every channel and verified, then written uncompressed little-endian in the
    de-identified header (YBR comes out as RGB). Review reasons name the frame."""
    cfg = remover.config
    arr = decoded_pixels(ds, name.name)
    frames, colour = int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("SamplesPerPixel", 1) or 1) == 3
    header = deidentify_dataset(ds, cfg, pseudo, source=name.name)  # before any write: a failure leaves nothing
    idents = header.identifiers
    cleaned, mask, regions, review = [], np.zeros(arr.shape[-3:-1] if colour else arr.shape[-2:], bool), [], []
    def view_of(frame: np.ndarray) -> np.ndarray:
        return to_uint8_view(frame.astype(np.float32) @ LUMINANCE) if colour else display_view(frame, ds)

    for i, frame in enumerate(arr if frames > 1 else arr[None]):
        res, left = clean_verified(remover, frame, view_of(frame), idents, view_of)
        review += [(f"frame {i + 1}: " if frames > 1 else "") + r for r in pixel_review(remover, res, left, idents)]
        cleaned.append(res.image)
        mask |= res.mask
        regions += res.regions
    pixels_clean = cfg.deid_verify and not review
    out = header.dataset
    if _big_endian(ds):
        out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.set_original_encoding(False, True)
    store_pixels(out, np.stack(cleaned) if frames > 1 else cleaned[0], "RGB" if colour else
                 str(ds.PhotometricInterpretation), int(ds.get("BitsStored", arr.dtype.itemsize * 8)))
    mark_derived(out, NOTE)
    finish_dataset(out, header, pixels_clean)
    return _write_outputs(out_dir, name, remover.config, pseudo, _dicom_bytes(out), header, regions, mask, review,
                          pixels_clean, {"shape": list(arr.shape), "dtype": str(arr.dtype), "frames": frames})


def _write_raster(path: Path, out_dir: Path, name: Path, remover: TextRemover,
                  pseudo: Pseudonymizer) -> dict[str, Any]:
    """A PNG/JPEG: no header, the pixel pass only."""
    arr, view, _ = read_for_cleaning(path)
    res, left = clean_verified(remover, arr, view, [])
    review = pixel_review(remover, res, left, [])
    pixels_clean = remover.config.deid_verify and not review
    return _write_outputs(out_dir, name, remover.config, pseudo, deid_files.image_bytes(res.image, name.suffix),
                          None, res.regions, res.mask, review, pixels_clean,
                          {"shape": list(arr.shape), "dtype": str(arr.dtype), "seconds": res.seconds})


def _write_header_only(ds: Dataset, why: str, out_dir: Path, name: Path, cfg: Any,
                       pseudo: Pseudonymizer) -> dict[str, Any]:
    """An object the pixel pass cannot clean: its header de-identified all the same and written with its
    pixels (if any) as they were, BurnedInAnnotation never NO, under needs_review/ when pixels are left
    unread or the profile removed all of a report's content."""
    header = deidentify_dataset(ds, cfg, pseudo, source=name.name)
    review = [f"{why} — check them for burnt-in text before sharing"] if why else []
    if not why and "ContentSequence" in ds and "ContentSequence" not in header.dataset:
        review.append("its report text (ContentSequence) was removed by the Basic Profile, so nothing of the "
                      "report is left — rerun with --clean-descriptors to keep it scrubbed, and read it")
    out = header.dataset
    if why:
        out.BurnedInAnnotation = "YES"
    mark_method(out, header.codes)
    if _big_endian(ds):  # written little-endian, pixels swapped too
        out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.set_original_encoding(False, True)
        _swap_words(out)
    return _write_outputs(out_dir, name, cfg, pseudo, _dicom_bytes(out), header, [], None, review,
                          False, {}, {"pixels": why or "none"})


def _write_outputs(out_dir: Path, name: Path, cfg: Any, pseudo: Pseudonymizer, image: bytes,
                   header: HeaderResult | None, regions: list[TextRegion], mask: np.ndarray | None,
                   review: list[str], pixels_clean: bool, extra: dict[str, Any],
                   entry_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The image, its box mask (if it has pixels) and its regions JSON, written together in OUT or
    OUT/needs_review/; an earlier run's verdict for the same file in the other folder is removed."""
    folder = out_dir / deid_files.REVIEW_DIR if review else out_dir
    paths = output_paths(folder, name)
    regions_json = [r.to_json() for r in regions]
    deid_files.blank_texts(regions_json, cfg.marker_pattern)
    entry = {**audit.file_entry(header, regions, review, pixels_clean), **(entry_extra or {})}
    if mask is None and not review:  # a header-only object with nothing to check has no pixel verdict to wait for
        entry["status"] = "ok"
    record = {"input": name.name, "output": str(paths["image"]),
              "mask": None if mask is None else str(paths["mask"]),
              "masked_pixels": 0 if mask is None else int(mask.sum()), **extra, "regions": regions_json,
              "settings": settings_fingerprint(cfg, pseudo), "deidentify": entry}
    files = [(paths["image"], image)]
    if mask is not None:
        box = deid_files.box_mask(mask, regions).astype(np.uint8) * 255
        files.append((paths["mask"], deid_files.image_bytes(box, ".png")))
    files.append((paths["json"], json.dumps(record, indent=1).encode("utf-8")))  # last: marks the file done
    deid_files.write_together(files)
    other = out_dir if review else out_dir / deid_files.REVIEW_DIR
    for p in output_paths(other, name).values():
        p.unlink(missing_ok=True)
    return {**record, "mapping": dict(pseudo.mapping)}


def store_pixels(ds: Dataset, arr: np.ndarray, photometric: str, bits_stored: int) -> None:
    """`arr` (frames, rows, columns[, 3]) as uncompressed little-endian pixel data (pydicom's set_pixel_data
    for 8/16-bit; 32-bit by hand, which it does not take)."""
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)  # set_pixel_data writes the array's own bytes
    if arr.dtype.itemsize <= 2:
        ds.set_pixel_data(arr, photometric, bits_stored, generate_instance_uid=False)
        return
    ds.PixelData = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"))).tobytes()
    ds["PixelData"].VR = "OW"
    ds.PhotometricInterpretation = photometric
    if "PlanarConfiguration" in ds:
        ds.PlanarConfiguration = 0
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _swap_words(ds: Dataset) -> None:
    """Raw big-endian 16/32-bit pixel words turned little-endian, without decoding (these pixels could not be
    decoded, or are kept as they were); bytes (8-bit, 1-bit) need no swap; a truncated tail is kept as is."""
    try:
        size = int(ds.get("BitsAllocated", 8) or 8) // 8
    except (TypeError, ValueError):
        return
    if "PixelData" not in ds or size not in (2, 4):
        return
    raw = bytes(ds.PixelData)
    whole = len(raw) - len(raw) % size
    ds.PixelData = np.frombuffer(raw[:whole], f">u{size}").astype(f"<u{size}").tobytes() + raw[whole:]
    ds["PixelData"].VR = "OW"


def _big_endian(ds: Dataset) -> bool:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return ts == ExplicitVRBigEndian or ds.original_encoding[1] is False


def _dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()

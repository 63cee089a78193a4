"""One file through `--deidentify`: header profile, pixel pass, review verdict and audit entry, written
together under a keyed name."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from cxrcommon.errors import ImageReadError, UserError
from cxrcommon.imageio import PLUGIN_HINT

from ..files import DICOM, NOTE, output_paths, read_for_cleaning
from ..remover import TextRemover
from . import audit, files as deid_files
from .pixels import clean_verified, pixel_review
from .profile import deidentify_dataset, mark_method, settings_fingerprint
from .pseudonyms import Pseudonymizer


def write_deidentified(path: Path, out_dir: Path, rel: Path, remover: TextRemover,
                       pseudo: Pseudonymizer) -> dict[str, Any]:
    """clean_file under --deidentify: outputs named by a keyed hash of `rel` (input->output only in the
    mapping), under needs_review/ when a person must look, mask as boxes, region texts blanked but for
    side markers, BurnedInAnnotation=NO only when the verify pass read nothing; all files written together."""
    cfg = remover.config
    pseudo.mapping.clear()
    name = pseudo.file_name(rel)
    if path.suffix.lower() in DICOM:
        ds = read_header(path)
        why = uncleanable(ds)
        if why is None:
            try:
                arr, view, ds = read_for_cleaning(path)
            except UserError:  # no installed decoder could read these pixels
                ts = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
                why = (f"pixel data in {getattr(ts, 'name', ts) or 'an unknown transfer syntax'} could not be "
                       f"decoded, so it was not cleaned — {PLUGIN_HINT}")
        if why is not None:
            return write_header_only(ds, why, out_dir, name, cfg, pseudo)
    else:
        arr, view, ds = read_for_cleaning(path)
    # before any write: a header that fails leaves nothing behind
    header = deidentify_dataset(ds, cfg, pseudo, source=name.name) if ds is not None else None
    idents = header.identifiers if header else []
    res, left = clean_verified(remover, arr, view, idents)
    review = pixel_review(remover, res, left, idents)
    pixels_clean = cfg.deid_verify and not review
    folder = out_dir / deid_files.REVIEW_DIR if review else out_dir
    paths = output_paths(folder, name)
    regions = res.regions_json()
    deid_files.blank_texts(regions, cfg.marker_pattern)
    record = {"input": name.name, "output": str(paths["image"]), "mask": str(paths["mask"]),
              "shape": list(arr.shape), "dtype": str(arr.dtype), "masked_pixels": int(res.mask.sum()),
              "seconds": res.seconds, "regions": regions, "settings": settings_fingerprint(cfg, pseudo),
              "deidentify": audit.file_entry(header, res.regions, review, pixels_clean)}
    image = deid_files.dicom_bytes(res.image, header, pixels_clean, NOTE) if header else \
        deid_files.image_bytes(res.image, name.suffix)
    mask = deid_files.image_bytes(deid_files.box_mask(res.mask, res.regions).astype(np.uint8) * 255, ".png")
    deid_files.write_together([(paths["image"], image), (paths["mask"], mask),
                               (paths["json"], json.dumps(record, indent=1).encode("utf-8"))])
    other = out_dir if review else out_dir / deid_files.REVIEW_DIR  # an earlier run's verdict, now stale
    for p in output_paths(other, name).values():
        p.unlink(missing_ok=True)
    return {**record, "mapping": dict(pseudo.mapping)}


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
    raise ImageReadError("not a readable DICOM file (truncated, corrupt or not DICOM) — re-export "
                         "it, or remove it from the input")


def uncleanable(ds: Dataset) -> str | None:
    """Why the pixel pass cannot clean this object (its pixels are then kept as they are and the file goes to
    review), '' for an object without pixels, None when it can be cleaned."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return ""
    try:
        frames, samples = int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except (TypeError, ValueError):
        return "the pixel description (frames, samples or bits) is not a number, so the pixels are not cleaned"
    if _big_endian(ds):
        return "big-endian pixels are not cleaned"
    if "PixelData" not in ds:
        return "floating-point pixel data is not cleaned"
    if frames > 1:
        return f"{frames} frames: multi-frame pixels are not cleaned"
    if samples != 1:
        return f"colour ({ds.get('PhotometricInterpretation', samples)}) pixels are not cleaned"
    if bits not in (8, 16):
        return f"{bits}-bit pixels are not cleaned"
    return None


def _big_endian(ds: Dataset) -> bool:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return ts == ExplicitVRBigEndian or ds.original_encoding[1] is False


def _to_little_endian(ds: Dataset) -> None:
    if "PixelData" in ds:
        arr = ds.pixel_array
        ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_original_encoding(False, True)


def write_header_only(ds: Dataset, why: str, out_dir: Path, name: Path, cfg: Any,
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
        _to_little_endian(out)
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    folder = out_dir / deid_files.REVIEW_DIR if review else out_dir
    paths = output_paths(folder, name)
    record = {"input": name.name, "output": str(paths["image"]), "mask": None, "regions": [],
              "settings": settings_fingerprint(cfg, pseudo),
              "deidentify": {**audit.file_entry(header, [], review, False), "pixels": why or "none"}}
    if not review:
        record["deidentify"]["status"] = "ok"
    deid_files.write_together([(paths["image"], buf.getvalue()),
                               (paths["json"], json.dumps(record, indent=1).encode("utf-8"))])
    other = out_dir if review else out_dir / deid_files.REVIEW_DIR
    for p in output_paths(other, name).values():
        p.unlink(missing_ok=True)
    return {**record, "mapping": dict(pseudo.mapping)}

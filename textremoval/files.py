"""Files of the text pipeline: which inputs a folder or glob contributes, how an image is read for cleaning
and written back in its own format, and where its outputs go."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from cxrcommon.atomic import atomic_path
from cxrcommon.errors import ImageReadError, MissingFileError, UserError
from cxrcommon.limits import check_image_file
from cxrcommon.paths import file_kind, glob_files, walk_files

from .detect import to_uint8_view

RASTER = {".png", ".jpg", ".jpeg"}
DICOM = {".dcm", ".dicom"}
SUFFIXES = RASTER | DICOM
OUTPUT_SUFFIXES = (".mask.png", ".regions.json")  # what a run writes beside each image: never an input
NOTE = "burnt-in text removed by synthcxr textremoval (OCR + inpainting)"


def read_for_cleaning(path: Path) -> tuple[np.ndarray, np.ndarray | None, Any]:
    """(pixels to clean in their stored dtype, 8-bit view for detection or None, DICOM dataset or None)."""
    from cxrcommon.imageio import read_dicom

    suffix = path.suffix.lower()
    if suffix in DICOM:
        arr, ds = read_dicom(path)
        frames, samples = int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("SamplesPerPixel", 1) or 1)
        if frames > 1 or samples != 1:
            what = f"{frames} frames" if frames > 1 else f"colour ({samples} samples per pixel)"
            raise ImageReadError(f"{path}: {what} DICOM is not supported; split it into single-frame grayscale "
                                 "files first (e.g. with highdicom or dcmtk) and clean those")
        stored = ds.pixel_array  # cleaned in stored values, seen through the display; native byte order
        return stored.astype(stored.dtype.newbyteorder("="), copy=False), to_uint8_view(arr), ds
    if suffix not in RASTER:
        raise ImageReadError(f"{path}: unsupported file type {suffix!r}; give PNG, JPEG or DICOM (.dcm) files")
    arr = cv2.imread(str(check_image_file(path)), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        raise ImageReadError(f"{path}: not a readable image (truncated or corrupt?); re-export it or remove it")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]  # alpha carries no anatomy
    return arr, None, None


def write_like(path: Path, arr: np.ndarray, ds: Any) -> None:
    """Write in the input's format: DICOM stored values with its own tags, else PNG/JPEG by suffix (atomically)."""
    if ds is not None:
        from cxrcommon.imageio import write_dicom_stored
        write_dicom_stored(path, ds, arr, note=NOTE)
        return
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), arr):
            raise OSError(f"could not write {path}")


def output_paths(out_dir: Path, rel: Path) -> dict[str, Path]:
    stem = out_dir / rel.with_suffix("")
    return {"image": out_dir / rel, "mask": Path(f"{stem}.mask.png"), "json": Path(f"{stem}.regions.json")}


def is_input_image(path: Path) -> bool:
    """A file a folder or glob contributes: an image suffix, not a hidden (e.g. temp) file, and not one of
    the masks or JSON a run writes, so a rerun never cleans its own outputs (`a.mask.mask.png`)."""
    name = path.name.lower()
    return path.suffix.lower() in SUFFIXES and not name.startswith(".") and not name.endswith(OUTPUT_SUFFIXES)


def expand_inputs(inputs: Sequence[str]) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """((file, name relative to the output folder), the folders/files/glob hits they came from) for files,
    folders (at any depth, walked without recursion) and glob patterns (`**` spans folders). A path that
    matches nothing, a pipe or device instead of a file, or inputs holding no image at all, is a UserError
    naming it."""
    found: list[tuple[Path, Path]] = []
    roots: list[Path] = []
    for item in inputs:
        p = Path(item)
        kind = file_kind(p)
        if kind == "a folder":
            roots.append(p)
            found += [(f, f.relative_to(p)) for f in sorted(walk_files(p)) if is_input_image(f)]
        elif kind == "file":
            roots.append(p)
            found.append((p, Path(p.name)))
        elif kind != "missing":
            raise UserError(f"input {item} is {kind}, not an image file — pass PNG, JPEG or DICOM files or a "
                            f"folder of them (save a stream to a file first)")
        else:
            hits = glob_files(item)
            if not hits:
                raise MissingFileError(f"input {item} does not exist and matches no file — check the path "
                                       f"(or quote a glob pattern so the shell does not expand it)")
            roots += hits
            found += [(h, Path(h.name)) for h in hits if is_input_image(h)]
    if not found:
        raise UserError(f"no PNG, JPEG or DICOM images in {', '.join(inputs)} (outputs *.mask.png / "
                        f"*.regions.json are not inputs) — pass image files or a folder holding them")
    seen: dict[Path, Path] = {}
    for f, rel in found:
        if rel in seen and seen[rel] != f:
            raise UserError(f"{f} and {seen[rel]} would both be written as {rel} — clean them into separate "
                            f"--out folders")
        seen[rel] = f
    return list(dict.fromkeys(found)), roots


_WORKER: dict[str, Any] = {}

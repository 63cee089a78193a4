"""Dataset manifests (CSV, JSONL, diffusers imagefolder metadata.jsonl) -> validated records.

Every row is checked before any work starts, and every problem is reported at once as
`file:line: what — fix`, so a user fixes a manifest in one pass instead of one crash per hour.
The train/val split is by patient so the same person never appears on both sides."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from .csv_cells import unescape
from .errors import MissingFileError, UserError
from .paths import file_kind

log = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom", ""}
IMAGEFOLDER_NAME = "metadata.jsonl"
# Smallest image side (pixels) a row may have. A 1x1 or 4x4 thumbnail opens fine but, resized to the
# model's resolution, is a flat grey square that teaches nothing; 8 px is one latent cell of the SD VAE.
# (finetune.data also warns, with a count, about images far smaller than the training resolution.)
MIN_IMAGE_SIDE = 8


@dataclasses.dataclass
class Record:
    """One usable manifest row; `line` is where it starts in the manifest, `extra` its other columns."""
    image: Path
    text: str
    patient_id: str | None
    label: str | None
    line: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # (width, height) from the image header when images were checked; derived, so not part of equality
    size: tuple[int, int] | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass
class Columns:
    """Which manifest column holds what. `text=None`: no text needed (e.g. images for FID).
    In an imagefolder `metadata.jsonl` the default image column "image" means `file_name`."""
    image: str = "image"
    text: str | None = "text"
    patient: str | None = None
    label: str | None = None


class ManifestError(UserError):
    """Bad manifest; `.problems` lists every bad row as `file:line: what — fix`."""

    def __init__(self, path: Path, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s) in the manifest:\n" + "\n".join(problems))


def _rows(path: Path, fatal: list[str]) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line, row dict) or (line, problem text) for each row; fatal problems end reading."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        fatal.append(f"{path}:1: not UTF-8 text ({e.reason} at byte {e.start}) — re-save the manifest as UTF-8")
        return
    yield from table_rows(text, "csv" if path.suffix.lower() == ".csv" else "jsonl")


def table_rows(text: str, kind: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Rows of CSV (header line first) or JSONL text as (line number, dict), or (line number, problem)
    for a row that cannot be a dict. Line numbers are physical lines, so quoted newlines count. CSV cells come
    back as `csv_cells.safe_cell` was given them (its leading quote, like a spreadsheet's, is not text)."""
    if kind == "csv":
        reader = csv.reader(text.splitlines(keepends=True))
        header = next(reader, None)
        if not header:
            return
        header = [h.strip() for h in header]
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                yield start, (f"has {len(row)} fields but the header has {len(header)} — "
                              f"quote fields that contain commas or newlines")
                continue
            yield start, dict(zip(header, map(unescape, row)))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, f"bad JSON ({e.msg} at column {e.colno}) — write one JSON object per line"
                continue
            if not isinstance(row, dict):
                yield n, f"JSON {type(row).__name__} instead of an object — write one JSON object per line"
                continue
            yield n, row


def manifest_columns(path: str | Path) -> set[str]:
    """The column names of a CSV manifest's header, or the keys of a JSONL manifest's first row (an
    imagefolder: its metadata.jsonl); empty when unreadable (read_manifest then says why)."""
    path = Path(path)
    if path.is_dir():
        path = path / IMAGEFOLDER_NAME
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            first = next(csv.reader(f), []) if path.suffix.lower() == ".csv" else [
                *json.loads(next((line for line in f if line.strip()), "{}"))]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return set()
    return {c.strip() for c in first}


def _image_problem(p: Path, root: Path, min_side: int = MIN_IMAGE_SIDE) -> str | tuple[int, int] | None:
    """Cheap readability check: the path is a regular file, non-empty, its header opens (no pixel
    decode) and its shorter side is at least `min_side` pixels. Returns the problem, or else the
    (width, height) the header gives (None if it gives none)."""
    kind = file_kind(p)
    if kind == "missing":
        return f"image {p} not found — fix the path (relative paths start at {root})"
    if kind != "file":
        return f"image {p} is {kind}, not an image file — point the row at an image file or remove the row"
    if p.stat().st_size == 0:
        return f"image {p} is empty (0 bytes) — re-export or remove the row"
    try:
        if p.suffix.lower() in DICOM_SUFFIXES:
            import pydicom
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            size = (int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)) if "Rows" in ds else None
        else:
            from PIL import Image
            with Image.open(p) as im:
                size = im.size
                im.verify()
    except Exception as e:  # noqa: BLE001 - any decoder failure means the same thing to the user
        return f"image {p} is unreadable ({type(e).__name__}: {e}) — re-export it as PNG/JPEG/DICOM or remove the row"
    if size is not None and min(size) < min_side:
        return (f"image {p} is only {size[0]}x{size[1]} pixels, below the {min_side}-pixel minimum side — "
                f"it would be stretched into a featureless square; use the full-size image or remove the row")
    return size


def _cell(row: dict[str, Any], col: str | None) -> str | None:
    if col is None or row.get(col) is None:
        return None
    value = str(row[col]).strip()
    return value or None


def read_manifest(path: str | Path, columns: Columns | None = None, *, on_error: str = "fail",
                  check_images: bool = True, image_root: str | Path | None = None,
                  min_side: int = MIN_IMAGE_SIDE) -> list[Record]:
    """Validated records of a CSV / JSONL / imagefolder `metadata.jsonl` manifest.

    Relative image paths resolve against `image_root` (default: the manifest's folder). Bad rows
    (missing column, bad JSON, missing/empty/unreadable image, a folder or pipe where an image should
    be, an image whose shorter side is under `min_side` pixels, duplicate image, empty text, ...)
    are all collected: on_error="fail" raises ManifestError listing them; "skip" logs each and
    returns the good rows. A manifest that cannot be read at all, or has no good row, always raises."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    path = Path(path)
    if path.is_dir():  # an imagefolder: its metadata.jsonl is the manifest
        if not (path / IMAGEFOLDER_NAME).is_file():
            raise MissingFileError(f"{path} is a folder without {IMAGEFOLDER_NAME} — pass a CSV/JSONL manifest or "
                                    f"an imagefolder (images plus {IMAGEFOLDER_NAME} with file_name and text)")
        path = path / IMAGEFOLDER_NAME
    if (kind := file_kind(path)) != "file":
        if kind == "missing":
            raise MissingFileError(f"manifest {path} not found — check the path")
        raise UserError(f"manifest {path} is {kind}, not a file — pass a CSV/JSONL manifest file")
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise ManifestError(path, [f"{path}:1: unsupported manifest type {path.suffix!r} — use .csv or .jsonl"])
    cols = columns or Columns()
    if path.name == IMAGEFOLDER_NAME and cols.image == "image":
        cols = dataclasses.replace(cols, image="file_name")
    root = Path(image_root) if image_root is not None else path.parent
    wanted = [c for c in (cols.image, cols.text, cols.patient, cols.label) if c]
    required = [c for c in (cols.image, cols.text) if c]
    is_csv = path.suffix.lower() == ".csv"

    fatal: list[str] = []
    problems: list[str] = []
    records: list[Record] = []
    seen: dict[Path, int] = {}
    header_checked = False
    for line, row in tqdm(_rows(path, fatal), desc=f"checking {path.name}", unit=" rows", disable=None,
                          leave=False):
        where = f"{path}:{line}:"
        if isinstance(row, str):
            problems.append(f"{where} {row}")
            continue
        missing = [c for c in wanted if c not in row]
        if missing and is_csv and not header_checked:
            fatal.append(f"{path}:1: missing column(s) {', '.join(map(repr, missing))} (header has "
                         f"{', '.join(row)}) — rename the header or set the column names")
            break
        header_checked = True
        missing = [c for c in missing if c in required]  # a JSONL row may leave out patient/label
        if missing:
            problems.append(f"{where} missing column(s) {', '.join(map(repr, missing))} — add the key(s) to this row")
            continue
        image = _cell(row, cols.image)
        text = _cell(row, cols.text) or ""
        row_problems, size = [], None
        if image is None:
            row_problems.append(f"{where} empty image path in column {cols.image!r} — fill it in or remove the row")
        else:
            img = Path(image) if Path(image).is_absolute() else root / image
            key = img.resolve()
            if key in seen:
                row_problems.append(f"{where} duplicate image {image} (also on line {seen[key]}) "
                                    "— remove one of the rows")
            elif check_images and isinstance(bad := _image_problem(img, root, min_side), str):
                row_problems.append(f"{where} {bad}")
            else:
                size = bad if check_images else None
            seen.setdefault(key, line)
        if cols.text and not text:
            row_problems.append(f"{where} empty text in column {cols.text!r} — fill in the report or remove the row")
        if row_problems:
            problems.extend(row_problems)
            continue
        extra = {k: v for k, v in row.items() if k not in wanted}
        records.append(Record(img, text, _cell(row, cols.patient), _cell(row, cols.label), line, extra, size))
    if fatal:
        raise ManifestError(path, fatal)
    if problems and on_error == "fail":
        raise ManifestError(path, problems)
    for p in problems:
        log.warning("skipped %s", p)
    if not records:
        raise ManifestError(path, problems + [f"{path}: no usable rows — fix the problems above "
                                              "or point at another manifest"])
    if problems:
        log.info("%s: kept %d rows, skipped %d problem(s)", path, len(records), len(problems))
    return records


def _patient_key(r: Record) -> str:
    """Rows without a patient id are their own patient (keyed by image, so stable under reordering)."""
    return f"patient:{r.patient_id}" if r.patient_id else f"image:{r.image}"


def patient_split(records: Sequence[Record], val_fraction: float, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, val) with every patient wholly on one side, val about `val_fraction` of rows.

    Patients are ordered by a seeded hash of their id and taken into val until it holds the asked
    share, so the split depends only on (ids, seed), not on row order or Python's hash seed."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(_patient_key(r), []).append(i)
    order = sorted(groups, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    target = val_fraction * len(records)
    val_idx: set[int] = set()
    for k in order[:-1]:  # the last patient always stays in train
        if len(val_idx) >= target:
            break
        if val_idx and len(val_idx) + len(groups[k]) - target > target - len(val_idx):
            continue  # this (large) patient would overshoot by more than leaving it out falls short
        val_idx.update(groups[k])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val

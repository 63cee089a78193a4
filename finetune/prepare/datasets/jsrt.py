"""JSRT (Japanese Society of Radiological Technology) Standard Digital Image Database: 247 PA chest films from
13 Japanese institutions and one in the United States, 154 with one lung nodule (100 malignant, 54 benign) and
93 without a nodule, digitised by a laser scanner at 2048x2048 (0.175 mm pixels), 12-bit gray scale.

Access: http://db.jsrt.or.jp/eng.php (free for research after registration): All247images.zip and
Clinical_Information.zip.

Citation: Shiraishi J, Katsuragawa S, Ikezoe J, et al. Development of a digital image database for chest
radiographs with and without a lung nodule. AJR 174(1):71-74, 2000. https://doi.org/10.2214/ajr.174.1.1740071

Layout read (`--root` holds the two zips unpacked, as folders or all in one folder):

    All247images/JPCLN001.IMG ... JPCLN154.IMG    nodule films
    All247images/JPCNN001.IMG ... JPCNN093.IMG    non-nodule films: no header, 2048x2048 big-endian 16-bit
                                                  words holding the 12-bit values (8,388,608 bytes)
    Clinical_Information/CLNDAT_EN.TXT   one line per nodule film: file, subtlety (1-5), size (mm), age, sex,
                                         x, y (nodule centre, pixels), malignant / benign, then the anatomic
                                         location and the diagnosis (free text)
    Clinical_Information/CNNDAT_EN.TXT   one line per non-nodule film: file, age, sex, "non-nodule"

The two text files are found in --root or a folder just below it, whatever the case of their names, and the
films in All247images/ or beside them. CLNDAT is tab separated, CNNDAT separated by runs of spaces, both with
old Mac (CR) line ends; an unknown age is "?". Both are read whatever their separators and line ends.

Images: the raw words count optical density, so a higher value is a darker film: shown as they are, the lungs
come out bright and the bone dark (a negative; readers that skip the inversion, e.g. jsrt-parser, show it so).
`read_image` (the runner calls it in place of its own decoder) inverts them (4095 - value, as Idiap's mednet
JSRT loader does) and spreads the 12 bits over 16 (value * 65535 / 4095, exactly, by bit replication), so the
16-bit PNG reads as every other dataset's: bright bone, dark lungs, full range.

Labels: a nodule film is {Nodule: 1, Malignant: 1 or 0}; a non-nodule film {Nodule: 0}. JSRT says only that
those 93 films hold no nodule, not that they are normal, so No Finding is not asserted. `LABELS` maps Nodule
onto Lung Lesion; Malignant keeps its own name.

Patient and study: the file stem (one film per patient). View: PA (every JSRT film is). Sex and age: the
text files. No official split: films are split by the seeded patient hash (SourceRow.split "")."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from cxrcommon.errors import UserError

from ..config import PrepareConfig
from ..rows import NEGATIVE, POSITIVE, Excluded, SourceRow, age_years, sex_code

NAME = "jsrt"
HAS_REPORTS = False
LABELS: dict[str, str | None] = {"Nodule": "Lung Lesion", "Malignant": None}

NODULE_FILE, NON_NODULE_FILE = "CLNDAT_EN.TXT", "CNNDAT_EN.TXT"
IMAGE_DIR = "All247images"
IMAGE_SIDE = 2048
IMAGE_BYTES = IMAGE_SIDE * IMAGE_SIDE * 2   # 8,388,608: no header, one big-endian 16-bit word per pixel
MAX_VALUE = 4095                            # 12-bit
VIEW = "PA"

_NODULE_NAME = re.compile(r"^JPCLN\d{3}\.IMG$", re.IGNORECASE)
_NON_NODULE_NAME = re.compile(r"^JPCNN\d{3}\.IMG$", re.IGNORECASE)
_UNKNOWN = ("", "?", "-")


def find_root(root: Path, cfg: PrepareConfig) -> Path:
    """`root` when it (or a folder just below it) holds both clinical text files; a UserError naming them
    otherwise."""
    root = Path(root)
    if _text_file(root, NODULE_FILE) and _text_file(root, NON_NODULE_FILE):
        return root
    raise UserError(f"{root} does not look like JSRT: {NODULE_FILE} and {NON_NODULE_FILE} not found (in it or in "
                    f"Clinical_Information/) — unzip All247images.zip and Clinical_Information.zip into one folder "
                    f"and pass that folder as --root")


def _text_file(root: Path, name: str) -> Path | None:
    """root/name or root/<folder>/name, matched without case (the release spells .TXT and .txt)."""
    folders = [root, *_folders(root)]
    for folder in folders:
        for spelling in (name, name.lower(), name[:-4] + ".txt"):
            if (folder / spelling).is_file():
                return folder / spelling
    return None


def _folders(root: Path) -> list[Path]:
    """The folders just below `root` (scandir's entry types: no stat per file, so another dataset's flat
    folder of 100,000 images is cheap to look through when the runner asks every module)."""
    if not root.is_dir():
        return []
    with os.scandir(root) as entries:
        return sorted(Path(e.path) for e in entries if e.is_dir())


def _image_dir(root: Path) -> Path:
    """The folder holding the JPC*.IMG films: All247images/ (or its own All247images/), the root, or a
    folder below it; All247images/ when none holds one (the runner then counts each film missing)."""
    for folder in [root / IMAGE_DIR, root / IMAGE_DIR / IMAGE_DIR, root, *_folders(root)]:
        if folder.is_dir() and next(folder.glob("JPC*.IMG"), None) is not None:
            return folder
    return root / IMAGE_DIR


def rows(root: Path, cfg: PrepareConfig) -> Iterator[SourceRow | Excluded]:
    """One SourceRow per line of the two clinical files (nodule films first), or an Excluded per bad line."""
    images = _image_dir(root)
    seen: set[str] = set()
    for name, nodule in ((NODULE_FILE, True), (NON_NODULE_FILE, False)):
        path = _text_file(root, name)
        if path is None:
            raise UserError(f"{root}: {name} not found — run with the folder find_root accepted")
        for line, text in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
            if not text.strip():
                continue
            item = _row(images, text, nodule, f"{path.name}:{line}")
            if isinstance(item, SourceRow) and item.patient in seen:
                item = Excluded("duplicate row", item.where, f"{item.patient} listed again")
            elif isinstance(item, SourceRow):
                seen.add(item.patient)
            yield item


def _row(images: Path, text: str, nodule: bool, where: str) -> SourceRow | Excluded:
    """One clinical line: tab-separated fields when it has tabs, else runs of spaces."""
    fields = [f.strip() for f in text.split("\t")] if "\t" in text else text.split()
    need, pattern = (8, _NODULE_NAME) if nodule else (3, _NON_NODULE_NAME)
    if len(fields) < need:
        return Excluded("malformed row", where, f"{len(fields)} fields, expected at least {need}")
    name = fields[0]
    if not pattern.match(name):
        return Excluded("malformed row", where, f"file {name!r} is not a {'JPCLN' if nodule else 'JPCNN'}###.IMG")
    age_cell, sex_cell = (fields[3], fields[4]) if nodule else (fields[1], fields[2])
    age = age_years(age_cell)
    if age is None and age_cell not in _UNKNOWN:
        return Excluded("malformed row", where, f"age {age_cell!r}")
    labels = {"Nodule": POSITIVE if nodule else NEGATIVE}
    if nodule:
        kind = fields[7].lower()
        if kind not in ("malignant", "benign"):
            return Excluded("malformed row", where, f"{fields[7]!r} is neither malignant nor benign")
        labels["Malignant"] = POSITIVE if kind == "malignant" else NEGATIVE
    stem = Path(name).stem.upper()
    return SourceRow(image=images / name, patient=stem, study=stem, view=VIEW, labels=labels,
                     sex=sex_code(sex_cell), age=age, split="", where=where)


def read_image(path: Path) -> np.ndarray:
    """A JSRT film as uint16 H x W, bone bright: the raw 12-bit optical densities inverted and spread over 16 bits.

    Raises ValueError naming the file when its size is not the 8,388,608 bytes of a 2048x2048 film."""
    path = Path(path)
    size = path.stat().st_size
    if size != IMAGE_BYTES:
        raise ValueError(f"{path}: {size:,} bytes, expected {IMAGE_BYTES:,} (a {IMAGE_SIDE}x{IMAGE_SIDE} JSRT film "
                         f"of big-endian 16-bit words) — unzip it again from All247images.zip")
    raw = np.fromfile(path, dtype=">u2").reshape(IMAGE_SIDE, IMAGE_SIDE).astype(np.uint16)
    film = MAX_VALUE - np.minimum(raw, MAX_VALUE)
    return (film << 4) | (film >> 8)            # 12 -> 16 bits: 0 -> 0, 4095 -> 65535, evenly in between

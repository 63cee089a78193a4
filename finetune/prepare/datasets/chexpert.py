"""CheXpert (Stanford): 224,316 chest radiographs of 65,240 patients, Stanford Hospital 2002-2017, each labelled
for 14 observations by the CheXpert labeler on its report (positive, negative, uncertain).

Access: https://stanfordaimi.azurewebsites.net/datasets/8cbd9ed4-2eb9-4565-affc-111cf4f7ebe2 (Stanford AIMI, free
after accepting the research use agreement). "CheXpert-v1.0-small" (11 GB, images downsampled to about 390x320)
is the widely shared re-packaging (competition page, Kaggle); its images are smaller than the default --size 512.

Citation: Irvin J, Rajpurkar P, Ko M, et al. CheXpert: A Large Chest Radiograph Dataset with Uncertainty Labels
and Expert Comparison. AAAI 2019. https://arxiv.org/abs/1901.07031

Layouts read (`--root` is any folder marked <-):

    <- parent/
        <- CheXpert-v1.0-small/   (or CheXpert-v1.0/, the full-size package; any folder name works when it is --root)
            train.csv  valid.csv
            train/patient00001/study1/view1_frontal.jpg ...
            valid/patient64541/study1/view1_frontal.jpg ...
    <- chexpertchestxrays-u20210408/            the Stanford AIMI download as it unzips now
        CheXpert-v1.0 batch 1 (validate & csv)/  train.csv  valid.csv  valid/patient64541/...
        CheXpert-v1.0 batch 2 (train 1)/patient00001/...     the training patients, spread over
        CheXpert-v1.0 batch 3 (train 2)/patient.../...       three folders without a train/ level
        CheXpert-v1.0 batch 4 (train 3)/patient.../...
        train_cheXbert.csv  train_visualCheXbert.csv  CHEXPERT DEMO.xlsx

The CSV's Path ("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg") is read from its split folder
on: <package>/train/patient00001/..., or in the AIMI download the batch folder that holds patient00001/ (the
batch folders are listed once). Where a parent holds both packages, the full-size one is read. In the AIMI
download, batch 1's train.csv gives the labels, or train_cheXbert.csv (same columns) where it is absent; the
VisualCheXbert file and the demographics workbook are not read.

Columns: Path, Sex, Age, Frontal/Lateral, AP/PA and the 14 observations. Splits are the official ones: train.csv
-> train, valid.csv -> validate (234 images, labelled by radiologists, no uncertain labels). Patient is
patientNNNNN, study patientNNNNN/studyN (from Path). View: Frontal + AP/PA gives AP or PA, Frontal with a blank
AP/PA FRONTAL, Frontal with LL or RL (17 training rows: a lateral position on a film called frontal) "FRONTAL LL"
/ "FRONTAL RL", kept apart so the default --views leave them out; Lateral gives LATERAL. Sex: Male / Female ->
M / F, Unknown (1 row) unknown. Age: whole years, 18-90 (90 stands for 90 or older); 0 (3 rows of a dataset of
adults) means unknown, as torchxrayvision reads it. No race (it is only in the .xlsx). Labels: 1.0 positive, 0.0
negative, -1.0 uncertain, blank not mentioned (left out); the names are CheXpert's own classes.

(Counts above from train.csv as torchxrayvision ships it: 223,414 rows, 161,590 AP, 29,420 PA, 32,387 lateral.)"""
from __future__ import annotations

import csv
import dataclasses
import os
import re
from pathlib import Path
from typing import Iterator, Mapping

from cxrcommon.errors import UserError

from ..config import PrepareConfig
from ..rows import (
    CHEXPERT_14,
    NEGATIVE,
    POSITIVE,
    UNCERTAIN,
    Excluded,
    SourceRow,
    age_years,
    check_columns,
    open_text,
    read_csv,
    sex_code,
)

NAME = "chexpert"
HAS_REPORTS = False
LABELS: dict[str, str | None] = {name: name for name in CHEXPERT_14}

PACKAGES = ("CheXpert-v1.0", "CheXpert-v1.0-small")  # the full-size package first: it is the better 512 px source
AIMI_BATCH1 = "CheXpert-v1.0 batch 1 (validate & csv)"
AIMI_TRAIN = ("CheXpert-v1.0 batch 2 (train 1)", "CheXpert-v1.0 batch 3 (train 2)", "CheXpert-v1.0 batch 4 (train 3)")
CSV_SPLITS = (("train.csv", "train"), ("valid.csv", "validate"))
COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_14)
SPLIT_DIRS = ("train", "valid", "test")
PATH_RE = re.compile(r"(?:^|/)(train|valid|test)/(patient\d+)/(study\d+)/([^/]+\.(?:jpe?g|png))$", re.IGNORECASE)
_LABEL_VALUES = {"1": POSITIVE, "1.0": POSITIVE, "0": NEGATIVE, "0.0": NEGATIVE, "-1": UNCERTAIN, "-1.0": UNCERTAIN}


class Images:
    """Where an image of a split lies: <the split's folder>/<patient>/<study>/<file>. A split spread over several
    folders (the AIMI training batches) is resolved by listing them once: patient folder -> the first batch
    that holds it (the first batch too when none does, so the runner counts the file missing)."""

    def __init__(self, folders: Mapping[str, tuple[Path, ...]]):
        self.folders = dict(folders)  # "train" / "valid" / "test" -> the folders holding patientNNNNN/
        self._batch: dict[str, dict[str, Path]] = {}

    def __call__(self, split_dir: str, patient: str, study: str, file: str) -> Path:
        folders = self.folders[split_dir]
        if len(folders) == 1:
            return folders[0] / patient / study / file
        if split_dir not in self._batch:
            self._batch[split_dir] = _patient_folders(folders)
        return self._batch[split_dir].get(patient, folders[0]) / patient / study / file


def _patient_folders(folders: tuple[Path, ...]) -> dict[str, Path]:
    where: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for entry in os.scandir(folder):
                where.setdefault(entry.name, folder)
    return where


@dataclasses.dataclass
class Layout:
    """One CheXpert download: the folder it hangs off, its label CSVs (with their split), where their images lie."""
    root: Path
    csvs: list[tuple[Path, str]]
    images: Images


def find_root(root: Path, cfg: PrepareConfig | None = None) -> Path:
    """The package folder (holding train.csv / valid.csv), or the AIMI download folder; UserError otherwise."""
    return layout(root).root


def layout(root: Path) -> Layout:
    """The CheXpert layout at or under `root` (see the module docstring); one UserError line when there is none."""
    if root.name == AIMI_BATCH1:  # batch 1 alone names the images of the batch folders beside it
        root = root.parent
    for folder in (root, *(root / p for p in PACKAGES)):
        csvs = [(folder / name, split) for name, split in CSV_SPLITS if _is_chexpert_csv(folder / name)]
        if csvs:
            return Layout(folder, csvs, Images({s: (folder / s,) for s in SPLIT_DIRS}))
    batch1 = root / AIMI_BATCH1
    if _is_chexpert_csv(batch1 / "valid.csv"):
        train = next((p for p in (batch1 / "train.csv", root / "train_cheXbert.csv") if _is_chexpert_csv(p)), None)
        csvs = ([(train, "train")] if train else []) + [(batch1 / "valid.csv", "validate")]
        return Layout(root, csvs, Images({"train": tuple(root / b for b in AIMI_TRAIN), "valid": (batch1 / "valid",),
                                          "test": (root / "test",)}))
    raise UserError(f"{root} does not look like CheXpert: no train.csv or valid.csv with a Path column here, in "
                    f"{' or '.join(p + '/' for p in PACKAGES)}, or in '{AIMI_BATCH1}/' — pass the folder that holds "
                    f"CheXpert-v1.0-small/ (or the unzipped Stanford AIMI download) as --root")


def _is_chexpert_csv(path: Path) -> bool:
    """A CSV whose header has CheXpert's Path and Frontal/Lateral columns (another dataset's train.csv is not)."""
    if not path.is_file():
        return False
    try:
        with open_text(path) as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return {"Path", "Frontal/Lateral"} <= set(header)


def rows(root: Path, cfg: PrepareConfig | None = None) -> Iterator[SourceRow | Excluded]:
    """One SourceRow per CSV row, train.csv then valid.csv; a row that cannot be read is an Excluded."""
    found = layout(root)
    for path, _ in found.csvs:
        check_columns(path, COLUMNS)
    for path, split in found.csvs:
        name = path.relative_to(found.root).as_posix()
        for line, r in read_csv(path, COLUMNS):
            where = f"{name}:{line}"
            if isinstance(r, Excluded):
                yield Excluded(r.reason, where, r.detail)
                continue
            try:
                yield _row(r, found.images, split, where)
            except ValueError as exc:
                yield Excluded("malformed row", where, str(exc))


def _row(r: dict, images: Images, split: str, where: str) -> SourceRow:
    check_cells(r)
    split_dir, patient, study, file = parse_path(r["Path"])
    labels = {}
    for name in CHEXPERT_14:
        value = label_value(r[name], name)
        if value is not None:
            labels[name] = value
    return SourceRow(image=images(split_dir, patient, study, file), patient=patient, study=f"{patient}/{study}",
                     view=view_of(r["Frontal/Lateral"], r["AP/PA"]), labels=labels, sex=sex_code(r["Sex"]),
                     age=age_of(r["Age"]), split=split, where=where)


def check_cells(r: dict) -> None:
    """ValueError for a row with fewer or more cells than its header (csv.DictReader's None key / values)."""
    if None in r:
        raise ValueError(f"{len(r) - 1 + len(r[None])} cells, the header has {len(r) - 1}")
    if any(v is None for v in r.values()):
        raise ValueError(f"{sum(v is not None for v in r.values())} cells, the header has {len(r)}")


def parse_path(text: str) -> tuple[str, str, str, str]:
    """(split folder, patientNNNNN, studyN, file) of a CheXpert image path, with or without its package folder."""
    m = PATH_RE.search(text.strip().replace("\\", "/"))
    if not m:
        raise ValueError(f"path {text!r} is not <split>/patientNNNNN/studyN/<image>")
    return m.group(1).lower(), m.group(2), m.group(3), m.group(4)


def label_value(text: str, name: str) -> float | None:
    """1.0 / 0.0 / -1.0 (uncertain), None for a blank (not mentioned); ValueError for anything else."""
    v = str(text).strip()
    if not v:
        return None
    if v not in _LABEL_VALUES:
        raise ValueError(f"{name} is {v!r}, not 1.0, 0.0, -1.0 or blank")
    return _LABEL_VALUES[v]


def view_of(frontal_lateral: str, ap_pa: str) -> str:
    """AP / PA / FRONTAL / LATERAL, or "FRONTAL LL" for a frontal film whose AP/PA says a lateral position."""
    side, projection = frontal_lateral.strip().upper(), ap_pa.strip().upper()
    if side != "FRONTAL":
        return side
    if projection in ("AP", "PA"):
        return projection
    return f"FRONTAL {projection}".strip()


def age_of(text: str) -> int | None:
    """Whole years; None when blank, 0 (CheXpert's unknown: its patients are adults) or out of range;
    ValueError when the cell is not a number."""
    v = str(text).strip()
    if not v:
        return None
    if not re.fullmatch(r"\d+(?:\.\d+)?\+?", v):  # "90+" where an export spells the top band out
        raise ValueError(f"age {v!r} is not a number")
    return age_years(v.rstrip("+")) or None

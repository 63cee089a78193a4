"""VinDr-CXR (VinBigData): 18,000 chest X-rays (DICOM) from two hospitals in Hanoi, 2018-2020, labelled by
17 radiologists: 15,000 training images read independently by three of them, 3,000 test images by the
consensus of five.

Access: https://physionet.org/content/vindr-cxr/1.0.0/ (credentialed, data use agreement); the 15,000 training
images and their boxes were also the Kaggle competition
https://www.kaggle.com/c/vinbigdata-chest-xray-abnormalities-detection (torchxrayvision's VinBrain_Dataset).

Citation: Nguyen HQ, Lam K, Le LT, et al. VinDr-CXR: An open dataset of chest X-rays with radiologist's
annotations. Scientific Data 9:429, 2022. https://doi.org/10.1038/s41597-022-01498-w (arXiv:2012.15029)

Layouts read (`--root`, or its `1.0.0/` or `physionet.org/files/vindr-cxr/1.0.0/` as `wget -r` leaves it):

    PhysioNet 1.0.0   annotations/image_labels_train.csv   image_id, rad_id, 28 finding columns (0/1):
                                                            one row per reader, three readers per image
                      annotations/image_labels_test.csv    the same columns ('Other disease' for 'Other
                                                            diseases'), one consensus row per image
                      train/<image_id>.dicom, test/<image_id>.dicom
    Kaggle            train.csv   image_id, class_name, class_id, rad_id, x_min, y_min, x_max, y_max: one row
                                  per box a reader drew, or one 'No finding' row for a reader who drew none
                      train/<image_id>.dicom   (its test/ has no labels and is not read)

The box files (annotations/annotations_*.csv) are not read: the image labels name the same findings.

Labels: a training image's readers are merged by --readers: `majority` (the default; a finding counts when
more than half of the image's readers marked it, i.e. 2 of 3), `any` or `all`, over the readers actually listed
for that image (a reader row left out as malformed does not vote). 'No finding' is merged the same way and
then dropped when any finding counts, so an image is never both. The merged labels are 1.0 / 0.0 for every
finding of the file (VinDr marks nothing uncertain). `LABELS` maps the findings with a CheXpert class; the rest
(Aortic enlargement, ILD, Tuberculosis, ...) keep their own names.

Patient and study: the image_id. VinDr publishes no patient ids, so a patient with two images could land on
both sides of the validate split (the official train/test split is the authors').

Split: the official train/ and test/; `validate` is a seeded share (--val-fraction, --seed) of the training
images, so the official test set stays whole (--test-fraction is not used).

Sex, age and view: from each image's DICOM header (PatientSex, PatientAge as "054Y", ViewPosition), read
without the pixels; many headers leave them blank, so sex/age stay unknown, and a blank view is PA, which the
authors state for every released image. A header that says LL / LATERAL is dropped by --views as usual."""
from __future__ import annotations

import collections
import logging
import re
from pathlib import Path
from typing import Iterable, Iterator

import pydicom

from cxrcommon.errors import UserError

from ..config import PrepareConfig
from ..rows import (
    NEGATIVE,
    POSITIVE,
    Excluded,
    SourceRow,
    age_years,
    check_columns,
    read_csv,
    seeded_split,
    sex_code,
)

NAME = "vindr-cxr"
HAS_REPORTS = False

LABELS: dict[str, str | None] = {
    "No finding": "No Finding", "Cardiomegaly": "Cardiomegaly", "Atelectasis": "Atelectasis",
    "Consolidation": "Consolidation", "Edema": "Edema", "Pleural effusion": "Pleural Effusion",
    "Pneumothorax": "Pneumothorax", "Lung Opacity": "Lung Opacity", "Nodule/Mass": "Lung Lesion",
    "Pneumonia": "Pneumonia", "Rib fracture": "Fracture", "Clavicle fracture": "Fracture",
}
NO_FINDING = "No finding"
RENAMED = {"Other disease": "Other diseases"}   # the test file's spelling of the training file's column
PHYSIONET_DIRS = (".", "1.0.0", "physionet.org/files/vindr-cxr/1.0.0")
PHYSIONET_TRAIN = "annotations/image_labels_train.csv"
PHYSIONET_TEST = "annotations/image_labels_test.csv"
KAGGLE_CSV = "train.csv"
KAGGLE_COLUMNS = ("image_id", "class_name", "rad_id")
IMAGE_SUFFIX = ".dicom"
DEFAULT_VIEW = "PA"   # "18,000 postero-anterior (PA) view CXR scans" (vindr.ai/datasets/cxr)
HEADER_TAGS = ["PatientSex", "PatientAge", "ViewPosition"]
READERS = ("majority", "any", "all")

_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
log = logging.getLogger(__name__)


def find_root(root: Path, cfg: PrepareConfig) -> Path:
    """The folder holding annotations/image_labels_train.csv (PhysioNet) or a train.csv with VinDr's columns
    (Kaggle); a UserError naming both otherwise."""
    root = Path(root)
    for sub in PHYSIONET_DIRS:
        if (root / sub / PHYSIONET_TRAIN).is_file():
            return root / sub
    if _is_kaggle_csv(root / KAGGLE_CSV):
        return root
    raise UserError(f"{root} does not look like VinDr-CXR: neither {PHYSIONET_TRAIN} (PhysioNet) nor a {KAGGLE_CSV} "
                    f"with columns {', '.join(KAGGLE_COLUMNS)} (Kaggle) found — pass the folder that holds "
                    f"annotations/ and train/ (or train.csv and train/) as --root")


def _is_kaggle_csv(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = [c.strip() for c in f.readline().split(",")]
    return all(c in header for c in KAGGLE_COLUMNS)


def rows(root: Path, cfg: PrepareConfig) -> Iterator[SourceRow | Excluded]:
    """One SourceRow per image (its readers merged), or an Excluded per malformed CSV row."""
    if cfg.readers not in READERS:
        raise UserError(f"--readers {cfg.readers!r} — choose majority, any or all")
    if (root / PHYSIONET_TRAIN).is_file():
        sources = [(root / PHYSIONET_TRAIN, "train", _physionet_votes)]
        if (root / PHYSIONET_TEST).is_file():
            sources.append((root / PHYSIONET_TEST, "test", _physionet_votes))
        else:
            log.warning("%s not found: only the training images are read", root / PHYSIONET_TEST)
    elif _is_kaggle_csv(root / KAGGLE_CSV):
        sources = [(root / KAGGLE_CSV, "train", _kaggle_votes)]
    else:
        raise UserError(f"{root}: neither {PHYSIONET_TRAIN} nor a Kaggle {KAGGLE_CSV} — run with the folder find_root "
                        f"accepted")
    for path, _, _ in sources:
        check_columns(path, ("image_id",))
    for path, split, read in sources:
        images: dict[str, _Image] = {}
        for item in read(path, images):
            yield item                                   # the malformed rows, as they are met
        for image_id, image in images.items():
            yield _source_row(root, image_id, image, split, cfg)


class _Image:
    """One image's readers as the label file lists them: where it first appears, and each reader's marks."""
    __slots__ = ("where", "findings", "readers")

    def __init__(self, where: str):
        self.where = where
        self.findings: list[str] = []                    # every finding name of the file, in its order
        self.readers: dict[str, set[str]] = {}           # rad_id -> the findings that reader marked


def _physionet_votes(path: Path, images: dict[str, _Image]) -> Iterator[Excluded]:
    """Fill `images` from image_labels_*.csv (one row per reader); yield its malformed rows."""
    for line, row in read_csv(path, ("image_id",)):
        where = f"{path.name}:{line}"
        if isinstance(row, Excluded):
            yield row
            continue
        if None in row or any(v is None for v in row.values()):
            yield Excluded("malformed row", where, "wrong number of cells")
            continue
        image_id = row["image_id"].strip()
        if not _ID.match(image_id):
            yield Excluded("malformed row", where, f"image_id {image_id!r}")
            continue
        columns = [c for c in row if c not in ("image_id", "rad_id")]
        bad = [f"{c}={row[c]!r}" for c in columns if _mark(row[c]) is None]
        if bad:
            yield Excluded("malformed row", where, f"not 0/1: {', '.join(bad[:3])}")
            continue
        image = images.setdefault(image_id, _Image(where))
        image.findings = image.findings or [RENAMED.get(c.strip(), c.strip()) for c in columns]
        reader = (row.get("rad_id") or "").strip() or f"row{line}"   # the test file's consensus row has none
        image.readers.setdefault(reader, set()).update(
            RENAMED.get(c.strip(), c.strip()) for c in columns if _mark(row[c]))


def _mark(cell: str) -> bool | None:
    """A finding cell: True (1), False (0 or blank, as the test file leaves some), None if neither."""
    text = cell.strip()
    if text in ("", "0", "0.0", "nan"):
        return False
    return True if text in ("1", "1.0") else None


def _kaggle_votes(path: Path, images: dict[str, _Image]) -> Iterator[Excluded]:
    """Fill `images` from the Kaggle train.csv (one row per box); yield its malformed rows."""
    for line, row in read_csv(path, KAGGLE_COLUMNS):
        where = f"{path.name}:{line}"
        if isinstance(row, Excluded):
            yield row
            continue
        if None in row or any(row.get(c) is None for c in KAGGLE_COLUMNS):
            yield Excluded("malformed row", where, "wrong number of cells")
            continue
        image_id, name, reader = (row[c].strip() for c in KAGGLE_COLUMNS)
        if not _ID.match(image_id):
            yield Excluded("malformed row", where, f"image_id {image_id!r}")
        elif not name or not reader:
            yield Excluded("malformed row", where, "no class_name" if not name else "no rad_id")
        else:
            images.setdefault(image_id, _Image(where)).readers.setdefault(reader, set()).add(name)


def merge(readers: Iterable[set[str]], findings: Iterable[str], policy: str) -> dict[str, float]:
    """{finding: 1.0 / 0.0} from the readers' marks under --readers; 'No finding' only when nothing else counts.

    `findings` names every finding of the source (the Kaggle file lists only those marked, so its images are
    labelled over the names their readers used)."""
    readers = list(readers)
    votes = collections.Counter(name for marks in readers for name in marks)
    need = {"majority": len(readers) // 2 + 1, "any": 1, "all": len(readers)}[policy]
    names = list(dict.fromkeys([*findings, *votes]))
    labels = {n: POSITIVE if votes[n] >= need else NEGATIVE for n in names if n != NO_FINDING}
    if NO_FINDING in names:
        labels[NO_FINDING] = POSITIVE if votes[NO_FINDING] >= need and POSITIVE not in labels.values() else NEGATIVE
    return labels


def _source_row(root: Path, image_id: str, image: _Image, split: str, cfg: PrepareConfig) -> SourceRow:
    path = root / split / f"{image_id}{IMAGE_SUFFIX}"
    sex, age, view = dicom_header(path)
    if split == "train":
        split = "validate" if seeded_split(image_id, cfg.seed, cfg.val_fraction, 0.0) == "validate" else "train"
    return SourceRow(image=path, patient=image_id, study=image_id, view=view or DEFAULT_VIEW,
                     labels=merge(image.readers.values(), image.findings, cfg.readers), sex=sex, age=age,
                     split=split, where=image.where)


def dicom_header(path: Path) -> tuple[str, int | None, str]:
    """(sex M/F/"", age in years or None, ViewPosition or "") from the header alone; all unknown when the
    file is missing or not DICOM (the runner counts those files itself)."""
    if not path.is_file():
        return "", None, ""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except Exception:  # noqa: BLE001 - pydicom raises assorted errors on damaged headers; the decode will say
        return "", None, ""
    return (sex_code(str(ds.get("PatientSex", "") or "")), age_years(str(ds.get("PatientAge", "") or "")),
            str(ds.get("ViewPosition", "") or "").strip())

"""PadChest (BIMCV): 160,868 chest X-rays of 67,625 patients, Hospital San Juan de Alicante, 2009-2017.

Access: https://bimcv.cipf.es/bimcv-projects/padchest/ (free, research use, after a request form); the full-size
images are also on Academic Torrents (dec12db21d57e158f78621f06dcbe78248d14850).

Citation: Bustos A, Pertusa A, Salinas J-M, de la Iglesia-Vayá M. PadChest: A large chest x-ray image dataset with
multi-label annotated reports. Medical Image Analysis 66:101797, 2020. https://arxiv.org/abs/1901.07441

Layout read (`--root`, or the one folder inside it that holds the CSV):

    PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz]   one row per image (the .gz as torchxrayvision ships it)
    0/ 1/ ... 54/<ImageID>.png      the official download: <ImageDir>/<ImageID>, 16-bit grayscale PNG
    <ImageID>.png  or  images/<ImageID>.png    the same files unpacked flat (torchxrayvision's flat_dir)

Each image is looked for under its ImageDir folder first, then flat; one not found is counted missing by the
runner. Some PNGs of the release are truncated or broken (torchxrayvision lists 21): the runner counts them
unreadable.

Columns used: ImageID, ImageDir, StudyID (study), PatientID (patient), PatientSex_DICOM (M / F / O), PatientBirth
(a year) and StudyDate_DICOM (YYYYMMDD) for the age at the study, Projection (PA, AP, AP_horizontal -> AP, L ->
LATERAL, COSTAL, EXCLUDE...; ViewPosition_DICOM where it is blank), Labels (a Python list literal of English
finding names, e.g. "['pleural effusion', 'cardiomegaly']", as physicians or the authors' RNN annotated the
report) and Report (the report in Spanish, stemmed: "cardiomegali . pinzamient seno costofren izquierd .").

Labels: the 174 radiographic findings plus 19 differential diagnoses, positive only (PadChest marks no negative
or uncertain finding); `LABELS` maps those with a clear CheXpert class (normal -> No Finding, nodule / mass ->
Lung Lesion, the atelectasis kinds, the fractures, tubes / catheters / pacemakers -> Support Devices, ...,
after torchxrayvision's PC_Dataset); every other finding keeps its own name. 'unchanged' (compared with an
earlier film, not a finding on this one) is dropped; a row labelled 'exclude' (PadChest's own mark for a
report to leave out) or with no label at all is left out, since its caption would say nothing.

Reports: none by default (HAS_REPORTS is False: the runner captions each image from its finding names). With
`--padchest-report` the stemmed Spanish report becomes the report instead; `has_reports(cfg)` tells the runner
which of the two a run uses. No official split: patients are split by the seeded hash (SourceRow.split "")."""
from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Iterator

from cxrcommon.errors import UserError

from ..config import PrepareConfig
from ..rows import POSITIVE, Excluded, SourceRow, age_years, is_file, read_csv, sex_code

NAME = "padchest"
HAS_REPORTS = False  # the default; with --padchest-report the Spanish report is used: see has_reports(cfg)

CSV_NAMES = ("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
             "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz")
REQUIRED = ("ImageID", "ImageDir", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM", "StudyDate_DICOM",
            "Projection", "Labels", "Report")
FLAT_DIRS = (".", "images")

_CLASSES: dict[str, tuple[str, ...]] = {
    "No Finding": ("normal",),
    "Enlarged Cardiomediastinum": ("mediastinal enlargement", "superior mediastinal enlargement"),
    "Cardiomegaly": ("cardiomegaly",),
    "Lung Opacity": ("infiltrates", "alveolar pattern", "ground glass pattern", "interstitial pattern",
                     "reticular interstitial pattern", "reticulonodular interstitial pattern"),
    "Lung Lesion": ("nodule", "multiple nodules", "mass", "pulmonary mass", "lung metastasis"),
    "Edema": ("pulmonary edema",),
    "Consolidation": ("consolidation", "air bronchogram"),
    "Pneumonia": ("pneumonia", "atypical pneumonia"),
    "Atelectasis": ("atelectasis", "laminar atelectasis", "lobar atelectasis", "segmental atelectasis",
                    "atelectasis basal", "total atelectasis", "round atelectasis"),
    "Pneumothorax": ("pneumothorax", "hydropneumothorax"),
    "Pleural Effusion": ("pleural effusion", "loculated pleural effusion", "loculated fissural effusion"),
    "Pleural Other": ("pleural thickening", "apical pleural thickening", "calcified pleural thickening",
                      "pleural plaques", "calcified pleural plaques"),
    "Fracture": ("fracture", "rib fracture", "callus rib fracture", "clavicle fracture", "humeral fracture",
                 "vertebral fracture"),
    "Support Devices": ("pacemaker", "single chamber device", "dual chamber device", "electrical device",
                        "NSG tube", "endotracheal tube", "tracheostomy tube", "chest drain tube", "gastrostomy tube",
                        "nephrostomy tube", "ventriculoperitoneal drain tube", "double J stent", "catheter",
                        "central venous catheter", "central venous catheter via subclavian vein",
                        "central venous catheter via jugular vein", "central venous catheter via umbilical vein",
                        "reservoir central venous catheter", "artificial heart valve", "artificial mitral heart valve",
                        "artificial aortic heart valve", "aortic endoprosthesis"),
}
LABELS: dict[str, str | None] = {name: cls for cls, names in _CLASSES.items() for name in names}
NOT_FINDINGS = ("unchanged",)   # dropped from an image's labels
EXCLUDE_LABEL = "exclude"       # PadChest's mark for a report to leave out: the row is left out


def has_reports(cfg: PrepareConfig) -> bool:
    """True when this run's rows carry the Spanish report (--padchest-report), False when the runner captions."""
    return bool(cfg.padchest_report)


def find_root(root: Path, cfg: PrepareConfig) -> Path:
    """`root`, or its one subfolder, that holds the labels CSV; a UserError naming the CSV otherwise."""
    root = Path(root)
    if _csv_path(root):
        return root
    if root.is_dir():  # scandir: a flat folder of 160k PNGs is listed without a stat per file
        with os.scandir(root) as entries:
            inside = [Path(e.path) for e in entries if e.is_dir() and _csv_path(Path(e.path))]
        if len(inside) == 1:
            return inside[0]
    raise UserError(f"{root} does not look like PadChest: {CSV_NAMES[0]} (or .csv.gz) not found — pass the folder "
                    f"that holds it and the image folders 0/ ... 54/ (or the PNGs, flat) as --root")


def _csv_path(root: Path) -> Path | None:
    return next((root / n for n in CSV_NAMES if (root / n).is_file()), None)


def rows(root: Path, cfg: PrepareConfig) -> Iterator[SourceRow | Excluded]:
    """One SourceRow per CSV row (streamed), or an Excluded naming the line and what was wrong with it."""
    path = _csv_path(root)
    if path is None:
        raise UserError(f"{root}: {CSV_NAMES[0]} (or .csv.gz) not found — run with the folder find_root accepted")
    flat = [root / d for d in FLAT_DIRS if (root / d).is_dir()]
    for line, row in read_csv(path, REQUIRED):
        yield row if isinstance(row, Excluded) else _row(root, flat, row, f"{path.name}:{line}", cfg.padchest_report)


def _row(root: Path, flat: list[Path], row: dict[str, str | None], where: str,
         with_report: bool) -> SourceRow | Excluded:
    if any(row.get(c) is None for c in REQUIRED) or None in row:
        return Excluded("malformed row", where, "wrong number of cells")
    image_id, patient = row["ImageID"].strip(), row["PatientID"].strip()
    if not image_id.lower().endswith(".png") or "/" in image_id or "\\" in image_id or image_id.startswith("."):
        return Excluded("malformed row", where, f"ImageID {image_id!r} is not a PNG file name")
    if not patient:
        return Excluded("malformed row", where, "no PatientID")
    image = _image_path(root, flat, row["ImageDir"].strip(), image_id)
    if image is None:
        return Excluded("malformed row", where, f"ImageDir {row['ImageDir']!r} is not a folder number")
    labels = _labels(row["Labels"])
    if isinstance(labels, str):
        return Excluded(labels, where, f"Labels {row['Labels'][:80]!r}")
    return SourceRow(image=image, patient=patient, study=row["StudyID"].strip(),
                     view=row["Projection"].strip() or (row.get("ViewPosition_DICOM") or "").strip(),
                     report=_report(row["Report"]) if with_report else "", labels=labels,
                     sex=sex_code(row["PatientSex_DICOM"]), age=_age(row["StudyDate_DICOM"], row["PatientBirth"]),
                     split="", where=where)


def _image_path(root: Path, flat: list[Path], image_dir: str, image_id: str) -> Path | None:
    """<ImageDir>/<ImageID> when it exists (or the flat copy doesn't), else the flat copy; None if ImageDir
    is neither blank nor a folder number."""
    if not image_dir:
        nested = None
    else:
        try:
            nested = root / str(int(float(image_dir))) / image_id
        except (ValueError, OverflowError):
            return None
    if nested is not None and is_file(nested):
        return nested
    found = next((d / image_id for d in flat if is_file(d / image_id)), None)
    return found or nested or root / image_id


def _labels(cell: str) -> dict[str, float] | str:
    """{finding: 1.0} from the list literal, or the exclusion reason."""
    text = cell.strip()
    if text.lower() in ("", "nan", "none"):
        return "no labels"
    try:
        names = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return "malformed labels"
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return "malformed labels"
    names = [n.strip() for n in names if n.strip() and n.strip() not in NOT_FINDINGS]
    if EXCLUDE_LABEL in names:
        return "labelled 'exclude'"
    return {n: POSITIVE for n in names} or "no labels"


def _report(cell: str) -> str:
    """The stemmed report with its whitespace collapsed; "" when it holds no word (" . . ." or "nan")."""
    text = " ".join(cell.split())
    return text if any(c.isalnum() for c in text) and text.lower() != "nan" else ""


def _age(study_date: str, birth_year: str) -> int | None:
    """Whole years at the study: the study's year minus the birth year (PadChest gives no birth date)."""
    date = study_date.strip()
    try:
        years = int(date[:4]) - int(float(birth_year))
    except (ValueError, OverflowError):
        return None
    return age_years(years) if len(date) >= 4 and date[:4].isdigit() else None

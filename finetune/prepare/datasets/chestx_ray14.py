"""NIH ChestX-ray14: 112,120 frontal chest X-rays of 30,805 patients, NIH Clinical Center, 1992-2015, each with
up to 14 findings text-mined from its (unreleased) report.

Access: https://nihcc.app.box.com/v/ChestXray-NIHCC (free; the official download: Data_Entry_2017_v2020.csv,
train_val_list.txt, test_list.txt and images_001.tar.gz ... images_012.tar.gz) and the Kaggle copy
https://www.kaggle.com/datasets/nih-chest-xrays/data (the same files, images unpacked per part).

Citation: Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. ChestX-ray8: Hospital-scale Chest X-ray Database and
Benchmarks on Weakly-Supervised Classification and Localization of Common Thorax Diseases. CVPR 2017.
https://arxiv.org/abs/1705.02315

Layout read (`--root`, or a folder with it as its only child holding the CSV):

    Data_Entry_2017_v2020.csv   one row per image (preferred; Data_Entry_2017.csv, the first release, also read;
                                either may be .csv.gz, as torchxrayvision ships it)
    test_list.txt               the official test images, one file name a line (train_val_list.txt is the rest)
    images/<Image Index>        the official download: every images_0NN.tar.gz unpacks to images/
    images_001/images/<Image Index> ... images_012/images/   the Kaggle copy: one folder per part

The PNG files are indexed by name once (112k names), so either layout, or a mix, is found; an image in none of
them is counted missing by the runner.

Columns used: Image Index (00000001_000.png: patient, follow-up), Finding Labels ('|'-separated, 'No Finding'),
Patient ID, Patient Age ("58" in v2020, "058Y" in the first release; ages over 120, typos of the first release,
become unknown), Patient Gender (M / F) and View Position (PA / AP: the dataset holds frontal films only, so the
view filter only tells PA from AP). Follow-up # and the original size / pixel spacing are not needed.

Labels: the 14 findings, each image's listed ones positive and the rest negative (the mining decided all 14).
`LABELS` maps Effusion -> Pleural Effusion, Mass and Nodule -> Lung Lesion, and Atelectasis, Cardiomegaly,
Consolidation, Edema, Pneumonia, Pneumothorax onto the CheXpert class of the same name; Infiltration, Emphysema,
Fibrosis, Pleural_Thickening and Hernia keep their own names (no CheXpert class says the same thing). A row
naming another finding is left out ("unknown finding"). No reports: the runner captions each image from its
finding names (HAS_REPORTS False).

Split: test_list.txt's images are 'test' (the benchmark's own test set, kept whole); the other images (the
official train_val list) are 'train', except a seeded share of their patients (--val-fraction) put in
'validate'. The official split is by patient, so no patient straddles test and train. Without test_list.txt
every patient takes the runner's seeded three-way split."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterator

from cxrcommon.errors import UserError

from ..config import PrepareConfig
from ..rows import NEGATIVE, POSITIVE, Excluded, SourceRow, age_years, open_text, read_csv, seeded_split, sex_code

log = logging.getLogger(__name__)

NAME = "chestx-ray14"
HAS_REPORTS = False

CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv",
             "Data_Entry_2017.csv.gz")
TEST_LIST = "test_list.txt"
REQUIRED = ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position")
NO_FINDING = "No Finding"
LABELS: dict[str, str | None] = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
    "Edema": "Edema", "Effusion": "Pleural Effusion", "Emphysema": None, "Fibrosis": None, "Hernia": None,
    "Infiltration": None, "Mass": "Lung Lesion", "Nodule": "Lung Lesion", "Pleural_Thickening": None,
    "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", NO_FINDING: "No Finding",
}
_IMAGE_RE = re.compile(r"^\d{8}_\d{3}\.png$")


def find_root(root: Path, cfg: PrepareConfig) -> Path:
    """`root`, or its one subfolder, that holds Data_Entry_2017*.csv; a UserError naming the CSV otherwise."""
    root = Path(root)
    if _csv_path(root):
        return root
    if root.is_dir():
        inside = [d for d in sorted(root.iterdir()) if d.is_dir() and _csv_path(d)]
        if len(inside) == 1:
            return inside[0]
    raise UserError(f"{root} does not look like ChestX-ray14: {CSV_NAMES[0]} (or {CSV_NAMES[2]}) not found — pass "
                    f"the folder that holds it, test_list.txt and images/ (or images_001/ ... images_012/) as --root")


def _csv_path(root: Path) -> Path | None:
    return next((root / n for n in CSV_NAMES if (root / n).is_file()), None)


def rows(root: Path, cfg: PrepareConfig) -> Iterator[SourceRow | Excluded]:
    """One SourceRow per Data_Entry row (streamed), or an Excluded naming the line and what was wrong with it."""
    path = _csv_path(root)
    if path is None:
        raise UserError(f"{root}: {CSV_NAMES[0]} not found — run with the folder find_root accepted")
    test = _test_names(root)
    folders, index = _index_images(root)
    for line, row in read_csv(path, REQUIRED):
        if isinstance(row, Excluded):
            yield row
            continue
        yield _row(row, f"{path.name}:{line}", folders, index, lambda name, patient: _split(name, patient, test, cfg))


def _row(row: dict[str, str | None], where: str, folders: list[Path], index: dict[str, int],
         split: Callable[[str, str], str]) -> SourceRow | Excluded:
    if any(row.get(c) is None for c in REQUIRED) or None in row:
        return Excluded("malformed row", where, "wrong number of cells")
    name, patient = row["Image Index"].strip(), row["Patient ID"].strip()
    if not _IMAGE_RE.match(name):
        return Excluded("malformed row", where, f"Image Index {name[:40]!r} is not a ChestX-ray14 file name")
    if not patient.isdigit():
        return Excluded("malformed row", where, f"Patient ID {patient[:40]!r} is not a number")
    findings = [f.strip() for f in row["Finding Labels"].split("|") if f.strip()]
    if not findings:
        return Excluded("malformed row", where, "no Finding Labels")
    unknown = [f for f in findings if f not in LABELS]
    if unknown:
        return Excluded("unknown finding", where, f"Finding Labels {row['Finding Labels'][:80]!r}")
    patient = str(int(patient))
    image = folders[index[name]] / name if name in index else folders[0] / name  # missing: counted by the runner
    return SourceRow(image=image, patient=patient, study=name[:-len(".png")], view=row["View Position"].strip(),
                     labels={n: POSITIVE if n in findings else NEGATIVE for n in LABELS},
                     sex=sex_code(row["Patient Gender"]), age=age_years(row["Patient Age"]),
                     split=split(name, patient), where=where)


def _split(name: str, patient: str, test: set[str] | None, cfg: PrepareConfig) -> str:
    """'test' for the official test list; train_val images 'train', or 'validate' for a seeded share of patients;
    "" (the runner's seeded split) when the download has no test list."""
    if test is None:
        return ""
    if name in test:
        return "test"
    return "validate" if seeded_split(patient, cfg.seed, cfg.val_fraction, 0.0) == "validate" else "train"


def _test_names(root: Path) -> set[str] | None:
    path = root / TEST_LIST
    if not path.is_file():
        log.warning("%s: no %s — the official split is unknown, so patients are split by the seeded hash "
                    "(--val-fraction, --test-fraction)", root, TEST_LIST)
        return None
    with open_text(path) as f:
        return {line.strip() for line in f if line.strip()}


def _index_images(root: Path) -> tuple[list[Path], dict[str, int]]:
    """(folders, PNG name -> index of its folder) over images/ and the Kaggle images_NNN/images/ folders; the
    first folder wins where a name appears twice. Small ints, not Paths, keep 112k entries light."""
    folders = [root / "images"] + sorted(d / "images" for d in root.glob("images_*") if (d / "images").is_dir())
    index: dict[str, int] = {}
    for i, folder in enumerate(folders):
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".png"):
                    index.setdefault(entry.name, i)
    return folders, index

"""CheXpert Plus (Stanford AIMI): CheXpert's radiographs (223,228 training + 234 validation, 64,725 patients) with
their 187,711 de-identified radiology reports, parsed into sections, and the patients' demographics.

Access: https://stanfordaimi.azurewebsites.net/datasets/5158c524-d3ab-4e02-96e9-6ee9efc110a1 (Stanford AIMI,
research use agreement; also on Redivis as aimi.chexpert_plus); code and notes: https://github.com/Stanford-AIMI/chexpert-plus

Citation: Chambon P, Delbrouck J-B, Sounack T, et al. CheXpert Plus: Augmenting a Large Chest X-ray Dataset with
Text Radiology Reports, Patient Demographics and Additional Image Formats. arXiv:2405.19538, 2024.

Layout read (`--root` is the folder holding the CSV):

    df_chexpert_plus_240401.csv         one row per image (a later df_chexpert_plus_*.csv[.gz] is read the same way)
    PNG/train/patient00001/study1/view1_frontal.png ...   the PNG release (also PNG/PNG/train/... as some unzip
    PNG/valid/patient64541/...                            it, or train/ and valid/ straight under --root)
    chexbert_labels/impression_fixed.json  (or report_fixed.json; or either beside the CSV)   optional labels

path_to_image ("train/patient00001/study1/view1_frontal.jpg") names CheXpert's JPEG; its image is the PNG of the
same name under the first of PNG/PNG/, PNG/ that has the split's folder. Without those, CheXpert's own JPEGs are
read where --root holds a CheXpert download in any layout `chexpert` reads (CheXpert-v1.0/, CheXpert-v1.0-small/,
the AIMI batch folders): the paths are the same; failing that, PNGs in train/ and valid/ straight under --root.
The DICOM release (path_to_dcm) is not read.

Columns used: path_to_image, frontal_lateral + ap_pa (views as in `chexpert`: AP, PA, FRONTAL, "FRONTAL LL",
LATERAL), deid_patient_id (patient; patientNNNNN from the path where blank), study patientNNNNN/studyN from the
path, section_findings + section_impression (the report: findings then impression, whitespace collapsed; a row
with neither is dropped by the runner), sex (Male / Female), age (years; 0 unknown), race + ethnicity (below) and
split (train / valid -> train / validate; blank: the seeded patient split).

Race: Stanford's race strings ("White", "White, non-Hispanic", "Black or African American", "Asian - Historical
Conv", "Other, Hispanic", "Patient Refused", "Race and Ethnicity Unknown", ...) onto the groups the manifest uses
(WHITE, BLACK, ASIAN, HISPANIC/LATINO, OTHER, "" unknown): a ", Hispanic" race or the ethnicity Hispanic/Latino
gives HISPANIC/LATINO, as MIMIC-IV's race field counts Hispanic patients; refused / unknown give "".

Labels: CheXbert's 14 CheXpert observations from chexbert_labels/ (JSON lines: path_to_image and one value per
observation, 1 / 0 / -1 uncertain / null), joined by path_to_image. impression_fixed.json (labels read from the
impression, as CheXpert's own were) is preferred to report_fixed.json (the whole report, history included);
findings_fixed.json is not used (it says No Finding wherever the findings section is empty). Without a label file
the manifest has reports but no labels. A line of the label file that cannot be read is counted as excluded."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator

from cxrcommon.errors import UserError

from ..config import PrepareConfig
from ..rows import (
    CHEXPERT_14,
    NEGATIVE,
    POSITIVE,
    UNCERTAIN,
    Excluded,
    SourceRow,
    check_columns,
    race_group,
    read_csv,
    sex_code,
    split_code,
)
from . import chexpert

NAME = "chexpert-plus"
HAS_REPORTS = True
LABELS = chexpert.LABELS

CSV_NAME = "df_chexpert_plus_240401.csv"
REQUIRED = ("path_to_image", "frontal_lateral", "ap_pa", "deid_patient_id", "section_findings", "section_impression")
PNG_FOLDERS = ("PNG/PNG", "PNG")
LABEL_FILES = ("chexbert_labels/impression_fixed.json", "impression_fixed.json",
               "chexbert_labels/report_fixed.json", "report_fixed.json")
_RACE_UNKNOWN = ("UNKNOWN", "RACE AND ETHNICITY UNKNOWN", "PATIENT REFUSED", "DECLINED", "NOT RECORDED")
_CODES = {POSITIVE: "p", NEGATIVE: "n", UNCERTAIN: "u", None: "."}  # one character per observation in the join
_VALUES = {code: value for value, code in _CODES.items()}


@dataclasses.dataclass
class Source:
    """The files of one CheXpert Plus download: the CSV, where its images lie, the label file (or None)."""
    csv: Path
    images: chexpert.Images
    png: bool                    # the PNG release (path_to_image's .jpg read as .png), else CheXpert's JPEGs
    labels: Path | None


def find_root(root: Path, cfg: PrepareConfig | None = None) -> Path:
    """`root` when it holds the CheXpert Plus CSV and an image tree; one UserError line otherwise."""
    source(root)
    return root


def source(root: Path) -> Source:
    """The CSV, images and label file under `root` (see the module docstring for the order images are looked for)."""
    table = root / CSV_NAME
    if not table.is_file():
        later = sorted(root.glob("df_chexpert_plus_*.csv*"))
        if not later:
            raise UserError(f"{root} does not look like CheXpert Plus: {CSV_NAME} not found — pass the folder the "
                            f"CheXpert Plus download unpacked to (the one holding the CSV and PNG/) as --root")
        table = later[-1]
    labels = next((root / p for p in LABEL_FILES if (root / p).is_file()), None)
    png = _png_tree(root, PNG_FOLDERS)
    if png is None:
        try:
            return Source(table, chexpert.layout(root).images, False, labels)
        except UserError:
            png = _png_tree(root, (".",))  # last: a CheXpert package's own train/ holds JPEGs, not these PNGs
    if png is None:
        raise UserError(f"{root}: no images for {table.name} — unzip the CheXpert Plus PNG release here (PNG/train/"
                        f"patient00001/...), or put a CheXpert download (CheXpert-v1.0-small/, CheXpert-v1.0/) "
                        f"beside the CSV")
    return Source(table, png, True, labels)


def _png_tree(root: Path, bases: tuple[str, ...]) -> chexpert.Images | None:
    """The PNG release's split folders under the first base that has each; None when no base has any."""
    folders = {s: next((root / b / s for b in bases if (root / b / s).is_dir()), None) for s in chexpert.SPLIT_DIRS}
    if not any(folders.values()):
        return None
    return chexpert.Images({s: (folder or root / bases[0] / s,) for s, folder in folders.items()})


def rows(root: Path, cfg: PrepareConfig | None = None) -> Iterator[SourceRow | Excluded]:
    """The label file's unreadable lines (as Excluded), then one SourceRow per CSV row."""
    src = source(root)
    check_columns(src.csv, REQUIRED)
    table: dict[str, str] = {}
    if src.labels:
        yield from _read_labels(src.labels, src.labels.relative_to(root).as_posix(), table)
    for line, r in read_csv(src.csv, REQUIRED):
        where = f"{src.csv.name}:{line}"
        if isinstance(r, Excluded):
            yield r
            continue
        try:
            yield _row(r, src, table, where)
        except ValueError as exc:
            yield Excluded("malformed row", where, str(exc))


def _row(r: dict, src: Source, table: dict[str, str], where: str) -> SourceRow:
    chexpert.check_cells(r)
    split_dir, patient, study, file = chexpert.parse_path(r["path_to_image"])
    image = src.images(split_dir, patient, study, Path(file).with_suffix(".png").name if src.png else file)
    split = (r.get("split") or "").strip()
    if split and not split_code(split):
        raise ValueError(f"split {split!r} is not train, valid or test")
    # The sections come parsed: joined here, not through cxrcommon.reports, whose import pulls in torch in every
    # image worker (the runner's workers import this module).
    report = " ".join(r[c] for c in ("section_findings", "section_impression"))
    codes = table.get(r["path_to_image"].strip(), "")
    return SourceRow(image=image, patient=r["deid_patient_id"].strip() or patient, study=f"{patient}/{study}",
                     view=chexpert.view_of(r["frontal_lateral"], r["ap_pa"]), report=" ".join(report.split()),
                     labels={n: _VALUES[c] for n, c in zip(CHEXPERT_14, codes) if c != "."},
                     sex=sex_code(r.get("sex") or ""), age=chexpert.age_of(r.get("age") or ""),
                     race=race_of(r.get("race") or "", r.get("ethnicity") or ""), split=split_code(split),
                     where=where)


def _read_labels(path: Path, name: str, table: dict[str, str]) -> Iterator[Excluded]:
    """Fill `table` (path_to_image -> one code per observation); yield an Excluded per unreadable line."""
    with open(path, encoding="utf-8-sig") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
                key = record["path_to_image"].strip()
                table[key] = "".join(_CODES[_label(record.get(obs))] for obs in CHEXPERT_14)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                if n == 1 and text.lstrip().startswith("["):
                    raise UserError(f"{path}: a JSON array — chexbert_labels ships one JSON object per line; use "
                                    f"the file as downloaded") from None
                yield Excluded("malformed label line", f"{name}:{n}", f"{type(exc).__name__}: {exc}"[:200])


def _label(value: object) -> float | None:
    """1 / 0 / -1 (uncertain) as a float, None for null; ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (POSITIVE, NEGATIVE, UNCERTAIN):
        return float(value)
    raise ValueError(f"label value {value!r} is not 1, 0, -1 or null")


def race_of(race: str, ethnicity: str) -> str:
    """Stanford's race (+ ethnicity) strings onto the manifest's groups (see the module docstring)."""
    base, _, qualifier = race.strip().partition(",")
    if qualifier.strip().upper() == "HISPANIC" or ethnicity.strip().upper().startswith("HISPANIC"):
        return "HISPANIC/LATINO"
    if base.strip().upper() in ("", *_RACE_UNKNOWN):
        return ""
    return race_group(base)

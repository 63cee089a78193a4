"""MIMIC-CXR-JPG: 377,110 chest X-rays (JPEG) of 227,835 studies of 65,379 patients, Beth Israel Deaconess
Medical Center, Boston, 2011-2016, with the studies' free-text radiology reports.

Access: https://physionet.org/content/mimic-cxr-jpg/2.1.0/ (credentialed PhysioNet access and the data use
agreement); the reports come from the MIMIC-CXR (DICOM) project, https://physionet.org/content/mimic-cxr/2.0.0/
(mimic-cxr-reports.zip). Sex, age and race come from MIMIC-IV, https://physionet.org/content/mimiciv/
(same access).

Citation: Johnson AEW, Pollard TJ, Greenbaum NR, et al. MIMIC-CXR-JPG, a large publicly available database of
labeled chest radiographs. arXiv:1901.07042, 2019; Johnson AEW, Pollard TJ, Berkowitz SJ, et al. MIMIC-CXR, a
de-identified publicly available database of chest radiographs with free-text reports. Scientific Data 6:317,
2019.

Layout read (`--root`: the version folder, or a folder above it as `wget -r` leaves it,
physionet.org/files/mimic-cxr-jpg/<version>/ or mimic-cxr-jpg/<version>/):

    mimic-cxr-2.0.0-metadata.csv.gz   one row per image: dicom_id, subject_id, study_id, ViewPosition, StudyDate
    mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split (train / validate / test)
    mimic-cxr-2.0.0-chexpert.csv.gz   subject_id, study_id and CheXpert's 14 columns (1.0 / 0.0 / -1.0 / blank)
    files/p10/p10000032/s50414267/<dicom_id>.jpg   p + the subject's first two digits / p<subject> / s<study>
    files/p10/p10000032/s50414267.txt              the report, from mimic-cxr-reports.zip unzipped into
                                                   --root, or under `--reports DIR` (DIR/files/p10/...)

Each file may also be the ungzipped .csv (v2.1.0 keeps the 2.0.0 names). The NegBio labels
(mimic-cxr-2.0.0-negbio.csv.gz) are not read: the CheXpert labeler's are the ones most work reports on.

Maps: patient = subject_id, study = study_id, view = ViewPosition as written (PA, AP, LATERAL, LL, ...; the
~16k images where it is blank stay unknown, counted by the runner as "view unknown"), split = the official
split, labels = the study's CheXpert labels (-1.0, uncertain, kept for the runner's --uncertain), report =
FINDINGS + IMPRESSION (CONCLUSION counts as the impression, as in MIT-LCP/mimic-cxr txt/section_parser.py),
one line, the `___` placeholders removed (`cxrcommon.reports`). A report with neither section (where
section_parser would fall back to its last paragraph) gives "", which the runner drops as "no
findings/impression text".

With `--mimic-iv DIR` (DIR/hosp/patients.csv.gz and DIR/hosp/admissions.csv.gz; core/ for MIMIC-IV 1.0):
sex = patients.gender; age at the study = anchor_age + (the StudyDate's year - anchor_year), both dates being
shifted alike per patient (anchor_age is 91 for anyone older than 89); race = the group (`rows.race_group`) most
of the patient's hospital admissions record, ignoring unknown / declined, a tie going to the latest admission's.
A patient never admitted (e.g. seen in the ED only) has no race in hosp/ and stays unknown.

Exclusions (counted per metadata row, so the summary's rows read are the metadata's 377,110): "malformed row"
(wrong number of cells, a non-numeric subject or study id, an odd dicom_id), "not in the split file",
"malformed label row" (its study's chexpert row holds a value other than 1.0 / 0.0 / -1.0 / blank: no labels
would read as all negative), "no report file" (with --require-report, the default). An unreadable split row
(its images then count as "not in the split file") or chexpert row without a numeric study_id is logged
(count and first line); a study with no chexpert row has no labels."""
from __future__ import annotations

import collections
import csv
import logging
import re
import sys
from pathlib import Path
from typing import Iterator

from cxrcommon.errors import UserError

from ..config import PrepareConfig
from ..rows import (
    CHEXPERT_14,
    Excluded,
    SourceRow,
    age_years,
    is_file,
    open_text,
    race_group,
    read_csv,
    split_code,
)

log = logging.getLogger(__name__)

NAME = "mimic-cxr"
HAS_REPORTS = True
LABELS: dict[str, str | None] = {name: name for name in CHEXPERT_14}

METADATA = "mimic-cxr-2.0.0-metadata.csv"
SPLIT = "mimic-cxr-2.0.0-split.csv"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv"
META_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate")
REPACKED = ("physionet.org/files/mimic-cxr-jpg", "files/mimic-cxr-jpg", "mimic-cxr-jpg")  # then /<version>/
MIMIC_IV_MODULES = ("hosp", "core", ".")   # hosp/ since MIMIC-IV 2.0, core/ in 1.0; "." = DIR is that folder
REPORT_PROBE = 50  # metadata rows whose report is looked for before a run: none found -> the reports are absent

_DICOM_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z-]*$")
# One character per CheXpert class and study (227,827 studies: ~15 MB as interned strings, not a 40 MB table).
_LABEL_CODE = {"1.0": "1", "1": "1", "0.0": "0", "0": "0", "-1.0": "u", "-1": "u", "": " "}
_LABEL_VALUE = {"1": 1.0, "0": 0.0, "u": -1.0}


def find_root(root: Path, cfg: PrepareConfig) -> Path:
    """The folder holding the metadata CSV (`root`, or its PhysioNet version folder); a UserError naming the
    missing file (metadata, split, chexpert, MIMIC-IV's patients, or the reports) otherwise."""
    found = _dataset_folder(Path(root))
    if found is None:
        raise UserError(f"{root} does not look like MIMIC-CXR-JPG: {METADATA}.gz not found — pass the folder the "
                        f"PhysioNet download unpacked to (it holds the metadata, split and chexpert CSVs and files/)")
    for name in (SPLIT, CHEXPERT):
        if _csv(found, name) is None:
            raise UserError(f"{found}: {name}.gz not found beside {METADATA}.gz — download it from "
                            f"https://physionet.org/content/mimic-cxr-jpg/ into that folder")
    if cfg.mimic_iv:
        _mimic_iv_files(Path(cfg.mimic_iv).expanduser())
    if cfg.require_report:
        _check_reports(found, _reports_root(found, cfg), cfg)
    return found


def rows(root: Path, cfg: PrepareConfig) -> Iterator[SourceRow | Excluded]:
    """One SourceRow per metadata row (streamed), or an Excluded naming its line; the split, labels and
    demographics are joined by id from dicts loaded first."""
    metadata = _csv(root, METADATA)
    if metadata is None:
        raise UserError(f"{root}: {METADATA}.gz not found — run with the folder find_root accepted")
    splits, subjects = _splits(_csv(root, SPLIT))
    labels, bad_labels = _labels(_csv(root, CHEXPERT))
    people = _demographics(Path(cfg.mimic_iv).expanduser(), subjects) if cfg.mimic_iv else {}
    if not cfg.mimic_iv:
        log.info("mimic-cxr: sex, age and race left empty — pass --mimic-iv DIR (the MIMIC-IV folder holding "
                 "hosp/patients.csv.gz and hosp/admissions.csv.gz) to fill them")
    reports = _reports_root(root, cfg)
    last_study, last_report = None, None
    for line, row in read_csv(metadata, META_COLUMNS):
        if isinstance(row, Excluded):
            yield row
            continue
        where = f"{metadata.name}:{line}"
        ids = _ids(row)
        if isinstance(ids, str):
            yield Excluded("malformed row", where, ids)
            continue
        dicom, subject, study = ids
        split = splits.get(int(study))
        if split is None:
            yield Excluded("not in the split file", where, f"study {study}")
            continue
        if int(study) in bad_labels:
            yield Excluded("malformed label row", where, bad_labels[int(study)])
            continue
        if study != last_study:
            last_study, last_report = study, _report(_report_path(reports, subject, study))
        if last_report is None and cfg.require_report:
            yield Excluded("no report file", where, str(_report_path(reports, subject, study)))
            continue
        sex, anchor_age, anchor_year, race = people.get(int(subject), ("", None, None, ""))
        yield SourceRow(image=root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg",
                        patient=subject, study=study, view=row["ViewPosition"].strip(), report=last_report or "",
                        labels=_decode(labels.get(int(study), "")), sex=sex,
                        age=_age(row["StudyDate"], anchor_age, anchor_year), race=race, split=split, where=where)


def _csv(folder: Path, name: str) -> Path | None:
    return next((p for p in (folder / f"{name}.gz", folder / name) if p.is_file()), None)


def _dataset_folder(root: Path) -> Path | None:
    """`root` when it holds the metadata, else the newest version folder under a PhysioNet wget layout."""
    if _csv(root, METADATA):
        return root
    for repacked in REPACKED:
        base = root / repacked
        if base.is_dir():
            versions = sorted((d for d in base.iterdir() if d.is_dir() and _csv(d, METADATA)),
                              key=lambda d: [int(x) if x.isdigit() else 0 for x in d.name.split(".")], reverse=True)
            if versions:
                return versions[0]
    return None


def _ids(row: dict[str, str | None]) -> tuple[str, str, str] | str:
    """(dicom_id, subject_id, study_id), or what is wrong with the row."""
    if None in row or any(row.get(c) is None for c in META_COLUMNS):
        return "wrong number of cells"
    dicom, subject, study = (row[c].strip() for c in ("dicom_id", "subject_id", "study_id"))
    if not _DICOM_ID.match(dicom):
        return f"dicom_id {dicom!r} is not a file name"
    if not (subject.isdigit() and len(subject) >= 2 and study.isdigit()):
        return f"subject_id {subject!r} / study_id {study!r} not numeric"
    return dicom, subject, study


def _warn_bad(path: Path, bad: list[str]) -> None:
    if bad:
        log.warning("%s: %d malformed row(s) skipped, the first %s", path.name, len(bad), bad[0])


def _splits(path: Path) -> tuple[dict[int, str], set[int]]:
    """(study -> train / validate / test, the subjects listed). The official split assigns whole patients, so
    one entry per study (227k int keys) stands for its images (377k dicom ids would take three times the memory)."""
    splits: dict[int, str] = {}
    subjects: set[int] = set()
    bad = []
    for line, row in read_csv(path, ("dicom_id", "study_id", "subject_id", "split")):
        if isinstance(row, Excluded):
            bad.append(f"line {line}: {row.reason}")
            continue
        study, subject, split = (row.get(c) or "" for c in ("study_id", "subject_id", "split"))
        if not (study.strip().isdigit() and subject.strip().isdigit() and split_code(split)):
            bad.append(f"line {line}: study {study!r}, subject {subject!r}, split {split!r}")
            continue
        splits[int(study)] = sys.intern(split_code(split))
        subjects.add(int(subject))
    _warn_bad(path, bad)
    return splits, subjects


def _labels(path: Path) -> tuple[dict[int, str], dict[int, str]]:
    """(study -> one code character per CheXpert class, study -> where its row was malformed)."""
    codes: dict[int, str] = {}
    bad: dict[int, str] = {}
    unattributed = []
    for line, row in read_csv(path, ("subject_id", "study_id") + CHEXPERT_14):
        if isinstance(row, Excluded):
            unattributed.append(f"line {line}: {row.reason}")
            continue
        study = (row.get("study_id") or "").strip()
        cells = [(row.get(name) or "").strip() for name in CHEXPERT_14]
        wrong = [f"{n}={c!r}" for n, c in zip(CHEXPERT_14, cells) if c not in _LABEL_CODE]
        if not study.isdigit():
            unattributed.append(f"line {line}: study_id {study!r}")
        elif wrong or None in row or any(row.get(n) is None for n in CHEXPERT_14):
            bad[int(study)] = f"{path.name}:{line}: " + (", ".join(wrong) or "wrong number of cells")
        else:
            codes[int(study)] = sys.intern("".join(_LABEL_CODE[c] for c in cells))
    _warn_bad(path, unattributed)
    return codes, bad


def _decode(code: str) -> dict[str, float]:
    return {name: _LABEL_VALUE[c] for name, c in zip(CHEXPERT_14, code) if c in _LABEL_VALUE}


def _reports_root(root: Path, cfg: PrepareConfig) -> Path:
    """The folder whose files/ holds the reports: --reports (itself or its parent when it is files/), or root."""
    if not cfg.reports:
        return root
    folder = Path(cfg.reports).expanduser()
    return folder.parent if folder.name == "files" and not (folder / "files").is_dir() else folder


def _report_path(reports: Path, subject: str, study: str) -> Path:
    return reports / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"


def _report(path: Path) -> str | None:
    """FINDINGS + IMPRESSION of a report file as one clean line; "" when it has neither, None when no file."""
    # imported here: cxrcommon.reports pulls in torch (via prompt_windows), which the runner's image workers,
    # importing this module for its optional read_image, need not load (~1 s and ~0.5 GB each)
    from cxrcommon.reports import extract_sections, normalize_report
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:  # none there, or a name the OS refuses (an id hundreds of digits long)
        return None
    return normalize_report(extract_sections(text, ("findings", "impression"), untitled_lead=False))


def _check_reports(root: Path, reports: Path, cfg: PrepareConfig) -> None:
    """A UserError when none of the first metadata rows' studies has a report file (the zip not unzipped)."""
    probed = []
    for _, row in read_csv(_csv(root, METADATA), META_COLUMNS):
        ids = "unreadable" if isinstance(row, Excluded) else _ids(row)
        if isinstance(ids, str):
            continue
        path = _report_path(reports, ids[1], ids[2])
        if is_file(path):
            return
        probed.append(path)
        if len(probed) >= REPORT_PROBE:
            break
    if probed:
        where = f"--reports {cfg.reports}" if cfg.reports else f"--root {root}"
        raise UserError(f"no report files under {where} (looked for {probed[0].relative_to(reports)} and "
                        f"{len(probed) - 1} more) — unzip mimic-cxr-reports.zip (MIMIC-CXR on PhysioNet) into the "
                        f"root, or pass --reports DIR holding its files/ folder (or --require-report false)")


def _mimic_iv_files(folder: Path) -> tuple[Path, Path]:
    """(patients, admissions) CSVs of a MIMIC-IV folder, or a UserError naming hosp/patients.csv.gz."""
    for module in MIMIC_IV_MODULES:
        patients, admissions = _csv(folder / module, "patients.csv"), _csv(folder / module, "admissions.csv")
        if patients and admissions:
            return patients, admissions
    raise UserError(f"--mimic-iv {folder}: hosp/patients.csv.gz and hosp/admissions.csv.gz not found — pass the "
                    f"MIMIC-IV folder (e.g. physionet.org/files/mimiciv/3.1) that holds hosp/")


def _int(value: str | None) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None


def _demographics(folder: Path, subjects: set[int]) -> dict[int, tuple[str, int | None, int | None, str]]:
    """subject -> (gender, anchor_age, anchor_year, race group) for the subjects of the split file."""
    patients, admissions = _mimic_iv_files(folder)
    races = _races(admissions, subjects)
    people, bad = {}, []
    for line, row in read_csv(patients, ("subject_id", "gender", "anchor_age", "anchor_year")):
        if isinstance(row, Excluded):
            bad.append(f"line {line}: {row.reason}")
            continue
        subject = _int(row["subject_id"])
        if subject in subjects:
            people[subject] = ((row["gender"] or "").strip(), _int(row["anchor_age"]), _int(row["anchor_year"]),
                               races.get(subject, ""))
    _warn_bad(patients, bad)
    log.info("mimic-cxr: MIMIC-IV demographics for %d of %d patients (%d with a known race)", len(people),
             len(subjects), sum(1 for p in people.values() if p[3]))
    return people


def _races(path: Path, subjects: set[int]) -> dict[int, str]:
    """subject -> the race group most of its admissions record (unknown ones ignored; a tie: the latest's)."""
    with open_text(path) as f:
        header = next(csv.reader(f), [])
    column = next((c for c in ("race", "ethnicity") if c in header), None)  # "ethnicity" in MIMIC-IV 1.0
    if column is None:
        raise UserError(f"{path}: no race (or ethnicity) column — is this MIMIC-IV's admissions file?")
    seen: dict[int, dict[str, list]] = collections.defaultdict(dict)
    bad = []
    for line, row in read_csv(path, ("subject_id", "admittime", column)):
        if isinstance(row, Excluded):
            bad.append(f"line {line}: {row.reason}")
            continue
        subject, group = _int(row["subject_id"]), race_group(row[column] or "")
        if subject in subjects and group:
            count = seen[subject].setdefault(group, [0, ""])
            count[0] += 1
            count[1] = max(count[1], (row["admittime"] or "").strip())
    _warn_bad(path, bad)
    return {subject: max(groups, key=lambda g: tuple(groups[g])) for subject, groups in seen.items()}


def _age(study_date: str | None, anchor_age: int | None, anchor_year: int | None) -> int | None:
    """Age in whole years at the study: anchor_age + (the study's year - anchor_year); None when unknown."""
    date = (study_date or "").strip().split(".")[0]
    if anchor_age is None or anchor_year is None or not (date.isdigit() and len(date) == 8):
        return None
    return age_years(anchor_age + int(date[:4]) - anchor_year)

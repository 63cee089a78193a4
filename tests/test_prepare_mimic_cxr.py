"""MIMIC-CXR-JPG dataset module: a small fixture tree in the PhysioNet layout (gzipped CSVs, files/pXX/pSUBJECT/
sSTUDY/*.jpg, the unzipped reports) and a MIMIC-IV hosp/ folder for sex, age at the study and race."""
from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrcommon.errors import UserError
from finetune.prepare import datasets
from finetune.prepare.config import PrepareConfig
from finetune.prepare.datasets import mimic_cxr
from finetune.prepare.rows import Excluded, SourceRow
from finetune.prepare.runner import prepare

META_HEADER = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
               "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
               "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
# MIMIC's own (alphabetical) column order, not CheXpert's: the module must read the labels by name
CHEXPERT_HEADER = ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                   "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding",
                   "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"]

REPORT_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with ?pleural effusion  // ?pleural effusion

 COMPARISON:  ___

 FINDINGS:

 Large left pleural effusion is new.  Small right effusion is new.  Dr. ___
 was paged.

 IMPRESSION:

 Large left pleural effusion.
"""
REPORT_CONCLUSION = """                                 FINAL REPORT
 HISTORY:  Dyspnea.

 CONCLUSION:
 Mild pulmonary edema.
"""
REPORT_IMPRESSION = " FINAL REPORT\n INDICATION:  Cough.\n\n IMPRESSION:\n No acute process.\n"
REPORT_UNSECTIONED = """                                 FINAL REPORT
 CHEST RADIOGRAPH PERFORMED ON ___

 COMPARISON:  Prior exam from ___.

 Lungs are clear.
"""

# dicom, subject, study, view, date; the image exists?, the report (None: no file)
IMAGES = [("d1a", "10000032", "50414267", "PA", "21800506"),
          ("d1b", "10000032", "50414267", "LATERAL", "21800506"),
          ("d2a", "10000032", "53189527", "AP", "21820304"),        # two years later: age 52 -> 54
          ("d3a", "11000011", "56699142", "PA", "21481230"),        # its JPEG is missing; before anchor_year
          ("d3b", "11000011", "56000009", "PA", "21490101"),        # its chexpert row is malformed
          ("d4a", "12000000", "57000001", "AP", "21600101"),        # no report file
          ("d5a", "19999999", "58000002", "AP", "21700101"),        # report without findings/impression
          ("d6a", "10000032", "59000003", "PA", "21830101")]        # not in the split file
REPORTS = {"50414267": REPORT_FULL, "53189527": REPORT_CONCLUSION, "56699142": REPORT_IMPRESSION,
           "56000009": REPORT_IMPRESSION, "58000002": REPORT_UNSECTIONED, "59000003": REPORT_IMPRESSION}
SPLITS = {"50414267": "train", "53189527": "train", "56699142": "validate", "56000009": "validate",
          "57000001": "test", "58000002": "test"}
LABELS = {"50414267": {"Pleural Effusion": "1.0", "Edema": "-1.0", "Cardiomegaly": "0.0"},
          "53189527": {"Edema": "1.0", "Support Devices": "-1.0"},
          "56699142": {"No Finding": "1.0"},
          "56000009": {"No Finding": "yes"},
          "57000001": {}, "58000002": {"Atelectasis": "1.0"}, "59000003": {}}


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open(path, "wt", newline="") if path.suffix == ".gz" else open(path, "w", newline="")) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((80, 64), 200, dtype=np.uint8)
    a[20:60, 16:48] = 40
    Image.fromarray(a).save(path, quality=90)


def _study_dir(root: Path, subject: str, study: str) -> Path:
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"


def _tree(root: Path, gz: bool = True, reports: Path | None = None) -> Path:
    """The fixture download: 8 images of 7 studies of 4 patients, plus a short and a non-numeric metadata row;
    the reports unzipped into `reports` (default: the root, as when the zip is unzipped there)."""
    ext = ".gz" if gz else ""
    meta = [[d, s, st, "CHEST (PA AND LAT)", v, "3056", "2544", date, "134509.015", "CHEST (PA AND LAT)",
             "postero-anterior", "Erect"] for d, s, st, v, date in IMAGES]
    meta.insert(3, ["d9a", "10000032"])                                              # wrong number of cells
    meta.insert(7, ["d9b", "abc", "55555555", "", "PA", "1", "1", "21800101", "0", "", "", ""])
    _write_csv(root / f"mimic-cxr-2.0.0-metadata.csv{ext}", META_HEADER, meta)
    _write_csv(root / f"mimic-cxr-2.0.0-split.csv{ext}", ["dicom_id", "study_id", "subject_id", "split"],
               [[d, st, s, SPLITS[st]] for d, s, st, _, _ in IMAGES if st in SPLITS])
    _write_csv(root / f"mimic-cxr-2.0.0-chexpert.csv{ext}", CHEXPERT_HEADER,
               [[s, st] + [LABELS[st].get(c, "") for c in CHEXPERT_HEADER[2:]]
                for st, s in dict((st, s) for _, s, st, _, _ in IMAGES).items()])
    for d, s, st, _, _ in IMAGES:
        if d != "d3a":
            _jpeg(_study_dir(root, s, st) / f"{d}.jpg")
        if st in REPORTS:
            path = _study_dir(reports or root, s, st).with_suffix(".txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(REPORTS[st])
    return root


def _mimic_iv(folder: Path) -> Path:
    """hosp/: patient 10000032 anchored at 52 in 2180; 11000011 at 70 in 2150 (a study in 2148: 68)."""
    _write_csv(folder / "hosp" / "patients.csv.gz", ["subject_id", "gender", "anchor_age", "anchor_year",
                                                     "anchor_year_group", "dod"],
               [["10000032", "F", "52", "2180", "2014 - 2016", "2180-09-09"],
                ["11000011", "M", "70", "2150", "2008 - 2010", ""],
                ["15555555", "M", "30", "2130", "2017 - 2019", ""]])
    header = ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type", "race"]
    adm = [["10000032", "1", "2180-05-06 22:23:00", "", "", "URGENT", "WHITE"],
           ["10000032", "2", "2180-06-26 18:27:00", "", "", "EW EMER.", "BLACK/AFRICAN AMERICAN"],
           ["10000032", "3", "2180-07-23 12:35:00", "", "", "EW EMER.", "WHITE - OTHER EUROPEAN"],
           ["10000032", "4", "2180-08-05 23:44:00", "", "", "EW EMER.", "UNKNOWN"],
           ["11000011", "5", "2149-03-01 10:00:00", "", "", "ELECTIVE", "PORTUGUESE"],
           ["11000011", "6", "2151-05-05 10:00:00", "", "", "ELECTIVE", "BLACK/CAPE VERDEAN"],
           ["11000011", "7", "2152-01-01 10:00:00", "", "", "ELECTIVE", "UNABLE TO OBTAIN"],
           ["11000011", "8", "2150-01-01 10:00:00", "", "", "ELECTIVE", "ASIAN - CHINESE"],
           ["15555555", "9", "2130-01-01 10:00:00", "", "", "ELECTIVE", "ASIAN"]]
    _write_csv(folder / "hosp" / "admissions.csv.gz", header, adm)
    return folder


def _cfg(root: Path, **kw) -> PrepareConfig:
    return PrepareConfig(dataset="mimic-cxr", root=str(root), **kw)


def _rows(root: Path, **kw) -> list[SourceRow | Excluded]:
    cfg = _cfg(root, **kw)
    return list(mimic_cxr.rows(mimic_cxr.find_root(root, cfg), cfg))


def _kept(items) -> dict[str, SourceRow]:
    return {r.image.stem: r for r in items if isinstance(r, SourceRow)}


def test_rows_ids_paths_views_splits_labels_and_reports(tmp_path):
    root = _tree(tmp_path / "mimic")
    got = _kept(_rows(root))
    assert sorted(got) == ["d1a", "d1b", "d2a", "d3a", "d5a"]
    pa, lat, ap = got["d1a"], got["d1b"], got["d2a"]
    assert pa.image == root / "files" / "p10" / "p10000032" / "s50414267" / "d1a.jpg"
    assert (pa.patient, pa.study, pa.view, pa.split) == ("10000032", "50414267", "PA", "train")
    assert (lat.view, lat.study) == ("LATERAL", "50414267") and got["d3a"].split == "validate"
    assert pa.labels == {"Pleural Effusion": 1.0, "Edema": -1.0, "Cardiomegaly": 0.0}   # blanks left out
    assert ap.labels == {"Edema": 1.0, "Support Devices": -1.0}
    assert pa.report == ("Large left pleural effusion is new. Small right effusion is new. Dr. was paged. "
                         "Large left pleural effusion.")                          # sections only, ___ gone
    assert lat.report == pa.report
    assert ap.report == "Mild pulmonary edema."                                   # CONCLUSION is the impression
    assert got["d3a"].report == "No acute process."
    assert got["d5a"].report == ""                       # no findings/impression: the runner drops it
    assert (pa.sex, pa.age, pa.race) == ("", None, "")   # no --mimic-iv
    assert pa.where == "mimic-cxr-2.0.0-metadata.csv.gz:2"


def test_bad_rows_are_excluded_with_their_line_and_reason(tmp_path):
    root = _tree(tmp_path / "mimic")
    out = [(r.reason, r.where) for r in _rows(root) if isinstance(r, Excluded)]
    name = "mimic-cxr-2.0.0-metadata.csv.gz"
    assert out == [("malformed row", f"{name}:5"), ("malformed label row", f"{name}:7"),
                   ("no report file", f"{name}:8"), ("malformed row", f"{name}:9"),
                   ("not in the split file", f"{name}:11")]
    detail = {r.reason: r.detail for r in _rows(root) if isinstance(r, Excluded)}
    assert "mimic-cxr-2.0.0-chexpert.csv.gz:" in detail["malformed label row"]
    assert "No Finding='yes'" in detail["malformed label row"]
    assert detail["no report file"].endswith("p12/p12000000/s57000001.txt")


def test_without_require_report_a_study_without_report_is_kept_empty(tmp_path):
    root = _tree(tmp_path / "mimic")
    got = _kept(_rows(root, require_report=False))
    assert got["d4a"].report == "" and got["d4a"].split == "test"


def test_mimic_iv_sex_age_across_years_and_race_rule(tmp_path):
    root = _tree(tmp_path / "mimic")
    iv = _mimic_iv(tmp_path / "mimiciv" / "3.1")
    got = _kept(_rows(root, mimic_iv=str(iv)))
    assert (got["d1a"].sex, got["d1a"].age) == ("F", 52)          # study in 2180 = anchor_year
    assert got["d2a"].age == 54                                   # 52 + (2182 - 2180)
    assert (got["d3a"].sex, got["d3a"].age) == ("M", 68)          # 70 + (2148 - 2150)
    assert got["d1a"].race == "WHITE"                             # 2 of 3 known admissions; UNKNOWN ignored
    assert got["d3a"].race == "BLACK"              # 1:1:1 tie -> the latest admission's (not first/last in file)
    assert (got["d5a"].sex, got["d5a"].age, got["d5a"].race) == ("", None, "")   # not in patients.csv


def test_age_arithmetic():
    assert mimic_cxr._age("21800506", 52, 2180) == 52
    assert mimic_cxr._age("21851231", 52, 2180) == 57
    assert mimic_cxr._age("21800506.0", 91, 2178) == 93
    assert mimic_cxr._age("2180", 52, 2180) is None and mimic_cxr._age("21800506", None, 2180) is None


def test_find_root_accepts_plain_csvs_and_the_wget_layout(tmp_path):
    plain = _tree(tmp_path / "plain", gz=False)
    assert mimic_cxr.find_root(plain, _cfg(plain)) == plain
    assert len(_kept(_rows(plain))) == 5
    version = _tree(tmp_path / "dl" / "physionet.org" / "files" / "mimic-cxr-jpg" / "2.1.0")
    assert mimic_cxr.find_root(tmp_path / "dl", _cfg(tmp_path / "dl")) == version
    assert datasets.get("mimic-cxr") is mimic_cxr


def test_reports_in_their_own_folder(tmp_path):
    reports = tmp_path / "physionet.org" / "files" / "mimic-cxr" / "2.0.0"
    root = _tree(tmp_path / "jpg", reports=reports)
    with pytest.raises(UserError, match=r"no report files under --root .*mimic-cxr-reports\.zip"):
        mimic_cxr.find_root(root, _cfg(root))
    for given in (reports, reports / "files"):
        assert _kept(_rows(root, reports=str(given)))["d1a"].report.endswith("Large left pleural effusion.")
    with pytest.raises(UserError, match="no report files under --reports"):
        mimic_cxr.find_root(root, _cfg(root, reports=str(tmp_path)))
    assert mimic_cxr.find_root(root, _cfg(root, require_report=False)) == root


def test_find_root_refuses_another_dataset_and_names_the_missing_file(tmp_path):
    chexpert = tmp_path / "chexpert"
    (chexpert / "CheXpert-v1.0-small").mkdir(parents=True)
    (chexpert / "CheXpert-v1.0-small" / "train.csv").write_text("Path,Sex,Age\n")
    with pytest.raises(UserError, match=r"does not look like MIMIC-CXR-JPG: mimic-cxr-2\.0\.0-metadata\.csv\.gz"):
        mimic_cxr.find_root(chexpert, _cfg(chexpert))
    root = _tree(tmp_path / "mimic")
    (root / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(UserError, match=r"mimic-cxr-2\.0\.0-split\.csv\.gz not found"):
        mimic_cxr.find_root(root, _cfg(root))
    (root / "mimic-cxr-2.0.0-metadata.csv.gz").unlink()
    with pytest.raises(UserError, match=r"mimic-cxr-2\.0\.0-metadata\.csv\.gz not found"):
        mimic_cxr.find_root(root, _cfg(root))


def test_wrong_mimic_iv_folder_and_wrong_metadata_file(tmp_path):
    root = _tree(tmp_path / "mimic")
    with pytest.raises(UserError, match=r"--mimic-iv .*: hosp/patients\.csv\.gz"):
        mimic_cxr.find_root(root, _cfg(root, mimic_iv=str(tmp_path)))
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    _write_csv(bad / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id"], [["d1a", "10000032"]])
    with pytest.raises(UserError, match=r"no column\(s\) study_id, ViewPosition, StudyDate"):
        mimic_cxr.find_root(bad, _cfg(bad))


def _manifest(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return {Path(r["source_image"]).stem: r for r in csv.DictReader(f)}


def test_end_to_end_through_the_runner(tmp_path):
    """prepare(): every metadata row kept or excluded for one reason; reports, labels, demographics, splits."""
    root = _tree(tmp_path / "mimic")
    iv = _mimic_iv(tmp_path / "mimiciv")
    out = tmp_path / "out"
    summary = prepare(_cfg(root, out=str(out), mimic_iv=str(iv), size=32, workers=1))
    assert summary["rows_read"] == 10 and summary["kept"] == 2
    assert summary["excluded"] == {"malformed row": 2, "malformed label row": 1, "no report file": 1,
                                   "not in the split file": 1, "view LATERAL (not in --views)": 1,
                                   "image file missing": 1, "no findings/impression text": 1}
    rows = _manifest(out)
    assert sorted(rows) == ["d1a", "d2a"]
    pa, ap = rows["d1a"], rows["d2a"]
    assert pa["report"].startswith("Large left pleural effusion is new.")
    assert (pa["labels"], pa["uncertain"]) == ("Pleural Effusion", "Edema")
    assert (ap["labels"], ap["uncertain"]) == ("Edema", "Support Devices")
    assert [pa[c] for c in ("patient", "study", "view", "sex", "age", "race", "split", "source")] == \
        ["10000032", "50414267", "PA", "F", "52", "WHITE", "train", "mimic-cxr"]
    assert (ap["view"], ap["age"]) == ("AP", "54")
    assert pa["source_image"] == "files/p10/p10000032/s50414267/d1a.jpg"
    with Image.open(out / pa["image"]) as img:
        assert img.size == (32, 32)
    assert summary["by_view"] == {"AP": 1, "PA": 1}


def test_runner_refuses_a_root_without_reports_before_writing(tmp_path):
    root = _tree(tmp_path / "jpg", reports=tmp_path / "elsewhere")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="mimic-cxr-reports.zip"):
        prepare(_cfg(root, out=str(out), workers=1))
    assert not out.exists()

"""CheXpert and CheXpert Plus dataset modules of finetune.prepare, on small fixture trees that follow each
download's documented layout (CheXpert-v1.0-small, the Stanford AIMI batches, CheXpert Plus's CSV + PNG/ +
chexbert_labels/), each with a malformed row, a missing file and a lateral view."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrcommon.errors import UserError
from finetune.prepare.config import PrepareConfig
from finetune.prepare.datasets import chexpert, chexpert_plus
from finetune.prepare.rows import CHEXPERT_14, Excluded, SourceRow, view_code
from finetune.prepare.runner import check, prepare

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_14]


def _image(path: Path, value: int = 120) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.add.outer(np.arange(80), np.arange(64)) + value).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def _labels(**marks: str) -> list[str]:
    return [marks.get(name.replace(" ", "_"), "") for name in CHEXPERT_14]


# (split file, path under the package, Sex, Age, Frontal/Lateral, AP/PA, labels, image written?)
TRAIN = [
    ("train/patient00001/study1/view1_frontal.jpg", "Female", "68", "Frontal", "AP",
     _labels(No_Finding="1.0", Pneumothorax="0.0", Support_Devices="1.0"), True),
    ("train/patient00002/study2/view1_frontal.jpg", "Male", "0", "Frontal", "PA",
     _labels(Cardiomegaly="-1.0", Edema="1.0"), True),
    ("train/patient00002/study1/view2_lateral.jpg", "Male", "83", "Lateral", "", _labels(Lung_Opacity="1.0"), True),
    ("train/patient00003/study1/view1_frontal.jpg", "Unknown", "45", "Frontal", "", _labels(), False),  # missing
    ("train/patient00004/study1/view1_frontal.jpg", "Female", "90", "Frontal", "LL", _labels(Fracture="1.0"), True),
]
VALID = [("valid/patient64541/study1/view1_frontal.jpg", "Male", "73", "Frontal", "AP",
          _labels(Cardiomegaly="1.0", Edema="0.0"), True)]
BAD_TRAIN = [  # one of each kind of malformed row, after the good ones (lines 7-10 of train.csv)
    ["{p}/train/patient00005/study1/view1_frontal.jpg", "Male", "50", "Frontal"],                  # too few cells
    ["{p}/train/patient00006/study1/view1_frontal.jpg", "Male", "50", "Frontal", "AP",
     *_labels(Edema="2.0")],                                                                       # bad label value
    ["{p}/somewhere/else.jpg", "Male", "50", "Frontal", "AP", *_labels()],                         # bad path
    ["{p}/train/patient00007/study1/view1_frontal.jpg", "Male", "fifty", "Frontal", "AP", *_labels()],  # bad age
]


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([HEADER, *rows])


def make_package(parent: Path, package: str = "CheXpert-v1.0-small") -> Path:
    """parent/<package>/ with train.csv, valid.csv and the JPEGs they name (one left out)."""
    folder = parent / package
    for name, entries, bad in (("train.csv", TRAIN, BAD_TRAIN), ("valid.csv", VALID, [])):
        rows = [[f"{package}/{p}", sex, age, fl, ap, *labels] for p, sex, age, fl, ap, labels, _ in entries]
        _write_csv(folder / name, rows + [[c.format(p=package) for c in b] for b in bad])
        for p, *_, written in entries:
            if written:
                _image(folder / p)
    return folder


def make_aimi(root: Path) -> Path:
    """The Stanford AIMI download: batch 1 holds the CSVs and valid/, training patients spread over batches 2-4
    without a train/ level; CSV paths start with CheXpert-v1.0/."""
    batch1 = root / chexpert.AIMI_BATCH1
    rows = [[f"CheXpert-v1.0/{p}", sex, age, fl, ap, *labels] for p, sex, age, fl, ap, labels, _ in TRAIN]
    _write_csv(batch1 / "train.csv", rows)
    _write_csv(batch1 / "valid.csv", [[f"CheXpert-v1.0/{p}", sex, age, fl, ap, *labels]
                                      for p, sex, age, fl, ap, labels, _ in VALID])
    for i, (p, *_, written) in enumerate(TRAIN):
        if written:  # patient00001 in batch 2, the others in batch 3
            _image(root / chexpert.AIMI_TRAIN[min(i, 1)] / p.removeprefix("train/"))
    _image(batch1 / VALID[0][0])
    return root


def _items(root: Path, module=chexpert) -> tuple[list[SourceRow], list[Excluded]]:
    items = list(module.rows(module.find_root(root, None), None))
    return [i for i in items if isinstance(i, SourceRow)], [i for i in items if isinstance(i, Excluded)]


# --- CheXpert -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("package", ["CheXpert-v1.0-small", "CheXpert-v1.0"])
@pytest.mark.parametrize("given", ["parent", "package"])
def test_find_root_takes_the_parent_or_the_package_folder(tmp_path, package, given):
    folder = make_package(tmp_path, package)
    found = chexpert.find_root(tmp_path if given == "parent" else folder, None)
    assert found == folder
    assert chexpert.find_root(found, None) == folder  # what the runner hands back to rows()


def test_rows_read_every_column(tmp_path):
    folder = make_package(tmp_path)
    kept, _ = _items(tmp_path)
    first = kept[0]
    assert first == SourceRow(image=folder / TRAIN[0][0], patient="patient00001", study="patient00001/study1",
                              view="AP", labels={"No Finding": 1.0, "Pneumothorax": 0.0, "Support Devices": 1.0},
                              sex="F", age=68, split="train", where="train.csv:2")
    by_path = {r.image.relative_to(folder).as_posix(): r for r in kept}
    assert set(by_path) == {p for p, *_ in TRAIN + VALID}  # the missing file is still yielded: the runner counts it
    pa = by_path["train/patient00002/study2/view1_frontal.jpg"]
    assert (pa.view, pa.age, pa.sex, pa.labels) == ("PA", None, "M", {"Cardiomegaly": -1.0, "Edema": 1.0})
    assert view_code(by_path["train/patient00002/study1/view2_lateral.jpg"].view) == "LATERAL"
    unknown = by_path["train/patient00003/study1/view1_frontal.jpg"]
    assert (view_code(unknown.view), unknown.sex, unknown.labels) == ("FRONTAL", "", {})
    assert view_code(by_path["train/patient00004/study1/view1_frontal.jpg"].view) == "FRONTAL LL"
    valid = by_path["valid/patient64541/study1/view1_frontal.jpg"]
    assert (valid.split, valid.where, valid.study) == ("validate", "valid.csv:2", "patient64541/study1")


def test_malformed_rows_are_excluded_with_their_line(tmp_path):
    make_package(tmp_path)
    _, excluded = _items(tmp_path)
    assert [(e.reason, e.where) for e in excluded] == [("malformed row", f"train.csv:{n}") for n in (7, 8, 9, 10)]
    details = [e.detail for e in excluded]
    assert "4 cells" in details[0] and "Edema is '2.0'" in details[1]
    assert "somewhere/else.jpg" in details[2] and "'fifty'" in details[3]


def test_aimi_download_finds_each_patient_in_its_batch(tmp_path):
    make_aimi(tmp_path)
    for given in (tmp_path, tmp_path / chexpert.AIMI_BATCH1):
        assert chexpert.find_root(given, None) == tmp_path
    kept, excluded = _items(tmp_path)
    assert not excluded
    images = {r.image.relative_to(tmp_path).as_posix() for r in kept}
    assert "CheXpert-v1.0 batch 2 (train 1)/patient00001/study1/view1_frontal.jpg" in images
    assert "CheXpert-v1.0 batch 3 (train 2)/patient00002/study2/view1_frontal.jpg" in images
    assert "CheXpert-v1.0 batch 1 (validate & csv)/valid/patient64541/study1/view1_frontal.jpg" in images
    assert sum(r.image.is_file() for r in kept) == len(kept) - 1  # only the one never written is missing


def test_aimi_download_falls_back_to_the_chexbert_labels(tmp_path):
    make_aimi(tmp_path)
    batch1 = tmp_path / chexpert.AIMI_BATCH1
    (batch1 / "train.csv").rename(tmp_path / "train_cheXbert.csv")
    kept, _ = _items(tmp_path)
    assert sum(r.split == "train" for r in kept) == len(TRAIN)


def test_find_root_refuses_another_dataset(tmp_path):
    (tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz").write_bytes(b"")
    (tmp_path / "train.csv").write_text("image_id,class_name,x_min\nabc,Aortic enlargement,1\n")  # VinDr-like
    with pytest.raises(UserError, match=r"does not look like CheXpert: no train\.csv or valid\.csv with a Path "
                                        r"column.*CheXpert-v1\.0-small/.*--root"):
        chexpert.find_root(tmp_path, None)


def test_prepare_end_to_end(tmp_path):
    make_package(tmp_path / "download")
    cfg = PrepareConfig(dataset="chexpert", root=str(tmp_path / "download"), out=str(tmp_path / "out"), size=32,
                        workers=1)
    summary = prepare(cfg)
    assert summary["kept"] == 3 and summary["rows_read"] == 10
    assert dict(summary["excluded"]) == {"malformed row": 4, "view LATERAL (not in --views)": 1,
                                         "view FRONTAL LL (not in --views)": 1, "image file missing": 1}
    with open(tmp_path / "out" / "manifest.csv", newline="") as f:
        manifest = {r["patient"]: r for r in csv.DictReader(f)}
    first = manifest["patient00001"]
    assert first["report"] == "AP chest x-ray. Support devices." and first["labels"] == "No Finding|Support Devices"
    assert manifest["patient00002"]["uncertain"] == "Cardiomegaly" and manifest["patient00002"]["age"] == ""
    assert manifest["patient64541"]["split"] == "validate" and manifest["patient64541"]["source"] == "chexpert"
    assert first["image"] == "images/train/patient00001/study1/view1_frontal.png"
    assert (tmp_path / "out" / first["image"]).is_file()
    assert first["source_image"] == "train/patient00001/study1/view1_frontal.jpg"


# --- CheXpert Plus ------------------------------------------------------------------------------------------

PLUS_HEADER = ["", "path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id",
               "patient_report_date_order", "report", "section_narrative", "section_clinical_history",
               "section_history", "section_comparison", "section_technique", "section_procedure_comments",
               "section_findings", "section_impression", "section_end_of_impression", "section_summary",
               "section_accession_number", "age", "sex", "race", "ethnicity", "interpreter_needed",
               "insurance_type", "recent_bmi", "deceased", "split"]
FINDINGS = "The heart is enlarged.\nNo pleural effusion."
IMPRESSION = "1. Cardiomegaly.\n2.  No pneumothorax."
# (path_to_image, frontal_lateral, ap_pa, findings, impression, age, sex, race, ethnicity, split, image written?)
PLUS = [
    ("train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP", FINDINGS, IMPRESSION, "68", "Female",
     "White, non-Hispanic", "Non-Hispanic/Non-Latino", "train", True),
    ("train/patient00001/study1/view2_lateral.jpg", "Lateral", "", FINDINGS, IMPRESSION, "68", "Female",
     "White, non-Hispanic", "Non-Hispanic/Non-Latino", "train", True),
    ("train/patient00002/study1/view1_frontal.jpg", "Frontal", "PA", "", "No acute disease.", "0", "Male",
     "Other", "Hispanic/Latino", "train", True),
    ("train/patient00003/study1/view1_frontal.jpg", "Frontal", "", "Clear lungs.", "", "45", "Male",
     "Patient Refused", "Unknown", "train", False),                                            # missing file
    ("valid/patient64541/study1/view1_frontal.jpg", "Frontal", "AP", "", "Normal chest.", "73", "Male",
     "Black or African American", "Non-Hispanic/Non-Latino", "valid", True),
    ("train/patient00004/study1/view1_frontal.jpg", "Frontal", "AP", "", "", "50", "Female", "Asian", "", "train",
     True),                                                                                     # no report text
]
PLUS_BAD = [  # raw CSV lines: too few cells, a path that is not CheXpert's, an unknown split
    "6,train/patient00005/study1/view1_frontal.jpg,x.dcm,Frontal",
    ",".join(["7", "somewhere/else.jpg"] + [""] * (len(PLUS_HEADER) - 2)),
    "8,train/patient00006/study1/view1_frontal.jpg,,Frontal,AP,patient00006,1,,,,,,,,A.,B.,,,,40,Male,,,,,,,holdout",
]
PLUS_LABELS = [
    {"path_to_image": PLUS[0][0], "Cardiomegaly": 1.0, "Pleural Effusion": 0.0, "Pneumothorax": 0.0, "Edema": None},
    {"path_to_image": PLUS[1][0], "Cardiomegaly": 1.0},
    {"path_to_image": PLUS[2][0], "No Finding": 1.0, "Edema": -1.0},
]


def make_plus(root: Path, png: str | None = "PNG", labels: str = "chexbert_labels/impression_fixed.json") -> Path:
    """The CheXpert Plus CSV (multi-line report cells, as the real one has), a label file with two unreadable
    lines, and the images: the PNG release under `png` (a folder under root), or CheXpert JPEGs when None."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / chexpert_plus.CSV_NAME, "w", newline="") as f:
        writer = csv.DictWriter(f, PLUS_HEADER, restval="")
        writer.writeheader()
        for i, (path, fl, ap, findings, impression, age, sex, race, eth, split, written) in enumerate(PLUS):
            patient = path.split("/")[1]
            writer.writerow({"": i, "path_to_image": path, "path_to_dcm": path.replace(".jpg", ".dcm"),
                             "frontal_lateral": fl, "ap_pa": ap, "deid_patient_id": patient,
                             "report": f"FINDINGS: {findings} IMPRESSION: {impression}",
                             "section_findings": findings, "section_impression": impression, "age": age,
                             "sex": sex, "race": race, "ethnicity": eth, "split": split})
            if written:
                if png is None:
                    _image(root / "CheXpert-v1.0-small" / path)
                else:
                    _image(root / png / Path(path).with_suffix(".png"))
        f.write("\n".join(PLUS_BAD) + "\n")
    if png is None:
        _write_csv(root / "CheXpert-v1.0-small" / "valid.csv", [])
    lines = [json.dumps(record) for record in PLUS_LABELS]
    lines[1:1] = ["{not json", json.dumps({"path_to_image": PLUS[3][0], "Edema": 2.0})]
    (root / labels).parent.mkdir(parents=True, exist_ok=True)
    (root / labels).write_text("\n".join(lines) + "\n")
    return root


def test_plus_rows_read_reports_labels_and_demographics(tmp_path):
    make_plus(tmp_path)
    kept, excluded = _items(tmp_path, chexpert_plus)
    assert len(kept) == len(PLUS)
    first = kept[0]
    assert first == SourceRow(
        image=tmp_path / "PNG/train/patient00001/study1/view1_frontal.png", patient="patient00001",
        study="patient00001/study1", view="AP",
        report="The heart is enlarged. No pleural effusion. 1. Cardiomegaly. 2. No pneumothorax.",
        labels={"Cardiomegaly": 1.0, "Pleural Effusion": 0.0, "Pneumothorax": 0.0}, sex="F", age=68, race="WHITE",
        split="train", where=first.where)
    assert first.where.startswith("df_chexpert_plus_240401.csv:")
    lateral, hispanic, missing, valid, empty = kept[1:]
    assert view_code(lateral.view) == "LATERAL" and lateral.labels == {"Cardiomegaly": 1.0}
    assert (hispanic.view, hispanic.age, hispanic.race, hispanic.labels) == (
        "PA", None, "HISPANIC/LATINO", {"No Finding": 1.0, "Edema": -1.0})
    assert hispanic.report == "No acute disease."
    assert (view_code(missing.view), missing.race, missing.labels, missing.image.is_file()) == ("FRONTAL", "", {},
                                                                                                False)
    assert (valid.split, valid.race, valid.labels) == ("validate", "BLACK", {})
    assert empty.report == ""
    assert [(e.reason, e.where) for e in excluded] == [
        ("malformed label line", "chexbert_labels/impression_fixed.json:2"),
        ("malformed label line", "chexbert_labels/impression_fixed.json:3"),
        *[("malformed row", f"df_chexpert_plus_240401.csv:{n}") for n in (16, 17, 18)]]
    assert "4 cells" in excluded[2].detail and "somewhere/else.jpg" in excluded[3].detail
    assert "'holdout'" in excluded[4].detail


@pytest.mark.parametrize("png", ["PNG/PNG", "."])
def test_plus_png_tree_nested_or_at_the_root(tmp_path, png):
    make_plus(tmp_path, png=png, labels="report_fixed.json")
    kept, _ = _items(tmp_path, chexpert_plus)
    assert kept[0].image == tmp_path / png / "train/patient00001/study1/view1_frontal.png"
    assert kept[0].image.is_file() and kept[0].labels["Cardiomegaly"] == 1.0


@pytest.mark.parametrize("csv_inside_package", [False, True])
def test_plus_reads_chexpert_jpegs_without_the_png_release(tmp_path, csv_inside_package):
    make_plus(tmp_path, png=None)
    package = tmp_path / "CheXpert-v1.0-small"
    root = package if csv_inside_package else tmp_path
    if csv_inside_package:  # its train/ holds CheXpert's JPEGs: not to be taken for the PNG release
        (tmp_path / chexpert_plus.CSV_NAME).rename(package / chexpert_plus.CSV_NAME)
    kept, _ = _items(root, chexpert_plus)
    assert kept[0].image == package / "train/patient00001/study1/view1_frontal.jpg"
    assert [r.image.is_file() for r in kept] == [p[-1] for p in PLUS]


def test_plus_find_root_refuses_other_folders(tmp_path):
    mimic = tmp_path / "mimic"
    mimic.mkdir()
    (mimic / "mimic-cxr-2.0.0-metadata.csv.gz").write_bytes(b"")
    with pytest.raises(UserError, match=r"does not look like CheXpert Plus: df_chexpert_plus_240401\.csv not found"):
        chexpert_plus.find_root(mimic, None)
    bare = tmp_path / "csv-only"
    bare.mkdir()
    (bare / chexpert_plus.CSV_NAME).write_text(",".join(PLUS_HEADER) + "\n")
    with pytest.raises(UserError, match=r"no images for df_chexpert_plus_240401\.csv — unzip .*\(PNG/train/"):
        chexpert_plus.find_root(bare, None)


def test_plus_label_file_as_a_json_array_is_refused(tmp_path):
    make_plus(tmp_path)
    (tmp_path / "chexbert_labels/impression_fixed.json").write_text(json.dumps(PLUS_LABELS))
    with pytest.raises(UserError, match="one JSON object per line"):
        _items(tmp_path, chexpert_plus)


def test_plus_prepare_end_to_end(tmp_path):
    make_plus(tmp_path / "download")
    cfg = PrepareConfig(dataset="chexpert-plus", root=str(tmp_path / "download"), out=str(tmp_path / "out"),
                        size=32, workers=1)
    summary = prepare(cfg)
    assert summary["kept"] == 3 and summary["rows_read"] == 11
    assert dict(summary["excluded"]) == {"malformed row": 3, "malformed label line": 2,
                                         "view LATERAL (not in --views)": 1, "image file missing": 1,
                                         "no findings/impression text": 1}
    with open(tmp_path / "out" / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    assert [r["patient"] for r in manifest] == ["patient00001", "patient00002", "patient64541"]
    assert manifest[0]["report"].startswith("The heart is enlarged.") and manifest[0]["labels"] == "Cardiomegaly"
    assert (manifest[1]["uncertain"], manifest[1]["race"], manifest[2]["split"]) == ("Edema", "HISPANIC/LATINO",
                                                                                      "validate")
    assert manifest[0]["image"] == "images/PNG/train/patient00001/study1/view1_frontal.png"
    assert all((tmp_path / "out" / r["image"]).is_file() for r in manifest)


def test_wrong_dataset_is_named(tmp_path):
    make_plus(tmp_path / "download")
    cfg = PrepareConfig(dataset="chexpert", root=str(tmp_path / "download"), out=str(tmp_path / "out"))
    with pytest.raises(UserError, match="holds chexpert-plus, not chexpert"):
        check(cfg)
    assert not (tmp_path / "out").exists()

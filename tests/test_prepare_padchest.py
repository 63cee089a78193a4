"""PadChest dataset module: a small fixture tree in the BIMCV layout (CSV + ImageDir folders, or flat PNGs)."""
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
from finetune.prepare.datasets import padchest
from finetune.prepare.rows import Excluded, SourceRow, apply_labels, view_code
from finetune.prepare.runner import prepare

CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
HEADER = ["", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
          "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric", "Modality_DICOM", "Labels",
          "Localizations", "Report", "MethodLabel"]


def _png16(path: Path, value: int = 40000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((20, 16), value, dtype=np.uint16)
    a[5:15, 4:12] = 1000
    Image.fromarray(a).save(path)


def _row(n: int, image_dir: str, projection: str, labels: str, report: str = " cardiomegali .",
         patient: str = "p1", sex: str = "F", birth: str = "1938.0", date: str = "20150312") -> list[str]:
    return [str(n), f"img{n}.png", image_dir, date, f"s{n}", patient, birth, sex, "POSTEROANTERIOR", projection,
            "Manual review of DICOM fields", "No", "CR", labels, "[]", report, "Physician"]


def _tree(root: Path, gz: bool = False) -> Path:
    """Ten rows: nested and flat images, a lateral, an AP_horizontal, one missing PNG, one truncated PNG, a
    malformed label list, empty labels, an 'exclude' label, only 'unchanged', and a short row."""
    rows = [_row(1, "0", "PA", "['pleural effusion', 'cardiomegaly']", " derram pleural . cardiomegali . "),
            _row(2, "1", "L", "['normal']", patient="p2", sex="M", birth="1980.0", date="20100101"),
            _row(3, "1", "AP_horizontal", "[' nodule', 'NSG tube', 'unchanged']", " . . . .", patient="p3", sex="O",
                 birth=""),
            _row(4, "2", "PA", "['rib fracture']", patient="p4"),              # its PNG is missing
            _row(5, "0", "PA", "['normal'", patient="p5"),                     # malformed list literal
            _row(6, "0", "PA", "", patient="p6"),                              # no labels
            _row(7, "0", "PA", "['exclude']", patient="p7"),
            _row(8, "0", "PA", "['unchanged']", patient="p8"),
            _row(10, "3", "PA", "['cardiomegaly']", patient="p10")]              # its PNG is truncated
    short = ["9", "img9.png", "0", "20150312"]                                  # wrong number of cells
    _png16(root / "0" / "img1.png")
    _png16(root / "img2.png")                                                  # flat copy, ImageDir 1 not unpacked
    _png16(root / "images" / "img3.png")                                       # flat under images/
    for n in (5, 6, 7, 8, 9):
        _png16(root / "0" / f"img{n}.png")
    _png16(root / "3" / "img10.png")
    (root / "3" / "img10.png").write_bytes((root / "3" / "img10.png").read_bytes()[:60])
    path = root / (CSV_NAME + (".gz" if gz else ""))
    with (gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")) as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows[:4])
        w.writerow(short)
        w.writerows(rows[4:])
    return root


def _rows(root: Path, **kw) -> list[SourceRow | Excluded]:
    cfg = PrepareConfig(dataset="padchest", root=str(root), **kw)
    return list(padchest.rows(padchest.find_root(root, cfg), cfg))


def test_rows_values_views_ages_and_both_image_layouts(tmp_path):
    root = _tree(tmp_path / "pc")
    _png16(root / "img1.png")                                  # a stray flat copy: the ImageDir one comes first
    got = {r.image.name: r for r in _rows(root) if isinstance(r, SourceRow)}
    assert sorted(got) == ["img1.png", "img10.png", "img2.png", "img3.png", "img4.png"]
    one, two, three, four = (got[f"img{n}.png"] for n in (1, 2, 3, 4))
    assert one.image == root / "0" / "img1.png" and one.image.is_file()
    assert (one.patient, one.study, one.view, one.sex, one.age, one.split) == ("p1", "s1", "PA", "F", 77, "")
    assert one.labels == {"pleural effusion": 1.0, "cardiomegaly": 1.0}
    assert one.report == "" and one.where == f"{CSV_NAME}:2"
    assert two.image == root / "img2.png" and view_code(two.view) == "LATERAL" and two.age == 30
    assert three.image == root / "images" / "img3.png" and view_code(three.view) == "AP" and three.sex == ""
    assert three.labels == {"nodule": 1.0, "NSG tube": 1.0} and three.age is None  # 'unchanged' dropped, no birth
    assert four.image == root / "2" / "img4.png" and not four.image.exists()      # the runner counts it missing


def test_bad_rows_are_excluded_with_their_line_and_reason(tmp_path):
    excluded = [r for r in _rows(_tree(tmp_path / "pc")) if isinstance(r, Excluded)]
    assert [(e.reason, e.where) for e in excluded] == [
        ("malformed row", f"{CSV_NAME}:6"), ("malformed labels", f"{CSV_NAME}:7"), ("no labels", f"{CSV_NAME}:8"),
        ("labelled 'exclude'", f"{CSV_NAME}:9"), ("no labels", f"{CSV_NAME}:10")]
    assert "['normal'" in excluded[1].detail
    assert padchest._image_path(tmp_path, [], "x1", "a.png") is None                 # ImageDir not a number
    assert padchest._image_path(tmp_path, [], "7.0", "a.png") == tmp_path / "7" / "a.png"


def test_labels_map_onto_chexpert_and_keep_other_names():
    positive, unsure, names = apply_labels({"nodule": 1.0, "NSG tube": 1.0, "aortic elongation": 1.0,
                                            "loculated pleural effusion": 1.0}, padchest.LABELS, "ignore")
    assert positive == ["Lung Lesion", "Pleural Effusion", "Support Devices", "aortic elongation"]
    assert unsure == [] and names == ["nodule", "NSG tube", "aortic elongation", "loculated pleural effusion"]
    assert padchest.LABELS["normal"] == "No Finding" and padchest.LABELS["clavicle fracture"] == "Fracture"


def test_spanish_report_option(tmp_path):
    root = _tree(tmp_path / "pc")
    assert padchest.has_reports(PrepareConfig()) is False and padchest.HAS_REPORTS is False
    assert padchest.has_reports(PrepareConfig(padchest_report=True)) is True
    got = {r.image.name: r for r in _rows(root, padchest_report=True) if isinstance(r, SourceRow)}
    assert got["img1.png"].report == "derram pleural . cardiomegali ."
    assert got["img2.png"].report == "cardiomegali ." and got["img3.png"].report == ""
    assert padchest._report(" . . . . ") == "" and padchest._report(" nan") == ""


def test_find_root_accepts_gz_and_a_parent_folder(tmp_path):
    root = _tree(tmp_path / "download" / "padchest", gz=True)
    cfg = PrepareConfig()
    assert padchest.find_root(root, cfg) == root
    assert padchest.find_root(tmp_path / "download", cfg) == root
    assert len([r for r in padchest.rows(root, cfg) if isinstance(r, SourceRow)]) == 5
    assert datasets.get("padchest") is padchest


def test_find_root_refuses_another_dataset(tmp_path):
    nih = tmp_path / "chestxray14"
    nih.mkdir()
    (nih / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels\n00000001_000.png,Effusion\n")
    with pytest.raises(UserError, match=r"does not look like PadChest: PADCHEST_chest_x_ray_images_labels_160K"):
        padchest.find_root(nih, PrepareConfig())
    with pytest.raises(UserError, match="does not look like PadChest"):
        padchest.find_root(tmp_path / "nowhere", PrepareConfig())


def test_a_csv_without_the_padchest_columns_is_refused_before_any_row(tmp_path):
    root = tmp_path / "pc"
    root.mkdir()
    (root / CSV_NAME).write_text("ImageID,Labels\nimg1.png,['normal']\n")
    with pytest.raises(UserError, match=r"no column\(s\) ImageDir"):
        _rows(root)


def test_two_trees_same_rows(tmp_path):
    """The flat download (every PNG in one folder) yields the same rows as the official one."""
    official = _tree(tmp_path / "official")
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(official / CSV_NAME, flat / CSV_NAME)
    for png in official.rglob("*.png"):
        shutil.copy(png, flat / png.name)
    a, b = _rows(official), _rows(flat)
    assert [type(r) for r in a] == [type(r) for r in b]
    for x, y in zip(a, b):
        if isinstance(x, SourceRow):
            assert (x.image.name, x.labels, x.patient, x.age) == (y.image.name, y.labels, y.patient, y.age)
            assert y.image.parent == flat or not x.image.exists()


def _manifest(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return {r["source_image"]: r for r in csv.DictReader(f)}


def test_end_to_end_through_the_runner(tmp_path):
    """prepare(): label captions, CheXpert labels, 16-bit PNGs, every left-out row counted under its reason."""
    root = _tree(tmp_path / "pc")
    out = tmp_path / "out"
    summary = prepare(PrepareConfig(dataset="padchest", root=str(root), out=str(out), size=32, workers=1))
    assert summary["rows_read"] == 10 and summary["kept"] == 2
    assert summary["excluded"] == {"malformed row": 1, "malformed labels": 1, "no labels": 2,
                                   "labelled 'exclude'": 1, "view LATERAL (not in --views)": 1,
                                   "image file missing": 1, "unreadable image": 1}
    rows = _manifest(out)
    assert sorted(rows) == ["0/img1.png", "images/img3.png"]
    one, three = rows["0/img1.png"], rows["images/img3.png"]
    assert one["report"] == "PA chest x-ray. Pleural effusion, cardiomegaly."
    assert one["labels"] == "Cardiomegaly|Pleural Effusion" and three["labels"] == "Lung Lesion|Support Devices"
    assert (one["view"], one["sex"], one["age"], one["source"]) == ("PA", "F", "77", "padchest")
    assert (three["view"], three["sex"], three["age"]) == ("AP", "", "")
    assert one["split"] in ("train", "validate", "test")
    with Image.open(out / one["image"]) as img:
        assert img.size == (32, 32) and img.mode.startswith("I;16")
        pixels = np.asarray(img)
    assert pixels.max() > 255                                     # 16-bit kept, not squashed to 8
    assert "unreadable image" in (out / "excluded.csv").read_text()


def test_end_to_end_spanish_report(tmp_path):
    """--padchest-report: the stemmed report is the report; a row whose report holds no word is dropped."""
    root = _tree(tmp_path / "pc")
    out = tmp_path / "out"
    summary = prepare(PrepareConfig(dataset="padchest", root=str(root), out=str(out), size=32, workers=1,
                                    padchest_report=True))
    assert summary["kept"] == 1 and summary["excluded"]["no findings/impression text"] == 1
    assert _manifest(out)["0/img1.png"]["report"] == "derram pleural . cardiomegali ."


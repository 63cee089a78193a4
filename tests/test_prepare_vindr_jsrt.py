"""VinDr-CXR and JSRT dataset modules: small fixture trees in each download's layout (PhysioNet and Kaggle
VinDr with DICOMs written by pydicom; JSRT raw films and its CR-ended clinical text files), each with malformed
rows, a missing file and (VinDr) a lateral header; the reader merge, the JSRT decoder, and one run through
finetune.prepare.runner.prepare per dataset."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from cxrcommon.errors import UserError
from finetune.prepare import runner
from finetune.prepare.config import PrepareConfig
from finetune.prepare.datasets import jsrt, vindr_cxr
from finetune.prepare.rows import Excluded, SourceRow, seeded_split, view_code

FINDINGS = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
            "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
            "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening",
            "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia",
            "Tuberculosis", "Other diseases", "No finding"]


# ---------------------------------------------------------------- VinDr-CXR fixtures

def _dicom(path: Path, **header) -> None:
    """A 40x32 DX DICOM (a bright square on dark) with the given header attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    pixels = np.full((40, 32), 300, dtype=np.uint16)
    pixels[10:30, 8:24] = 3800
    ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    for key, value in header.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _reader(image_id: str, rad: str, *marked: str, columns=FINDINGS, **cells) -> list[str]:
    return [image_id, rad, *("1" if c in marked else cells.get(c, "0") for c in columns)]


def _physionet(root: Path) -> Path:
    """Train: aaa1 (readers split 2:1 on Cardiomegaly, one says No finding), bbb2 (all No finding; sex/age in
    its header), ccc3 (lateral header), ddd4 (no DICOM; one of its reader rows has a bad cell), and a short
    row, a path-like image_id and a bad value. Test: eee5, one consensus row with a blank cell."""
    train = [_reader("aaa1", "R1", "Cardiomegaly", "Pleural effusion"), _reader("aaa1", "R2", "Cardiomegaly"),
             _reader("aaa1", "R3", "No finding"),
             _reader("bbb2", "R4", "No finding"), _reader("bbb2", "R5", "No finding"),
             _reader("bbb2", "R6", "No finding"),
             _reader("ccc3", "R1", "Nodule/Mass"), _reader("ccc3", "R2", "Nodule/Mass"), _reader("ccc3", "R3"),
             _reader("ddd4", "R1", "Pneumothorax"), _reader("ddd4", "R2", "Pneumothorax"),
             _reader("ddd4", "R3", Edema="2"),                                     # a cell that is not 0/1
             ["fff6", "R1", "0"],                                                 # wrong number of cells
             _reader("../x", "R1", "Edema")]                                      # not an image id
    test_columns = [("Other disease" if c == "Other diseases" else c) for c in FINDINGS]
    test = [["eee5", "R8", *("1" if c in ("Pneumothorax", "Other disease") else "" if c == "Edema" else "0"
                             for c in test_columns)]]
    (root / "annotations").mkdir(parents=True)
    for name, columns, body in (("image_labels_train.csv", FINDINGS, train),
                                ("image_labels_test.csv", test_columns, test)):
        with open(root / "annotations" / name, "w", newline="") as f:
            csv.writer(f).writerows([["image_id", "rad_id", *columns], *body])
    _dicom(root / "train" / "aaa1.dicom", PatientSex="", PatientAge="")
    _dicom(root / "train" / "bbb2.dicom", PatientSex="F", PatientAge="054Y", ViewPosition="PA")
    _dicom(root / "train" / "ccc3.dicom", PatientSex="M", PatientAge="061Y", ViewPosition="LL")
    _dicom(root / "test" / "eee5.dicom", PatientSex="M", PatientAge="030Y")
    return root


def _kaggle(root: Path) -> Path:
    """train.csv, one row per box: k1 (Cardiomegaly by 2 readers in 3 boxes, Aortic enlargement by 1), k2
    (all No finding), k3 (lateral header), k4 (one reader listed, no DICOM); a row without class_name and a
    short row."""
    box = ["10.0", "20.0", "30.0", "40.0"]
    body = [["k1", "Cardiomegaly", "3", "R1", *box], ["k1", "Cardiomegaly", "3", "R1", *box],
            ["k1", "Cardiomegaly", "3", "R2", *box], ["k1", "Aortic enlargement", "0", "R3", *box],
            ["k2", "No finding", "14", "R4", "", "", "", ""], ["k2", "No finding", "14", "R5", "", "", "", ""],
            ["k2", "No finding", "14", "R6", "", "", "", ""],
            ["k3", "Pleural effusion", "10", "R1", *box], ["k3", "Pleural effusion", "10", "R2", *box],
            ["k4", "ILD", "5", "R1", *box],
            ["k2", "", "14", "R7", "", "", "", ""],
            ["k1", "Cardiomegaly"]]
    root.mkdir(parents=True)
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"],
                                 *body])
    _dicom(root / "train" / "k1.dicom")
    _dicom(root / "train" / "k2.dicom", PatientSex="M", PatientAge="045Y")
    _dicom(root / "train" / "k3.dicom", ViewPosition="LATERAL")
    return root


def _vindr_rows(root: Path, **kw) -> tuple[dict[str, SourceRow], list[Excluded]]:
    cfg = PrepareConfig(dataset="vindr-cxr", root=str(root), **kw)
    items = list(vindr_cxr.rows(vindr_cxr.find_root(root, cfg), cfg))
    return ({r.patient: r for r in items if isinstance(r, SourceRow)}, [r for r in items if isinstance(r, Excluded)])


def _positive(row: SourceRow) -> set[str]:
    return {name for name, value in row.labels.items() if value == 1.0}


def test_vindr_physionet_rows_merge_readers_and_read_the_header(tmp_path):
    root = _physionet(tmp_path / "vindr")
    got, excluded = _vindr_rows(root, val_fraction=0.0)
    assert sorted(got) == ["aaa1", "bbb2", "ccc3", "ddd4", "eee5"]
    a, b, c, d, e = (got[k] for k in ("aaa1", "bbb2", "ccc3", "ddd4", "eee5"))
    assert a.image == root / "train" / "aaa1.dicom" and a.where == "image_labels_train.csv:2"
    assert _positive(a) == {"Cardiomegaly"} and a.labels["Pleural effusion"] == 0.0 and a.labels["No finding"] == 0.0
    assert set(a.labels) == set(FINDINGS)                           # every finding of the file, 1 or 0
    assert (a.patient, a.study, a.view, a.sex, a.age, a.split) == ("aaa1", "aaa1", "PA", "", None, "train")
    assert _positive(b) == {"No finding"} and (b.sex, b.age, b.view) == ("F", 54, "PA")
    assert _positive(c) == {"Nodule/Mass"} and view_code(c.view) == "LATERAL" and (c.sex, c.age) == ("M", 61)
    assert _positive(d) == {"Pneumothorax"}                         # the two readers left both marked it
    assert not d.image.is_file() and (d.sex, d.age, d.view) == ("", None, "PA")
    assert e.image == root / "test" / "eee5.dicom" and e.split == "test" and e.where == "image_labels_test.csv:2"
    assert _positive(e) == {"Pneumothorax", "Other diseases"} and e.labels["Edema"] == 0.0   # blank cell: 0
    assert (e.sex, e.age) == ("M", 30)
    assert [(x.reason, x.where) for x in excluded] == [("malformed row", f"image_labels_train.csv:{n}")
                                                      for n in (13, 14, 15)]
    assert "Edema='2'" in excluded[0].detail and "cells" in excluded[1].detail and "'../x'" in excluded[2].detail


@pytest.mark.parametrize("policy, aaa1, ccc3", [("any", {"Cardiomegaly", "Pleural effusion"}, {"Nodule/Mass"}),
                                                ("all", set(), set())])
def test_vindr_readers_policy(tmp_path, policy, aaa1, ccc3):
    got, _ = _vindr_rows(_physionet(tmp_path / "vindr"), readers=policy)
    assert _positive(got["aaa1"]) == aaa1 and _positive(got["ccc3"]) == ccc3
    assert _positive(got["bbb2"]) == {"No finding"}                 # unanimous either way
    assert _positive(got["eee5"]) == {"Pneumothorax", "Other diseases"}   # one consensus row: its own marks


def test_merge_counts_the_readers_present_and_never_pairs_no_finding_with_a_finding():
    two = [{"Edema"}, set()]
    assert vindr_cxr.merge(two, ["Edema", "No finding"], "majority") == {"Edema": 0.0, "No finding": 0.0}
    assert vindr_cxr.merge(two, ["Edema"], "any") == {"Edema": 1.0}
    three = [{"Edema"}, {"No finding"}, {"No finding"}]
    assert vindr_cxr.merge(three, [], "majority") == {"Edema": 0.0, "No finding": 1.0}
    assert vindr_cxr.merge(three, [], "any") == {"Edema": 1.0, "No finding": 0.0}
    assert vindr_cxr.merge(three, [], "all") == {"Edema": 0.0, "No finding": 0.0}


def test_vindr_validate_is_a_seeded_share_of_train_and_test_stays_whole(tmp_path):
    root = _physionet(tmp_path / "vindr")
    got, _ = _vindr_rows(root, val_fraction=0.5, test_fraction=0.3, seed=7)
    for image_id, row in got.items():
        want = "test" if image_id == "eee5" else (
            "validate" if seeded_split(image_id, 7, 0.5, 0.0) == "validate" else "train")
        assert row.split == want
    assert {r.split for r in got.values()} >= {"test"}
    assert {r.split for r in _vindr_rows(root, val_fraction=0.0)[0].values()} == {"train", "test"}


def test_vindr_kaggle_rows(tmp_path):
    root = _kaggle(tmp_path / "kaggle")
    got, excluded = _vindr_rows(root, val_fraction=0.0)
    assert sorted(got) == ["k1", "k2", "k3", "k4"]
    assert got["k1"].labels == {"Cardiomegaly": 1.0, "Aortic enlargement": 0.0}
    assert got["k2"].labels == {"No finding": 1.0} and (got["k2"].sex, got["k2"].age) == ("M", 45)
    assert _positive(got["k3"]) == {"Pleural effusion"} and view_code(got["k3"].view) == "LATERAL"
    assert _positive(got["k4"]) == {"ILD"} and not got["k4"].image.is_file()   # its one listed reader decides
    assert all(r.split == "train" and r.image.parent == root / "train" for r in got.values())
    assert [(x.reason, x.where) for x in excluded] == [("malformed row", "train.csv:12"),
                                                      ("malformed row", "train.csv:13")]


def test_vindr_find_root_layouts_and_refusals(tmp_path):
    cfg = PrepareConfig(dataset="vindr-cxr")
    physionet = _physionet(tmp_path / "dl" / "physionet.org" / "files" / "vindr-cxr" / "1.0.0")
    assert vindr_cxr.find_root(tmp_path / "dl", cfg) == physionet
    assert vindr_cxr.find_root(physionet, cfg) == physionet
    kaggle = _kaggle(tmp_path / "kaggle")
    assert vindr_cxr.find_root(kaggle, cfg) == kaggle
    chexpert = tmp_path / "chexpert"                 # another dataset's train.csv is not mistaken for Kaggle's
    chexpert.mkdir()
    (chexpert / "train.csv").write_text("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding\n")
    for wrong in (chexpert, _jsrt(tmp_path / "jsrt")):
        with pytest.raises(UserError, match=r"does not look like VinDr-CXR: neither annotations/image_labels_train"):
            vindr_cxr.find_root(wrong, cfg)


def test_vindr_dicom_header_of_a_file_that_is_not_dicom(tmp_path):
    (tmp_path / "x.dicom").write_bytes(b"not a dicom file")
    assert vindr_cxr.dicom_header(tmp_path / "x.dicom") == ("", None, "")


# ---------------------------------------------------------------- JSRT fixtures

def _film(path: Path, top: int = 4000, bottom: int = 100) -> None:
    """A full-size raw film: dark (high optical density) upper half, bright lower half."""
    raw = np.full((jsrt.IMAGE_SIDE, jsrt.IMAGE_SIDE), bottom, dtype=">u2")
    raw[: jsrt.IMAGE_SIDE // 2] = top
    path.parent.mkdir(parents=True, exist_ok=True)
    raw.tofile(path)


def _jsrt(root: Path, films: bool = False) -> Path:
    """The two zips unpacked. CLNDAT (tabs, CR line ends): two good films, a 7-field line, an unparsable age,
    a missing film, a non-nodule name, a repeat. CNNDAT (spaces, CR): two good films (one age '?'), a short line.
    `films`: full-size raw files (else 1-byte stand-ins; rows() never opens them)."""
    nodule = ["JPCLN001.IMG\t3\t15\t53\tmale\t1634\t692\tmalignant\tr.upper lobe\tlung cancer",
              "JPCLN002.IMG\t5\t20\t?\tfemale\t810\t1020\tbenign\tl.lower lobe\tgranuloma",
              "JPCLN003.IMG\t2\t10\t61\tmale\t100\t200",
              "JPCLN004.IMG\t2\t10\tsixty\tmale\t100\t200\tbenign\tl.upper lobe\thamartoma",
              "JPCLN005.IMG\t4\t12\t70\tfemale\t900\t900\tmalignant\tr.lower lobe\tadenocarcinoma",
              "JPCNN009.IMG\t4\t12\t70\tfemale\t900\t900\tmalignant\tr.lower lobe\tadenocarcinoma",
              "JPCLN001.IMG\t3\t15\t53\tmale\t1634\t692\tmalignant\tr.upper lobe\tlung cancer", ""]
    non_nodule = ["JPCNN001.IMG 43  male  non-nodule", "JPCNN002.IMG  ?   female non-nodule", "JPCNN003.IMG 50", ""]
    info = root / "Clinical_Information"
    info.mkdir(parents=True)
    (info / "CLNDAT_EN.txt").write_bytes("\r".join(nodule).encode())
    (info / "CNNDAT_EN.TXT").write_bytes("\r".join(non_nodule).encode())
    for name in ("JPCLN001", "JPCLN002", "JPCLN003", "JPCLN004", "JPCNN001", "JPCNN002", "JPCNN003"):
        path = root / "All247images" / f"{name}.IMG"
        if films and name in ("JPCLN001", "JPCNN001"):
            _film(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\0")
    return root


def _jsrt_rows(root: Path) -> tuple[dict[str, SourceRow], list[Excluded]]:
    cfg = PrepareConfig(dataset="jsrt", root=str(root))
    items = list(jsrt.rows(jsrt.find_root(root, cfg), cfg))
    return ({r.patient: r for r in items if isinstance(r, SourceRow)}, [r for r in items if isinstance(r, Excluded)])


def test_jsrt_rows(tmp_path):
    root = _jsrt(tmp_path / "jsrt")
    got, excluded = _jsrt_rows(root)
    assert sorted(got) == ["JPCLN001", "JPCLN002", "JPCLN005", "JPCNN001", "JPCNN002"]
    one, two, five, n1, n2 = (got[k] for k in ("JPCLN001", "JPCLN002", "JPCLN005", "JPCNN001", "JPCNN002"))
    assert one.image == root / "All247images" / "JPCLN001.IMG" and one.where == "CLNDAT_EN.txt:1"
    assert (one.study, one.view, one.sex, one.age, one.split) == ("JPCLN001", "PA", "M", 53, "")
    assert one.labels == {"Nodule": 1.0, "Malignant": 1.0} and two.labels == {"Nodule": 1.0, "Malignant": 0.0}
    assert (two.sex, two.age) == ("F", None)
    assert not five.image.is_file()                                   # listed, never unpacked: the runner counts it
    assert n1.labels == {"Nodule": 0.0} and (n1.sex, n1.age) == ("M", 43) and n1.where == "CNNDAT_EN.TXT:1"
    assert (n2.sex, n2.age) == ("F", None)
    assert all(r.view == "PA" for r in got.values())                  # JSRT holds no other view
    assert [(x.reason, x.where) for x in excluded] == [
        ("malformed row", "CLNDAT_EN.txt:3"), ("malformed row", "CLNDAT_EN.txt:4"),
        ("malformed row", "CLNDAT_EN.txt:6"), ("duplicate row", "CLNDAT_EN.txt:7"),
        ("malformed row", "CNNDAT_EN.TXT:3")]
    assert "7 fields" in excluded[0].detail and "'sixty'" in excluded[1].detail and "JPCNN009" in excluded[2].detail


def test_jsrt_find_root_layouts_and_refusals(tmp_path):
    cfg = PrepareConfig(dataset="jsrt")
    root = _jsrt(tmp_path / "jsrt")
    assert jsrt.find_root(root, cfg) == root
    flat = tmp_path / "flat"                     # everything in one folder, lower-case text file names
    flat.mkdir()
    for path in (root / "Clinical_Information").iterdir():
        (flat / path.name.lower()).write_bytes(path.read_bytes())
    (flat / "JPCLN001.IMG").write_bytes(b"\0")
    assert jsrt.find_root(flat, cfg) == flat
    got, _ = _jsrt_rows(flat)
    assert got["JPCLN001"].image == flat / "JPCLN001.IMG"
    (root / "Clinical_Information" / "CNNDAT_EN.TXT").unlink()      # half a download
    for wrong in (root, _physionet(tmp_path / "vindr")):
        with pytest.raises(UserError, match=r"does not look like JSRT: CLNDAT_EN.TXT and CNNDAT_EN.TXT not found"):
            jsrt.find_root(wrong, cfg)


def test_runner_names_the_dataset_a_wrong_root_holds(tmp_path):
    vindr = _physionet(tmp_path / "vindr")
    with pytest.raises(UserError, match="holds vindr-cxr, not jsrt"):
        runner.check(PrepareConfig(dataset="jsrt", root=str(vindr), out=str(tmp_path / "out")))
    with pytest.raises(UserError, match="holds jsrt, not vindr-cxr"):
        runner.check(PrepareConfig(dataset="vindr-cxr", root=str(_jsrt(tmp_path / "jsrt")), out=str(tmp_path / "o")))


def test_jsrt_read_image_inverts_and_spreads_to_16_bits(tmp_path):
    raw = np.zeros((jsrt.IMAGE_SIDE, jsrt.IMAGE_SIDE), dtype=">u2")
    raw[0, :4] = [0, 4095, 5000, 0x0102]        # white film, black film, out of range, a byte-order check
    raw.tofile(tmp_path / "JPCLN001.IMG")
    img = jsrt.read_image(tmp_path / "JPCLN001.IMG")
    assert img.dtype == np.uint16 and img.shape == (2048, 2048)
    assert img[0, :4].tolist() == [65535, 0, 0, round((4095 - 258) * 65535 / 4095)]
    short = tmp_path / "JPCNN001.IMG"
    short.write_bytes(b"\0" * 1000)
    with pytest.raises(ValueError, match=r"JPCNN001.IMG: 1,000 bytes, expected 8,388,608"):
        jsrt.read_image(short)


# ---------------------------------------------------------------- through the runner

def _manifest(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return {r["patient"]: r for r in csv.DictReader(f)}


def test_vindr_prepare_end_to_end(tmp_path):
    root, out = _physionet(tmp_path / "vindr"), tmp_path / "out"
    summary = runner.prepare(PrepareConfig(dataset="vindr-cxr", root=str(root), out=str(out), size=32, workers=1,
                                           val_fraction=0.0))
    rows = _manifest(out)
    assert sorted(rows) == ["aaa1", "bbb2", "eee5"]
    a, b, e = rows["aaa1"], rows["bbb2"], rows["eee5"]
    assert (a["labels"], a["split"], a["view"], a["source"]) == ("Cardiomegaly", "train", "PA", "vindr-cxr")
    assert a["report"] == "PA chest x-ray. Cardiomegaly."
    assert (b["labels"], b["sex"], b["age"]) == ("No Finding", "F", "54")
    assert b["report"] == "PA chest x-ray. No acute cardiopulmonary findings."
    assert (e["labels"], e["split"]) == ("Pneumothorax|Other diseases", "test")
    assert e["image"] == "images/test/eee5.png" and e["source_image"] == "test/eee5.dicom"
    png = np.asarray(Image.open(out / a["image"]))
    assert png.shape == (32, 32) and png.dtype == np.uint16 and png[16, 16] > png[16, 2]   # the bright square
    assert summary["kept"] == 3 and summary["rows_read"] == 8
    assert summary["excluded"] == {"malformed row": 3, "view LATERAL (not in --views)": 1, "image file missing": 1}


def test_jsrt_prepare_end_to_end(tmp_path):
    root, out = _jsrt(tmp_path / "jsrt", films=True), tmp_path / "out"
    summary = runner.prepare(PrepareConfig(dataset="jsrt", root=str(root), out=str(out), size=32, workers=1))
    rows = _manifest(out)
    assert sorted(rows) == ["JPCLN001", "JPCNN001"]
    one, none = rows["JPCLN001"], rows["JPCNN001"]
    assert (one["labels"], one["view"], one["sex"], one["age"]) == ("Lung Lesion|Malignant", "PA", "M", "53")
    assert one["report"] == "PA chest x-ray. Nodule, malignant."
    assert none["labels"] == "" and none["report"] == "PA chest x-ray. No acute cardiopulmonary findings."
    png = np.asarray(Image.open(out / one["image"]))
    assert png.dtype == np.uint16 and png[4, 16] < 2000 and png[28, 16] > 60000   # dense upper half shown dark
    assert summary["excluded"] == {"malformed row": 4, "duplicate row": 1, "image file missing": 1,
                                   "unreadable image": 2}             # JPCLN002, JPCNN002: 1-byte stand-ins

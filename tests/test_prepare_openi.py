"""OpenI dataset module: small fixture trees in the NLM layout (ecgen-radiology XML + NLMCXR_png, optionally
NLMCXR_dcm) and the Kaggle one (indiana_reports.csv + indiana_projections.csv + images/images_normalized)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cxrcommon.errors import UserError
from cxrcommon.imageio import write_dicom
from finetune.prepare import PrepareConfig, prepare
from finetune.prepare.datasets import openi
from finetune.prepare.rows import Excluded, SourceRow, apply_labels, view_code
from finetune.prepare.runner import check


def _png(path: Path, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((48, 40), value, np.uint8)
    a[10:30, 8:20] = 255 - value
    Image.fromarray(a).save(path)


def _dicom(path: Path, view: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dicom(path, np.linspace(0, 1, 48 * 40).reshape(48, 40))
    ds = pydicom.dcmread(path)
    ds.ViewPosition = view
    ds.save_as(path)


def _xml(uid: str, findings: str, impression: str, mesh: list[str], images: list[str]) -> str:
    sections = "".join(f'<AbstractText Label="{label}">{text}</AbstractText>'
                       for label, text in (("COMPARISON", "None."), ("INDICATION", "Positive TB test"),
                                           ("FINDINGS", findings), ("IMPRESSION", impression)))
    majors = "".join(f"<major>{m}</major>" for m in mesh)
    parents = "".join(f'<parentImage id="{i}"><figureId>F1</figureId><caption>Xray Chest PA and Lateral</caption>'
                      f'<panel type="single"><url>/hadoop/storage/radiology/extract/{i}.jpg</url></panel>'
                      f'</parentImage>' for i in images)
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<eCitation><meta type="rr"/><uId id="{uid}"/><pmcId id="1"/>'
            f'<MedlineCitation Owner="Indiana University"><Article PubModel="Electronic"><Abstract>{sections}'
            f'</Abstract></Article></MedlineCitation><MeSH>{majors}<automatic>opacity</automatic></MeSH>'
            f'{parents}</eCitation>')


def _nlm_tree(root: Path, dicom: bool = False) -> Path:
    """Reports 1, 2, 10 with images (one PNG missing), a truncated XML, a report without images, a bad uId and a bad
    image id; with `dicom`, NLMCXR_dcm holds three films (one whose PNG is missing) with their View Position."""
    xml = root / "ecgen-radiology"
    xml.mkdir(parents=True)
    (xml / "1.xml").write_text(_xml("CXR1", "The cardiac silhouette is normal. There is no XXXX of a pleural "
                                            "effusion.", "Normal chest x-XXXX.", ["normal"],
                                    ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]))
    (xml / "2.xml").write_text(_xml("CXR2", "Borderline cardiomegaly.", "No acute pulmonary findings.",
                                    ["Cardiomegaly/borderline", "Pulmonary Artery/enlarged",
                                     "Technical Quality of Image Unsatisfactory "],
                                    ["CXR2_IM-0652-1001", "CXR2_IM-0652-2001"]))
    (xml / "10.xml").write_text(_xml("CXR10", "", "", ["Opacity/lung/base/left/mild", "Nodule"],
                                     ["CXR10_IM-0002-1001", "../../etc/passwd"]))
    (xml / "3.xml").write_text(_xml("CXR3", "x", "y", ["normal"], ["CXR3_IM-1384-1001"])[:200])
    (xml / "4.xml").write_text(_xml("CXR4", "Clear lungs.", "Normal.", ["normal"], []))
    (xml / "5.xml").write_text(_xml("IU5", "Clear lungs.", "Normal.", ["normal"], ["CXR5_IM-2117-1001"]))
    for image in ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001", "CXR10_IM-0002-1001"):
        _png(root / "NLMCXR_png" / f"{image}.png")
    if dicom:
        for name, view in (("1_IM-0001-3001", "PA"), ("1_IM-0001-4001", "LL"), ("2_IM-0652-2001", "AP")):
            _dicom(root / "NLMCXR_dcm" / f"{name}.dcm", view)
    return root


def _kaggle_tree(root: Path) -> Path:
    root.mkdir(parents=True)
    with open(root / "indiana_reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"])
        w.writerow(["1", "normal", "normal", "Xray Chest PA and Lateral", "Positive TB test", "None.",
                    "The cardiac silhouette and mediastinum size are within normal limits.", "Normal chest x-XXXX."])
        w.writerow(["2", "Cardiomegaly/borderline;Pulmonary Artery/enlarged", "Cardiomegaly;Pulmonary Artery",
                    "Chest, 2 views, frontal and lateral", "Preop bariatric surgery.", "None.",
                    "Borderline cardiomegaly. Midline sternotomy XXXX.", "No acute pulmonary findings."])
        w.writerow(["x7", "normal", "normal", "", "", "", "Clear.", "Normal."])       # bad uid
        w.writerow(["8", "normal"])                                                     # short row
    with open(root / "indiana_projections.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["uid", "filename", "projection"],
                     ["1", "1_IM-0001-4001.dcm.png", "Frontal"], ["1", "1_IM-0001-3001.dcm.png", "Lateral"],
                     ["2", "2_IM-0652-1001.dcm.png", "Frontal"], ["2", "2_IM-0652-2001.dcm.png", "Frontal"],
                     ["9", "9_IM-0001-1001.dcm.png", "Frontal"], ["3", "../secret.png", "Frontal"], ["4"]])
    for name in ("1_IM-0001-4001", "1_IM-0001-3001", "2_IM-0652-1001", "9_IM-0001-1001"):
        _png(root / "images" / "images_normalized" / f"{name}.dcm.png")
    return root


def _cfg(root: Path, out: Path | None = None, **kw) -> PrepareConfig:
    return PrepareConfig(dataset="openi", root=str(root), out=str(out or ""), size=32, workers=1, **kw)


def _rows(root: Path) -> tuple[list[SourceRow], list[Excluded]]:
    cfg = _cfg(root)
    items = list(openi.rows(openi.find_root(root, cfg), cfg))
    return [i for i in items if isinstance(i, SourceRow)], [i for i in items if isinstance(i, Excluded)]


def test_nlm_rows_values_and_exclusions(tmp_path):
    root = _nlm_tree(tmp_path / "openi")
    kept, excluded = _rows(root)
    assert [(r.where, r.image.name) for r in kept] == [
        ("ecgen-radiology/1.xml", "CXR1_1_IM-0001-3001.png"), ("ecgen-radiology/1.xml", "CXR1_1_IM-0001-4001.png"),
        ("ecgen-radiology/2.xml", "CXR2_IM-0652-1001.png"), ("ecgen-radiology/2.xml", "CXR2_IM-0652-2001.png"),
        ("ecgen-radiology/10.xml", "CXR10_IM-0002-1001.png")]                    # reports in numeric order
    first, _, second, missing, empty = kept
    assert (first.patient, first.study, first.view, first.split, first.sex, first.age) == ("1", "1", "", "", "", None)
    assert first.report == ("The cardiac silhouette is normal. There is no XXXX of a pleural effusion. "
                            "Normal chest x-XXXX.")                                 # findings, then impression
    assert first.labels == {"normal": 1.0} and apply_labels(first.labels, openi.LABELS, "ignore")[0] == ["No Finding"]
    assert second.labels == {"Cardiomegaly": 1.0, "Pulmonary Artery": 1.0}         # non-finding heading dropped
    assert apply_labels(second.labels, openi.LABELS, "ignore")[0] == ["Cardiomegaly", "Pulmonary Artery"]
    assert first.image.is_file() and not missing.image.is_file() and missing.labels == second.labels
    assert empty.report == "" and apply_labels(empty.labels, openi.LABELS, "ignore")[0] == ["Lung Opacity",
                                                                                           "Lung Lesion"]
    assert sorted((e.reason, e.where) for e in excluded) == [
        ("malformed report XML", "ecgen-radiology/10.xml"), ("malformed report XML", "ecgen-radiology/3.xml"),
        ("malformed report XML", "ecgen-radiology/5.xml"), ("report without images", "ecgen-radiology/4.xml")]


def test_nlm_views_from_dicom_headers_then_kaggle_projections(tmp_path):
    root = _nlm_tree(tmp_path / "openi", dicom=True)
    kept, _ = _rows(root)
    assert [view_code(r.view) for r in kept] == ["PA", "LATERAL", "", "AP", ""]
    assert kept[3].image.name == "2_IM-0652-2001.dcm"                             # no PNG: the DICOM is read
    assert kept[0].image.suffix == ".png"                                         # the PNG, where there is one
    (root / "indiana_projections.csv").write_text("uid,filename,projection\n1,1_IM-0001-3001.dcm.png,Frontal\n"
                                                  "2,2_IM-0652-1001.dcm.png,Lateral\n")
    kept, _ = _rows(root)
    assert [view_code(r.view) for r in kept] == ["FRONTAL", "LATERAL", "LATERAL", "AP", ""]


def test_kaggle_rows_values_and_exclusions(tmp_path):
    root = _kaggle_tree(tmp_path / "iu")
    kept, excluded = _rows(root)
    assert [(r.image.name, view_code(r.view), r.patient) for r in kept] == [
        ("1_IM-0001-4001.dcm.png", "FRONTAL", "1"), ("1_IM-0001-3001.dcm.png", "LATERAL", "1"),
        ("2_IM-0652-1001.dcm.png", "FRONTAL", "2"), ("2_IM-0652-2001.dcm.png", "FRONTAL", "2")]
    assert kept[0].image.parent == root / "images" / "images_normalized" and not kept[3].image.is_file()
    assert kept[0].report == ("The cardiac silhouette and mediastinum size are within normal limits. "
                              "Normal chest x-XXXX.")
    assert kept[2].labels == {"Cardiomegaly": 1.0, "Pulmonary Artery": 1.0}
    assert kept[2].where == "indiana_projections.csv:4"
    assert sorted((e.reason, e.where) for e in excluded) == [
        ("malformed row", "indiana_projections.csv:7"), ("malformed row", "indiana_projections.csv:8"),
        ("malformed row", "indiana_reports.csv:4"), ("malformed row", "indiana_reports.csv:5"),
        ("no report row", "indiana_projections.csv:6")]


def test_find_root_layouts_and_refusals(tmp_path):
    nlm = _nlm_tree(tmp_path / "a" / "NLMCXR")
    assert openi.find_root(nlm, _cfg(nlm)) == nlm and openi.find_root(tmp_path / "a", _cfg(nlm)) == nlm
    kaggle = _kaggle_tree(tmp_path / "iu")
    assert openi.find_root(kaggle, _cfg(kaggle)) == kaggle
    (kaggle / "indiana_projections.csv").unlink()
    with pytest.raises(UserError, match="not indiana_projections.csv"):
        openi.find_root(kaggle, _cfg(kaggle))
    nih = tmp_path / "nih"
    nih.mkdir()
    (nih / "Data_Entry_2017_v2020.csv").write_text("Image Index,Finding Labels\n")
    with pytest.raises(UserError, match=r"does not look like OpenI: neither ecgen-radiology/\*\.xml"):
        openi.find_root(nih, _cfg(nih))
    with pytest.raises(UserError, match="holds chestx-ray14, not openi"):      # the runner names what it found
        check(_cfg(nih, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_prepare_end_to_end_nlm_with_dicom(tmp_path):
    root = _nlm_tree(tmp_path / "openi", dicom=True)
    out = tmp_path / "out"
    summary = prepare(_cfg(root, out))
    with open(out / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    assert [(r["source_image"], r["view"]) for r in manifest] == [
        ("NLMCXR_png/CXR1_1_IM-0001-3001.png", "PA"), ("NLMCXR_dcm/2_IM-0652-2001.dcm", "AP")]
    assert manifest[1]["image"] == "images/NLMCXR_dcm/2_IM-0652-2001.png"
    assert manifest[0]["report"].startswith("The cardiac silhouette is normal.") and manifest[0]["labels"] == \
        "No Finding"
    assert manifest[1]["labels"] == "Cardiomegaly|Pulmonary Artery" and manifest[1]["source"] == "openi"
    assert summary["excluded"] == {"malformed report XML": 3, "report without images": 1,
                                   "view LATERAL (not in --views)": 1, "view UNKNOWN (not in --views)": 2}
    for r in manifest:
        with Image.open(out / r["image"]) as im:
            assert im.size == (32, 32)


def test_prepare_end_to_end_kaggle(tmp_path):
    root = _kaggle_tree(tmp_path / "iu")
    out = tmp_path / "out"
    summary = prepare(_cfg(root, out))
    with open(out / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    assert [(r["source_image"], r["view"], r["patient"]) for r in manifest] == [
        ("images/images_normalized/1_IM-0001-4001.dcm.png", "FRONTAL", "1"),
        ("images/images_normalized/2_IM-0652-1001.dcm.png", "FRONTAL", "2")]
    assert manifest[1]["report"] == "Borderline cardiomegaly. Midline sternotomy XXXX. No acute pulmonary findings."
    assert summary["excluded"] == {"malformed row": 4, "no report row": 1, "view LATERAL (not in --views)": 1,
                                   "image file missing": 1}

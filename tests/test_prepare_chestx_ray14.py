"""ChestX-ray14 dataset module: small fixture trees in the NIH Box layout (images/) and the Kaggle one
(images_001/images/ ...), with the v2020 and the first-release Data_Entry CSVs."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrcommon.errors import UserError
from finetune.prepare import PrepareConfig, prepare
from finetune.prepare.datasets import chestx_ray14
from finetune.prepare.rows import Excluded, SourceRow, view_code
from finetune.prepare.runner import check

HEADER_V2020 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((48, 40), value, np.uint8)
    a[10:30, 8:20] = 255 - value
    Image.fromarray(a).save(path)


def _tree(root: Path, kaggle: bool = False, first_release: bool = False, test_list: bool = True) -> Path:
    """Nine rows: two patients' films (one AP, one in the test list), a lateral (LL), an image not on disk, a short
    row, a bad Image Index, a bad Patient ID, an unknown finding name and an age that is a typo."""
    def pid(n: int) -> str:
        return f"{n:08d}" if first_release else str(n)

    def age(n: int) -> str:
        return f"{n:03d}Y" if first_release else str(n)

    lines = [HEADER_V2020 + ("," if first_release else ""),
             f"00000001_000.png,Cardiomegaly|Effusion,0,{pid(1)},{age(58)},M,PA,2682,2749,0.143,0.143",
             f"00000001_001.png,No Finding,1,{pid(1)},{age(59)},M,AP,2500,2048,0.168,0.168",
             f"00000002_000.png,Mass|Infiltration,0,{pid(2)},{age(41)},F,LL,2048,2500,0.139,0.139",
             f"00000003_000.png,Pneumothorax,0,{pid(3)},{age(30)},F,PA,2048,2500,0.139,0.139",   # not on disk
             f"00000004_000.png,Hernia,0,{pid(4)},{age(72)}",                                       # short row
             f"../etc/passwd,Hernia,0,{pid(5)},{age(72)},F,PA,1,1,0.1,0.1",
             f"00000006_000.png,Hernia,0,p6,{age(72)},F,PA,1,1,0.1,0.1",
             f"00000007_000.png,Cardiomegally,0,{pid(7)},{age(50)},M,PA,1,1,0.1,0.1",
             f"00000008_000.png,Nodule,0,{pid(8)},414,F,PA,1,1,0.1,0.1"]
    name = "Data_Entry_2017.csv" if first_release else "Data_Entry_2017_v2020.csv"
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("\r\n".join(lines) + "\r\n")
    on_disk = ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000008_000.png"]
    for i, image in enumerate(on_disk):
        folder = root / f"images_{i % 2 + 1:03d}" / "images" if kaggle else root / "images"
        _png(folder / image, 40 + 50 * i)
    if test_list:
        (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000002_000.png\n")
        (root / "test_list.txt").write_text("00000003_000.png\n00000008_000.png\n")
    return root


def _cfg(root: Path, out: Path | None = None, **kw) -> PrepareConfig:
    return PrepareConfig(dataset="chestx-ray14", root=str(root), out=str(out or ""), size=32, workers=1, **kw)


def _split_rows(root: Path, cfg: PrepareConfig) -> tuple[list[SourceRow], list[Excluded]]:
    items = list(chestx_ray14.rows(chestx_ray14.find_root(root, cfg), cfg))
    return [i for i in items if isinstance(i, SourceRow)], [i for i in items if isinstance(i, Excluded)]


@pytest.mark.parametrize("kaggle,first_release", [(False, False), (True, True)])
def test_rows_values_and_exclusions(tmp_path, kaggle, first_release):
    root = _tree(tmp_path / "nih", kaggle=kaggle, first_release=first_release)
    kept, excluded = _split_rows(root, _cfg(root, val_fraction=0.0))
    assert [r.image.name for r in kept] == ["00000001_000.png", "00000001_001.png", "00000002_000.png",
                                            "00000003_000.png", "00000008_000.png"]
    first, second, lateral, missing, typo_age = kept
    assert first.image.is_file() and second.image.is_file() and not missing.image.is_file()
    if kaggle:  # found in whichever part folder holds it
        assert first.image.parent.parent.name == "images_001" and second.image.parent.parent.name == "images_002"
    assert (first.patient, first.study, first.view, first.sex, first.age) == ("1", "00000001_000", "PA", "M", 58)
    assert {n for n, v in first.labels.items() if v == 1.0} == {"Cardiomegaly", "Effusion"}
    assert len(first.labels) == 15 and first.labels["Pneumothorax"] == 0.0   # the 14 findings + No Finding
    assert {n for n, v in second.labels.items() if v == 1.0} == {"No Finding"} and second.view == "AP"
    assert view_code(lateral.view) == "LATERAL" and lateral.sex == "F" and lateral.age == 41
    assert typo_age.age is None                                                 # 414: a typo, not a patient
    assert [r.split for r in kept] == ["train", "train", "train", "test", "test"]
    assert first.where.endswith(":2")
    reasons = sorted((e.reason, e.where.split(":")[1]) for e in excluded)
    assert reasons == [("malformed row", "6"), ("malformed row", "7"), ("malformed row", "8"),
                       ("unknown finding", "9")]
    assert "Patient ID 'p6'" in next(e.detail for e in excluded if e.where.endswith(":8"))


def test_official_test_stays_whole_and_validate_comes_from_train_val(tmp_path):
    root = _tree(tmp_path / "nih")
    kept, _ = _split_rows(root, _cfg(root, val_fraction=0.99, test_fraction=0.5))
    splits = {r.image.name: r.split for r in kept}
    assert splits["00000003_000.png"] == splits["00000008_000.png"] == "test"
    assert {splits[n] for n in ("00000001_000.png", "00000001_001.png", "00000002_000.png")} == {"validate"}
    kept, _ = _split_rows(root, _cfg(root, val_fraction=0.0, test_fraction=0.5))
    assert [r.split for r in kept] == ["train", "train", "train", "test", "test"]


def test_without_test_list_the_runner_splits_by_seed(tmp_path):
    root = _tree(tmp_path / "nih", test_list=False)
    kept, _ = _split_rows(root, _cfg(root))
    assert {r.split for r in kept} == {""}


def test_find_root_layouts_and_refusals(tmp_path):
    root = _tree(tmp_path / "dl" / "CXR8")
    assert chestx_ray14.find_root(root, _cfg(root)) == root
    assert chestx_ray14.find_root(tmp_path / "dl", _cfg(root)) == root          # the folder above it
    other = tmp_path / "chexpert"
    other.mkdir()
    (other / "train.csv").write_text("Path,Sex,Age\n")
    with pytest.raises(UserError, match=r"does not look like ChestX-ray14: Data_Entry_2017_v2020\.csv"):
        chestx_ray14.find_root(other, _cfg(other))
    with pytest.raises(UserError) as exc:
        check(_cfg(other, tmp_path / "out"))
    assert "\n" not in str(exc.value) and "Data_Entry_2017_v2020.csv" in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_wrong_csv_is_refused_before_anything_is_written(tmp_path):
    root = tmp_path / "nih"
    root.mkdir()
    (root / "Data_Entry_2017_v2020.csv").write_text("Path,Sex\nx.png,M\n")
    with pytest.raises(UserError, match="no column"):
        list(chestx_ray14.rows(root, _cfg(root)))
    with pytest.raises(UserError):
        prepare(_cfg(root, tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_prepare_end_to_end(tmp_path):
    root = _tree(tmp_path / "nih", kaggle=True)
    out = tmp_path / "out"
    summary = prepare(_cfg(root, out, val_fraction=0.0))
    with open(out / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    assert [r["source_image"].split("/")[-1] for r in manifest] == ["00000001_000.png", "00000001_001.png",
                                                                     "00000008_000.png"]
    first, second, third = manifest
    assert first["labels"] == "Cardiomegaly|Pleural Effusion" and first["report"] == \
        "PA chest x-ray. Cardiomegaly, effusion."
    assert second["labels"] == "No Finding" and second["report"] == \
        "AP chest x-ray. No acute cardiopulmonary findings."
    assert third["labels"] == "Lung Lesion" and third["age"] == "" and third["split"] == "test"
    assert (first["patient"], first["sex"], first["age"], first["split"], first["source"]) == \
        ("1", "M", "58", "train", "chestx-ray14")
    assert summary["excluded"] == {"malformed row": 3, "unknown finding": 1, "view LATERAL (not in --views)": 1,
                                   "image file missing": 1}
    assert summary["kept"] == 3 and summary["rows_read"] == 9
    for r in manifest:
        with Image.open(out / r["image"]) as im:
            assert im.size == (32, 32)
    lateral = prepare(_cfg(root, tmp_path / "lat", views=["LATERAL"]))
    assert lateral["kept"] == 1 and lateral["by_view"] == {"LATERAL": 1}

"""finetune.prepare under inputs nobody should send but someone will: one test per class of failure found by
attacking it (broken CSV bytes, broken gzip, options out of range, reruns with other settings, two rows for one
output, images that are no film, escaped manifest cells). Tiny fixtures: the toy dataset of test_prepare_runner."""
from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import prepare_toy
import pytest
from PIL import Image

from cxrcommon.errors import UserError
from finetune.prepare import PrepareConfig, datasets, prepare
from finetune.prepare.images import prepare_image


@pytest.fixture()
def toy(monkeypatch, tmp_path):
    real = datasets.registry()
    monkeypatch.setattr(datasets, "registry", lambda: {**real, "toy": prepare_toy})
    prepare_toy.make_tree(tmp_path / "dl")
    return tmp_path / "dl"


def _cfg(root: Path, out: Path, **kw) -> PrepareConfig:
    kw = {"size": 64, "workers": 1, **kw}
    return PrepareConfig(dataset=kw.pop("dataset", "toy"), root=str(root), out=str(out), **kw)


def _manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _excluded(out: Path) -> list[dict[str, str]]:
    with open(out / "excluded.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _edit_csv(root: Path, old: bytes, new: bytes) -> None:
    data = (root / "toy.csv").read_bytes()
    assert old in data
    (root / "toy.csv").write_bytes(data.replace(old, new, 1))


# --- CSV rows that cannot be read: each is one excluded row, never the end of the run ---------------------------

def test_undecodable_or_oversized_csv_rows_are_excluded_and_the_run_goes_on(toy, tmp_path):
    _edit_csv(toy, b"img1.jpg,p0,PA,", b"img1.jpg,p\xe90,PA,")                      # Latin-1 byte in UTF-8
    _edit_csv(toy, b"img3.jpg,p1,PA,", b'img3.jpg,p1,PA,"' + b"x" * 200_000 + b'"')  # past csv's field limit
    summary = prepare(_cfg(toy, tmp_path / "out"))
    assert summary["excluded"]["not UTF-8 text"] == 1 and summary["excluded"]["unreadable row"] == 1
    assert [r["source_image"] for r in _manifest(tmp_path / "out")] == ["img0.jpg", "img2.jpg", "img4.jpg", "img5.jpg"]
    bad = {e["reason"]: e for e in _excluded(tmp_path / "out")}
    assert bad["not UTF-8 text"]["where"] == "toy.csv:3" and "0xe9" in bad["not UTF-8 text"]["detail"]
    assert bad["unreadable row"]["where"].startswith("toy.csv:")


# --- a gzip that is not one, or is cut off: one line before anything is written ---------------------------------

def _mimic(tmp_path: Path) -> Path:
    from test_prepare_mimic_cxr import _tree
    return _tree(tmp_path / "mimic")


@pytest.mark.parametrize("name, damage", [("metadata", lambda b: b[:len(b) // 2]),      # a cut-off download
                                          ("split", lambda b: b"subject_id,study_id\n"),  # a plain CSV named .gz
                                          ("chexpert", lambda b: b[:-9])])                 # the trailer missing
def test_broken_gzip_is_one_line_and_nothing_is_written(tmp_path, name, damage):
    root = _mimic(tmp_path)
    path = root / f"mimic-cxr-2.0.0-{name}.csv.gz"
    path.write_bytes(damage(path.read_bytes()))
    for require_report in (True, False):
        with pytest.raises(UserError, match=rf"{path.name}: not a whole gzip file .* download it again"):
            prepare(_cfg(root, tmp_path / "out", dataset="mimic-cxr", require_report=require_report))
        assert not (tmp_path / "out").exists()


# --- a module's UserError before its first row (a file without its columns) leaves no --out behind ----------------

@pytest.mark.parametrize("text", ["", "\n", "name,other\nimg0.jpg,x\n"])
def test_a_wrong_file_found_while_reading_rows_leaves_no_out(toy, tmp_path, text):
    (toy / "toy.csv").write_text(text)
    with pytest.raises(UserError, match="toy.csv: no column"):
        prepare(_cfg(toy, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# --- options out of range: one line before anything is written; --views spelled loosely still means views --------

@pytest.mark.parametrize("option, message", [({"limit": -1}, "--limit -1"), ({"limit": 0}, "--limit 0"),
                                             ({"workers": -1}, "--workers -1"), ({"size": 100_000}, "--size 100000"),
                                             ({"size": 4}, "--size 4"), ({"views": []}, "--views names no view"),
                                             ({"views": [" ", ","]}, "--views names no view")])
def test_options_out_of_range_are_refused_before_writing(toy, tmp_path, option, message):
    with pytest.raises(UserError, match=message):
        prepare(_cfg(toy, tmp_path / "out", **option))
    assert not (tmp_path / "out").exists()


def test_views_in_lower_case_commas_or_long_names_keep_the_same_films(toy, tmp_path):
    kept = {}
    for i, views in enumerate((["PA", "AP"], ["pa,ap"], ["posteroanterior", "ap"])):
        kept[i] = prepare(_cfg(toy, tmp_path / f"o{i}", views=views))["by_view"]
    assert kept[0] == kept[1] == kept[2] == {"PA": 6}
    Image.fromarray(np.tile(np.arange(100, 200, dtype=np.uint8), (80, 1))).save(toy / "lat.jpg")  # not blank
    assert prepare(_cfg(toy, tmp_path / "lat", views=["lat"]))["by_view"] == {"LATERAL": 1}


# --- a rerun into the same --out with other image settings: refused, naming the difference ------------------------

def test_rerun_with_other_size_mode_or_root_is_refused_naming_the_difference(toy, tmp_path):
    out = tmp_path / "out"
    prepare(_cfg(toy, out))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    copy = tmp_path / "other_copy"
    shutil.copytree(toy, copy)
    for kw, difference in (({"size": 128}, "size: 64 -> 128"),
                           ({"resize_mode": "crop"}, "resize_mode: 'pad' -> 'crop'"),
                           ({"root": copy}, f"root: '{toy.resolve()}' -> '{copy.resolve()}'")):
        cfg = _cfg(kw.pop("root", toy), out, **kw)
        with pytest.raises(UserError, match="was made with other settings") as err:
            prepare(cfg)
        assert difference in str(err.value) and "\n" not in str(err.value)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before   # nothing touched
    assert json.loads((out / "settings.json").read_text())["size"] == 64
    assert prepare(_cfg(toy, out, views=["PA"]))["images_made_this_run"] == 0   # what only the manifest uses may change


def test_out_holding_another_tools_outputs_is_not_overwritten(toy, tmp_path):
    out = tmp_path / "generated"
    out.mkdir()
    (out / "manifest.csv").write_text("image,text\nx.png,a film\n")
    with pytest.raises(UserError, match=r"already holds manifest.csv but no settings.json"):
        prepare(_cfg(toy, out))
    assert (out / "manifest.csv").read_text() == "image,text\nx.png,a film\n" and sorted(out.iterdir()) == [
        out / "manifest.csv"]
    (out / "config.yaml").write_text("size: 64\n")  # a folder holding only unrelated files is fine
    (out / "manifest.csv").unlink()
    assert prepare(_cfg(toy, out))["kept"] == 6


# --- one output, one row: a source listed twice, or two sources with one output name ------------------------------

def test_each_output_image_belongs_to_one_row(toy, tmp_path):
    from cxrcommon.manifest import Columns, read_manifest
    dark = np.zeros((100, 80), np.uint8)
    dark[10:90, 10:70] = 7
    Image.fromarray(dark).save(toy / "img0.png")   # another film, the same output name as img0.jpg
    with open(toy / "toy.csv", "a") as f:
        f.write("img0.jpg,p0,PA,,M,30\nimg0.png,p77,PA,,F,30\n")
    out = tmp_path / "out"
    summary = prepare(_cfg(toy, out))
    assert summary["excluded"]["image listed twice"] == 1
    assert summary["excluded"]["output name taken by another image"] == 1
    rows = _manifest(out)
    assert len({r["image"] for r in rows}) == len(rows) == 6
    assert {r["patient"] for r in rows if r["image"] == "images/img0.png"} == {"p0"}
    assert np.asarray(Image.open(out / "images" / "img0.png")).max() > 7   # img0.jpg's pixels, not img0.png's
    assert len(read_manifest(out / "manifest.csv", Columns(text="report", patient="patient"))) == 6  # strict reader


# --- images that are no film: listed and skipped; an EXIF orientation is honoured ---------------------------------

@pytest.mark.parametrize("name, pixels", [("blank8.png", np.full((120, 100), 128, np.uint8)),
                                          ("blank16.png", np.zeros((120, 100), np.uint16)),
                                          ("sliver.png", np.tile(np.arange(200, dtype=np.uint8), (3, 1)))])
def test_blank_or_sliver_images_are_refused(tmp_path, name, pixels):
    Image.fromarray(pixels).save(tmp_path / name)
    with pytest.raises(ValueError, match="blank|at least 8 px"):
        prepare_image(tmp_path / name, tmp_path / "out.png", 64, "pad")
    assert not (tmp_path / "out.png").exists()


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    import cxrcommon.limits
    Image.fromarray(np.tile(np.arange(200, dtype=np.uint8), (150, 1))).save(tmp_path / "big.png")
    monkeypatch.setattr(cxrcommon.limits, "MAX_PIXELS", 100 * 100)
    with pytest.raises(Exception, match="exceeds the limit"):
        prepare_image(tmp_path / "big.png", tmp_path / "out.png", 64, "pad")


def test_exif_orientation_is_applied(tmp_path):
    gradient = np.tile(np.linspace(20, 230, 200).astype(np.uint8), (300, 1))   # dark left, bright right
    exif = Image.Exif()
    exif[0x0112] = 6                                                            # "rotate 90 clockwise to view"
    Image.fromarray(gradient).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    prepare_image(tmp_path / "rotated.jpg", tmp_path / "out.png", 64, "pad")
    out = np.asarray(Image.open(tmp_path / "out.png")).astype(float)
    assert out.shape == (64, 64) and out[0].max() == 0                       # landscape now: padded above
    column = out[:, 32]
    assert column[column > 0][-1] - column[column > 0][0] > 100               # the gradient runs top to bottom


# --- a later file of a dataset without its columns: refused before the first row, not after the first file ---------

def _chexpert_valid_without_sex(tmp_path: Path) -> tuple[Path, str]:
    from test_prepare_chexpert import make_package
    folder = make_package(tmp_path / "dl")
    valid = folder / "valid.csv"
    valid.write_text(valid.read_text().replace("Path,Sex,", "Path,Gender,", 1))
    return tmp_path / "dl", "chexpert"


def _openi_projections_without_column(tmp_path: Path) -> tuple[Path, str]:
    from test_prepare_openi import _kaggle_tree
    root = _kaggle_tree(tmp_path / "dl")          # its reports CSV starts with good rows, then a bad uid
    path = root / "indiana_projections.csv"
    path.write_text(path.read_text().replace("uid,filename,projection", "uid,filename,view", 1))
    return root, "openi"


def _vindr_test_file_without_image_id(tmp_path: Path) -> tuple[Path, str]:
    from test_prepare_vindr_jsrt import _physionet
    root = _physionet(tmp_path / "dl")
    path = root / "annotations" / "image_labels_test.csv"
    path.write_text(path.read_text().replace("image_id,", "image,", 1))
    return root, "vindr-cxr"


@pytest.mark.parametrize("make", [_chexpert_valid_without_sex, _openi_projections_without_column,
                                  _vindr_test_file_without_image_id])
def test_a_later_file_without_its_columns_is_refused_before_anything_is_written(tmp_path, make):
    root, dataset = make(tmp_path)
    with pytest.raises(UserError, match="no column"):
        prepare(_cfg(root, tmp_path / "out", dataset=dataset, size=32))
    assert not (tmp_path / "out").exists()


# --- label names: the labels column's separator or a newline inside a source's finding name -----------------------

def test_a_finding_name_with_the_separator_or_a_newline_stays_one_label():
    from finetune.prepare.rows import apply_labels
    labels, _, names = apply_labels({"pleural effusion|loculated": 1.0, "air\ntrapping": 1.0, " ": 1.0,
                                     "Effusion": 1.0}, {"Effusion": "Pleural Effusion"}, "ignore")
    assert labels == ["Pleural Effusion", "air trapping", "pleural effusion/loculated"]
    assert names == ["pleural effusion/loculated", "air trapping", "Effusion"]


# --- cells made spreadsheet-safe come back as they were in the training reader ------------------------------------

def test_escaped_manifest_cells_read_back_as_written(toy, tmp_path):
    from cxrcommon.manifest import Columns, read_manifest
    _edit_csv(toy, b"img0.jpg,p0,", b"img0.jpg,=HYPERLINK(1),")
    out = tmp_path / "out"
    prepare(_cfg(toy, out, caption_template="- {findings}"))
    raw = _manifest(out)
    assert raw[0]["patient"] == "'=HYPERLINK(1)" and raw[0]["report"] == "'- Effusion"   # safe in a spreadsheet
    records = read_manifest(out / "manifest.csv", Columns(text="report", patient="patient"))
    assert (records[0].patient_id, records[0].text) == ("=HYPERLINK(1)", "- Effusion")   # trained on as written


# --- a file name from a CSV cell that the OS refuses (over 255 bytes): that row is missing, the run goes on ---------

def _append_row(path: Path, edit) -> None:
    """Append to a (gzipped) CSV a copy of its first data row, changed by `edit(row dict)`."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    with opener(path, "at", newline="") as f:
        csv.DictWriter(f, list(rows[0])).writerow(edit(dict(rows[0])))


def _long_toy(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "ds"
    prepare_toy.make_tree(root)
    _append_row(root / "toy.csv", lambda r: {**r, "image": "x" * 300 + ".jpg"})
    return root, "toy"


def _long_mimic(tmp_path: Path) -> tuple[Path, str]:
    root = _mimic(tmp_path)
    _append_row(root / "mimic-cxr-2.0.0-metadata.csv.gz", lambda r: {**r, "dicom_id": "d" * 300})
    _append_row(root / "mimic-cxr-2.0.0-split.csv.gz", lambda r: {**r, "subject_id": "1" * 300, "study_id": "9" * 300})
    _append_row(root / "mimic-cxr-2.0.0-metadata.csv.gz",
                lambda r: {**r, "subject_id": "1" * 300, "study_id": "9" * 300})
    return root, "mimic-cxr"


def _long_padchest(tmp_path: Path) -> tuple[Path, str]:
    from test_prepare_padchest import CSV_NAME, _tree
    root = _tree(tmp_path / "ds")
    _append_row(root / CSV_NAME, lambda r: {**r, "ImageID": "i" * 300 + ".png"})
    return root, "padchest"


def _long_openi(tmp_path: Path) -> tuple[Path, str]:
    from test_prepare_openi import _kaggle_tree
    root = _kaggle_tree(tmp_path / "ds")
    _append_row(root / "indiana_projections.csv", lambda r: {**r, "filename": "f" * 300 + ".png"})
    return root, "openi"


@pytest.mark.parametrize("make", [_long_toy, _long_mimic, _long_padchest, _long_openi])
def test_a_file_name_the_os_refuses_is_a_missing_file(toy, tmp_path, make):
    root, dataset = make(tmp_path)
    summary = prepare(_cfg(root, tmp_path / "out", dataset=dataset, size=32))
    assert summary["kept"] >= 1
    refused = [e for e in _excluded(tmp_path / "out") if len(e["detail"]) > 300 or "9" * 300 in e["detail"]]
    assert refused and all(e["reason"] in ("image file missing", "no report file", "not in the split file")
                           for e in refused)

"""Manifests: CSV / JSONL / imagefolder metadata.jsonl, every bad row reported with its line, patient split."""
from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrcommon.manifest import Columns, ManifestError, Record, patient_split, read_manifest


def png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32), value, np.uint8)).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    for i in range(4):
        png(tmp_path / "img" / f"ok{i}.png", 40 * i)
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    (tmp_path / "img" / "garbage.png").write_bytes(b"this is not a PNG at all" * 10)
    noise = png(tmp_path / "noise.png", 0)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(noise)
    good = noise.read_bytes()  # noise keeps the header intact and cuts the pixel data
    (tmp_path / "img" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "img" / "bad.dcm").write_bytes(b"\0" * 200)
    return tmp_path


def test_csv_good_rows_paths_columns_and_extra(data):
    m = write_csv(data / "train.csv", ["path", "report", "subject", "finding", "view"], [
        ["img/ok0.png", "FINDINGS: Lungs are clear.", "p1", "No Finding", "PA"],
        ["img/ok1.png", "Small left effusion.\nNo pneumothorax.", "", "Effusion", "AP"],
        [str(data / "img" / "ok2.png"), "Cardiomegaly.", "p2", "", "PA"],
    ])
    recs = read_manifest(m, Columns(image="path", text="report", patient="subject", label="finding"))
    assert [r.image for r in recs] == [data / "img" / f"ok{i}.png" for i in range(3)]
    assert recs[0] == Record(data / "img" / "ok0.png", "FINDINGS: Lungs are clear.", "p1", "No Finding", 2,
                             {"view": "PA"})
    assert recs[1].patient_id is None and recs[1].text == "Small left effusion.\nNo pneumothorax."
    assert recs[2].line == 5  # the quoted newline in row 2 takes a physical line
    assert recs[2].label is None


def test_every_bad_row_reported_with_line_and_fix(data):
    m = data / "bad.jsonl"
    lines = [
        json.dumps({"image": "img/ok0.png", "text": "Lungs clear.", "pid": "a"}),        # 1 good
        json.dumps({"image": "img/missing.png", "text": "Effusion."}),                  # 2 missing file
        json.dumps({"image": "img/empty.png", "text": "Effusion."}),                    # 3 empty file
        json.dumps({"image": "img/garbage.png", "text": "Effusion."}),                  # 4 not an image
        json.dumps({"image": "img/truncated.png", "text": "Effusion."}),                # 5 truncated PNG
        json.dumps({"image": "img/ok1.png", "text": "   "}),                            # 6 empty text
        json.dumps({"image": "img/ok0.png", "text": "Again."}),                         # 7 duplicate image
        '{"image": "img/ok2.png", "text": "unterminated}',                              # 8 bad JSON
        json.dumps({"text": "No image key."}),                                          # 9 missing column
        "",                                                                             # 10 blank: ignored
        json.dumps(["img/ok3.png", "a list"]),                                          # 11 not an object
        json.dumps({"image": "", "text": "Empty path."}),                               # 12 empty image path
        json.dumps({"image": "img/bad.dcm", "text": "Bad DICOM."}),                     # 13 unreadable DICOM
        json.dumps({"image": "img/ok3.png", "text": "Fine.", "pid": "b"}),              # 14 good
    ]
    m.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError) as exc:
        read_manifest(m, Columns(patient="pid"))
    probs = exc.value.problems
    expect = [
        (2, rf"image .*missing\.png not found — fix the path \(relative paths start at {re.escape(str(data))}\)$"),
        (3, r"image .*empty\.png is empty \(0 bytes\) — re-export or remove the row"),
        (4, r"image .*garbage\.png is unreadable \(UnidentifiedImageError.*\) — re-export it"),
        (5, r"image .*truncated\.png is unreadable \(OSError: Truncated File Read\) — re-export it"),
        (6, r"empty text in column 'text' — fill in the report or remove the row"),
        (7, r"duplicate image img/ok0\.png \(also on line 1\) — remove one of the rows"),
        (8, r"bad JSON \(Unterminated string.*\) — write one JSON object per line"),
        (9, r"missing column\(s\) 'image' — add the key\(s\) to this row"),
        (11, r"JSON list instead of an object — write one JSON object per line"),
        (12, r"empty image path in column 'image' — fill it in or remove the row"),
        (13, r"image .*bad\.dcm is unreadable \(.*\) — re-export it"),
    ]
    assert len(probs) == len(expect), "\n".join(probs)
    for p, (line, pattern) in zip(probs, expect):
        prefix = f"{m}:{line}: "
        assert p.startswith(prefix), p
        assert re.match(pattern, p[len(prefix):]), p
    assert str(exc.value).startswith(f"{m}: 11 problem(s) in the manifest:")
    assert all(p in str(exc.value) for p in probs)


def test_skip_logs_each_problem_and_returns_good_rows(data, caplog):
    m = write_csv(data / "m.csv", ["image", "text"], [
        ["img/ok0.png", "Clear."], ["img/missing.png", "Effusion."], ["img/ok1.png", ""],
        ["img/ok2.png", "Edema."],
    ])
    with pytest.raises(ManifestError) as exc:
        read_manifest(m)  # default is fail
    assert [p.split(": ")[0] for p in exc.value.problems] == [f"{m}:3", f"{m}:4"]
    with caplog.at_level(logging.WARNING, logger="cxrcommon.manifest"):
        recs = read_manifest(m, on_error="skip")
    assert [(r.image.name, r.line) for r in recs] == [("ok0.png", 2), ("ok2.png", 5)]
    assert f"{m}:3: image" in caplog.text and f"{m}:4: empty text" in caplog.text
    with pytest.raises(ValueError, match="on_error must be 'fail' or 'skip'"):
        read_manifest(m, on_error="ignore")


def test_csv_missing_column_and_ragged_row(data):
    m = write_csv(data / "m.csv", ["file", "report"], [["img/ok0.png", "Clear."]])
    with pytest.raises(ManifestError) as exc:
        read_manifest(m, on_error="skip")  # no row can be read: fatal even when skipping
    assert exc.value.problems == [f"{m}:1: missing column(s) 'image', 'text' (header has file, report) — "
                                  "rename the header or set the column names"]
    m.write_text("image,text\nimg/ok0.png,Clear.\nimg/ok1.png,Small effusion, left.\n", encoding="utf-8")
    with pytest.raises(ManifestError) as exc:
        read_manifest(m)
    assert exc.value.problems == [f"{m}:3: has 3 fields but the header has 2 — "
                                  "quote fields that contain commas or newlines"]


def test_check_images_off_and_image_root(data):
    m = write_csv(data / "m.csv", ["image", "text"], [["ok0.png", "Clear."], ["not-there.png", "Clear."]])
    recs = read_manifest(m, check_images=False)
    assert [r.image for r in recs] == [data / "ok0.png", data / "not-there.png"]
    m = write_csv(data / "m.csv", ["image", "text"], [["ok0.png", "Clear."], ["ok1.png", "Edema."]])
    assert len(read_manifest(m, image_root=data / "img")) == 2
    # text=None: an images-only manifest (e.g. real images for FID) needs no text column
    m = write_csv(data / "m.csv", ["image"], [["ok0.png"], ["ok1.png"]])
    recs = read_manifest(m, Columns(text=None), image_root=data / "img")
    assert [(r.image.name, r.text) for r in recs] == [("ok0.png", ""), ("ok1.png", "")]


def test_unreadable_manifests(data):
    with pytest.raises(FileNotFoundError, match="nope.csv not found"):
        read_manifest(data / "nope.csv")
    (data / "m.txt").write_text("x")
    with pytest.raises(ManifestError, match=r"unsupported manifest type '\.txt' — use \.csv or \.jsonl"):
        read_manifest(data / "m.txt")
    (data / "latin1.csv").write_bytes("image,text\nimg/ok0.png,Fi\xe8vre\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"latin1\.csv:1: not UTF-8 text .* — re-save the manifest as UTF-8"):
        read_manifest(data / "latin1.csv")
    (data / "allbad.jsonl").write_text(json.dumps({"image": "img/missing.png", "text": "x"}) + "\n")
    with pytest.raises(ManifestError, match="no usable rows"):
        read_manifest(data / "allbad.jsonl", on_error="skip")


def test_imagefolder_metadata_jsonl(tmp_path):
    folder = tmp_path / "train"
    png(folder / "0001.png")
    png(folder / "sub" / "0002.png")
    rows = [{"file_name": "0001.png", "text": "Right lower lobe pneumonia.", "patient": "p9"},
            {"file_name": "sub/0002.png", "text": "No acute process."}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recs = read_manifest(folder / "metadata.jsonl", Columns(patient="patient"))
    assert [(r.image, r.text, r.patient_id, r.line) for r in recs] == [
        (folder / "0001.png", "Right lower lobe pneumonia.", "p9", 1),
        (folder / "sub" / "0002.png", "No acute process.", None, 2)]
    assert read_manifest(folder / "metadata.jsonl")[1].extra == {}
    assert read_manifest(folder, Columns(patient="patient")) == recs  # the folder itself is accepted
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="folder without metadata.jsonl"):
        read_manifest(tmp_path / "empty")


def _records(n_patients: int, per_patient: int, n_single: int) -> list[Record]:
    recs = [Record(Path(f"/d/p{p}_{k}.png"), "t", f"p{p}", None, 0) for p in range(n_patients)
            for k in range(per_patient)]
    return recs + [Record(Path(f"/d/solo{i}.png"), "t", None, None, 0) for i in range(n_single)]


def test_patient_split_disjoint_and_sized():
    recs = _records(40, 3, 30)
    train, val = patient_split(recs, 0.2, seed=0)
    assert len(train) + len(val) == len(recs)
    assert {id(r) for r in train}.isdisjoint({id(r) for r in val})
    train_p = {r.patient_id or str(r.image) for r in train}
    val_p = {r.patient_id or str(r.image) for r in val}
    assert train_p.isdisjoint(val_p)  # no patient on both sides
    assert abs(len(val) - 0.2 * len(recs)) <= 3
    assert any(r.patient_id is None for r in val) or any(r.patient_id is None for r in train)
    # every patient's rows stay together
    for pid in {r.patient_id for r in recs if r.patient_id}:
        sides = {r in val for r in recs if r.patient_id == pid}
        assert len(sides) == 1


def test_patient_split_deterministic_order_independent_and_seeded():
    recs = _records(30, 2, 10)
    train, val = patient_split(recs, 0.25, seed=7)
    train2, val2 = patient_split(list(reversed(recs)), 0.25, seed=7)
    assert {r.image for r in val} == {r.image for r in val2}
    assert [r.image for r in train] == [r.image for r in recs if r not in val]  # input order kept
    _, val3 = patient_split(recs, 0.25, seed=8)
    assert {r.image for r in val3} != {r.image for r in val}


def test_patient_split_edges():
    recs = _records(1, 5, 0)
    assert patient_split(recs, 0.5) == (recs, [])  # one patient cannot be split: all train
    assert patient_split(_records(5, 1, 0), 0.0)[1] == []
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        patient_split(recs, 1.0)


def test_real_manifest(realcxr):
    recs = read_manifest(realcxr / "manifest.csv", Columns(image="file", text="report_text", label="label"),
                         on_error="skip", image_root=realcxr / "images")
    assert len(recs) > 300 and all(r.text and r.image.is_file() for r in recs)
    with pytest.raises(ManifestError) as exc:
        read_manifest(realcxr / "manifest.csv", Columns(image="file", text="report_text"),
                      image_root=realcxr / "images", check_images=False)
    assert all("empty text in column 'report_text'" in p for p in exc.value.problems)
    assert len(exc.value.problems) + len(recs) == sum(1 for _ in open(realcxr / "manifest.csv")) - 1

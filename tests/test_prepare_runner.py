"""finetune.prepare's shared runner on a toy dataset: filters that explain themselves, resume, kill -9, workers,
bad input refused before anything is written, and the image path (DCT-scaled JPEG, 16-bit, DICOM)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import prepare_toy
import pytest
from PIL import Image

from cxrcommon.errors import UserError
from finetune.prepare import PrepareConfig, datasets, prepare
from finetune.prepare.images import decode, prepare_image

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def toy(monkeypatch, tmp_path):
    real = datasets.registry()
    monkeypatch.setattr(datasets, "registry", lambda: {**real, "toy": prepare_toy})
    good = prepare_toy.make_tree(tmp_path / "dl")
    return tmp_path / "dl", good


def _cfg(root: Path, out: Path, **kw) -> PrepareConfig:
    return PrepareConfig(dataset="toy", root=str(root), out=str(out), size=64, workers=1, **kw)


def _manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_rows_filters_and_summary(toy, tmp_path):
    root, good = toy
    out = tmp_path / "out"
    summary = prepare(_cfg(root, out))
    rows = _manifest(out)
    assert [r["source_image"] for r in rows] == good
    assert summary["rows_read"] == len(good) + 4 and summary["kept"] == len(good)
    assert summary["excluded"] == {"malformed row": 1, "view LATERAL (not in --views)": 1,
                                   "image file missing": 1, "unreadable image": 1}
    first, second, third = rows[:3]
    assert first["labels"] == "Pleural Effusion" and first["report"] == "PA chest x-ray. Effusion."
    assert second["labels"] == "Lung Lesion|Hernia" and second["report"] == "PA chest x-ray. Mass, hernia."
    assert third["labels"] == "" and third["report"] == "PA chest x-ray. No acute cardiopulmonary findings."
    assert (first["sex"], first["age"], first["source"]) == ("M", "30", "toy")
    assert {r["split"] for r in rows} <= {"train", "validate", "test"}
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())  # a patient never straddles splits
    for r in rows:
        with Image.open(out / r["image"]) as im:
            assert im.size == (64, 64) and im.mode == "L"
    excluded = list(csv.DictReader(open(out / "excluded.csv")))
    assert {e["reason"] for e in excluded} == set(summary["excluded"])
    assert any("bad.jpg" in e["detail"] for e in excluded if e["reason"] == "unreadable image")
    text = (out / "summary.md").read_text()
    assert "image file missing" in text and f"{len(good)} images kept" in text
    assert json.loads((out / "summary.json").read_text())["by_sex"] == {"F": 3, "M": 3}


def test_unknown_views_pass_only_when_asked(toy, tmp_path):
    root, good = toy
    csv_text = (root / "toy.csv").read_text().replace("img0.jpg,p0,PA,", "img0.jpg,p0,,")
    (root / "toy.csv").write_text(csv_text)
    summary = prepare(_cfg(root, tmp_path / "a"))
    assert summary["excluded"]["view UNKNOWN (not in --views)"] == 1 and summary["kept"] == len(good) - 1
    summary = prepare(_cfg(root, tmp_path / "b", views=["PA", "AP", "UNKNOWN"]))
    assert summary["kept"] == len(good) and _manifest(tmp_path / "b")[0]["view"] == ""


def test_manifest_reads_in_finetune_reader(toy, tmp_path):
    from cxrcommon.manifest import Columns, read_manifest
    root, good = toy
    prepare(_cfg(root, tmp_path / "out"))
    records = read_manifest(tmp_path / "out" / "manifest.csv", Columns(text="report", patient="patient"))
    assert len(records) == len(good) and all(r.image.is_file() for r in records)


def test_rerun_makes_only_what_is_missing(toy, tmp_path):
    root, good = toy
    out = tmp_path / "out"
    assert prepare(_cfg(root, out))["images_made_this_run"] == len(good)
    before = (out / "manifest.csv").read_bytes()
    assert prepare(_cfg(root, out))["images_made_this_run"] == 0
    assert (out / "manifest.csv").read_bytes() == before
    (out / "images" / "img2.png").unlink()
    assert prepare(_cfg(root, out))["images_made_this_run"] == 1


def test_workers_give_the_same_output(toy, tmp_path):
    root, _ = toy
    prepare(_cfg(root, tmp_path / "one"))
    cfg = _cfg(root, tmp_path / "two")
    cfg.workers = 2
    prepare(cfg)
    assert (tmp_path / "one" / "manifest.csv").read_bytes() == (tmp_path / "two" / "manifest.csv").read_bytes()
    for p in (tmp_path / "one" / "images").iterdir():
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "two" / "images" / p.name)))


def test_kill_9_loses_nothing(toy, tmp_path):
    root = tmp_path / "dl"
    good = prepare_toy.make_tree(root, n=12)
    out = tmp_path / "out"
    code = ("import sys, prepare_toy; from finetune.prepare import datasets, runner; "
            "real = datasets.registry(); datasets.registry = lambda: {**real, 'toy': prepare_toy}; "
            "from finetune.prepare import PrepareConfig; "
            f"runner.prepare(PrepareConfig(dataset='toy', root={str(root)!r}, out={str(out)!r}, size=64, workers=1))")
    env = {**os.environ, "TOY_SLOW": "0.4", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    images = out / "images"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(images.glob("img*.png"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    made_before = sorted(p.name for p in images.glob("img*.png"))
    assert 3 <= len(made_before) < len(good), "the run should have been killed midway"
    assert not (out / "manifest.csv").exists()  # the manifest only appears whole
    for p in images.glob("img*.png"):
        with Image.open(p) as im:
            im.load()  # every image that exists is whole
    summary = prepare(_cfg(root, out))
    assert summary["images_made_this_run"] == len(good) - len(made_before)
    assert len(_manifest(out)) == len(good)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_bad_input_writes_nothing(toy, tmp_path):
    root, _ = toy
    with pytest.raises(UserError, match="overlaps the input folder"):
        prepare(_cfg(root, root / "out"))
    assert not (root / "out").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "unrelated.txt").write_text("x")
    with pytest.raises(UserError, match="toy.csv not found"):
        prepare(_cfg(other, tmp_path / "o2"))
    with pytest.raises(UserError, match="--uncertain"):
        prepare(_cfg(root, tmp_path / "o3", uncertain="maybe"))
    with pytest.raises(UserError, match="caption-template"):
        prepare(_cfg(root, tmp_path / "o4", caption_template="{nope}"))
    with pytest.raises(UserError, match="unknown dataset"):
        prepare(PrepareConfig(dataset="mimic", root=str(root), out=str(tmp_path / "o5")))
    assert not any((tmp_path / f"o{i}").exists() for i in range(2, 6))


def test_root_of_another_dataset_is_named(toy, tmp_path, monkeypatch):
    root, _ = toy
    other = dict(datasets.registry())
    fake = type(sys)("fake")
    fake.NAME, fake.HAS_REPORTS, fake.LABELS = "fake", False, {}

    def find_root(r, cfg):
        raise UserError(f"{r} does not look like fake: fake.csv not found")
    fake.find_root = find_root
    monkeypatch.setattr(datasets, "registry", lambda: {**other, "fake": fake})
    cfg = _cfg(root, tmp_path / "o")
    cfg.dataset = "fake"
    with pytest.raises(UserError, match=r"holds toy, not fake"):
        prepare(cfg)
    assert not (tmp_path / "o").exists()


def _psnr(a: np.ndarray, b: np.ndarray, top: float) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(top ** 2 / mse)


def test_jpeg_is_dct_scaled_and_close_to_a_full_decode(tmp_path):
    yy, xx = np.mgrid[0:2400, 0:2000]
    img = 40 + 150 * (xx / 2000) * (yy / 2400) + 40 * np.sin(xx / 90.0) * np.cos(yy / 120.0)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(tmp_path / "big.jpg", quality=95)
    small = decode(tmp_path / "big.jpg", 512)
    assert 512 <= max(small.shape) < 2400 / 2  # decoded at 1/4, not in full
    prepare_image(tmp_path / "big.jpg", tmp_path / "fast.png", 512, "pad")
    full = Image.open(tmp_path / "big.jpg").convert("L")
    ref = np.asarray(full.resize((427, 512), Image.LANCZOS))
    fast = np.asarray(Image.open(tmp_path / "fast.png"))[:, (512 - 427) // 2:(512 - 427) // 2 + 427]
    assert _psnr(fast, ref, 255) >= 38


def test_16_bit_png_and_dicom_stay_16_bit(tmp_path):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    arr = (np.linspace(0, 60000, 200 * 160).reshape(200, 160)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert prepare_image(tmp_path / "deep.png", tmp_path / "deep_out.png", 64, "pad") == 16
    with Image.open(tmp_path / "deep_out.png") as im:
        out = np.asarray(im)
    assert out.dtype == np.uint16 and out.max() > 50000
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 200, 160, 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME1"
    ds.PixelData = (arr // 16).tobytes()
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    assert prepare_image(tmp_path / "x.dcm", tmp_path / "x.png", 64, "pad") == 16
    dcm = np.asarray(Image.open(tmp_path / "x.png")).astype(float)
    assert dcm[8:56, 20].mean() > dcm[8:56, 43].mean()  # MONOCHROME1: low stored values come out bright
    assert pydicom.dcmread(tmp_path / "x.dcm").PhotometricInterpretation == "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = (arr // 256).astype(np.uint8).tobytes()
    ds.save_as(tmp_path / "x8.dcm", enforce_file_format=True)
    assert prepare_image(tmp_path / "x8.dcm", tmp_path / "x8.png", 64, "pad") == 8  # no more bits than the source


def test_cli_help_and_one_line_errors(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "finetune.prepare", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    assert out.returncode == 0
    for flag in ("--root", "--out", "--views", "--uncertain", "--readers", "--caption-template", "--workers",
                 "--mimic-iv", "--reports", "--padchest-report", "--size"):
        assert flag in out.stdout
    (tmp_path / "dl").mkdir()
    res = subprocess.run([sys.executable, "-m", "finetune.prepare", "jsrt", "--root", str(tmp_path / "dl"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")
    assert "jsrt" in res.stderr.lower() and not (tmp_path / "o").exists()

"""--deidentify: PS3.15 header profile + header identifiers erased from the pixels + audit trail."""
from __future__ import annotations

import csv
import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (ComputedRadiographyImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless,
                         JPEGLosslessSV1, RLELossless, generate_uid)

from cxrcommon.imageio import read_dicom
from textremoval import TextRemovalConfig, TextRemover
from textremoval.clean import clean, clean_file, main
from textremoval.deidentify import Pseudonymizer, deidentify_dataset, reads_as_identifier
from textremoval.detect import to_uint8_view
from test_textremoval import draw
NAME, PID, BIRTH, ACC = "DOE^JOHN", "4455667", "19610402", "ACC998877"
PHI = ["DOE", "JOHN", PID, BIRTH, ACC, "SAINT ELSEWHERE", "HOUSE", "GREGORY", "02/04/1961"]
DEID = dict(deidentify=True, deid_secret="test-key")


def film(items, shape=(320, 400), seed=0) -> np.ndarray:
    """An X-ray-like 8-bit film with bright text items [(text, (x, y), size)] (test_textremoval's drawing)."""
    return draw(shape, items, seed)[0]


PHI_FILM = [("DOE, JOHN", (20, 16), 26), (f"ID {PID}", (20, 52), 24), ("R", (330, 200), 40)]


def phi_dataset(img: np.ndarray, *, study: str | None = None, photometric: str = "MONOCHROME2") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PID, BIRTH
    ds.PatientSex, ds.PatientAge, ds.PatientWeight = "M", "063Y", "81"
    ds.AccessionNumber, ds.InstitutionName = ACC, "SAINT ELSEWHERE HOSPITAL"
    ds.ReferringPhysicianName, ds.OperatorsName = "HOUSE^GREGORY", "DOE^JANE"
    ds.StudyDate, ds.StudyTime, ds.SeriesDate = "20200321", "101500", "20200321"
    ds.StudyDescription, ds.SeriesDescription = "CHEST AP for DOE JOHN 21/03/2020", "AP PORTABLE"
    ds.ImageComments = f"pt {PID} bed 4"
    ds.Modality, ds.BurnedInAnnotation = "CR", "YES"
    ds.private_block(0x0009, "ACME", create=True).add_new(0x01, "LO", "DOE JOHN private")
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ComputedRadiographyImageStorage, generate_uid()
    ds.ReferencedImageSequence = Sequence([item])
    stored = img.astype(np.uint16) * 16
    ds.set_pixel_data(4095 - stored if photometric == "MONOCHROME1" else stored, photometric, 12)
    return ds


def save(ds: Dataset, path) -> None:
    ds.save_as(path, enforce_file_format=True)


def header_text(ds: Dataset) -> str:
    parts = []
    ds.walk(lambda _, e: parts.append(str(e.value)) if e.tag != 0x7FE00010 else None)
    return " ".join(parts).upper()


@pytest.fixture(scope="module")
def remover():
    return TextRemover.from_config(TextRemovalConfig(keep_markers=True, **DEID))


def test_identifier_matching_tolerates_ocr_slips_but_not_short_strings():
    idents = ["DOE JOHN", "DOE", "JOHN", PID]
    assert reads_as_identifier("D0E, JOHN", idents)          # 0 for O
    assert reads_as_identifier("ID 4455657", idents)          # one digit misread
    assert reads_as_identifier("JOH", idents)                 # a fragment of a longer box
    assert not reads_as_identifier("R", idents) and not reads_as_identifier("PORTABLE", idents)


def test_cli_deidentifies_header_erases_identifiers_keeps_markers_and_audits(tmp_path, remover):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    save(phi_dataset(film(PHI_FILM)), src / "a.dcm")
    assert main([str(src), "--out", str(out), "--deidentify", "--keep-markers", "--deid-secret", "k"]) == 0
    raw = (out / "a.dcm").read_bytes().upper()
    assert not [s for s in PHI if s.encode() in raw]           # no PHI anywhere in the file, preamble included
    ds = pydicom.dcmread(out / "a.dcm")
    assert ds.PatientIdentityRemoved == "YES" and ds.BurnedInAnnotation == "NO"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113107", "113108", "113105",
                                                                           "113101"]
    assert (ds.PatientSex, ds.PatientAge, ds.PatientWeight) == ("M", "063Y", "81")     # characteristics kept
    assert ds.StudyDate != "20200321" and ds.StudyDate == ds.SeriesDate and ds.StudyTime == "101500"
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert ds.StudyDescription.startswith("CHEST AP") and ds.SeriesDescription == "AP PORTABLE"  # cleaned, kept
    assert not any(e.tag.is_private for e in ds.iterall())
    assert ds.PatientID.startswith("ANON-") and ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    # the pixels: OCR of the written file reads no identifier, the R marker is still there
    texts = [r.text for r in remover.detector(to_uint8_view(read_dicom(out / "a.dcm")[0]))]
    assert not [t for t in texts if reads_as_identifier(t, PHI)] and "R" in texts
    rec = json.loads((out / "a.regions.json").read_text())
    assert rec["deidentify"]["identifier_regions"] >= 2 and rec["deidentify"]["regions_kept"] == 1
    assert not [s for s in PHI if s in json.dumps(rec).upper()]
    rows = list(csv.DictReader((out / "deid_audit.csv").open()))
    assert rows[0]["status"] == "ok" and "PatientName" in rows[0]["emptied"] and "PatientSex" in rows[0]["kept"]
    assert "(0009,1001) private" in rows[0]["removed"] and "StudyInstanceUID" in rows[0]["replaced"]
    assert not [s for s in PHI if s in (out / "deid_audit.csv").read_text().upper()]
    assert not list(tmp_path.rglob("*map*"))                   # the mapping only on request


def test_uids_dates_and_patient_stay_linked_across_files_and_mapping_is_written(tmp_path):
    study = generate_uid()
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        save(phi_dataset(film([("AP", (20, 20), 20)], seed=len(name)), study=study), src / f"{name}.dcm")
    summary = clean([str(src)], tmp_path / "out", TextRemovalConfig(**DEID), mapping_out=tmp_path / "map.csv")
    assert len(summary["done"]) == 2 and not summary["failed"]
    a, b = (pydicom.dcmread(tmp_path / "out" / f"{n}.dcm") for n in "ab")
    assert a.StudyInstanceUID == b.StudyInstanceUID != study and a.SeriesInstanceUID != b.SeriesInstanceUID
    assert a.PatientID == b.PatientID and a.StudyDate == b.StudyDate
    rows = list(csv.DictReader((tmp_path / "map.csv").open()))
    assert {"kind": "uid", "old": study, "new": a.StudyInstanceUID} in rows
    assert {"kind": "patient_id", "old": PID, "new": a.PatientID} in rows
    same_key = deidentify_dataset(phi_dataset(film([]), study=study), TextRemovalConfig(**DEID),
                                  Pseudonymizer("test-key")).dataset
    assert same_key.StudyInstanceUID == a.StudyInstanceUID     # the same secret links later runs too
    other = deidentify_dataset(phi_dataset(film([]), study=study), TextRemovalConfig(**DEID), Pseudonymizer("x"))
    assert other.dataset.StudyInstanceUID != a.StudyInstanceUID


def test_identifier_is_erased_even_where_policy_keeps_text_and_unremoved_text_flags_review(tmp_path):
    cfg = TextRemovalConfig(erase_pattern="PORTABLE", **DEID)   # keeps everything but PORTABLE ...
    path = tmp_path / "x.dcm"
    save(phi_dataset(film([("DOE JOHN", (20, 16), 26), ("PORTABLE", (20, 60), 26), ("CHEST", (200, 250), 26)])),
         path)
    rec = clean_file(path, tmp_path / "out", cfg)
    by_action = {r["action"]: r for r in rec["regions"] if r["identifier"]}
    assert set(by_action) == {"erased"}                         # ... yet the patient's name goes
    deid = rec["deidentify"]
    assert deid["status"] == "review" and any("not a side marker" in r for r in deid["review"])
    ds = pydicom.dcmread(tmp_path / "out" / "x.dcm")
    codes = [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
    assert ds.BurnedInAnnotation == "YES" and "113101" not in codes
    assert "DOE" not in json.dumps(deid).upper()


def _jpeg_lossless(img: np.ndarray, bits: int) -> bytes:
    """A minimal JPEG lossless (process 14, predictor 1) encoder: pydicom has none, and the test needs a file."""
    out, acc, n = bytearray(), 0, 0

    def put(value: int, length: int) -> None:
        nonlocal acc, n
        acc, n = (acc << length) | (value & ((1 << length) - 1)), n + length
        while n >= 8:
            byte = (acc >> (n - 8)) & 0xFF
            out.append(byte)
            if byte == 0xFF:
                out.append(0)
            n -= 8
    x = img.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0], pred[0, 1:], pred[1:, 0], pred[1:, 1:] = 1 << (bits - 1), x[0, :-1], x[:-1, 0], x[1:, :-1]
    for d in ((x - pred) % 65536).ravel():
        d = int(d) - 65536 if d > 32768 else int(d)
        ssss = abs(d).bit_length()
        put(ssss, 5)                                            # 17 categories, all 5-bit codes 0..16
        if 0 < ssss < 16:
            put(d if d > 0 else d - 1, ssss)
    if n:
        put((1 << (8 - n)) - 1, 8 - n)
    h, w = img.shape
    dht = bytes([0xFF, 0xC4, 0, 3 + 16 + 17, 0]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sof = bytes([0xFF, 0xC3, 0, 11, bits, h >> 8, h & 255, w >> 8, w & 255, 1, 1, 0x11, 0])
    sos = bytes([0xFF, 0xDA, 0, 8, 1, 1, 0, 1, 0, 0])
    return b"\xff\xd8" + dht + sof + sos + bytes(out) + b"\xff\xd9"


@pytest.mark.parametrize("kind", ["rle", "jpeg2000", "jpeg_lossless", "monochrome1"])
def test_compressed_and_monochrome1_inputs_give_valid_uncompressed_dicom(tmp_path, remover, kind):
    img = film(PHI_FILM[:2])
    ds = phi_dataset(img, photometric="MONOCHROME1" if kind == "monochrome1" else "MONOCHROME2")
    stored = ds.pixel_array.copy()
    if kind == "rle":
        ds.compress(RLELossless)
    elif kind == "jpeg2000":
        ds.compress(JPEG2000Lossless)
    elif kind == "jpeg_lossless":
        ds.PixelData = encapsulate([_jpeg_lossless(stored, 12)])
        ds["PixelData"].VR, ds.file_meta.TransferSyntaxUID = "OB", JPEGLosslessSV1
    path = tmp_path / "x.dcm"
    save(ds, path)
    assert np.array_equal(pydicom.dcmread(path).pixel_array, stored)  # the input decodes to what we encoded
    clean_file(path, tmp_path / "out", remover=remover)
    out_path = tmp_path / "out" / "x.dcm"
    out = pydicom.dcmread(out_path)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and out.PatientIdentityRemoved == "YES"
    assert out.PhotometricInterpretation == ds.PhotometricInterpretation
    # a second reader: the raw little-endian words of Pixel Data, without pydicom's pixel handlers
    raw = np.frombuffer(out.PixelData, "<u2")[: out.Rows * out.Columns].reshape(out.Rows, out.Columns)
    assert np.array_equal(raw, out.pixel_array)
    mask = np.asarray(Image.open(tmp_path / "out" / "x.mask.png")) > 0
    assert mask.any() and np.array_equal(raw[~mask], stored[~mask])


def test_multiframe_is_refused_with_the_fix_and_nothing_is_written(tmp_path, remover):
    ds = phi_dataset(film([]))
    frames = np.stack([ds.pixel_array] * 2)
    ds.set_pixel_data(frames, "MONOCHROME2", 12)
    save(ds, tmp_path / "m.dcm")
    summary = clean([str(tmp_path / "m.dcm")], tmp_path / "out", TextRemovalConfig(**DEID))
    assert "2 frames DICOM is not supported; split it" in summary["failed"][0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["deid_audit.csv", "deid_audit.json"]
    assert "failed" in (tmp_path / "out" / "deid_audit.csv").read_text()


def test_a_header_the_profile_cannot_handle_is_skipped_whole(tmp_path, monkeypatch):
    from textremoval import deidentify

    def broken(ds, tag):
        raise NotImplementedError("Not anonymized. VR XX not yet implemented.")
    monkeypatch.setattr(deidentify, "basic_profile", lambda: {(0x0010, 0x0010): broken})
    save(phi_dataset(film([])), tmp_path / "a.dcm")
    summary = clean([str(tmp_path / "a.dcm")], tmp_path / "out", TextRemovalConfig(**DEID))
    assert "header could not be de-identified" in summary["failed"][0] and "a.dcm" in summary["failed"][0]
    assert not list((tmp_path / "out").glob("a.*"))


def test_verify_pass_erases_text_the_first_pass_missed(remover):
    from textremoval.clean import clean_verified
    img = film(PHI_FILM[:1])
    calls = []

    def first_blind(gray):
        calls.append(1)
        return [] if len(calls) == 1 else remover.detector(gray)
    blind = TextRemover(first_blind, remover.segmenter, remover.inpainter, remover.config)
    res, left = clean_verified(blind, img, None, ["DOE JOHN", "DOE", "JOHN"])
    assert len(calls) == 3 and not left                 # missed, found by the check, clear on the re-check
    assert res.mask[16:45, 20:150].mean() > 0.2 and any(r.identifier for r in res.regions)

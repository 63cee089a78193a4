"""--deidentify: PS3.15 header profile + header identifiers erased from the pixels + audit trail."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)
from test_textremoval import draw

from cxrcommon.errors import UserError
from cxrcommon.imageio import read_dicom
from textremoval import TextRemovalConfig, TextRemover
from textremoval import remover as remover_mod
from textremoval.clean import EXIT_REVIEW, clean, clean_file, main
from textremoval.deid import files as deid_files
from textremoval.deid.profile import deidentify_dataset
from textremoval.deid.pseudonyms import Pseudonymizer
from textremoval.deid.scrubber import identifiers, reads_as_identifier
from textremoval.detect import TextRegion, to_uint8_view

NAME, PID, BIRTH, ACC = "DOE^JOHN", "4455667", "19610402", "ACC998877"
PHI = ["DOE", "JOHN", PID, BIRTH, ACC, "SAINT ELSEWHERE", "HOUSE", "GREGORY", "02/04/1961", "20200321",
       "ELSEWHERE_WS"]
DEID = dict(deidentify=True, deid_secret="test-key")
PHI_NAME = "DOE_JOHN_4455667.dcm"   # input names hold PHI in real exports


def film(items, shape=(320, 400), seed=0) -> np.ndarray:
    """An X-ray-like 8-bit film with bright text items [(text, (x, y), size)] (test_textremoval's drawing)."""
    return draw(shape, items, seed)[0]


PHI_FILM = [("DOE, JOHN", (20, 16), 26), (f"ID {PID}", (20, 52), 24), ("R", (330, 200), 40)]


def item(**kw) -> Dataset:
    d = Dataset()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def phi_dataset(img: np.ndarray, *, study: str | None = None, photometric: str = "MONOCHROME2",
                date: str = "20200321", pid: str = PID, ref: str | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.SourceApplicationEntityTitle = "ELSEWHERE_WS"        # source meta: must not survive
    ds.preamble = b"DOE JOHN 4455667".ljust(128, b"\0")               # a preamble can carry anything
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, pid, BIRTH
    ds.PatientSex, ds.PatientAge, ds.PatientWeight = "M", "063Y", "81"
    ds.AccessionNumber, ds.InstitutionName = ACC, "SAINT ELSEWHERE HOSPITAL"
    ds.ReferringPhysicianName, ds.OperatorsName = "HOUSE^GREGORY", "DOE^JANE"
    ds.StudyDate, ds.StudyTime, ds.SeriesDate = date, "101500", date
    ds.StudyDescription, ds.SeriesDescription = "CHEST AP for DOE JOHN 21/03/2020", "AP PORTABLE"
    ds.ImageComments = f"pt {PID} bed 4"
    ds.Modality, ds.BurnedInAnnotation = "CR", "YES"
    ds.private_block(0x0009, "ACME", create=True).add_new(0x01, "LO", "DOE JOHN private")
    ds.ReferencedImageSequence = Sequence([item(ReferencedSOPClassUID=ComputedRadiographyImageStorage,
                                                ReferencedSOPInstanceUID=ref or generate_uid())])
    ds.ProcedureCodeSequence = Sequence([item(CodeValue="CXR", CodingSchemeDesignator="99X",
                                              CodeMeaning="Chest film DOE JOHN")])  # kept; the sweep cuts the name
    stored = img.astype(np.uint16) * 16
    ds.set_pixel_data(4095 - stored if photometric == "MONOCHROME1" else stored, photometric, 12)
    return ds


def save(ds: Dataset, path) -> None:
    ds.save_as(path, enforce_file_format=True)


def out_name(rel: str, secret: str = "test-key") -> str:
    return Pseudonymizer(secret).file_name(rel).name


def header_text(ds: Dataset) -> str:
    parts = []
    ds.walk(lambda _, e: parts.append(str(e.value)) if e.tag != 0x7FE00010 else None)
    return " ".join(parts).upper()


def read_any(path: Path) -> np.ndarray:
    return read_dicom(path)[0] if path.suffix == ".dcm" else cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def ocr_phi(remover, path: Path, phi=PHI) -> list[str]:
    """What the project's detector reads as PHI in an image file (and in its negative: a mask is white on black)."""
    img = to_uint8_view(read_any(path))
    texts = [r.text for view in (img, 255 - img) for r in remover.detector(view)]
    return [t for t in texts if reads_as_identifier(t, phi)]


@pytest.fixture(scope="module")
def remover():
    return TextRemover.from_config(TextRemovalConfig(keep_markers=True, **DEID))


def test_identifier_matching_tolerates_ocr_slips_but_not_short_strings():
    idents = ["DOE JOHN", "DOE", "JOHN", PID]
    assert reads_as_identifier("D0E, JOHN", idents)          # 0 for O
    assert reads_as_identifier("ID 4455657", idents)          # one digit misread
    assert reads_as_identifier("JOH", idents)                 # a fragment of a longer box
    assert not reads_as_identifier("R", idents) and not reads_as_identifier("PORTABLE", idents)


def test_cli_deidentifies_header_and_every_output_file_is_free_of_phi(tmp_path, remover):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    img = film(PHI_FILM + [("2020-03-21", (20, 260), 24)])       # the real study date, burned in
    save(phi_dataset(img), src / PHI_NAME)
    assert main([str(src), "--out", str(out), "--deidentify", "--keep-markers", "--deid-secret", "k"]) == 0
    name = out_name(PHI_NAME, "k")
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert [p.name for p in files] == sorted([name, name[:-4] + ".mask.png", name[:-4] + ".regions.json",
                                              "deid_audit.csv", "deid_audit.json"])
    for p in files:  # names, header bytes (preamble and file meta included), JSON, CSV: no PHI anywhere
        assert not [s for s in PHI + ["DOE_JOHN"] if s.encode() in p.name.upper().encode() + p.read_bytes().upper()]
    ds = pydicom.dcmread(out / name)
    assert ds.preamble == b"\0" * 128 and "SourceApplicationEntityTitle" not in ds.file_meta
    assert ds.file_meta.ImplementationClassUID == pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    assert ds.PatientIdentityRemoved == "YES" and ds.BurnedInAnnotation == "NO"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113107", "113108", "113101"]
    assert (ds.PatientSex, ds.PatientAge, ds.PatientWeight) == ("M", "063Y", "81")     # characteristics kept
    assert ds.StudyDate != "20200321" and ds.StudyTime == "101500"
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    # by default descriptors and comments go, as the Basic Profile says (--clean-descriptors keeps them cleaned)
    assert "StudyDescription" not in ds and "SeriesDescription" not in ds and "ImageComments" not in ds
    assert ds.ProcedureCodeSequence[0].CodeMeaning == "Chest film"                  # swept inside a sequence
    assert ds.ProcedureCodeSequence[0].CodeValue == "CXR"
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert not any(e.tag.is_private for e in ds.iterall())
    assert ds.PatientID.startswith("ANON-") and ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    # the pixels: OCR of every written image (the mask too) reads no identifier, the R marker is still there
    for p in files:
        if p.suffix in (".dcm", ".png"):
            assert not ocr_phi(remover, p), p.name
    texts = [r.text for r in remover.detector(to_uint8_view(read_dicom(out / name)[0]))]
    assert "R" in texts
    # the mask is filled boxes that cover every changed pixel; pixels outside it are the input's
    mask = cv2.imread(str(out / (name[:-4] + ".mask.png")), 0) > 0
    n, labels = cv2.connectedComponents(mask.astype(np.uint8))
    assert n > 1
    for k in range(1, n):
        ys, xs = np.nonzero(labels == k)
        assert mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()         # a filled rectangle
    raw, before = pydicom.dcmread(out / name).pixel_array, img.astype(np.uint16) * 16
    assert np.array_equal(raw[~mask], before[~mask])
    assert (raw[16:42, 20:140] != before[16:42, 20:140]).mean() > 0.2           # the name's pixels changed
    rec = json.loads((out / (name[:-4] + ".regions.json")).read_text())
    assert rec["deidentify"]["identifier_regions"] >= 3 and rec["deidentify"]["regions_kept"] == 1
    assert {r["text"] for r in rec["regions"]} <= {"", "R"}
    rows = list(csv.DictReader((out / "deid_audit.csv").open()))
    assert rows[0]["status"] == "ok" and "PatientName" in rows[0]["emptied"] and "PatientSex" in rows[0]["kept"]
    assert "(0009,1001) private" in rows[0]["removed"] and "StudyInstanceUID" in rows[0]["replaced"]
    assert rows[0]["input"] == name
    assert not list(tmp_path.rglob("*map*"))                   # the mapping only on request


def test_app_clean_downloads_hold_no_readable_phi(tmp_path, remover):
    import app

    class Services:
        def remover(self, keep_markers, deidentify):
            assert deidentify
            return remover

        def run(self, fn, *args, **kwargs):
            return fn(*args, **kwargs)
    save(phi_dataset(film(PHI_FILM)), tmp_path / PHI_NAME)
    _, cleaned, mask, files, table = app.clean_upload(Services(), tmp_path / "session", str(tmp_path / PHI_NAME),
                                                     True, True)
    assert len(files) == 3 and all(Path(f).is_file() for f in files)
    for f in [cleaned, mask] + [f for f in files if not f.endswith(".json")]:
        assert not ocr_phi(remover, Path(f)), f
    assert not [s for s in PHI if s in Path(files[2]).read_text().upper()]
    assert not [row for row in table if reads_as_identifier(row[0], PHI)]


def test_sequences_keep_valid_keyed_uids_and_the_library_never_draws_random_ones(monkeypatch):
    import dicomanonymizer.simpledicomanonymizer as sda

    def no_random_uids(old):
        raise AssertionError("dicom-anonymizer's get_UID ran")
    monkeypatch.setattr(sda, "get_UID", no_random_uids)
    ref, pps, study_ref = generate_uid(), generate_uid(), generate_uid()
    ds = phi_dataset(film([]), ref=ref)
    ds.SourceImageSequence = Sequence([item(ReferencedSOPClassUID=ComputedRadiographyImageStorage,
                                            ReferencedSOPInstanceUID=ref)])
    ds.ReferencedStudySequence = Sequence([item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
                                                ReferencedSOPInstanceUID=study_ref)])
    ds.ReferencedPerformedProcedureStepSequence = Sequence([item(
        ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.3", ReferencedSOPInstanceUID=pps)])
    ds.StudyID, ds.SpecificCharacterSet, ds.PatientName = "100", "ISO_IR 100", "ROME^ANNA"
    ds.SeriesDescription, ds.ProcedureCodeSequence[0].CodeMeaning = "AP ROMEO VIEW", "ANNA ROME chest"
    out = deidentify_dataset(ds, TextRemovalConfig(**DEID, deid_clean_descriptors=True), Pseudonymizer("k")).dataset
    new_ref = Pseudonymizer("k").uid(ref)
    for seq in ("ReferencedImageSequence", "SourceImageSequence"):
        assert out[seq][0].ReferencedSOPInstanceUID == new_ref                    # remapped, same key -> same UID
        assert out[seq][0].ReferencedSOPClassUID == ComputedRadiographyImageStorage  # class UIDs never remapped
    assert out.ReferencedStudySequence[0].ReferencedSOPInstanceUID == Pseudonymizer("k").uid(study_ref)
    assert out.ReferencedStudySequence[0].ReferencedSOPClassUID == "1.2.840.10008.3.1.2.3.1"
    assert out.ReferencedPerformedProcedureStepSequence[0].ReferencedSOPInstanceUID == Pseudonymizer("k").uid(pps)
    assert out.SOPClassUID == ComputedRadiographyImageStorage
    # coded attributes are not swept: 'ROME' is no part of MONOCHROME2, StudyID '100' none of 'ISO_IR 100'
    assert out.PhotometricInterpretation == "MONOCHROME2" and out.SpecificCharacterSet == "ISO_IR 100"
    assert out.SeriesDescription == "AP ROMEO VIEW"                           # whole words only: ROMEO stays
    assert out.ProcedureCodeSequence[0].CodeMeaning == "chest"                # ... but the name goes


def test_identifiers_are_every_name_date_and_scrubbed_free_text_sequences_included():
    ds = phi_dataset(film([]))
    ds.StationName, ds.InstitutionalDepartmentName, ds.OtherPatientIDs = "XR-ROOM-7", "RADIOLOGY WEST", ["OPID12345"]
    ds.RequestAttributesSequence = Sequence([item(RequestedProcedureID="RQ778899",
                                                  ScheduledPerformingPhysicianName="KILDARE^JAMES")])
    ds.AcquisitionDate = "20200322"
    out = deidentify_dataset(ds, TextRemovalConfig(**DEID), Pseudonymizer("k"))
    idents = {i.upper() for i in out.identifiers}
    for s in ("DOE JOHN", "JANE", "GREGORY", "KILDARE", "JAMES", PID, ACC, "XR-ROOM-7", "RADIOLOGY WEST",
              "OPID12345", "RQ778899", "SAINT ELSEWHERE HOSPITAL"):
        assert s in idents, s
    for d in ("20200321", "2020-03-21", "21/03/2020", "03/21/2020", "21.03.2020", "21-MAR-2020", "22-MAR-2020",
              "02/04/1961"):
        assert d in idents, d
    assert "AP PORTABLE" not in idents and "CHEST" not in idents and "CXR" not in idents  # kept text is not PHI
    assert identifiers(ds, set()) and not [i for i in identifiers(ds, set()) if "ROOM" in i]


def test_placeholder_dates_survive_and_every_date_moves_by_vr():
    ds = phi_dataset(film([]), date="00010101")
    ds.InstanceCreationDate, ds.InstanceCreationTime, ds.AcquisitionDateTime = "20200321", "101600", "20200321101600"
    ds.DateOfSecondaryCapture = "20200321"
    out = deidentify_dataset(ds, TextRemovalConfig(**DEID), Pseudonymizer("k")).dataset
    assert out.StudyDate == "00010101"                          # already anonymized elsewhere: left as it is
    shifted = out.InstanceCreationDate
    assert shifted not in ("20200321", "00010101", "") and out.DateOfSecondaryCapture == shifted
    assert out.AcquisitionDateTime == shifted + "101600" and out.InstanceCreationTime == "101600"


def test_links_across_files_and_workers_dates_keep_intervals_per_patient_mapping_is_private(tmp_path, monkeypatch):
    study, ref = generate_uid(), generate_uid()
    src = tmp_path / "in"
    src.mkdir()
    plan = {"a": ("20200321", PID), "b": ("20200401", PID), "c": ("20200321", "9988776")}
    for name, (date, pid) in plan.items():
        save(phi_dataset(film([("AP", (20, 20), 20)], seed=len(name)), study=study, date=date, pid=pid, ref=ref),
             src / f"{name}.dcm")
    monkeypatch.setenv("SYNTHCXR_DEID_SECRET", "env-key")      # the key from the environment, not the command line
    with pytest.raises(UserError, match="inside --out"):
        clean([str(src)], tmp_path / "out", TextRemovalConfig(deidentify=True), mapping_out=tmp_path / "out" / "m.csv")
    summary = clean([str(src)], tmp_path / "out", TextRemovalConfig(deidentify=True), workers=2,
                    mapping_out=tmp_path / "map.csv")
    assert len(summary["done"]) == 3 and not summary["failed"]
    a, b, c = (pydicom.dcmread(tmp_path / "out" / out_name(f"{n}.dcm", "env-key")) for n in "abc")
    assert a.StudyInstanceUID == b.StudyInstanceUID != study and a.SeriesInstanceUID != b.SeriesInstanceUID
    refs = {x.ReferencedImageSequence[0].ReferencedSOPInstanceUID for x in (a, b, c)}
    assert refs == {Pseudonymizer("env-key").uid(ref)}           # one UID across the two worker processes
    assert a.PatientID == b.PatientID != c.PatientID

    def day(x):
        return np.datetime64(f"{x[:4]}-{x[4:6]}-{x[6:]}")
    assert day(b.StudyDate) - day(a.StudyDate) == np.timedelta64(11, "D")      # intervals kept per patient
    assert a.StudyDate != "20200321" and c.StudyDate != a.StudyDate             # other patient, other shift
    assert os.stat(tmp_path / "map.csv").st_mode & 0o777 == 0o600
    rows = list(csv.DictReader((tmp_path / "map.csv").open()))
    assert {"kind": "uid", "old": study, "new": a.StudyInstanceUID} in rows
    assert {"kind": "patient_id", "old": PID, "new": a.PatientID} in rows
    assert {"kind": "file", "old": "a.dcm", "new": out_name("a.dcm", "env-key")} in rows
    (tmp_path / "key.txt").write_text("env-key\n")
    same_key = deidentify_dataset(phi_dataset(film([]), study=study), TextRemovalConfig(**DEID),
                                  Pseudonymizer("env-key")).dataset
    assert same_key.StudyInstanceUID == a.StudyInstanceUID     # the same secret links later runs too
    monkeypatch.delenv("SYNTHCXR_DEID_SECRET")
    again = clean([str(src)], tmp_path / "out", TextRemovalConfig(deidentify=True,
                                                                  deid_secret=f"file:{tmp_path / 'key.txt'}"))
    assert len(again["skipped"]) == 3                          # the key from a file: the same run, resumed


def test_resume_refuses_other_settings_and_always_writes_the_audit(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    save(phi_dataset(film([("AP", (20, 20), 20)])), src / "a.dcm")
    clean([str(src)], tmp_path / "plain", TextRemovalConfig())
    with pytest.raises(UserError, match="other de-identification settings"):
        clean([str(src)], tmp_path / "plain", TextRemovalConfig(**DEID))
    clean([str(src)], tmp_path / "out", TextRemovalConfig(**DEID))
    for other in (dict(DEID, deid_secret="other"), dict(DEID, deid_retain_dates=False)):
        with pytest.raises(UserError, match="other de-identification settings"):
            clean([str(src)], tmp_path / "out", TextRemovalConfig(**other))
    (tmp_path / "out" / "deid_audit.csv").unlink()
    assert clean([str(src)], tmp_path / "out", TextRemovalConfig(**DEID))["skipped"] == [out_name("a.dcm")]
    assert list(csv.DictReader((tmp_path / "out" / "deid_audit.csv").open()))[0]["input"] == out_name("a.dcm")


def test_remover_is_reused_across_runs_with_random_keys(tmp_path):
    save(phi_dataset(film([])), tmp_path / "a.dcm")
    clean([str(tmp_path / "a.dcm")], tmp_path / "o0", TextRemovalConfig(deidentify=True))
    n = len(remover_mod._REMOVERS)
    clean([str(tmp_path / "a.dcm")], tmp_path / "o1", TextRemovalConfig(deidentify=True))
    assert len(remover_mod._REMOVERS) == n
    assert remover_mod.get_remover(TextRemovalConfig(deidentify=True, deid_secret="a")) is \
        remover_mod.get_remover(TextRemovalConfig(deidentify=True, deid_secret="b"))
    assert {p.name for p in (tmp_path / "o0").glob("*.dcm")} != {p.name for p in (tmp_path / "o1").glob("*.dcm")}


def test_kept_text_is_blanked_flagged_file_goes_to_review_folder_and_cli_exits_3(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    save(phi_dataset(film([("DOE JOHN", (20, 16), 26), ("PORTABLE", (20, 60), 26), ("CHEST", (200, 250), 26)])),
         src / "x.dcm")
    code = main([str(src), "--out", str(tmp_path / "out"), "--deidentify", "--deid-secret", "test-key",
                 "--erase-pattern", "PORTABLE"])           # keeps everything but PORTABLE ...
    assert code == EXIT_REVIEW
    name = out_name("x.dcm")
    assert not (tmp_path / "out" / name).exists()
    rec = json.loads((tmp_path / "out" / deid_files.REVIEW_DIR / (name[:-4] + ".regions.json")).read_text())
    by_action = {r["action"] for r in rec["regions"] if r["identifier"]}
    assert by_action == {"erased"}                             # ... yet the patient's name goes
    assert {r["text"] for r in rec["regions"]} == {""}          # kept CHEST is blanked too: not a side marker
    deid = rec["deidentify"]
    assert deid["status"] == "review" and any("not a side marker" in r for r in deid["review"])
    ds = pydicom.dcmread(tmp_path / "out" / deid_files.REVIEW_DIR / name)
    codes = [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
    assert ds.BurnedInAnnotation == "YES" and "113101" not in codes
    rows = list(csv.DictReader((tmp_path / "out" / "deid_audit.csv").open()))
    assert rows[0]["status"] == "review" and deid_files.REVIEW_DIR in rows[0]["output"]


def test_no_clean_pixel_claim_without_verification_and_any_box_is_residual(tmp_path, remover):
    save(phi_dataset(film(PHI_FILM)), tmp_path / "d.dcm")
    cfg = TextRemovalConfig(keep_markers=True, **dict(DEID, deid_verify=False))
    rec = clean_file(tmp_path / "d.dcm", tmp_path / "out", remover=TextRemover(
        remover.detector, remover.segmenter, remover.inpainter, cfg))
    ds = pydicom.dcmread(rec["output"])
    assert (ds.BurnedInAnnotation == "YES"
            and "113101" not in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence])
    assert rec["deidentify"]["status"] == "unverified"
    faint = TextRegion((10, 10, 60, 30), [], 0.9, text="D0E", text_score=0.1)
    probe = TextRemover(lambda g: [faint], remover.segmenter, remover.inpainter, remover.config)
    assert probe.residual_text(np.zeros((64, 64), np.uint8), []) == [faint]


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    save(phi_dataset(film(PHI_FILM[:1])), tmp_path / "a.dcm")
    monkeypatch.setattr(deid_files.cv2, "imencode", lambda *a, **k: (False, None))  # the mask cannot be encoded
    summary = clean([str(tmp_path / "a.dcm")], tmp_path / "out", TextRemovalConfig(**DEID))
    assert summary["failed"] and summary["failed"][0].startswith(out_name("a.dcm"))
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["deid_audit.csv", "deid_audit.json"]


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
    rec = clean_file(path, tmp_path / "out", remover=remover, pseudo=Pseudonymizer("k"))
    out = pydicom.dcmread(rec["output"])
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and out.PatientIdentityRemoved == "YES"
    assert out.PhotometricInterpretation == ds.PhotometricInterpretation
    # a second reader: the raw little-endian words of Pixel Data, without pydicom's pixel handlers
    raw = np.frombuffer(out.PixelData, "<u2")[: out.Rows * out.Columns].reshape(out.Rows, out.Columns)
    assert np.array_equal(raw, out.pixel_array)
    mask = cv2.imread(rec["mask"], 0) > 0
    assert mask.any() and np.array_equal(raw[~mask], stored[~mask])


def test_a_multiframe_film_is_cleaned_frame_by_frame_in_its_stored_values(tmp_path, remover):
    ds = phi_dataset(film([]))
    plain, marked = ds.pixel_array, phi_dataset(film(PHI_FILM[:2])).pixel_array   # the name on frame 2 only
    ds.set_pixel_data(np.stack([plain, marked]), "MONOCHROME2", 12)
    save(ds, tmp_path / "m.dcm")
    summary = clean([str(tmp_path / "m.dcm")], tmp_path / "out", TextRemovalConfig(**DEID))
    assert summary["failed"] == [] and summary["review"] == []
    out = pydicom.dcmread(tmp_path / "out" / out_name("m.dcm"))
    assert out.PatientIdentityRemoved == "YES" and out.BurnedInAnnotation == "NO" and PID not in str(out)
    frames = out.pixel_array
    assert frames.shape == (2, *plain.shape) and np.array_equal(frames[0], plain)     # frame 1 untouched
    changed = frames[1] != marked
    assert changed[16:45, 20:150].mean() > 0.1                                       # the name is erased
    # erased in stored values: the patch sits at its neighbours' level, not at a display-space extreme
    assert abs(float(np.median(frames[1][changed])) - float(np.median(plain[changed]))) < 200


def test_a_clipped_window_does_not_leave_a_stencil_of_the_erased_text(tmp_path, remover):
    """A window that shows every stored value up to 600 as black: erasing in display space and mapping back
    gave the lowest stored value, a readable stencil of the glyphs on a 600-level background."""
    img = film(PHI_FILM[:1]).astype(np.uint16) * 16
    ds = phi_dataset(film([]))
    stored = np.maximum(img, 600).astype(np.uint16)
    ds.set_pixel_data(stored, "MONOCHROME2", 12)
    ds.WindowCenter, ds.WindowWidth = 2000, 2800            # 600 and below display as 0
    save(ds, tmp_path / "w.dcm")
    clean([str(tmp_path / "w.dcm")], tmp_path / "out", TextRemovalConfig(**DEID))
    out = next((tmp_path / "out").rglob("*.dcm"))
    px = pydicom.dcmread(out).pixel_array
    erased = px != stored
    assert erased.any() and px[erased].min() >= 550, np.unique(px[erased])[:5]


def test_a_header_the_profile_cannot_handle_is_skipped_whole(tmp_path, monkeypatch):
    from textremoval.deid import profile as deidentify

    def broken(ds, tag):
        raise NotImplementedError("Not anonymized. VR XX not yet implemented.")
    monkeypatch.setattr(deidentify, "basic_profile", lambda: {(0x0010, 0x0010): broken})
    save(phi_dataset(film([])), tmp_path / "a.dcm")
    summary = clean([str(tmp_path / "a.dcm")], tmp_path / "out", TextRemovalConfig(**DEID))
    assert "header could not be de-identified" in summary["failed"][0] and out_name("a.dcm") in summary["failed"][0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["deid_audit.csv", "deid_audit.json"]


def test_verify_pass_erases_text_the_first_pass_missed(remover):
    from textremoval.deid.pixels import clean_verified
    img = film(PHI_FILM[:2])
    calls = []

    def first_half_blind(gray):  # the first pass finds only the ID line; the name is found on the re-read
        calls.append(1)
        found = remover.detector(gray)
        return [r for r in found if r.box[1] > 40] if len(calls) == 1 else found
    blind = TextRemover(first_half_blind, remover.segmenter, remover.inpainter, remover.config)
    res, left = clean_verified(blind, img, None, ["DOE JOHN", "DOE", "JOHN"])
    assert len(calls) >= 3 and not left                 # missed, found by the check, clear on a re-check
    assert res.mask[16:45, 20:150].mean() > 0.2 and any(r.identifier for r in res.regions)


def test_an_image_where_nothing_was_erased_is_not_read_twice(remover):
    """The verify pass re-reads only a changed image: the same pixels at the same contrast read the same."""
    from textremoval.deid.pixels import clean_verified
    calls = []

    def counting(gray):
        calls.append(1)
        return remover.detector(gray)
    counted = TextRemover(counting, remover.segmenter, remover.inpainter, remover.config)
    res, left = clean_verified(counted, film([]), None, [])
    assert calls == [1] and not left and not res.mask.any()
    calls.clear()
    clean_verified(counted, film(PHI_FILM[:1]), None, [])
    assert len(calls) == 2                              # erased something: the result is read again

"""cxrcommon.imageio: every format in and out, the DICOM display pipeline, and bad input."""
from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    MPEG2MPML,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from cxrcommon import imageio as io
from cxrcommon import limits
from cxrcommon.provenance import SYNTHETIC_WARNING, provenance

RNG = np.random.default_rng(0)


def make_dicom(path, stored, photometric="MONOCHROME2", bits=None, compress=None, **attrs):
    """A minimal DX image DICOM with the given stored values and extra attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.StudyInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Doe^Jane", "PID123", "DX"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "YES"
    ds.set_pixel_data(stored, photometric, bits or stored.dtype.itemsize * 8)
    for k, v in attrs.items():
        setattr(ds, k, v)
    if compress:
        ds.compress(compress)
    ds.save_as(path, enforce_file_format=True)
    return path


def gradient(h=24, w=32, top=4095, dtype=np.uint16):
    return np.linspace(0, top, h * w).reshape(h, w).round().astype(dtype)


# ---------------------------------------------------------------- PNG / JPEG / TIFF

def test_png16_round_trip_is_exact(tmp_path):
    a = RNG.integers(0, 65536, (33, 47), dtype=np.uint16)
    io.write_png(tmp_path / "a.png", a, bits=16)
    back = io.read_image(tmp_path / "a.png")
    assert back.dtype == np.float32 and back.shape == (33, 47)
    assert np.array_equal(np.rint(back.astype(np.float64) * 65535).astype(np.uint16), a)
    with Image.open(tmp_path / "a.png") as img:
        assert img.mode == "I;16"


def test_png8_round_trip_quantises_to_255_levels(tmp_path):
    a = RNG.random((20, 30)).astype(np.float32)
    io.write_png(tmp_path / "a.png", a, bits=8)
    back = io.read_image(tmp_path / "a.png")
    assert np.array_equal(back, io.to_uint(a, 8).astype(np.float32) / 255)
    assert np.abs(back - a).max() <= 0.5 / 255 + 1e-6


def test_png_text_chunks_read_back_including_non_latin1(tmp_path):
    tags = provenance(prompt="Kein Erguss — 无积液", seed=7)
    io.write_png(tmp_path / "a.png", np.zeros((8, 8), np.float32), text=tags)
    back = io.read_png_text(tmp_path / "a.png")
    assert back["prompt"] == "Kein Erguss — 无积液" and back["seed"] == "7"
    assert back["synthetic"] == "true" and back["warning"] == SYNTHETIC_WARNING


def test_jpeg_rgb_is_read_as_gray(tmp_path):
    g = np.tile(np.linspace(0, 255, 64), (48, 1)).astype(np.uint8)
    Image.fromarray(np.stack([g] * 3, -1)).save(tmp_path / "a.jpg", quality=95)
    back = io.read_image(tmp_path / "a.jpg")
    assert back.shape == (48, 64)
    assert np.abs(back - g / 255.0).mean() < 0.01


def test_tiff_16bit_read_exact(tmp_path):
    a = gradient(top=60000)
    Image.fromarray(a).save(tmp_path / "a.tiff")
    back = io.read_image(tmp_path / "a.tiff")
    assert np.array_equal(np.rint(back.astype(np.float64) * 65535).astype(np.uint16), a)


# ---------------------------------------------------------------- DICOM display pipeline

def test_dicom_monochrome2_is_min_max_scaled(tmp_path):
    a = gradient(top=3000) + 100
    arr, ds = io.read_dicom(make_dicom(tmp_path / "a.dcm", a, bits=12))
    assert arr.min() == 0 and arr.max() == 1 and ds.PatientID == "PID123"
    assert np.allclose(arr, (a - 100) / (a.max() - 100), atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path):
    a = gradient()
    arr = io.read_image(make_dicom(tmp_path / "a.dcm", a, photometric="MONOCHROME1", bits=12))
    assert arr[0, 0] == 1.0 and arr[-1, -1] == 0.0
    assert np.allclose(arr, 1 - a / a.max(), atol=1e-6)


def test_dicom_rescale_slope_and_intercept_are_applied(tmp_path):
    a = gradient()
    # A negative slope flips the image; min-max alone would hide a positive slope.
    arr = io.read_image(make_dicom(tmp_path / "a.dcm", a, bits=12, RescaleSlope=-1, RescaleIntercept=500))
    assert np.allclose(arr, 1 - a / a.max(), atol=1e-6)


def test_dicom_window_saturates_outside_and_is_linear_inside(tmp_path):
    a = np.arange(0, 101, dtype=np.uint16).reshape(1, 101).repeat(2, 0)
    arr = io.read_image(make_dicom(tmp_path / "a.dcm", a, bits=12, WindowCenter=50, WindowWidth=21))
    assert (arr[:, :40] == 0).all() and (arr[:, 61:] == 1).all()
    assert abs(arr[0, 50] - 0.5) < 0.03 and np.all(np.diff(arr[0, 40:61]) > 0)


def test_dicom_window_in_rescaled_units(tmp_path):
    a = np.arange(0, 101, dtype=np.uint16).reshape(1, 101).repeat(2, 0)
    # Stored 0..100 → 2*s - 1000 = -1000..-800; window around -900 (stored 50).
    arr = io.read_image(make_dicom(tmp_path / "a.dcm", a, bits=12, RescaleSlope=2, RescaleIntercept=-1000,
                                   WindowCenter=-900, WindowWidth=41))
    assert (arr[:, :39] == 0).all() and (arr[:, 62:] == 1).all() and abs(arr[0, 50] - 0.5) < 0.03


def test_dicom_voi_lut_sequence_is_applied(tmp_path):
    a = np.array([[0, 1, 2, 3]], dtype=np.uint16).repeat(2, 0)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.LUTData = [0, 255, 255, 128]  # non-monotonic on purpose: only a real LUT does this
    item["LUTDescriptor"].VR = "US"
    item["LUTData"].VR = "US"
    arr = io.read_image(make_dicom(tmp_path / "a.dcm", a, bits=8, VOILUTSequence=[item]))
    assert np.allclose(arr[0], [0, 1, 1, 128 / 255], atol=1e-6)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_dicom_reads_like_uncompressed(tmp_path, syntax):
    a = gradient(64, 64)  # OpenJPEG's default 6 resolution levels need ≥ 64 px
    plain = io.read_image(make_dicom(tmp_path / "plain.dcm", a, bits=12))
    path = make_dicom(tmp_path / "c.dcm", a, bits=12, compress=syntax)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(io.read_image(path), plain)


def test_dicom_without_a_decoder_names_the_plugin(tmp_path):
    path = make_dicom(tmp_path / "v.dcm", gradient(4, 4, 255, np.uint8), bits=8)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 16])
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(io.ImageReadError, match=r"v\.dcm.*pip install pylibjpeg.*python-gdcm"):
        io.read_image(path)


# ---------------------------------------------------------------- DICOM writing

def test_write_dicom_secondary_capture_is_marked_synthetic(tmp_path):
    a = RNG.random((16, 20)).astype(np.float32)
    io.write_dicom(tmp_path / "s.dcm", a, tags=provenance(prompt="small effusion", seed=3))
    io.write_dicom(tmp_path / "t.dcm", a)
    ds, other = pydicom.dcmread(tmp_path / "s.dcm"), pydicom.dcmread(tmp_path / "t.dcm")
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.ConversionType == "SYN"
    assert ds.BurnedInAnnotation == "NO" and str(ds.PatientName) == "SYNTHETIC^IMAGE"
    assert "SYNTHETIC" in ds.DerivationDescription and SYNTHETIC_WARNING in ds.ImageComments
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    for uid in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert ds[uid].value != other[uid].value
    prov = io.dicom_provenance(ds)
    assert prov["prompt"] == "small effusion" and prov["seed"] == "3" and prov["synthetic"] == "true"
    assert io.dicom_provenance(other)["synthetic"] == "true"  # synthetic even without tags
    assert ds.BitsStored == 16 and np.array_equal(ds.pixel_array, io.to_uint(a, 16))


def test_save_image_dispatches_on_format(tmp_path):
    a = RNG.random((8, 8)).astype(np.float32)
    tags = provenance(prompt="p")
    io.save_image(tmp_path / "a.png", a, fmt="png", tags=tags)
    io.save_image(tmp_path / "b.png", a, fmt="png16", tags=tags)
    io.save_image(tmp_path / "c.dcm", a, fmt="dcm", tags=tags)
    with Image.open(tmp_path / "a.png") as i8, Image.open(tmp_path / "b.png") as i16:
        assert (i8.mode, i16.mode) == ("L", "I;16")
    assert io.read_png_text(tmp_path / "b.png")["prompt"] == "p"
    assert io.dicom_provenance(pydicom.dcmread(tmp_path / "c.dcm"))["prompt"] == "p"
    with pytest.raises(ValueError, match="unknown image format 'jpg'"):
        io.save_image(tmp_path / "d.jpg", a, fmt="jpg")


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_write_dicom_like_keeps_tags_and_replaces_pixels(tmp_path, photometric):
    stored = gradient()
    src = make_dicom(tmp_path / "src.dcm", stored, photometric=photometric, bits=12,
                     WindowCenter=2000, WindowWidth=3000, compress=RLELossless)
    disp, template = io.read_dicom(src)
    cleaned = disp.copy()
    cleaned[2:6, 3:9] = 0.25  # "inpainted" patch
    io.write_dicom_like(tmp_path / "out.dcm", template, cleaned, note="burnt-in text removed")
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (out.PatientID, str(out.PatientName), out.Modality) == ("PID123", "Doe^Jane", "DX")
    assert (out.BitsStored, out.BitsAllocated, out.PhotometricInterpretation) == (12, 16, photometric)
    assert (out.WindowCenter, out.WindowWidth) == (2000, 3000)
    assert out.BurnedInAnnotation == "NO" and "burnt-in text removed" in out.DerivationDescription
    assert out.ImageType[0] == "DERIVED" and out.SOPInstanceUID != template.SOPInstanceUID
    mask = np.zeros(stored.shape, bool)
    mask[2:6, 3:9] = True
    assert np.array_equal(out.pixel_array[~mask], stored[~mask])  # untouched pixels keep exact values
    assert not np.array_equal(out.pixel_array[mask], stored[mask])
    again = io.read_image(tmp_path / "out.dcm")
    assert np.abs(again - cleaned).max() < 1e-3  # display round-trips, MONOCHROME1 re-inverted


def test_write_dicom_like_rejects_a_resized_image(tmp_path):
    _, template = io.read_dicom(make_dicom(tmp_path / "src.dcm", gradient(), bits=12))
    with pytest.raises(ValueError, match=r"out\.dcm.*resize back to the template's size"):
        io.write_dicom_like(tmp_path / "out.dcm", template, np.zeros((10, 10), np.float32), note="x")
    assert not (tmp_path / "out.dcm").exists()


# ---------------------------------------------------------------- array helpers

def test_percentile_clip_ignores_the_brightest_pixels():
    a = np.tile(np.linspace(0, 0.5, 100), (100, 1))
    a[0, :50] = 1.0  # 0.5 % of pixels: a burnt-in label
    plain, clipped = io.normalize(a), io.normalize(a, clip_percentile=1.0)
    assert plain[50].max() == pytest.approx(0.5, abs=1e-6)
    assert clipped[50].max() == 1.0 and clipped[0, :50].max() == 1.0


def test_read_image_applies_clip_percentile(tmp_path):
    a = np.tile(np.linspace(0, 0.5, 100), (100, 1)).astype(np.float32)
    a[0, :50] = 1.0
    io.write_png(tmp_path / "a.png", a, bits=16)
    assert io.read_image(tmp_path / "a.png")[50].max() == pytest.approx(0.5, abs=1e-4)
    assert io.read_image(tmp_path / "a.png", clip_percentile=1.0)[50].max() == 1.0


def test_to_square_pad_keeps_aspect():
    a = np.ones((20, 40), np.float32)
    sq = io.to_square(a, 32)
    assert sq.shape == (32, 32) and sq.dtype == np.float32
    assert (sq[8:24] == 1).all() and (sq[:8] == 0).all() and (sq[24:] == 0).all()
    assert (io.to_square(a, 32, pad_value=0.5)[:8] == 0.5).all()
    rgb = io.to_square(np.ones((40, 20, 3), np.float32), 16)
    assert rgb.shape == (16, 16, 3) and (rgb[:, 4:12] == 1).all() and (rgb[:, :4] == 0).all()


def test_to_square_crop_keeps_the_centre():
    a = np.tile(np.arange(40, dtype=np.float32), (20, 1))  # value = column
    sq = io.to_square(a, 20, mode="crop")
    assert sq.shape == (20, 20)
    assert sq[0, 0] == 10 and sq[0, -1] == 29  # the middle 20 columns, no scaling needed
    with pytest.raises(ValueError, match="'pad' or 'crop'"):
        io.to_square(a, 20, mode="stretch")


def test_to_uint_and_from_pil():
    a = np.array([[0.0, 0.5, 1.0]], np.float32)
    assert io.to_uint(a, 8).tolist() == [[0, 128, 255]]
    assert io.to_uint(a, 16).tolist() == [[0, 32768, 65535]]
    assert io.to_uint(np.array([[255]], np.uint8), 16).tolist() == [[65535]]
    img = Image.fromarray(io.to_uint(a, 8)).convert("RGB")
    assert np.allclose(io.from_pil(img), io.to_uint(a, 8) / 255.0)


# ---------------------------------------------------------------- bad input

def _truncated_png(p):
    io.write_png(p, RNG.random((64, 64)).astype(np.float32))
    p.write_bytes(p.read_bytes()[:300])


def _truncated_dicom(p):
    make_dicom(p, gradient(64, 64), bits=12)
    p.write_bytes(p.read_bytes()[:-2000])


def _dicom_without_pixels(p):
    make_dicom(p, gradient(), bits=12)
    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p, enforce_file_format=True)


BAD_READS = {
    "missing": ("gone.png", None, "file not found"),
    "empty": ("empty.png", lambda p: p.write_bytes(b""), "file is empty"),
    "truncated png": ("cut.png", _truncated_png, "corrupt or truncated"),
    "text named png": ("notes.png", lambda p: p.write_text("hello"), "not a recognisable image"),
    "unsupported extension": ("scan.gif", lambda p: p.write_bytes(b"GIF89a" + b"\0" * 20),
                              "unsupported file type '.gif'"),
    "no extension, not dicom": ("scan", lambda p: p.write_bytes(b"\0" * 200), "unsupported file type"),
    "png named dcm": ("x.dcm", lambda p: io.write_png(p, np.zeros((4, 4), np.float32)), "not a DICOM file"),
    "dicom without pixels": ("sr.dcm", _dicom_without_pixels, "DICOM has no pixel data"),
    "truncated dicom": ("cut.dcm", _truncated_dicom, "truncated"),
    "folder": ("folder.png", lambda p: p.mkdir(), "not a regular file"),
}


@pytest.mark.parametrize("name", BAD_READS)
def test_bad_input_is_rejected_with_a_clear_message(tmp_path, name):
    fname, make, message = BAD_READS[name]
    p = tmp_path / fname
    if make:
        make(p)
    with pytest.raises(io.ImageReadError, match=message) as err:
        io.read_image(p)
    assert fname in str(err.value) and " — " in str(err.value)  # names the file and the fix


@pytest.mark.parametrize("kind", ["png", "dcm"])
def test_decompression_bomb_is_rejected(tmp_path, kind, monkeypatch):
    p = tmp_path / f"big.{kind}"
    if kind == "png":
        io.write_png(p, np.zeros((100, 100), np.float32))
    else:
        make_dicom(p, gradient(100, 100), bits=12)
    with pytest.raises(io.ImageReadError, match=r"big\.\w+: 10000 pixels exceeds the limit of 5000.*max_pixels"):
        io.read_image(p, max_pixels=5000)
    monkeypatch.setattr(limits, "MAX_PIXELS", 9999)  # the module-wide default is configurable too
    with pytest.raises(io.ImageReadError, match="decompression bomb"):
        io.read_image(p)
    assert io.read_image(p, max_pixels=10000).shape == (100, 100)


def test_extensionless_dicom_is_detected(tmp_path):
    p = make_dicom(tmp_path / "IM0001", gradient(), bits=12)
    assert io.read_image(p).shape == (24, 32)


BAD_WRITES = {
    "zero-size": (np.zeros((0, 5), np.float32), "empty"),
    "nan": (np.full((4, 4), np.nan, np.float32), "NaN or inf"),
    "out of range": (np.full((4, 4), 2.0, np.float32), r"outside \[0, 1\].*normalize"),
    "int64": (np.zeros((4, 4), np.int64), "unsupported dtype int64"),
    "bool": (np.zeros((4, 4), bool), "unsupported dtype bool"),
    "4-d": (np.zeros((2, 4, 4, 1), np.float32), "expected a gray"),
    "list": ([[0.0]], "expected a numpy array"),
}


@pytest.mark.parametrize("name", BAD_WRITES)
@pytest.mark.parametrize("fmt", ["png", "png16", "dcm"])
def test_bad_arrays_are_refused_on_write(tmp_path, name, fmt):
    arr, message = BAD_WRITES[name]
    p = tmp_path / f"out.{'dcm' if fmt == 'dcm' else 'png'}"
    with pytest.raises(ValueError, match=message) as err:
        io.save_image(p, arr, fmt=fmt)
    assert p.name in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing half-written


# ---------------------------------------------------------------- real images

def test_real_cxr_pngs_read(realcxr):
    with open(realcxr / "manifest.csv", newline="") as fh:
        names = [r["file"] for r in csv.DictReader(fh)][:3]
    for name in names:
        arr = io.read_image(realcxr / "images" / name, clip_percentile=1.0)
        assert arr.ndim == 2 and min(arr.shape) >= 128
        assert arr.min() == 0.0 and arr.max() == 1.0 and arr.std() > 0.05
        sq = io.to_square(arr, 64)
        assert sq.shape == (64, 64) and 0 <= sq.min() and sq.max() <= 1

"""Analytic attribute scorer for chest phantoms: does a generated image show what its prompt asked?

Why: proving that the embedded model learns needs a judge that is independent of the model. The
phantom generator (phantoms.generator) draws findings in known places, so simple region statistics
read them back: brightness of each costophrenic region over the upper lung, which lies above even a
large effusion so a bilateral one reads as bilateral (pleural effusion), and heart width over chest
width (cardiomegaly), and for pneumothorax the upper lateral lung of each side: collapsed lung leaves a
darker rim crossed by a sharp pleural line. Demographics: sex from the breast shadows' dense lower edge
over the upper abdomen, lateral to the midline (read_sex); the age band from the aortic knob, which
unfolds from 40 on and carries a calcified rim over 65 (read_age_band). Works on any size; image RIGHT is
the patient's LEFT. Thresholds are calibrated on phantoms from one seed range (phantoms.calibrate) and tested on
another; rerun `python -m phantoms.calibrate` after changing the generator.

`python -m phantoms.score DIR --out reads.csv` writes what the scorer reads in every image of DIR.
"""
from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from cxrcommon.atomic import atomic_path
from cxrcommon.cli import cli_entry
from cxrcommon.config import field, parse_config
from cxrcommon.csv_cells import safe_row
from cxrcommon.errors import UserError
from cxrcommon.imageio import DICOM_SUFFIXES, PIL_SUFFIXES, read_image
from cxrcommon.logs import setup_logging
from cxrcommon.paths import walk_files

log = logging.getLogger(__name__)

WORK = 128                 # every image is scored at this size
CALIBRATION_SEED = 1_000_000  # calibration phantoms use seeds from here; tests use other seeds


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds; defaults are the output of `calibrate()` (see module docstring), but for sex and age."""
    effusion: float = 0.265       # costophrenic minus darkest upper-lung brightness (normalised units)
    bilateral_margin: float = 0.5  # both sides above threshold and within this ratio -> bilateral
    cardiomegaly_ctr: float = 0.55
    pneumothorax: float = 0.023    # |left - right| pneumothorax score above this -> that side
    # sex and age: between calibrate()'s plateau on raw 64 px phantoms and the one through the embedded model's
    # VAE (bench/bench_phantoms.py), whose decoder draws every generated image and softens the calcified rim
    breast: float = 0.01           # lateral minus central upper-abdomen brightness above this -> F
    knob: float = 0.13             # aortic knob width from the midline (u) above this -> 40 or over
    calcification: float = 0.09    # knob rim brightness over the heart's, in heart-lung units, above this -> over 65


THRESHOLDS = Thresholds()


def _gray(img, clip: bool = True) -> np.ndarray:
    """Any image (path, PIL, HxW or HxWxC array in 0-1 or 0-255) -> float32 WORK x WORK, its 2nd and 98th
    percentiles at 0 and 1; clipped to [0, 1] unless `clip` is False (bright detail such as calcium stays)."""
    arr = read_image(img) if isinstance(img, (str, Path)) else np.asarray(img)
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=2) if arr.shape[2] in (3, 4) else arr.mean(axis=0)
    if arr.ndim != 2 or min(arr.shape) < 16:
        raise ValueError(f"expected a grayscale or RGB image of at least 16x16, got shape {arr.shape}")
    arr = arr.astype(np.float32)
    if arr.max() > 1.0:
        arr /= 65535.0 if arr.max() > 255 else 255.0
    if arr.shape != (WORK, WORK):
        arr = cv2.resize(arr, (WORK, WORK), interpolation=cv2.INTER_AREA if arr.shape[0] > WORK else cv2.INTER_LINEAR)
    lo, hi = np.percentile(arr, [2, 98])
    arr = (arr - lo) / max(hi - lo, 1e-3)
    return np.clip(arr, 0, 1) if clip else arr


def _roi(a: np.ndarray, u0: float, u1: float, v0: float, v1: float) -> np.ndarray:
    n = a.shape[0]
    return a[int(v0 * n):int(v1 * n), int(u0 * n):int(u1 * n)]


def _midline(a: np.ndarray) -> float:
    """Column of the bright mediastinum in the upper chest (u), so ROIs follow a shifted patient."""
    band = _roi(a, 0.3, 0.7, 0.2, 0.45).mean(axis=0)
    band = np.convolve(band, np.ones(9) / 9, mode="same")
    return 0.3 + (int(np.argmax(band[4:-4])) + 4 + 0.5) / a.shape[0]


def _side_features(a: np.ndarray, c: float, s: float) -> dict[str, float]:
    """Region means for one hemithorax; s=+1 is image right (patient's left)."""
    def band(d0: float, d1: float, v0: float, v1: float, q: float = 25) -> float:
        """A low percentile: the aerated lung in the box, ignoring heart, ribs and wall that intrude."""
        u0, u1 = sorted((c + s * d0, c + s * d1))
        return float(np.percentile(_roi(a, max(u0, 0), min(u1, 1), v0, v1), q))
    # the reference sits above the fluid line of a large effusion, so a bilateral one cannot raise it
    return {"upper": band(0.12, 0.30, 0.20, 0.35), "costophrenic": band(0.24, 0.36, 0.60, 0.72)}


def _pneumothorax_side(a: np.ndarray, c: float, s: float) -> float:
    """Upper lateral lung of one side: fine detail (the pleural line) minus 0.1 x its darkest tenth.

    A pneumothorax raises the first (a sharp line where smooth lung was) and lowers the second (no lung
    tissue in the rim); 0.1 puts both on one scale (they move by ~0.02 and ~0.2 on phantoms)."""
    u0, u1 = sorted((c + s * 0.10, c + s * 0.34))
    box = (max(u0, 0), min(u1, 1), 0.12, 0.45)
    detail = _roi(a - cv2.GaussianBlur(a, (0, 0), 2.0), *box)
    return float(detail.std()) - 0.1 * float(np.percentile(_roi(a, *box), 10))


def measure(img) -> dict:
    """Measured attributes of one image (patient sides: 'left' = image right)."""
    a = _gray(img)
    c = _midline(a)
    left, right = _side_features(a, c, +1.0), _side_features(a, c, -1.0)
    ref = min(left["upper"], right["upper"])
    out = {"midline": c,
           "effusion_score_left": left["costophrenic"] - ref,
           "effusion_score_right": right["costophrenic"] - ref,
           "ctr": _ctr(a, c),
           "pneumothorax_score": _pneumothorax_side(a, c, +1.0) - _pneumothorax_side(a, c, -1.0)}
    return out


def _ctr(a: np.ndarray, c: float) -> float:
    """Widest heart over widest lungs, in the rows between the aortic knob and the diaphragm domes.

    Each row is thresholded halfway between lung and heart brightness: the bright run through the centre
    is the heart, the dark runs beside it are the lungs, reaching out to the chest wall. The domes are where
    the lung columns at +-0.19 from the midline turn bright; rows from there down are left out."""
    n = a.shape[0]
    b = cv2.GaussianBlur(a, (0, 0), 1.0)
    band = b[int(0.4 * n):int(0.8 * n)]
    t = (np.percentile(band, 10) + np.percentile(band[:, int((c - 0.05) * n):int((c + 0.1) * n)], 50)) / 2
    v_lo, v_hi = int(0.35 * n), int(0.85 * n)
    for d in (-0.19, 0.19):
        col = b[:, int((c + d - 0.03) * n):int((c + d + 0.03) * n)].mean(axis=1)
        below = np.flatnonzero(col[int(0.5 * n):v_hi] > t)
        if below.size:
            v_hi = min(v_hi, int(0.5 * n) + int(below[0]) - 1)
    heart_w, chest_w = 0, 0
    for r in b[v_lo:v_hi] > t:
        centre = int(c * n) + int(np.argmax(r[int(c * n):int((c + 0.08) * n)]))
        if not r[centre]:
            continue
        lo, hi = centre, centre
        while lo > 0 and r[lo - 1]:
            lo -= 1
        while hi < n - 1 and r[hi + 1]:
            hi += 1
        left, right = lo - 1, hi + 1  # walk out through the lungs to the chest wall
        while left > 0 and not r[left - 1]:
            left -= 1
        while right < n - 1 and not r[right + 1]:
            right += 1
        if lo == 0 or hi == n - 1 or left == 0 or right == n - 1:
            continue  # a lung is missing on this row, or the run leaks out of the body
        heart_w = max(heart_w, hi - lo + 1)
        chest_w = max(chest_w, right - left + 1)
    return float(heart_w / chest_w) if chest_w else float("nan")


def classify_effusion(img, thresholds: Thresholds | None = None) -> str:
    """'left' | 'right' | 'none' (or 'bilateral' when both sides are bright alike)."""
    return _effusion_from(measure(img), thresholds or THRESHOLDS)


def _effusion_from(m: dict, t: Thresholds) -> str:
    sl, sr = m["effusion_score_left"], m["effusion_score_right"]
    if max(sl, sr) < t.effusion:
        return "none"
    if min(sl, sr) >= t.effusion and min(sl, sr) >= (1 - t.bilateral_margin) * max(sl, sr):
        return "bilateral"
    return "left" if sl > sr else "right"


def classify_pneumothorax(img, thresholds: Thresholds | None = None) -> str:
    """'left' | 'right' | 'none'."""
    return _pneumothorax_from(measure(img), thresholds or THRESHOLDS)


def _pneumothorax_from(m: dict, t: Thresholds) -> str:
    d = m["pneumothorax_score"]
    return "none" if abs(d) < t.pneumothorax else "left" if d > 0 else "right"


def has_cardiomegaly(img, thresholds: Thresholds | None = None) -> bool:
    return measure(img)["ctr"] > (thresholds or THRESHOLDS).cardiomegaly_ctr


def measure_demographics(img) -> dict:
    """The sex and age cues of one image: breast (brightness of the upper abdomen lateral to the midline, where
    the breast shadows' dense lower edges lie, minus that of the centre), knob (width of the aortic knob from
    the midline, u) and calcification (its brightest tenth over the heart, in heart-minus-lung units)."""
    a = _gray(img, clip=False)
    c = _midline(np.clip(a, 0, 1))

    def q(u0: float, u1: float, v0: float, v1: float, pct: float) -> float:
        return float(np.percentile(_roi(a, max(u0, 0), min(u1, 1), v0, v1), pct))
    centre = q(c - 0.05, c + 0.05, 0.80, 0.92, 50)
    breast = np.mean([q(*sorted((c + s * 0.15, c + s * 0.33)), 0.80, 0.92, 50) - centre for s in (1.0, -1.0)])
    # the brighter upper lung is the reference: a pneumothorax darkens its side
    heart = q(c - 0.02, c + 0.08, 0.52, 0.64, 50)
    lung = max(q(*sorted((c + s * 0.18, c + s * 0.32)), 0.24, 0.36, 25) for s in (1.0, -1.0))
    n = a.shape[0]
    dark = cv2.GaussianBlur(a, (0, 0), 1.0)[int(0.25 * n):int(0.34 * n), int(round(c * n)):int((c + 0.3) * n)] \
        < (heart + lung) / 2
    widths = [(np.argmax(row) if row.any() else row.size) / n for row in dark]  # bright run out from the midline
    # an opening removes lines thinner than the calcified rim (a pacemaker lead, a central line)
    rim = cv2.GaussianBlur(cv2.morphologyEx(a, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))),
                           (0, 0), 1.0)
    calcium = float(np.percentile(_roi(rim, c + 0.03, c + 0.19, 0.20, 0.32), 75))
    return {"breast": float(breast), "knob": float(np.percentile(widths, 75)),
            "calcification": (calcium - heart) / max(heart - lung, 1e-3)}


def read_sex(img, thresholds: Thresholds | None = None) -> str:
    """'F' when breast shadows are seen, else 'M'."""
    return _sex_from(measure_demographics(img), thresholds or THRESHOLDS)


def _sex_from(m: dict, t: Thresholds) -> str:
    return "F" if m["breast"] > t.breast else "M"


def read_age_band(img, thresholds: Thresholds | None = None) -> str:
    """'<40', '40-65' or '>65' (cxrcommon.demographics' bands): a calcified knob is over 65, an unfolded one 40-65."""
    return _age_band_from(measure_demographics(img), thresholds or THRESHOLDS)


def _age_band_from(m: dict, t: Thresholds) -> str:
    return ">65" if m["calcification"] > t.calcification else "40-65" if m["knob"] > t.knob else "<40"


# attribute -> its scorer (image, thresholds=None) -> label
JUDGES = {"effusion": classify_effusion, "cardiomegaly": has_cardiomegaly, "pneumothorax": classify_pneumothorax,
          "sex": read_sex, "age_band": read_age_band}


def prompt_adherence(images: Sequence, expected_labels: Sequence, attribute: str = "effusion",
                     thresholds: Thresholds | None = None) -> float:
    """Fraction of images whose measured `attribute` equals the expected one.

    expected_labels: strings ('left'/'right'/'none'; 'F'/'M'; '<40'/'40-65'/'>65'), bools for cardiomegaly, or
    label dicts (as in the phantom metadata) from which `attribute` is taken."""
    if len(images) != len(expected_labels):
        raise ValueError(f"{len(images)} images but {len(expected_labels)} expected labels")
    if not images:
        raise ValueError("no images to score")
    judge = JUDGES.get(attribute)
    if judge is None:
        raise ValueError(f"unknown attribute {attribute!r}; use one of {', '.join(JUDGES)}")
    hits = 0
    for img, exp in zip(images, expected_labels):
        exp = exp[attribute] if isinstance(exp, dict) else exp
        hits += judge(img, thresholds) == exp
    return hits / len(images)


# ----------------------------------------------------------------------------- reads of a folder

READ_COLUMNS = ("file", "effusion_side", "sex", "age_band")


def image_files(folder: str | Path) -> list[Path]:
    """The readable images under `folder` (any depth, sorted); a missing folder or one without images is a
    UserError, so a mistyped DIR never yields an empty CSV."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{root}: {'not a folder' if root.exists() else 'no such folder'} — pass the folder of "
                        "images to read")
    files = sorted(p for p in walk_files(root) if p.suffix.lower() in PIL_SUFFIXES + DICOM_SUFFIXES)
    if not files:
        raise UserError(f"{root}: no images ({', '.join(PIL_SUFFIXES + DICOM_SUFFIXES)}) in it or below — "
                        "pass the folder the images were written to")
    return files


def read_folder(folder: str | Path, progress: bool = True) -> list[dict[str, str]]:
    """One row per image under `folder`: its path relative to the folder and what the scorer reads.

    effusion_side is classify_effusion's answer (none, left, right or bilateral; the patient's side); sex is
    read_sex's (M or F) and age_band read_age_band's (<40, 40-65 or >65).

    Args:
        folder: folder of PNG/JPEG/TIFF/DICOM images, searched at any depth.
        progress: show a tqdm progress bar.
    Returns: rows with the keys READ_COLUMNS, in sorted file order."""
    root = Path(folder)
    rows = []
    for path in tqdm(image_files(root), desc="reading", unit="img", disable=not progress):
        try:
            img = read_image(path)
            side, sex, band = classify_effusion(img), read_sex(img), read_age_band(img)
        except ValueError as exc:  # an ImageReadError names the file already; a too-small image does not
            raise UserError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from exc
        rows.append({"file": path.relative_to(root).as_posix(), "effusion_side": side, "sex": sex, "age_band": band})
    return rows


def write_reads(rows: Sequence[dict[str, str]], out: str | Path) -> Path:
    """The rows as a CSV (header READ_COLUMNS), every cell neutralised, written atomically."""
    with atomic_path(out) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(READ_COLUMNS)
            writer.writerows(safe_row(row[c] for c in READ_COLUMNS) for row in rows)
    return Path(out)


@dataclass
class ReadsConfig:
    dir: str = field("", "folder of images to read (PNG/JPEG/TIFF/DICOM, any depth); also the first bare argument")
    out: str = field("reads.csv", "CSV to write: file, effusion_side (none/left/right/bilateral), sex (M/F), "
                                  "age_band (<40, 40-65 or >65)")
    verbose: bool = field(False, "debug logging; a user error shows its traceback")


@cli_entry
def main(argv: list[str]) -> Path:
    if argv and not argv[0].startswith("-"):
        argv = ["--dir", *argv]  # `DIR --out reads.csv`
    cfg = parse_config(ReadsConfig, argv, "What the phantom scorer reads in each image of a folder, as a CSV. "
                                          "Usage: python -m phantoms.score DIR --out reads.csv")
    setup_logging(cfg.verbose)
    if not cfg.dir:
        raise UserError("give the folder of images: python -m phantoms.score DIR --out reads.csv")
    rows = read_folder(cfg.dir)
    out = write_reads(rows, cfg.out)
    log.info("%d images read, %s written", len(rows), out)
    print(f"{len(rows)} images -> {out}")
    return out


if __name__ == "__main__":
    main()

"""Residual PHI and time per image of `textremoval.clean --deidentify` against the header-only library it
builds on (dicom-anonymizer, Basic Profile) used alone, on the same DICOMs.

    python bench/bench_deidentify.py --n 20
    python bench/bench_deidentify.py --n 20 --faint   # the identity in faint, small print


Each test DICOM is a real CXR (../shared/data/realcxr, else smooth noise) at 1024 px with 1-4 rendered
burnt-in items (markers, PORTABLE, dates, kV/mAs: textremoval.synth_text) plus the patient's name, ID and
birth date rendered in a corner, and the same identity (plus accession, institution, physicians, a private
tag) in the header. Residual PHI after de-identification is counted two ways: any PHI string anywhere in
the written file's bytes (header), and any PHI string the project's OCR (PP-OCR, a fresh TextRemover's
detector with recognition) reads in the written pixels, on the plain view and on a contrast-equalised (CLAHE)
one. `--faint` prints the identity at 12-18 px, 25-35 grey levels over its local background, as a careful
attacker's probe did. Prints a Markdown table, the command and the machine."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxrcommon.imageio import read_dicom  # noqa: E402
from textremoval import TextRemovalConfig, TextRemover  # noqa: E402
from textremoval.clean import clean  # noqa: E402
from textremoval.deid.files import REVIEW_DIR  # noqa: E402
from textremoval.deid.pseudonyms import Pseudonymizer  # noqa: E402
from textremoval.deid.scrubber import reads_as_identifier  # noqa: E402
from textremoval.detect import contrast_view, to_uint8_view  # noqa: E402
from textremoval.evaluate import REALCXR, realcxr_records  # noqa: E402
from textremoval.synth_text import font_files, render  # noqa: E402

FAMILY = ["MARTINEZ", "OKAFOR", "LINDQVIST", "HASHEMI", "BRENNAN", "NAKAMURA", "DUBOIS", "KOWALSKI"]
KEY = "bench-key"  # a fixed key, so the bench can find each output by its keyed name
GIVEN = ["ELENA", "SAMUEL", "INGRID", "FARID", "MAUREEN", "HIROSHI", "CLAIRE", "TOMASZ"]


def make_files(n: int, folder: Path, seed: int = 0, faint: bool = False) -> list[tuple[Path, list[str], list[str]]]:
    """(file, PHI strings in the header, PHI strings rendered into the pixels) per test DICOM."""
    rng = np.random.default_rng(seed)
    fonts = font_files()
    if (REALCXR / "manifest.csv").is_file():
        rows = realcxr_records(REALCXR)
        bases = [cv2.resize(cv2.imread(str(rows[i].image), cv2.IMREAD_GRAYSCALE), (1024, 1024),
                            interpolation=cv2.INTER_AREA) for i in rng.permutation(len(rows))[:n]]
    else:
        bases = [cv2.GaussianBlur(rng.integers(0, 255, (1024, 1024), dtype=np.uint8), (0, 0), 25) for _ in range(n)]
    out = []
    for i, base in enumerate(bases):
        family, given = FAMILY[i % len(FAMILY)], GIVEN[(i * 3) % len(GIVEN)]
        pid = f"{rng.integers(10**6, 10**7)}"
        birth = f"19{rng.integers(30, 99)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"
        shown = [f"{family}, {given}", f"ID {pid}", f"DOB {birth[6:]}/{birth[4:6]}/{birth[:4]}"]
        img = render(base, rng).image
        layer = Image.fromarray(img)
        size = int(rng.integers(12, 19) if faint else rng.integers(18, 30))
        font = ImageFont.truetype(str(fonts[i % len(fonts)]), size) if fonts else ImageFont.load_default(size=size)
        x, y = (24, 24) if i % 2 else (620, 900)
        for k, line in enumerate(shown):
            top = y + k * (size + 8)
            if faint:  # just above the local background, as a faint print or a dim overlay is
                local = float(np.median(img[top:top + size + 4, x:x + 20 * size]))
                fill = int(min(255, local + rng.integers(25, 36)))
            else:
                fill = int(rng.integers(200, 256))
            ImageDraw.Draw(layer).text((x, top), line, font=font, fill=fill)
        pixels = np.asarray(layer)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = ComputedRadiographyImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"{family}^{given}", pid, birth
        ds.PatientSex, ds.PatientAge = "F" if i % 2 else "M", "054Y"
        ds.AccessionNumber, ds.InstitutionName = f"A{pid[::-1]}", "ST ELSEWHERE GENERAL"
        ds.ReferringPhysicianName, ds.StudyDate, ds.StudyDescription = "WESTPHALL^DONALD", "20200321", \
            f"CHEST AP {family}"
        ds.Modality, ds.BurnedInAnnotation = "CR", "YES"
        ds.private_block(0x0009, "ACME", create=True).add_new(0x01, "LO", f"{family} {pid}")
        ds.set_pixel_data(pixels.astype(np.uint16) * 16, "MONOCHROME2", 12)
        path = folder / f"case{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        header_phi = [family, given, pid, birth, ds.AccessionNumber, "ELSEWHERE", "WESTPHALL"]
        out.append((path, header_phi, [family, given, pid, birth[6:] + "/" + birth[4:6] + "/" + birth[:4]]))
    return out


def residual(files: list[tuple[Path, list[str], list[str]]], output: Callable[[Path], Path],
             reader: TextRemover) -> dict:
    """Share of files with PHI left in the header bytes, in OCR-readable pixels, either, and either without
    the file being flagged for review (written under needs_review/). `output`: input -> written file."""
    header = pixels = either = silent = 0
    shown_left = shown_total = 0
    for src, header_phi, shown in files:
        out = output(src)
        raw = out.read_bytes().upper()
        h = any(s.encode() in raw for s in header_phi)
        view = to_uint8_view(read_dicom(out)[0])
        texts = [r.text for v in (view, contrast_view(view)) for r in reader.detector(v)]
        left = [s for s in shown if any(reads_as_identifier(t, [s]) for t in texts)]
        header, pixels, either = header + h, pixels + bool(left), either + (h or bool(left))
        silent += (h or bool(left)) and out.parent.name != REVIEW_DIR
        shown_left, shown_total = shown_left + len(left), shown_total + len(shown)
    n = len(files)
    return {"header": header / n, "pixels": pixels / n, "either": either / n, "silent": silent / n,
            "strings": shown_left / shown_total}


def written(out_dir: Path, src: Path) -> Path:
    """Where `clean --deidentify` wrote `src`: its keyed name, in out_dir or its needs_review/ folder."""
    name = Pseudonymizer(KEY).file_name(src.name)
    return next(p for p in (out_dir / name, out_dir / REVIEW_DIR / name) if p.is_file())


def header_only(files: list[tuple[Path, list[str], list[str]]], out_dir: Path) -> float:
    from dicomanonymizer.simpledicomanonymizer import anonymize_dicom_file, initialize_actions

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for src, _, _ in files:
        anonymize_dicom_file(str(src), str(out_dir / src.name), base_rules_gen=lambda: initialize_actions(
            "dicomfields_2026c"))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="test DICOMs")
    ap.add_argument("--faint", action="store_true", help="print the identity small and faint (12-18 px, 25-35 grey "
                    "levels over the background) instead of bold")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    reader = TextRemover.from_config(TextRemovalConfig())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        files = make_files(args.n, tmp / "in", faint=args.faint)
        t_header = header_only(files, tmp / "header_only")
        rows = [("dicom-anonymizer 2.1.0 alone (Basic Profile, header only)", t_header,
                 residual(files, lambda src: tmp / "header_only" / src.name, reader))]
        for k, (name, cfg) in enumerate((
                ("textremoval.clean --deidentify --keep-markers (default: contrast-equalised view, verify pass on)",
                 TextRemovalConfig(deidentify=True, keep_markers=True, deid_secret=KEY)),
                ("textremoval.clean --deidentify --keep-markers --deid-contrast false (plain view, as before #24)",
                 TextRemovalConfig(deidentify=True, keep_markers=True, deid_contrast=False, deid_secret=KEY)),
                ("textremoval.clean --deidentify --keep-markers --deid-verify false",
                 TextRemovalConfig(deidentify=True, keep_markers=True, deid_verify=False, deid_secret=KEY)))):
            out = tmp / f"run{k}"
            clean([str(files[0][0])], tmp / f"warm-{out.name}", cfg)  # model load and ONNX warm-up outside the clock
            start = time.perf_counter()
            summary = clean([str(f) for f, _, _ in files], out, cfg)
            rows.append((f"{name}; {len(summary['review'])} of {args.n} flagged for review",
                         time.perf_counter() - start, residual(files, lambda src, o=out: written(o, src), reader)))
    print(f"command: python bench/bench_deidentify.py --n {args.n}{' --faint' if args.faint else ''}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, Python "
          f"{platform.python_version()}, load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}\n")
    print("| method | s/image | files with PHI in header bytes | files with PHI OCR-readable in pixels | "
          "files with any residual PHI | ... of them not flagged for review | rendered PHI strings still readable |")
    print("|---|---|---|---|---|---|---|")
    for name, seconds, r in rows:
        print(f"| {name} | {seconds / args.n:.3f} | {r['header']:.0%} | {r['pixels']:.0%} | {r['either']:.0%} "
              f"| {r['silent']:.0%} | {r['strings']:.0%} |")


if __name__ == "__main__":
    main()

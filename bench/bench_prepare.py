"""Speed, fidelity and memory of `finetune.prepare` on JPEGs the size of MIMIC-CXR-JPG's, CPU only.

    python bench/bench_prepare.py --n 40

Builds a MIMIC-CXR-JPG tree (metadata, split, CheXpert labels, reports, files/pXX/...) whose JPEGs are real
films from ../shared/data/realcxr upscaled to 2544x3056 with light grain, JPEG quality 95 (as MIMIC-CXR-JPG).
Then, in one run:
- the stock way: PIL full decode + Lanczos resize to 512, the same padding, PIL's PNG save, one process,
  timed image by image alternating with prepare's per-image path (so other load falls on both alike);
- `python -m finetune.prepare mimic-cxr --workers 1` end to end (CSV reading and the manifest included), and
  `--workers 2`;
- PSNR of every prepared image against the stock way's;
- peak memory (max RSS of the command) for the run, and with metadata of 10,000 vs 377,110 rows (2 films, the
  other rows without report or image, streamed and excluded): flat memory means the two peaks are close.
Prints a Markdown table, the command and the machine."""
from __future__ import annotations

import argparse
import csv
import gzip
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cxrcommon.imageio import to_square  # noqa: E402
from finetune.prepare.images import PNG_COMPRESSION, prepare_image  # noqa: E402

REALCXR = ROOT.parent / "shared" / "data" / "realcxr" / "images"
MIMIC_SIZE = (2544, 3056)  # width, height of a typical MIMIC-CXR-JPG film
REPORT = ("                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n INDICATION:  ___ "
          "with cough.\n\n FINDINGS:\n \n The lungs are clear without focal consolidation. No pleural effusion or "
          "pneumothorax. Heart size is normal.\n \n IMPRESSION:\n \n No acute cardiopulmonary process.\n")


def _gz_csv(path: Path, header: list[str], rows) -> None:
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def build_tree(root: Path, n: int, extra_rows: int = 0, seed: int = 0) -> list[Path]:
    """A MIMIC-CXR-JPG layout with n real-looking films (and `extra_rows` metadata rows without images)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    sources = sorted(REALCXR.glob("*.png"))
    if not sources:
        raise SystemExit(f"{REALCXR} not found: this benchmark needs ../shared/data/realcxr")
    meta, split, labels, jpgs = [], [], [], []
    for i in range(n):
        subject, study, dicom = 10000000 + i, 50000000 + i, f"{i:08x}-0000-0000-0000-000000000000"
        folder = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}"
        (folder / f"s{study}").mkdir(parents=True, exist_ok=True)
        (folder / f"s{study}.txt").write_text(REPORT)
        if not (jpg := folder / f"s{study}" / f"{dicom}.jpg").exists():
            with Image.open(sources[i % len(sources)]) as im:
                big = np.asarray(to_square_fit(im.convert("L"), MIMIC_SIZE), dtype=np.float32)
            big = np.clip(big + rng.normal(0, 2.0, big.shape), 0, 255).astype(np.uint8)
            Image.fromarray(big).save(jpg, quality=95)
        jpgs.append(jpg)
        meta.append([dicom, subject, study, "CHEST (PA AND LAT)", "PA", MIMIC_SIZE[1], MIMIC_SIZE[0], "21800506",
                     "213014.531", "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
        split.append([dicom, study, subject, "train"])
        labels.append([subject, study] + [""] * 8 + ["1.0"] + [""] * 5)
    for j in range(extra_rows):
        subject, study = 20000000 + j, 60000000 + j
        meta.append([f"x{j:07d}", subject, study, "CHEST (PA AND LAT)", "PA", 3056, 2544, "21800506", "1.0",
                     "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
        split.append([f"x{j:07d}", study, subject, "train"])
    _gz_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz",
            ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
             "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
             "PatientOrientationCodeSequence_CodeMeaning"], meta)
    _gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split)
    _gz_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz",
            ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
             "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
             "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"], labels)
    return jpgs


def to_square_fit(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Upscale a film to fill a MIMIC-sized frame (aspect kept, centre-cropped)."""
    scale = max(size[0] / im.width, size[1] / im.height)
    big = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
    left, top = (big.width - size[0]) // 2, (big.height - size[1]) // 2
    return big.crop((left, top, left + size[0], top + size[1]))


def stock(jpg: Path, out: Path, size: int) -> None:
    """The stock way: PIL full decode + Lanczos to the target, the same padding, PIL's PNG save with its defaults."""
    with Image.open(jpg) as im:
        gray = im.convert("L")
        scale = size / max(gray.size)
        small = gray.resize((round(gray.width * scale), round(gray.height * scale)), Image.LANCZOS)
    Image.fromarray(to_square(np.asarray(small), size)).save(out / (jpg.stem + ".png"))


def fast(jpg: Path, out: Path, size: int) -> None:
    """What each prepare worker runs per image (DCT-scaled decode, area resize, pad, PNG)."""
    prepare_image(jpg, out / (jpg.stem + ".png"), size, "pad")


def interleaved(jpgs: list[Path], work: Path, size: int) -> tuple[float, float]:
    """(stock seconds, prepare seconds) over the same films, the two ways alternating image by image so that
    load from other processes falls on both alike."""
    t_stock = t_fast = 0.0
    for jpg in jpgs:
        t = time.perf_counter()
        stock(jpg, work / "stock", size)
        t_stock += time.perf_counter() - t
        t = time.perf_counter()
        fast(jpg, work / "fast", size)
        t_fast += time.perf_counter() - t
    return t_stock, t_fast


def run_prepare(root: Path, out: Path, workers: int, size: int) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of the CLI as a fresh process, into a fresh `out`."""
    shutil.rmtree(out, ignore_errors=True)
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:]); dt = time.perf_counter() - t; "
            "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "finetune.prepare", "mimic-cxr", "--root", str(root),
           "--out", str(out), "--workers", str(workers), "--size", str(size)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if res.returncode:
        raise SystemExit(res.stderr[-2000:])
    seconds, rss_kb = res.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(rss_kb) / 1024


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="films of MIMIC size")
    ap.add_argument("--size", type=int, default=512, help="output side")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp folder)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    root = work / "mimic"
    t = time.perf_counter()
    jpgs = build_tree(root, args.n)
    print(f"built {args.n} MIMIC-size JPEGs in {time.perf_counter() - t:.0f} s under {root}", file=sys.stderr)
    for name in ("stock", "fast"):
        shutil.rmtree(work / name, ignore_errors=True)
        (work / name).mkdir(parents=True)
    t_stock, t_fast = interleaved(jpgs, work, args.size)
    t_one, rss_one = run_prepare(root, work / "one", 1, args.size)
    t_two, rss_two = run_prepare(root, work / "two", 2, args.size)
    values = []
    for jpg in jpgs:
        rel = jpg.relative_to(root).with_suffix(".png")
        values.append(psnr(np.asarray(Image.open(work / "one" / "images" / rel)),
                           np.asarray(Image.open(work / "stock" / (jpg.stem + ".png")))))
    mem = {}
    for rows in (10_000, 377_110):
        big = work / f"rows{rows}"
        build_tree(big, 2, extra_rows=rows)  # 2 films with reports, then rows without images or reports
        mem[rows] = run_prepare(big, work / f"out{rows}", 1, args.size)[1]
    n = args.n
    print(f"\n`python bench/bench_prepare.py --n {n}` on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}; load average {os.getloadavg()[0]:.2f}\n")
    print("| path | s/image | images/s | vs stock | peak RSS |")
    print("|---|---:|---:|---:|---:|")
    print(f"| stock: PIL full decode + Lanczos + PIL PNG save (1 process) | {t_stock / n:.3f} | "
          f"{n / t_stock:.2f} | 1.00x | |")
    print(f"| prepare's per-image path (DCT-scaled decode, area resize, PNG level {PNG_COMPRESSION}), 1 process | "
          f"{t_fast / n:.3f} | {n / t_fast:.2f} | **{t_stock / t_fast:.2f}x** | |")
    print(f"| finetune.prepare --workers 1 (whole command) | {t_one / n:.3f} | {n / t_one:.2f} | "
          f"{t_stock / t_one:.2f}x | {rss_one:.0f} MiB |")
    print(f"| finetune.prepare --workers 2 (whole command) | {t_two / n:.3f} | {n / t_two:.2f} | "
          f"{t_stock / t_two:.2f}x | {rss_two:.0f} MiB |")
    print("\n(The whole command includes starting Python, reading the CSVs and the report files, and, with 2 "
          "workers, starting them: a fixed cost that a run of thousands of images spreads thin.)")
    print(f"\nPSNR of prepare's images against the stock way's: mean {np.mean(values):.1f} dB, "
          f"min {np.min(values):.1f} dB over {n} images.")
    print(f"Peak RSS with metadata of 10,000 rows: {mem[10_000]:.0f} MiB; 377,110 rows: {mem[377_110]:.0f} MiB.")


if __name__ == "__main__":
    main()

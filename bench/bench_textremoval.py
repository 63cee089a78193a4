"""Speed of text removal (detect + glyph mask + Telea) on 1024² CXRs with rendered text, CPU only.

    python bench/bench_textremoval.py --n 24

Compares the naive way (OCR engine re-created per image, full-resolution OCR, full-image inpaint) with
the TextRemover (engine loaded once, detection on a 720-px copy plus a 400-px second pass, the glyph
detector for lone markers, per-component crop inpainting), in one process and in a pool of one process per
core, with and without the glyph detector. Besides wall-clock images/s it
reports CPU seconds per image (all threads and workers): on a shared, loaded machine the wall clock
measures the load, while cores / CPU-s per image bounds what a quiet machine does with one process per
core. Prints a Markdown table, the command, the machine and its load average."""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from textremoval import TextRemovalConfig, TextRemover  # noqa: E402
from textremoval.detect import TextRegion  # noqa: E402
from textremoval.evaluate import REALCXR, realcxr_records  # noqa: E402
from textremoval.segment import GlyphSegmenter  # noqa: E402
from textremoval.synth_text import render  # noqa: E402


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    """n 1024² CXRs with rendered text (real ones when the shared folder exists, else smooth noise)."""
    rng = np.random.default_rng(seed)
    if (REALCXR / "manifest.csv").is_file():
        rows = realcxr_records(REALCXR)
        files = [rows[i].image for i in rng.permutation(len(rows))[:n]]
        bases = [cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (1024, 1024), interpolation=cv2.INTER_AREA)
                 for f in files]
    else:
        bases = [cv2.GaussianBlur(rng.integers(0, 255, (1024, 1024), dtype=np.uint8), (0, 0), 25) for _ in range(n)]
    return [render(b, rng).image for b in bases]


def naive(imgs: list[np.ndarray]) -> dict:
    """What a notebook does: a fresh OCR engine per image at full size, full-image inpaint."""
    from rapidocr import RapidOCR

    t = {"detect": 0.0, "segment": 0.0, "inpaint": 0.0}
    seg = GlyphSegmenter(TextRemovalConfig())
    cpu, start = time.process_time(), time.perf_counter()
    for img in imgs:
        t0 = time.perf_counter()
        out = RapidOCR(params={"Global.log_level": "error"})(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
        regions = []
        for quad in (out.boxes if out.boxes is not None else []):
            x0, y0 = np.floor(np.min(quad, 0)).astype(int)
            x1, y1 = np.ceil(np.max(quad, 0)).astype(int) + 1
            regions.append(TextRegion((max(0, x0), max(0, y0), min(1024, x1), min(1024, y1)),
                                      [tuple(map(int, p)) for p in quad], 1.0))
        t1 = time.perf_counter()
        mask = seg(img, regions)
        t2 = time.perf_counter()
        cv2.inpaint(img, mask.astype(np.uint8), 5, cv2.INPAINT_TELEA)
        t3 = time.perf_counter()
        t["detect"] += t1 - t0
        t["segment"] += t2 - t1
        t["inpaint"] += t3 - t2
    return {"total": time.perf_counter() - start, "cpu": time.process_time() - cpu, **t}


def single(imgs: list[np.ndarray], cfg: TextRemovalConfig) -> dict:
    remover = TextRemover.from_config(cfg)
    remover(imgs[0])  # warm-up (ONNX session first-run allocations)
    t = {"detect": 0.0, "segment": 0.0, "inpaint": 0.0}
    cpu, start = time.process_time(), time.perf_counter()
    for img in imgs:
        for k, v in remover(img).seconds.items():
            t[k] += v
    return {"total": time.perf_counter() - start, "cpu": time.process_time() - cpu, **t}


_REMOVER: list[TextRemover] = []


def _init(cfg: TextRemovalConfig) -> None:
    _REMOVER.append(TextRemover.from_config(cfg))
    _REMOVER[0](np.zeros((256, 256), np.uint8))


def _work(img: np.ndarray) -> dict:
    cpu = time.process_time()
    seconds = _REMOVER[0](img).seconds
    return {**seconds, "cpu": time.process_time() - cpu}


def pool(imgs: list[np.ndarray], cfg: TextRemovalConfig, workers: int) -> dict:
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init, initargs=(cfg,)) as ex:
        list(ex.map(_work, imgs[:workers]))  # start and warm every worker
        t = {"detect": 0.0, "segment": 0.0, "inpaint": 0.0, "cpu": 0.0}
        start = time.perf_counter()
        for sec in ex.map(_work, imgs):
            for k, v in sec.items():
                t[k] += v
        return {"total": time.perf_counter() - start, **t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24, help="images per mode")
    args = ap.parse_args()
    imgs = images(args.n)
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    rows = [("naive: engine per image, full-size OCR (det+cls+rec), full-image Telea", naive(imgs))]
    rows.append((f"TextRemover, 1 process, det 720 + 400 px passes + glyph detector, {cores} ORT threads",
                 single(imgs, TextRemovalConfig())))
    rows.append((f"TextRemover, 1 process, previous default: 720 + 400, no glyph detector, {cores} ORT threads",
                 single(imgs, TextRemovalConfig(glyph_detector=False))))
    rows.append((f"TextRemover, {cores} processes x 1 ORT thread, det 720 + 400 + glyph detector",
                 pool(imgs, TextRemovalConfig(ocr_threads=1), cores)))
    rows.append((f"TextRemover, {cores} processes x 1 ORT thread, previous default: no glyph detector",
                 pool(imgs, TextRemovalConfig(ocr_threads=1, glyph_detector=False), cores)))
    rows.append((f"TextRemover, {cores} processes x 1 ORT thread, glyph detector, no recognition of line boxes",
                 pool(imgs, TextRemovalConfig(ocr_threads=1, recognize=False), cores)))
    print(f"command: python bench/bench_textremoval.py --n {args.n}")
    print(f"machine: {platform.processor() or platform.machine()}, {cores} CPU cores, "
          f"Python {platform.python_version()}, "
          f"load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}\n")
    print("| mode | images/s (wall) | CPU s/img | quiet bound img/s "
          "| detect ms/img | segment ms/img | inpaint ms/img |")
    print("|---|---|---|---|---|---|---|")
    n = len(imgs)
    for name, r in rows:
        bound = f"{cores / (r['cpu'] / n):.1f}" if "processes" in name else "-"
        print(f"| {name} | {n / r['total']:.2f} | {r['cpu'] / n:.3f} | {bound} | {1000 * r['detect'] / n:.0f} "
              f"| {1000 * r['segment'] / n:.1f} | {1000 * r['inpaint'] / n:.1f} |")
    print("\n(stage times in the pool rows are per-worker sums divided by images; they overlap in wall time. "
          "quiet bound = cores / CPU-s per image: the pool's images/s if each worker had a core to itself)")


if __name__ == "__main__":
    main()

"""Measure text removal on real CXRs with rendered ground-truth text, and on images with real burnt-in text.

`python -m textremoval.evaluate --n 100` prints a Markdown table: detection recall/precision of the
rendered boxes, mask IoU and glyph coverage, PSNR/SSIM vs the clean original (inside text regions and
whole image), residual-text rate (OCR again on the cleaned image) and outside-mask changes (must be 0);
then the residual-text rate on the manifest's `has_burnt_text=yes` images."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm import tqdm

from cxrcommon.atomic import atomic_write_text
from cxrcommon.cli import cli_entry
from cxrcommon.config import field, from_dict, load_yaml, parse_config
from cxrcommon.limits import check_image_file
from cxrcommon.manifest import Columns, Record, read_manifest

from .clean import TextRemover
from .config import TextRemovalConfig
from .synth_text import render

log = logging.getLogger(__name__)
REALCXR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "realcxr"


@dataclass
class EvalConfig:
    data: str = field(str(REALCXR), "folder with manifest.csv and images/ (the shared real-CXR set)")
    n: int = field(100, "number of images to render text onto (seeded sample)")
    seed: int = field(0, "sampling and rendering seed")
    exclude_seed: int = field(-1, "sample only from images NOT in the `--n 100` sample of this seed, e.g. "
                                  "--exclude-seed 0 for a development split disjoint from the reported one "
                                  "(-1 = sample from all images)")
    removal_config: str | None = field(None, "YAML of text-removal options (configs/textremoval.yaml); "
                                             "default options if unset")
    det_max_side: int = field(-1, "override det_max_side of the removal config (-1 = keep)")
    burnt: bool = field(True, "also measure the residual-text rate on has_burnt_text=yes images")
    report: str | None = field(None, "write the full metrics as JSON here")


def ioa(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection over the smaller box: tolerant of detector margins and line splits/merges."""
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(1, small)


def covered(box: Sequence[int], others: Sequence[Sequence[int]], shape: tuple[int, int]) -> float:
    """Fraction of `box` covered by the union of `others`."""
    x0, y0, x1, y1 = box
    union = np.zeros(shape, bool)
    for b in others:
        union[b[1]:b[3], b[0]:b[2]] = True
    return float(union[y0:y1, x0:x1].mean()) if x1 > x0 and y1 > y0 else 0.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of 8-bit pixels (torchmetrics), capped at 99 dB for identical inputs so means stay finite."""
    value = peak_signal_noise_ratio(torch.from_numpy(a).double(), torch.from_numpy(b).double(), data_range=255.0)
    return min(float(value), 99.0)


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM (torchmetrics; Gaussian window, sigma 1.5, Wang et al. 2004) of 8-bit images."""
    _, full = structural_similarity_index_measure(torch.from_numpy(a).double()[None, None],
                                                  torch.from_numpy(b).double()[None, None],
                                                  data_range=255.0, return_full_image=True)
    return full[0, 0].numpy()


def realcxr_records(data: Path) -> list[Record]:
    """Rows of the shared real-CXR manifest (image paths under images/, `has_burnt_text` in `extra`)."""
    path = data / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass --data pointing at the shared realcxr folder")
    return read_manifest(path, Columns(image="file", text=None), image_root=data / "images", check_images=False)


def eval_rendered(remover: TextRemover, files: list[Path], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    det = remover.detector
    n_gt = n_found = n_resid = n_det = n_tp = n_pre = n_changed_outside = n_glyph_pre = 0
    ious, cover, ps_in, ps_in0, ps_all, ss_in, ss_all, secs = [], [], [], [], [], [], [], []
    for f in tqdm(files, desc="rendered", unit="img"):
        original = cv2.imread(str(check_image_file(f)), cv2.IMREAD_GRAYSCALE)
        if original is None:
            log.warning("skipping unreadable %s", f)
            continue
        s = render(original, rng)
        pre_regions = det(original)                               # text already on the film
        pre = [r.box for r in pre_regions]
        n_glyph_pre += sum(r.source == "glyph" for r in pre_regions)
        t = time.perf_counter()
        res = remover(s.image)
        secs.append(time.perf_counter() - t)
        boxes = [r.box for r in res.regions]
        after = [r.box for r in det(res.image)]
        shape = original.shape
        for g in s.boxes:
            n_gt += 1
            n_found += covered(g, boxes, shape) >= 0.5
            n_resid += covered(g, after, shape) >= 0.5
        for b in boxes:
            hit = any(ioa(b, g) >= 0.5 for g in s.boxes)
            if not hit and any(ioa(b, p) >= 0.5 for p in pre):
                n_pre += 1                                        # real text, not a false alarm
                continue
            n_det += 1
            n_tp += hit
        gt, pm = s.mask, res.mask
        ious.append((gt & pm).sum() / max(1, (gt | pm).sum()))
        cover.append((gt & pm).sum() / max(1, gt.sum()))
        region = np.zeros(shape, bool)
        for x0, y0, x1, y1 in s.boxes:
            region[max(0, y0 - 4):y1 + 4, max(0, x0 - 4):x1 + 4] = True
        smap = ssim_map(res.image, original)
        ps_in.append(psnr(res.image[region], original[region]))
        ps_in0.append(psnr(s.image[region], original[region]))
        ps_all.append(psnr(res.image, original))
        ss_in.append(float(smap[region].mean()))
        ss_all.append(float(smap.mean()))
        n_changed_outside += int((res.image[~pm] != s.image[~pm]).any())
    return {"images": len(ious), "gt_items": n_gt, "recall": n_found / max(1, n_gt),
            "precision": n_tp / max(1, n_det), "pre_existing_text_boxes": n_pre,
            "glyph_boxes_on_originals": n_glyph_pre,
            "mask_iou": float(np.mean(ious)), "glyph_coverage": float(np.mean(cover)),
            "psnr_text_regions_before": float(np.mean(ps_in0)), "psnr_text_regions": float(np.mean(ps_in)),
            "psnr_whole": float(np.mean(ps_all)), "ssim_text_regions": float(np.mean(ss_in)),
            "ssim_whole": float(np.mean(ss_all)), "residual_text_rate": n_resid / max(1, n_gt),
            "images_changed_outside_mask": n_changed_outside, "seconds_per_image": float(np.mean(secs))}


def eval_burnt(remover: TextRemover, files: list[Path]) -> dict:
    """On real burnt-in text: how many erased boxes the OCR still finds after cleaning."""
    n_erased = n_resid = n_img_resid = 0
    leftovers = []
    for f in tqdm(files, desc="burnt-in", unit="img"):
        img = cv2.imread(str(check_image_file(f)), cv2.IMREAD_GRAYSCALE)
        res = remover(img)
        erased = [r for r in res.regions if r.action == "erased"]
        after = remover.detector(res.image)
        left = [r for r in erased if any(ioa(r.box, a.box) >= 0.5 for a in after)]
        n_erased, n_resid, n_img_resid = n_erased + len(erased), n_resid + len(left), n_img_resid + bool(left)
        leftovers += [f"{f.name}: {r.text!r}" for r in left]
    return {"images": len(files), "erased_regions": n_erased, "residual_text_rate": n_resid / max(1, n_erased),
            "images_with_residual": n_img_resid, "leftovers": leftovers}


def sample(count: int, n: int, seed: int) -> list[int]:
    """The seeded sample of `n` of `count` images (the same indices for the same seed, count and n)."""
    return np.random.default_rng(seed).permutation(count)[:n].tolist()


def eval_indices(count: int, n: int, seed: int, exclude_seed: int = -1, exclude_n: int = 100) -> list[int]:
    """Indices of the images to render onto: the seeded sample of `n`, drawn from the images outside the
    `exclude_n` sample of `exclude_seed` when that is >= 0 (a development split disjoint from the report)."""
    held = set(sample(count, exclude_n, exclude_seed)) if exclude_seed >= 0 else set()
    pool = [i for i in range(count) if i not in held]
    if not pool:
        raise ValueError(f"--exclude-seed {exclude_seed} leaves no image: all {count} are in its {exclude_n}-image "
                         "sample; use a larger data folder or drop --exclude-seed")
    return [pool[i] for i in sample(len(pool), n, seed)]


def evaluate(cfg: EvalConfig) -> dict:
    data = Path(cfg.data)
    rows = realcxr_records(data)
    removal = from_dict(TextRemovalConfig, load_yaml(cfg.removal_config), cfg.removal_config) \
        if cfg.removal_config else TextRemovalConfig()
    if cfg.det_max_side >= 0:
        removal.det_max_side = cfg.det_max_side
    remover = TextRemover.from_config(removal)
    order = eval_indices(len(rows), cfg.n, cfg.seed, cfg.exclude_seed)
    report = {"config": {"n": cfg.n, "seed": cfg.seed, "exclude_seed": cfg.exclude_seed,
                         "det_max_side": removal.det_max_side, "det_extra_sides": removal.det_extra_sides,
                         "det_thresh": removal.det_thresh,
                         "det_box_thresh": removal.det_box_thresh, "segmenter": removal.segmenter,
                         "inpainter": removal.inpainter, "glyph_detector": removal.glyph_detector},
              "rendered": eval_rendered(remover, [rows[i].image for i in order], cfg.seed)}
    if cfg.burnt:
        burnt = [r.image for r in rows if r.extra.get("has_burnt_text") == "yes"]
        report["burnt"] = eval_burnt(remover, burnt)
    if cfg.report:
        atomic_write_text(cfg.report, json.dumps(report, indent=1))
    return report


def markdown(report: dict) -> str:
    r = report["rendered"]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in r.items()]
    if "burnt" in report:
        b = report["burnt"]
        lines += [f"| burnt-in set: images | {b['images']} |",
                  f"| burnt-in set: erased regions | {b['erased_regions']} |",
                  f"| burnt-in set: residual_text_rate | {b['residual_text_rate']:.4g} |",
                  f"| burnt-in set: images_with_residual | {b['images_with_residual']} |"]
    return "\n".join(lines)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    from cxrcommon.logs import setup_logging

    setup_logging()
    cfg = parse_config(EvalConfig, argv, "Measure burnt-in text removal on real CXRs with rendered text.")
    report = evaluate(cfg)
    print(f"config: {report['config']}\n")
    print(markdown(report))
    if report.get("burnt", {}).get("leftovers"):
        print("\nresidual text on burnt-in images:\n" + "\n".join(f"- {x}" for x in report["burnt"]["leftovers"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

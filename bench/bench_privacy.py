"""Catch rate of eval.privacy on planted copies, and its false-flag rate on fresh images.

    python bench/bench_privacy.py [--n-train 300] [--n-plant 60] [--features ""] [--copy-ratio 0.4]

"Training" images: a seeded sample of ../shared/data/realcxr (read in place, never copied into the project).
Planted copies, written to a temporary folder outside the project and deleted afterwards: training images
slipped into the synthetic set as they are, mirrored, cropped by 5% (5% of height and width removed, at a
random offset), resized to half size, and with light noise (Gaussian, sigma 0.02). "Fresh" images: the
realcxr images NOT drawn as training (held-out real images; the set has no patient ids, so a few may be
another film of a training patient). Prints a Markdown table for docs/BENCHMARKS.md and writes the raw
rows as JSON beside the table when --json is given.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cxrcommon.imageio import read_image, write_png  # noqa: E402
from eval.privacy import PrivacyConfig, privacy  # noqa: E402
from eval.sources import list_images  # noqa: E402

REALCXR = Path(__file__).resolve().parents[2] / "shared" / "data" / "realcxr" / "images"


def plant(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One planted copy of a training image."""
    h, w = img.shape
    if kind == "copy":
        return img
    if kind == "mirrored":
        return img[:, ::-1]
    if kind == "cropped 5%":
        ch, cw = round(h * 0.05), round(w * 0.05)
        top, left = rng.integers(0, ch + 1), rng.integers(0, cw + 1)
        return img[top:top + h - ch, left:left + w - cw]
    if kind == "resized 50%":
        return cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    if kind == "noise 0.02":
        return np.clip(img + rng.normal(0, 0.02, img.shape).astype(np.float32), 0, 1)
    raise ValueError(kind)


KINDS = ("copy", "mirrored", "cropped 5%", "resized 50%", "noise 0.02")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=REALCXR, help="folder of real CXRs (read in place)")
    ap.add_argument("--n-train", type=int, default=300, help="images drawn as the training set; the rest are fresh")
    ap.add_argument("--n-plant", type=int, default=60, help="training images planted per kind of copy")
    ap.add_argument("--copy-ratio", type=float, default=PrivacyConfig.copy_ratio, help="eval.privacy --copy-ratio")
    ap.add_argument("--k", type=int, default=PrivacyConfig.k, help="eval.privacy --k")
    ap.add_argument("--features", default="", help="eval.privacy --features (empty: pixel only)")
    ap.add_argument("--feature-weights", default="", help="eval.privacy --feature-weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None, help="also write the per-image rows here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = list_images(args.images)
    order = random.Random(args.seed).sample(range(len(paths)), len(paths))
    train, fresh = [paths[i] for i in order[:args.n_train]], [paths[i] for i in order[args.n_train:]]
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-privacy-") as tmp:
        tmp = Path(tmp)
        (tmp / "train.csv").write_text("image\n" + "".join(f"{p}\n" for p in train))
        kind_of = {str(p): "fresh" for p in fresh}
        for kind in KINDS:
            for j, p in enumerate(rng.choice(len(train), args.n_plant, replace=False)):
                out = tmp / "planted" / f"{kind.split()[0]}_{j:03d}.png"
                out.parent.mkdir(exist_ok=True)
                write_png(out, np.ascontiguousarray(plant(read_image(train[p]), kind, rng)))
                kind_of[str(out)] = kind
        (tmp / "fake.csv").write_text("image\n" + "".join(f"{p}\n" for p in kind_of))
        cfg = PrivacyConfig(train=str(tmp / "train.csv"), fake=str(tmp / "fake.csv"), k=args.k,
                            copy_ratio=args.copy_ratio, features=args.features, feature_weights=args.feature_weights,
                            cache_dir=str(tmp / "cache"), device="cpu")
        start = time.perf_counter()
        result = privacy(cfg)
        took = time.perf_counter() - start
    by_kind: dict[str, list[dict]] = {}
    for r in result["rows"]:
        by_kind.setdefault(kind_of[r["file"]], []).append(r)
    print(f"{len(train)} training, {len(result['rows'])} synthetic images (k={args.k}, copy ratio "
          f"{args.copy_ratio}); methods: {result['method']}; {took:.1f} s on {platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    print("| images | n | flagged | rate | pixel ratio median [max] |")
    print("|---|---|---|---|---|")
    for kind in (*KINDS, "fresh"):
        rows = by_kind[kind]
        ratios = np.array([r["pixel_ratio"] for r in rows])
        n_flag = sum(r["flagged"] for r in rows)
        what = "fresh (held-out real, false flags)" if kind == "fresh" else f"planted: {kind}"
        print(f"| {what} | {len(rows)} | {n_flag} | {n_flag / len(rows):.1%} | {np.median(ratios):.3f} "
              f"[{ratios.max():.3f}] |")
    low = sorted((r for r in by_kind["fresh"] if r["flagged"]), key=lambda r: r["pixel_ratio"])
    for r in low:
        print(f"- fresh flagged: {Path(r['file']).name} ~ {Path(r['nearest_train']).name} "
              f"(pixel ratio {r['pixel_ratio']:.3f}, {r['match']})")
    fresh_ratios = np.sort([r["pixel_ratio"] for r in by_kind["fresh"]])
    print(f"\nfresh pixel ratio, lowest five: {', '.join(f'{v:.3f}' for v in fresh_ratios[:5])}")
    if args.json:
        args.json.write_text(json.dumps([{**r, "kind": kind_of[r["file"]]} for r in result["rows"]], indent=1))


if __name__ == "__main__":
    main()

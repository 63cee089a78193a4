"""Memorisation check: the nearest training image of every synthetic one (feature cosine, then SSIM).

A synthetic image much closer to a training image than training images are to each other is a likely
copy; the report shows the two distributions and the closest pairs side by side for a human to judge.
`--by COLUMN` splits the synthetic images by a column of their manifest (eval.subgroups); each one's nearest
training image is still searched among all of them."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cxrcommon.cli import cli_entry
from cxrcommon.config import field
from cxrcommon.errors import UserError
from cxrcommon.logs import setup_logging

from .cache import default_cache_dir
from .cli import parse, user_errors
from .features import Backbone, embed_paths, load_backbone, to_square_tensor
from .sources import list_images
from .subgroups import check_by, groups, per_group, rows_for, sections, split_by

log = logging.getLogger(__name__)
CHUNK = 4096


@dataclasses.dataclass
class MemorizationConfig:
    train: str = field("", "folder or manifest of the images the generator was trained on")
    fake: str = field("", "folder or manifest of synthetic images")
    features: str = field("inception", "backbone: inception, xrv, tiny (tests only) or a TorchScript file path")
    inception_weights: str = field("", "path of the InceptionV3 FID weights file")
    input_size: int = field(224, "input side for a TorchScript backbone")
    top_k: int = field(16, "closest pairs shown in the side-by-side sheet")
    ssim_size: int = field(256, "side both images are resized to for SSIM")
    image_column: str = field("image", "manifest column holding image paths")
    batch_size: int = field(32, "images per feature-extraction batch")
    device: str = field("auto", "cpu, cuda, mps, xpu or auto")
    cache_dir: str = field("", "feature cache folder (default: one per input under $SYNTHCXR_CACHE "
                               "or ~/.cache/synthcxr/features)")
    by: list[str] = field([], "also report per group of these --fake manifest columns (sex, age_band, race, label "
                          "or any column): median nearest cosine and the share closer than the train-train p99")
    n_boot: int = field(1000, "--by: bootstrap resamples per group")
    out: str = field("eval_out/memorization", "folder for memorization.json, .md, histogram and sheet")
    verbose: bool = field(False, "debug logging")


def nearest(query: torch.Tensor, bank: torch.Tensor, exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity and index of each query row's nearest bank row (optionally not itself)."""
    q, b = F.normalize(query.double(), dim=1), F.normalize(bank.double(), dim=1)
    sims, idx = [], []
    for start in range(0, len(q), CHUNK):
        s = q[start:start + CHUNK] @ b.T
        if exclude_self:
            rows = torch.arange(start, start + len(s))
            s[torch.arange(len(s)), rows] = -2.0
        best = s.max(dim=1)
        sims.append(best.values)
        idx.append(best.indices)
    return torch.cat(sims), torch.cat(idx)


def ssim(a: np.ndarray, b: np.ndarray, size: int = 256) -> float:
    """SSIM (torchmetrics, data range 1) of two gray images after resizing both to size x size."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    return float(structural_similarity_index_measure(to_square_tensor(a, size), to_square_tensor(b, size),
                                                     data_range=1.0))


def memorization(train: str | Path, fake: str | Path, features: str | Backbone = "inception", *,
                 inception_weights: str | Path | None = None, input_size: int = 224, top_k: int = 16,
                 ssim_size: int = 256, image_column: str = "image", batch_size: int = 32, device: str = "auto",
                 cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Per synthetic image: nearest training image, its cosine and SSIM; plus the train-to-train reference.

    Args:
        train: the training images: a folder (recursive) or a manifest; >= 2 readable images.
        fake: the synthetic images: a folder or a manifest; >= 1 readable image.
        features: the backbone: "inception", "xrv", "tiny", a TorchScript file's path, or a loaded Backbone.
        inception_weights: the InceptionV3 FID weights file for "inception", or None to look in the default place.
        input_size: input side in pixels of a TorchScript backbone (its (N, 3, S, S) input), > 0.
        top_k: closest pairs to show; the result's top_k is min(top_k, number of pairs), all pairs are kept.
        ssim_size: side in pixels both images are resized to for SSIM, > 0.
        image_column: the manifests' image-path column.
        batch_size: images per feature-extraction batch, >= 1.
        device: "auto" or a torch device name for the backbone.
        cache_dir: feature-cache folder shared by both sets, or None for one per source under the user cache.
    Returns: sizes, backbone, cosine_max / cosine_median (cosine similarity in [-1, 1]), the train-train 99th
        percentile and how many fakes exceed it, ssim_max, skipped files, `pairs` (fake, nearest train image,
        cosine, ssim; most similar first) and every train image's nearest-other-train cosine."""
    from cxrcommon.imageio import read_image
    bb = load_backbone(features, inception_weights=inception_weights, input_size=input_size, device=device)
    et = embed_paths(list_images(train, image_column), bb, batch_size=batch_size, desc="train features",
                     cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(train))
    ef = embed_paths(list_images(fake, image_column), bb, batch_size=batch_size, desc="fake features",
                     cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(fake))
    if len(et.paths) < 2 or not ef.paths:
        raise ValueError(f"need at least 2 readable training images and 1 synthetic one; got {len(et.paths)} "
                         f"and {len(ef.paths)}")
    cos, idx = nearest(ef.features, et.features)
    ref, _ = nearest(et.features, et.features, exclude_self=True)
    pairs = [{"fake": str(ef.paths[i]), "train": str(et.paths[int(j)]), "cosine": float(c)}
             for i, (c, j) in enumerate(zip(cos, idx))]
    pairs.sort(key=lambda r: -r["cosine"])
    for row in pairs:
        row["ssim"] = ssim(read_image(row["fake"]), read_image(row["train"]), ssim_size)
    ref_q = float(torch.quantile(ref, 0.99)) if len(ref) else float("nan")
    return {"train": str(train), "fake": str(fake), "backbone": bb.name, "resize": bb.resize,
            "n_train": len(et.paths), "n_fake": len(ef.paths), "ssim_size": ssim_size,
            "cosine_max": float(cos.max()), "cosine_median": float(cos.median()),
            "train_train_cosine_p99": ref_q,
            "n_fake_closer_than_train_p99": int((cos > ref_q).sum()),
            "ssim_max": max(r["ssim"] for r in pairs), "top_k": min(top_k, len(pairs)),
            "skipped": et.skipped + ef.skipped, "pairs": pairs, "train_train_cosine": ref.tolist()}


def by_group(result: dict[str, Any], fake: str | Path, by: str, image_column: str = "image", n_boot: int = 1000,
             seed: int = 0) -> list[dict[str, Any]]:
    """Per group of synthetic images (column `by` of `fake`'s manifest): the median nearest-training cosine and
    the share above the train-train 99th percentile, with bootstrap intervals over the group's images."""
    cos = np.array([r["cosine"] for r in result["pairs"]])
    above = cos > result["train_train_cosine_p99"]

    def metric(i: np.ndarray) -> dict[str, float]:
        return {"cosine_median": float(np.median(cos[i])), "share_closer_than_train_p99": float(above[i].mean())}
    index = groups(rows_for([Path(r["fake"]) for r in result["pairs"]], fake, image_column), by)
    return per_group(metric, {g: [ix] for g, ix in index.items()}, names=("fake",), n_boot=n_boot, seed=seed)


def _figures(result: dict[str, Any], top_k: int) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    from cxrcommon.imageio import read_image
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].hist([r["cosine"] for r in result["pairs"]], bins=40, alpha=0.7, density=True, label="synthetic -> train")
    ax[0].hist(result["train_train_cosine"], bins=40, alpha=0.5, density=True, label="train -> other train")
    ax[0].axvline(result["train_train_cosine_p99"], color="k", ls="--", lw=0.8, label="train-train 99th pct")
    ax[0].set_xlabel(f"nearest-neighbour cosine ({result['backbone']})")
    ax[0].legend(fontsize=7)
    ax[1].hist([r["ssim"] for r in result["pairs"]], bins=40, color="tab:green")
    ax[1].set_xlabel("SSIM with nearest training image")
    top = result["pairs"][:top_k]
    sheet, axes = plt.subplots(len(top), 2, figsize=(5, 2.5 * len(top)), squeeze=False)
    for row, pair in zip(axes, top):
        for a, key in zip(row, ("fake", "train")):
            a.imshow(read_image(pair[key]), cmap="gray", vmin=0, vmax=1)
            a.set_axis_off()
            a.set_title(f"{key}: {Path(pair[key]).name[:28]}", fontsize=6)
        row[0].text(0.02, 0.02, f"cos {pair['cosine']:.4f}  SSIM {pair['ssim']:.3f}", color="yellow", fontsize=7,
                    transform=row[0].transAxes)
    return {"hist": fig, "closest_pairs": sheet}


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse(MemorizationConfig, argv, "Nearest training image per synthetic image (feature cosine + SSIM), "
                "with a histogram and a sheet of the closest pairs.")
    setup_logging(cfg.verbose)
    if not cfg.train or not cfg.fake:
        raise UserError("give both --train and --fake (folders or manifests)")
    by = split_by(cfg.by)
    if by:
        check_by(by, {"--fake": cfg.fake})
    from .outputs import markdown_table, write_report
    with user_errors():
        result = memorization(cfg.train, cfg.fake, cfg.features, inception_weights=cfg.inception_weights or None,
                              input_size=cfg.input_size, top_k=cfg.top_k, ssim_size=cfg.ssim_size,
                              image_column=cfg.image_column, batch_size=cfg.batch_size, device=cfg.device,
                              cache_dir=cfg.cache_dir or None)
        if by:
            result["by"] = {col: by_group(result, cfg.fake, col, cfg.image_column, cfg.n_boot) for col in by}
    notes = [f"**Backbone:** {result['backbone']}", f"**Resize:** {result['resize']}; SSIM at "
             f"{cfg.ssim_size}x{cfg.ssim_size}", f"**N:** {result['n_train']} train, {result['n_fake']} synthetic",
             f"{result['n_fake_closer_than_train_p99']} synthetic image(s) are closer to a training image than "
             "99% of training images are to their own nearest neighbour: inspect those first."]
    result["report"] = write_report(cfg.out, "memorization", result, title="Memorisation: nearest training image",
                                    notes=notes, figures=_figures(result, cfg.top_k),
                                    sections={"Closest pairs": markdown_table(result["pairs"][:cfg.top_k]),
                                              **sections(result.get("by", {}), ["cosine_median",
                                                                                 "share_closer_than_train_p99"])})
    print(f"max cosine {result['cosine_max']:.4f}, max SSIM {result['ssim_max']:.4f}; "
          f"report {result['report']['markdown']}")
    return result


if __name__ == "__main__":
    main()

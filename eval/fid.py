"""FID, KID and precision/recall/density/coverage between a real and a synthetic set, on one feature matrix.

Every result states N (real, fake), the backbone and the resize, because FID depends on all three
(and is biased upwards for small N: compare FIDs only at equal N and backbone)."""
from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from cxrcommon.cli import cli_entry
from cxrcommon.config import field
from cxrcommon.errors import UserError
from cxrcommon.logs import setup_logging

from .cache import default_cache_dir
from .cli import parse, user_errors
from .features import Backbone, embed_paths, load_backbone
from .prdc import prdc
from .sources import list_images, subsample

log = logging.getLogger(__name__)
SMALL_N = 2000


@dataclasses.dataclass
class FidConfig:
    real: str = field("", "folder or manifest (.csv/.jsonl) of real images")
    fake: str = field("", "folder or manifest (.csv/.jsonl) of synthetic images")
    features: str = field("inception", "backbone: inception, xrv, tiny (tests only) or a TorchScript file path")
    inception_weights: str = field("", "path of the InceptionV3 FID weights file "
                                   "(default: $TORCH_HOME/hub/checkpoints/)")
    input_size: int = field(224, "input side for a TorchScript backbone")
    n: int = field(0, "use a seeded random subset of N images per set (0 = all)")
    seed: int = field(0, "seed for the --n subset and KID subsets")
    k: int = field(5, "nearest neighbours for precision/recall/density/coverage")
    kid_subsets: int = field(100, "KID: number of random subsets")
    kid_subset_size: int = field(1000, "KID: images per subset (capped at the smaller set)")
    image_column: str = field("image", "manifest column holding image paths")
    batch_size: int = field(32, "images per feature-extraction batch")
    device: str = field("auto", "cpu, cuda, mps, xpu or auto")
    cache_dir: str = field("", "feature cache folder (default: one per input under $SYNTHCXR_CACHE or ~/.cache/synthcxr/features)")
    no_cache: bool = field(False, "do not read or write the feature cache")
    out: str = field("eval_out/fid", "folder for fid.json, fid.md and plots")
    verbose: bool = field(False, "debug logging")


class _Given(nn.Module):
    """Identity 'feature extractor': hands already-extracted features to torchmetrics."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def distances(real: torch.Tensor, fake: torch.Tensor, *, k: int = 5, kid_subsets: int = 100,
              kid_subset_size: int = 1000, seed: int = 0) -> dict[str, Any]:
    """FID (torchmetrics), KID (torchmetrics) and PRDC on two (N, D) feature matrices."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images per set; got {len(real)} real and {len(fake)} fake")
    real, fake = real.double(), fake.double()
    fid = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    size = min(kid_subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=kid_subsets, subset_size=size)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    out: dict[str, Any] = {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
                           "kid_subset_size": size, "prdc_k": k}
    try:
        out.update(prdc(real, fake, k))
    except ValueError as exc:
        log.warning("%s", exc)
        out.update(precision=None, recall=None, density=None, coverage=None)
    return out


def _embed(source: str | Path, n: int | None, seed: int, backbone: Backbone, cache_dir: str | Path | None,
           use_cache: bool, image_column: str, batch_size: int, what: str):
    paths = subsample(list_images(source, image_column), n, seed, what)
    cdir = (Path(cache_dir) if cache_dir else default_cache_dir(source)) if use_cache else None
    return embed_paths(paths, backbone, cache_dir=cdir, batch_size=batch_size, desc=f"{what} features")


def evaluate(real: str | Path, fake: str | Path, features: str | Backbone = "inception", n: int | None = None, *,
             inception_weights: str | Path | None = None, input_size: int = 224, k: int = 5, seed: int = 0,
             kid_subsets: int = 100, kid_subset_size: int = 1000, image_column: str = "image",
             batch_size: int = 32, device: str = "auto", cache_dir: str | Path | None = None,
             use_cache: bool = True, out: str | Path | None = None) -> dict[str, Any]:
    """All distribution metrics for two image sets; writes fid.json/fid.md/plots under `out` when given."""
    t0 = time.perf_counter()
    bb = load_backbone(features, inception_weights=inception_weights, input_size=input_size, device=device)
    er = _embed(real, n, seed, bb, cache_dir, use_cache, image_column, batch_size, "real")
    ef = _embed(fake, n, seed, bb, cache_dir, use_cache, image_column, batch_size, "fake")
    result: dict[str, Any] = {"real": str(real), "fake": str(fake), "n_real": len(er.paths), "n_fake": len(ef.paths),
                              "backbone": bb.name, "resize": bb.resize, "feature_dim": int(er.features.shape[1])}
    result.update(distances(er.features, ef.features, k=k, kid_subsets=kid_subsets,
                            kid_subset_size=kid_subset_size, seed=seed))
    warns = []
    if min(len(er.paths), len(ef.paths)) < SMALL_N:
        warns.append(f"N < {SMALL_N} (real {len(er.paths)}, fake {len(ef.paths)}): FID is biased upwards at small N; "
                     "compare FIDs only at the same N and backbone, and prefer KID for small sets.")
    if er.skipped or ef.skipped:
        warns.append(f"{len(er.skipped) + len(ef.skipped)} unreadable image(s) skipped; see `skipped` in the JSON.")
    result.update(warnings=warns, skipped=er.skipped + ef.skipped,
                  cache={"real_hits": er.cache_hits, "real_extracted": er.extracted,
                         "fake_hits": ef.cache_hits, "fake_extracted": ef.extracted},
                  seconds=round(time.perf_counter() - t0, 2))
    for w in warns:
        log.warning("%s", w)
    if out:
        result["report"] = _report(out, result, er.features, ef.features)
    return result


def _report(out: str | Path, result: dict[str, Any], real: torch.Tensor, fake: torch.Tensor) -> dict[str, str]:
    import matplotlib.pyplot as plt
    from .report import write_report
    both = torch.cat([real, fake]).double()
    centred = both - both.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ v[:2].T).numpy()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].scatter(xy[:len(real), 0], xy[:len(real), 1], s=6, alpha=0.6, label=f"real (N={len(real)})")
    ax[0].scatter(xy[len(real):, 0], xy[len(real):, 1], s=6, alpha=0.6, label=f"synthetic (N={len(fake)})")
    ax[0].set_title("features, first two principal components")
    ax[0].legend()
    names = ["precision", "recall", "density", "coverage"]
    ax[1].bar(names, [result[m] or 0.0 for m in names], color="tab:gray")
    ax[1].axhline(1.0, ls="--", lw=0.8, color="k")
    ax[1].set_title(f"k={result['prdc_k']} nearest neighbours")
    notes = [f"**Backbone:** {result['backbone']}", f"**Resize:** {result['resize']}",
             f"**N:** {result['n_real']} real, {result['n_fake']} synthetic",
             f"**FID** {result['fid']:.2f} | **KID** {result['kid_mean']:.4f} ± {result['kid_std']:.4f} "
             f"(subset size {result['kid_subset_size']})"]
    return write_report(out, "fid", result, title="FID / KID / precision-recall-density-coverage",
                        notes=notes, warnings=result["warnings"], figures={"features": fig})


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse(FidConfig, argv, "FID, KID and precision/recall/density/coverage between real and synthetic images.")
    setup_logging(cfg.verbose)
    if not cfg.real or not cfg.fake:
        raise UserError("give both --real and --fake (folders or manifests)")
    with user_errors():
        result = evaluate(cfg.real, cfg.fake, cfg.features, cfg.n or None,
                          inception_weights=cfg.inception_weights or None, input_size=cfg.input_size, k=cfg.k,
                          seed=cfg.seed, kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size,
                          image_column=cfg.image_column, batch_size=cfg.batch_size,
                          device=cfg.device, cache_dir=cfg.cache_dir or None, use_cache=not cfg.no_cache,
                          out=cfg.out)
    print(f"FID {result['fid']:.3f}  KID {result['kid_mean']:.5f}  N real {result['n_real']} fake {result['n_fake']}  "
          f"backbone {result['backbone']}  report {result['report']['markdown']}")
    return result


if __name__ == "__main__":
    main()

"""FID, KID and precision/recall/density/coverage between a real and a synthetic set, on one feature matrix.

Every result states N (real, fake), the backbone and the resize, because FID depends on all three
(and is biased upwards for small N: compare FIDs only at equal N and backbone). Where the backbone and
settings are those of a published benchmark, the result also carries the numbers under that benchmark's
names (`comparable_names`): CheXGenBench's "FID", "KID" (inception) and "FID (RadDino)", "KID (RadDino)",
"Precision", "Recall", "Density", "Coverage" (rad-dino, k = 5), and RoentGen's CLIP / XRV FID.

`--by COLUMN` adds the metrics per group (sex, age_band, race, label, any manifest column; eval.subgroups): real
and fake rows are split by the same column (a generated manifest's requested demographics), every group is
subsampled to one N (FID's bias depends on N), and FID/KID get a bootstrap interval from resampling the group's
images (re-centred on the estimate: see eval.subgroups.bootstrap_ci). A resample's FID uses `frechet_distance`
(an N x N SVD when N < D: 0.06 s at N 500, 2048-d, vs 1.56 s for torchmetrics' D x D eigvals on 2 CPU
cores; docs/BENCHMARKS.md) and
its KID one unbiased MMD over the whole resample: ~0.7 s a draw on a busy 2-core CPU, so `--by-n-boot 50` over 5
groups adds ~3 minutes. Each group's point estimates are torchmetrics' (one `distances` call each, as costly as
the pooled one: ~45 s at N 500, 2048-d there). PRDC per group has no interval (resampling with replacement
duplicates images, collapsing k-NN radii)."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from cxrcommon.cli import cli_entry
from cxrcommon.config import field
from cxrcommon.errors import UserError
from cxrcommon.logs import setup_logging
from cxrcommon.paths import check_out_dir

from .cache import default_cache_dir
from .cli import parse, user_errors
from .features import Backbone, embed_paths, load_backbone
from .prdc import prdc
from .sources import list_images, subsample
from .subgroups import check_by, groups, per_group, rows_for, sections, split_by

log = logging.getLogger(__name__)
SMALL_N = 2000
BY_KEYS = ("fid", "kid_mean", "precision", "recall", "density", "coverage")


@dataclasses.dataclass
class FidConfig:
    real: str = field("", "folder or manifest (.csv/.jsonl) of real images")
    fake: str = field("", "folder or manifest (.csv/.jsonl) of synthetic images")
    features: str = field("inception", "backbone: inception, rad-dino, clip, xrv (these three need --weights), "
                          "tiny (tests only) or a TorchScript file path")
    weights: str = field("", "local weights for --features: rad-dino and clip a transformers folder "
                         "(microsoft/rad-dino, openai/clip-vit-base-patch32), xrv a DenseNet-121 .safetensors "
                         "file, inception the FID InceptionV3 file; nothing is downloaded")
    inception_weights: str = field("", "path of the InceptionV3 FID weights file, as --weights "
                                   "(default: $TORCH_HOME/hub/checkpoints/)")
    input_size: int = field(224, "input side for a TorchScript backbone")
    n: int = field(0, "use a seeded random subset of N images per set (0 = all)")
    seed: int = field(0, "seed for the --n subset and KID subsets")
    k: int = field(5, "nearest neighbours for precision/recall/density/coverage")
    kid_subsets: int = field(100, "KID: number of random subsets")
    kid_subset_size: int = field(1000, "KID: images per subset (capped at the smaller set); 0 = the smaller "
                                 "set's size, as CheXGenBench")
    image_column: str = field("image", "manifest column holding image paths")
    batch_size: int = field(32, "images per feature-extraction batch")
    device: str = field("auto", "cpu, cuda, mps, xpu or auto")
    cache_dir: str = field("", "feature cache folder (default: one per input under $SYNTHCXR_CACHE "
                               "or ~/.cache/synthcxr/features)")
    no_cache: bool = field(False, "do not read or write the feature cache")
    by: list[str] = field([], "also report every metric per group of these manifest columns: sex, age_band, race, "
                          "label (each '|' label) or any column (`--by sex race` or `--by sex,race`); both sets "
                          "must be manifests (or generated folders with manifest.jsonl) that have the column")
    by_n_boot: int = field(50, "--by: bootstrap resamples per group for the FID/KID intervals (each ~0.7 s at "
                           "N 500, 2048-d on 2 CPU cores)")
    by_equal_n: bool = field(True, "--by: subsample every group's real and fake sets to the smallest such size, "
                             "so groups are compared at one N (FID is biased upwards at small N)")
    out: str = field("eval_out/fid", "folder for fid.json, fid.md and plots")
    verbose: bool = field(False, "debug logging")


class _Given(nn.Module):
    """Identity 'feature extractor': hands already-extracted features to torchmetrics."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def distances(real: torch.Tensor, fake: torch.Tensor, cfg: FidConfig | None = None,
              with_prdc: bool = True) -> dict[str, Any]:
    """FID and KID (torchmetrics) and precision/recall/density/coverage on two feature matrices.

    Args:
        real: (N_real, D) features of the real set; N_real >= 2.
        fake: (N_fake, D) features of the synthetic set, same D; N_fake >= 2.
        cfg: where `k`, `kid_subsets`, `kid_subset_size` and `seed` come from (FidConfig's defaults if None).
        with_prdc: False leaves precision/recall/density/coverage out (bootstrap draws).
    Returns: fid, kid_mean, kid_std, kid_subset_size (capped at the smaller set; 0 in cfg means the smaller
        set), prdc_k, precision, recall, density and coverage (None when a set is too small for k neighbours)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    cfg = cfg or FidConfig()
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images per set; got {len(real)} real and {len(fake)} fake")
    real, fake = real.double(), fake.double()
    fid = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    size = min(cfg.kid_subset_size or len(real), len(real), len(fake))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=cfg.kid_subsets, subset_size=size)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        kid_mean, kid_std = kid.compute()
    out: dict[str, Any] = {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
                           "kid_subset_size": size, "prdc_k": cfg.k}
    if not with_prdc:
        return out
    try:
        out.update(prdc(real, fake, cfg.k))
    except ValueError as exc:
        log.warning("%s", exc)
        out.update(precision=None, recall=None, density=None, coverage=None)
    return out


CHEXGENBENCH = {"inception": {"fid": "FID", "kid_mean": "KID"},
                "rad-dino": {"fid": "FID (RadDino)", "kid_mean": "KID (RadDino)", "precision": "Precision",
                             "recall": "Recall", "density": "Density", "coverage": "Coverage"}}
CHEXGENBENCH_K = 5  # their compute_prdc(nearest_k=5)
ROENTGEN = {"clip": {"model": "clip_vit_b_32", "n_features": 512}, "xrv": {"n_features": 1024}}


def comparable_names(family: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics under a published benchmark's own names, where the backbone is that benchmark's.

    CheXGenBench (metrics/fid.py) writes one row per model: "FID" and "KID" (mean) on InceptionV3, "FID (RadDino)",
    "KID (RadDino)" and "Precision", "Recall", "Density", "Coverage" (k = 5) on RAD-DINO; run eval.fid once per
    backbone and merge the two `chexgenbench` dicts for their row. RoentGen (eval/calculate_fid.py) writes
    {"clip": {"fid", "model", "n_features"}} and {"xrv": {...}}. Unrounded (CheXGenBench rounds to 3 decimals).

    Args:
        family: the backbone's --features name (`Backbone.family`).
        metrics: `distances`' result (fid, kid_mean, precision, ..., prdc_k).
    Returns: {"chexgenbench": {...}} or {"roentgen": {...}}, or {} for other backbones."""
    if family in CHEXGENBENCH:
        names = CHEXGENBENCH[family]
        skip = () if metrics.get("prdc_k") == CHEXGENBENCH_K else ("precision", "recall", "density", "coverage")
        return {"chexgenbench": {name: metrics[key] for key, name in names.items() if key not in skip}}
    if family in ROENTGEN:
        return {"roentgen": {family: {"fid": metrics["fid"], **ROENTGEN[family]}}}
    return {}


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID of two (N, D) feature matrices (N >= 2), equal to torchmetrics' up to rounding but fast when N < D.

    The trace term tr sqrt(S_r S_f) is a nuclear norm: with centred X, S = X^T X / (N - 1), and the nonzero
    eigenvalues of S_r S_f are the squared singular values of X_r X_f^T / sqrt((N_r - 1)(N_f - 1)), so an
    N_r x N_f SVD replaces a D x D non-symmetric eigendecomposition. With more images than dimensions the
    D x D form ||S_r^1/2 S_f^1/2||_* is used instead."""
    real, fake = real.double(), fake.double()
    xr, xf = real - real.mean(0), fake - fake.mean(0)
    cr, cf = len(real) - 1, len(fake) - 1
    if max(len(real), len(fake)) <= real.shape[1]:
        cross = torch.linalg.svdvals(xr @ xf.T).sum() / math.sqrt(cr * cf)
    else:
        cross = torch.linalg.svdvals(_psd_sqrt(xr.T @ xr / cr) @ _psd_sqrt(xf.T @ xf / cf)).sum()
    mean = (real.mean(0) - fake.mean(0)).square().sum()
    return float(mean + xr.square().sum() / cr + xf.square().sum() / cf - 2 * cross)


def distances_by(real: torch.Tensor, fake: torch.Tensor, real_rows: list[dict[str, Any]],
                 fake_rows: list[dict[str, Any]], by: str, cfg: FidConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """FID, KID and PRDC per group of column `by`, real and fake split by the same column.

    Args:
        real: (N_real, D) features; real_rows: the manifest row of each (same order).
        fake: (N_fake, D) features; fake_rows: the manifest row of each.
        by: the column (see eval.subgroups).
        cfg: metric settings, plus by_n_boot, by_equal_n and seed (subsampling and bootstrap).
    Returns: (one row per group: group, n_real, n_fake, fid, kid_mean, ..., ci {fid, kid_mean: [low, high]},
        n_boot_used, note; warnings)."""
    g_real, g_fake = groups(real_rows, by), groups(fake_rows, by)
    none = np.zeros(0, dtype=np.int64)
    index = {g: [g_real.get(g, none), g_fake.get(g, none)] for g in sorted({*g_real, *g_fake},
                                                                           key=lambda g: (g == "unknown", g))}
    sizes = [min(len(r), len(f)) for r, f in index.values() if min(len(r), len(f)) >= 2]
    small = min(sizes) if sizes else 0
    if cfg.by_equal_n and small:
        rng = np.random.default_rng(cfg.seed)
        for g, sets in index.items():
            if min(map(len, sets)) >= 2:
                index[g] = [np.sort(rng.choice(s, small, replace=False)) for s in sets]
    warns = []
    if small and small < SMALL_N:
        warns.append(f"--by {by}: groups scored at N down to {small}{' (all at that N)' if cfg.by_equal_n else ''}; "
                     "FID is biased upwards at small N: compare groups only at one N and backbone, and lean on KID.")
    if small and small <= real.shape[1]:
        warns.append(f"--by {by}: N {small} <= feature dimension {real.shape[1]}: the covariances are singular, "
                     "so per-group FID mostly measures N; use more images per group or a smaller backbone.")

    def point(r: np.ndarray, f: np.ndarray) -> dict[str, Any]:
        return distances(real[torch.from_numpy(r)], fake[torch.from_numpy(f)], cfg)

    def draw(r: np.ndarray, f: np.ndarray) -> dict[str, Any]:
        from torchmetrics.image.kid import poly_mmd
        a, b = real[torch.from_numpy(r)].double(), fake[torch.from_numpy(f)].double()
        return {"fid": frechet_distance(a, b), "kid_mean": float(poly_mmd(a, b))}
    rows = per_group(point, index, names=("real", "fake"), n_boot=cfg.by_n_boot, seed=cfg.seed, min_n=2,
                     boot_metric=draw, recentre=True)
    return rows, warns


def _embed(source: str | Path, cfg: FidConfig, backbone: Backbone, what: str):
    """Features of one image set (`what`: 'real' or 'fake'), subsampled to cfg.n and read from/written to the
    feature cache unless cfg.no_cache."""
    paths = subsample(list_images(source, cfg.image_column), cfg.n or None, cfg.seed, what)
    cache = None if cfg.no_cache else Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(source)
    return embed_paths(paths, backbone, cache_dir=cache, batch_size=cfg.batch_size, desc=f"{what} features")


def evaluate(cfg: FidConfig, backbone: Backbone | None = None) -> dict[str, Any]:
    """All distribution metrics between cfg.real and cfg.fake (folders or manifests), with N, backbone and
    resize stated; writes fid.json/fid.md/plots under cfg.out when it is set. `backbone`: an already-loaded
    feature extractor (else cfg.features is loaded)."""
    t0 = time.perf_counter()
    by = split_by(cfg.by)
    if by:
        check_by(by, {"--real": cfg.real, "--fake": cfg.fake})
    backbone = backbone or load_backbone(cfg.features, weights=cfg.weights or None,
                                         inception_weights=cfg.inception_weights or None,
                                         input_size=cfg.input_size, device=cfg.device)
    if cfg.out:  # its figures are PNGs: inside REAL or FAKE they would be read back as images next time
        check_out_dir(cfg.out, (cfg.real, cfg.fake))
    real = _embed(cfg.real, cfg, backbone, "real")
    fake = _embed(cfg.fake, cfg, backbone, "fake")
    result: dict[str, Any] = {"real": str(cfg.real), "fake": str(cfg.fake), "n_real": len(real.paths),
                              "n_fake": len(fake.paths), "backbone": backbone.name, "features": backbone.family,
                              "weights_sha256": backbone.weights_sha256, "resize": backbone.resize,
                              "feature_dim": int(real.features.shape[1])}
    result.update(distances(real.features, fake.features, cfg))
    result.update(comparable_names(backbone.family, result))
    warns = []
    if min(len(real.paths), len(fake.paths)) < SMALL_N:
        warns.append(f"N < {SMALL_N} (real {len(real.paths)}, fake {len(fake.paths)}): FID is biased upwards at small "
                     "N; compare FIDs only at the same N and backbone, and prefer KID for small sets.")
    if real.skipped or fake.skipped:
        warns.append(f"{len(real.skipped) + len(fake.skipped)} unreadable image(s) skipped; see `skipped` in the JSON.")
    if by:
        real_rows = rows_for(real.paths, cfg.real, cfg.image_column)
        fake_rows = rows_for(fake.paths, cfg.fake, cfg.image_column)
        result["by"] = {}
        for col in by:
            result["by"][col], col_warns = distances_by(real.features, fake.features, real_rows, fake_rows, col, cfg)
            warns += col_warns
    result.update(warnings=warns, skipped=real.skipped + fake.skipped,
                  cache={"real_hits": real.cache_hits, "real_extracted": real.extracted,
                         "fake_hits": fake.cache_hits, "fake_extracted": fake.extracted},
                  seconds=round(time.perf_counter() - t0, 2))
    for w in warns:
        log.warning("%s", w)
    if cfg.out:
        result["report"] = _report(cfg.out, result, real.features, fake.features)
    return result


def _report(out: str | Path, result: dict[str, Any], real: torch.Tensor, fake: torch.Tensor) -> dict[str, str]:
    """fid.json, fid.md and a figure (features on their first two principal components; PRDC bars)."""
    import matplotlib.pyplot as plt

    from .outputs import write_report
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
    for bench, values in ((b, result[b]) for b in ("chexgenbench", "roentgen") if b in result):
        notes.append(f"**{bench} names:** " + ", ".join(f"{k} {v}" for k, v in values.items()))
    return write_report(out, "fid", result, title="FID / KID / precision-recall-density-coverage",
                        notes=notes, warnings=result["warnings"], figures={"features": fig},
                        sections=sections(result.get("by", {}), BY_KEYS))


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse(FidConfig, argv, "FID, KID and precision/recall/density/coverage between real and synthetic images "
                "(`python -m eval.fid REAL FAKE --features rad-dino --weights DIR`).", positional=("real", "fake"))
    setup_logging(cfg.verbose)
    if not cfg.real or not cfg.fake:
        raise UserError("give both --real and --fake (folders or manifests)")
    with user_errors():
        result = evaluate(cfg)
    print(f"FID {result['fid']:.3f}  KID {result['kid_mean']:.5f}  N real {result['n_real']} fake {result['n_fake']}  "
          f"backbone {result['backbone']}  report {result['report']['markdown']}")
    return result


if __name__ == "__main__":
    main()

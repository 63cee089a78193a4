"""FID, KID and precision/recall/density/coverage between a real and a synthetic set, on one feature matrix.

Every result states N (real, fake), the backbone and the resize, because FID depends on all three
(and is biased upwards for small N: compare FIDs only at equal N and backbone). Where the backbone and
settings are those of a published benchmark, the result also carries the numbers under that benchmark's
names (`comparable_names`): CheXGenBench's "FID", "KID" (inception) and "FID (RadDino)", "KID (RadDino)",
"Precision", "Recall", "Density", "Coverage" (rad-dino, k = 5), and RoentGen's CLIP / XRV FID."""
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
    out: str = field("eval_out/fid", "folder for fid.json, fid.md and plots")
    verbose: bool = field(False, "debug logging")


class _Given(nn.Module):
    """Identity 'feature extractor': hands already-extracted features to torchmetrics."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def distances(real: torch.Tensor, fake: torch.Tensor, cfg: FidConfig | None = None) -> dict[str, Any]:
    """FID and KID (torchmetrics) and precision/recall/density/coverage on two feature matrices.

    Args:
        real: (N_real, D) features of the real set; N_real >= 2.
        fake: (N_fake, D) features of the synthetic set, same D; N_fake >= 2.
        cfg: where `k`, `kid_subsets`, `kid_subset_size` and `seed` come from (FidConfig's defaults if None).
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
    backbone = backbone or load_backbone(cfg.features, weights=cfg.weights or None,
                                         inception_weights=cfg.inception_weights or None,
                                         input_size=cfg.input_size, device=cfg.device)
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
                        notes=notes, warnings=result["warnings"], figures={"features": fig})


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

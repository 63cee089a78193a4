"""One report for a synthetic set: `python -m eval.report REAL FAKE [--rad-dino-weights DIR] [--train TRAIN]`.

What a reviewer asking for "FID on RAD-DINO, PRDC and a privacy check" expects, in one Markdown + JSON + plots:
- FID, KID and precision/recall/density/coverage (k = 5) on each backbone (eval.fid), under CheXGenBench's names
  as one results row ("FID", "KID" on Inception; "FID (RadDino)", "KID (RadDino)", "Precision", ... on RAD-DINO),
  with N and the backbone; on RAD-DINO beside CheXGenBench's leaderboard;
- the same metrics per pathology label (eval.subgroups' `label`: each '|' label of a `labels` or `label` column),
  each label with its N and a bootstrap interval, a label whose N is under MIN_GROUP_N marked;
- nearest neighbours: each synthetic image's nearest real image (feature cosine) against the real images' own
  nearest neighbours;
- with --train, the privacy check (eval.privacy): pixel and feature nearest training image, flagged copies, and
  patient re-identification scores with --reid-weights / --reid-train.

Backbones: `--features` names them; left empty it is inception plus every backbone whose weights flag is given
(`--rad-dino-weights DIR` alone gives inception + rad-dino). Every input is checked before any image is embedded
and nothing is written until every metric is computed, so bad input ends in one line with nothing written.
Features come from the feature cache eval.fid and eval.privacy share, so no image is embedded twice by the same
backbone: the nearest-neighbour step and privacy's feature search read the rows eval.fid stored (the cache is
one folder per source unless --cache-dir names one; a TRAIN manifest other than REAL that lists the same files
shares rows only with --cache-dir). eval.privacy loads its feature backbone itself (a second load, no re-embedding).

The synthetic images' labels: a folder written by inference.generate has manifest.jsonl whose `label` is the
prompt file's `label` column (write several as "Effusion|Edema"); a CheXGenBench prompt CSV (prompt,
img_savename) gets one by adding that column before generating. Any other set: pass it as a CSV/JSONL manifest
with `image` and `labels` columns."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cxrcommon.cli import cli_entry
from cxrcommon.config import field
from cxrcommon.errors import UserError
from cxrcommon.logs import setup_logging
from cxrcommon.paths import check_out_dir

from .cache import default_cache_dir
from .cli import parse, user_errors
from .features import SPECS, Backbone, embed_paths, load_backbone
from .fid import BY_KEYS, FidConfig, evaluate
from .privacy import PrivacyConfig, build_scorer, input_paths, pairs_sheet, privacy, suspicion_order, write_flags
from .sources import list_images, subsample
from .subgroups import check_by, sections, split_by

log = logging.getLogger(__name__)

WEIGHT_FLAGS = {"inception": "inception_weights", "rad-dino": "rad_dino_weights", "clip": "clip_weights",
                "xrv": "xrv_weights"}
LABEL_MODES = ("auto", "require", "off")
MIN_GROUP_N = 100       # a label with fewer real or synthetic images is marked: its FID mostly measures N
PRDC = ("precision", "recall", "density", "coverage")
TOP_PAIRS = 16
# FID (RadDino), lower is better: CheXGenBench's leaderboard (github.com/Raman1121/CheXGenBench README; Dutt et al.
# 2025, arXiv 2505.10496), their MIMIC-CXR test prompts against the real test images.
REFERENCE = {"Sana 0.6B": 54.23, "PixArt-Σ": 60.15, "SD 1.5": 118.93, "SD 2.1": 186.53}
REFERENCE_SOURCE = ("CheXGenBench leaderboard, FID (RadDino) (Dutt et al. 2025, arXiv 2505.10496; "
                    "github.com/Raman1121/CheXGenBench)")


@dataclasses.dataclass
class ReportConfig:
    real: str = field("", "folder or manifest (.csv/.jsonl) of real images")
    fake: str = field("", "folder (generated: with manifest.jsonl) or manifest of synthetic images")
    features: list[str] = field([], "backbones (inception, rad-dino, clip, xrv, tiny, or a TorchScript file); "
                                "empty: inception plus each backbone whose --*-weights flag is given")
    inception_weights: str = field("", "InceptionV3 FID weights file (default: $TORCH_HOME/hub/checkpoints/)")
    rad_dino_weights: str = field("", "microsoft/rad-dino folder; adds rad-dino, CheXGenBench's FID (RadDino) and "
                                  "PRDC backbone, and the leaderboard comparison")
    clip_weights: str = field("", "openai/clip-vit-base-patch32 folder; adds clip (RoentGen's CLIP FID)")
    xrv_weights: str = field("", "torchxrayvision DenseNet-121 'all' .safetensors file; adds xrv (RoentGen)")
    n: int = field(0, "use a seeded random subset of N images per set for FID/KID/PRDC and nearest neighbours "
                   "(0 = all; privacy checks every synthetic image)")
    seed: int = field(0, "seed for --n, KID subsets and bootstrap resamples")
    k: int = field(5, "nearest neighbours for PRDC (CheXGenBench: 5) and privacy's training-image scale")
    kid_subsets: int = field(100, "KID: number of random subsets")
    kid_subset_size: int = field(0, "KID: images per subset; 0 = the smaller set's size, as CheXGenBench")
    labels: str = field("auto", "per-label metrics from a labels/label column ('|' between labels): auto (when "
                        "both sets have one, else the report says why not), require (refuse without), off")
    by: list[str] = field([], "also per group of these manifest columns (sex, age_band, race or any column)")
    by_n_boot: int = field(20, "bootstrap resamples per label/group for FID/KID intervals (each ~0.5-4 s per "
                           "group and backbone on CPU at N 500-5000)")
    by_equal_n: bool = field(False, "subsample every label/group to the smallest one's N (comparable across "
                             "groups, but one rare label drags all to its N); default: each label at its own N, "
                             "as CheXGenBench's per-pathology numbers")
    train: str = field("", "the generator's training images (folder or manifest): runs the privacy check")
    text_column: str = field("text", "privacy: training manifest column holding each image's report")
    prompt_key: str = field("prompt", "privacy: synthetic images' prompt (PNG text chunk / manifest key)")
    copy_ratio: float = field(0.4, "privacy: flag a nearest-neighbour distance under this share of the training "
                              "image's distance to its k-th nearest other training image")
    privacy_features: str = field("auto", "privacy: backbone of the feature nearest neighbour, one of the "
                                  "report's backbones; auto = rad-dino if used, else the first; none = pixels only")
    reid_weights: str = field("", "privacy: re-identification weights (CheXGenBench's ResNet-50_epoch11_data_"
                              "handling_RPN.pth or a scorer saved by eval.privacy --reid-train)")
    reid_train: str = field("", "privacy: instead train the re-id scorer on this manifest's same-patient pairs")
    patient_column: str = field("patient", "privacy --reid-train: manifest column holding patient ids")
    reid_threshold: float = field(0.5, "privacy: re-id score (same-patient probability) that flags an image")
    image_column: str = field("image", "manifest column holding image paths")
    batch_size: int = field(32, "images per feature-extraction batch")
    device: str = field("auto", "cpu, cuda, mps, xpu or auto")
    cache_dir: str = field("", "feature cache folder (default: one per input under $SYNTHCXR_CACHE or "
                               "~/.cache/synthcxr/features, shared with eval.fid and eval.privacy)")
    out: str = field("eval_out/report", "folder for report.json, report.md, the plots and flags.csv")
    verbose: bool = field(False, "debug logging")


@dataclasses.dataclass
class Plan:
    """What a report will compute, decided (and every input checked) before anything is embedded."""
    specs: list[str]
    weights: dict[str, str]
    by: list[str]                 # --by columns, "label" first when per-label metrics run
    label_note: str               # why there are no per-label metrics ("" when there are)
    nn_spec: str                  # backbone of the nearest-neighbour distributions
    privacy: PrivacyConfig | None  # None without --train


def backbone_specs(cfg: ReportConfig) -> tuple[list[str], dict[str, str]]:
    """The backbones to run and each one's weights ("" = the backbone's default place or none)."""
    given = {spec: getattr(cfg, flag) for spec, flag in WEIGHT_FLAGS.items() if getattr(cfg, flag)}
    specs = list(dict.fromkeys(split_by(cfg.features))) or ["inception", *(s for s in given if s != "inception")]
    for spec in given:
        if spec not in specs:
            flag = "--" + WEIGHT_FLAGS[spec].replace("_", "-")
            raise UserError(f"{flag} is given but --features {' '.join(specs)} leaves {spec} out — add {spec} to "
                            "--features or drop the flag")
    for spec in specs:
        if spec not in SPECS and not Path(spec).is_file():
            raise UserError(f"--features {spec}: use {', '.join(SPECS)} or the path of a TorchScript file")
    return specs, {s: given.get(s, "") for s in specs}


def _count(source: str, cfg: ReportConfig, what: str) -> int:
    """Images of one set (after --n), refused when PRDC's k nearest neighbours cannot exist."""
    n = len(list_images(source, cfg.image_column))
    n = min(n, cfg.n) if cfg.n else n
    if n < cfg.k + 1:
        raise UserError(f"{what} {source}: {n} image(s), fewer than --k + 1 = {cfg.k + 1} (PRDC needs k other "
                        "images around each one; FID needs far more) — add images or lower --k")
    return n


def _readable(result: dict[str, Any], k: int) -> None:
    """`_count` counts the files listed; after embedding, the images that could be read must still be k + 1 a set
    (else PRDC would quietly be left out of the report)."""
    if min(result["n_real"], result["n_fake"]) < k + 1:
        skipped = result["skipped"]
        raise UserError(f"only {result['n_real']} real and {result['n_fake']} synthetic image(s) could be read "
                        f"({len(skipped)} unreadable{', e.g. ' + skipped[0] if skipped else ''}), fewer than --k + 1 "
                        f"= {k + 1} in a set — replace the unreadable files or lower --k")


def _labels(cfg: ReportConfig, sources: dict[str, str]) -> tuple[bool, str]:
    """(run per-label metrics?, why not): --labels require refuses a set without a labels/label column."""
    if cfg.labels not in LABEL_MODES:
        raise UserError(f"--labels {cfg.labels!r}: use one of {', '.join(LABEL_MODES)}")
    if cfg.labels == "off":
        return False, "per-label metrics not asked for (--labels off)."
    try:
        check_by(["label"], sources)
    except UserError as exc:
        if cfg.labels == "require":
            raise UserError(f"--labels require: {exc}") from None
        return False, (f"per-label metrics not computed: {exc}. A folder from inference.generate carries each "
                       "prompt's `label` in manifest.jsonl (add a label column to the prompt CSV, '|' between "
                       "labels); or pass the set as a CSV manifest with `image` and `labels` columns.")
    return True, ""


def plan(cfg: ReportConfig) -> Plan:
    """Check every input and decide what runs, before any model is loaded or image embedded.

    Raises: UserError (one line naming the input and the fix), FileNotFoundError / ValueError from the sources."""
    if not cfg.real or not cfg.fake:
        raise UserError("give both REAL and FAKE (folders or manifests): python -m eval.report REAL FAKE")
    if cfg.k < 1 or cfg.n < 0 or cfg.by_n_boot < 0 or cfg.batch_size < 1:
        raise UserError("--k and --batch-size must be >= 1, --n and --by-n-boot >= 0")
    specs, weights = backbone_specs(cfg)
    _count(cfg.real, cfg, "REAL")
    _count(cfg.fake, cfg, "FAKE")
    check_out_dir(cfg.out, (cfg.real, cfg.fake))  # its plots are PNGs: inside REAL or FAKE they would be read back
    sources = {"REAL": cfg.real, "FAKE": cfg.fake}
    by = [c for c in split_by(cfg.by) if c != "label"]
    if by:
        check_by(by, sources)
    with_labels, label_note = _labels(cfg, sources)
    nn_spec = "rad-dino" if "rad-dino" in specs else specs[0]
    return Plan(specs, weights, ["label", *by] if with_labels else by, label_note, nn_spec,
                _privacy_config(cfg, weights))


def _privacy_config(cfg: ReportConfig, weights: dict[str, str]) -> PrivacyConfig | None:
    """eval.privacy's settings from ours (None without --train); its inputs checked as eval.privacy would."""
    if not cfg.train:
        if cfg.reid_weights or cfg.reid_train:
            raise UserError("--reid-weights / --reid-train need --train (the training images to score against)")
        return None
    feats = cfg.privacy_features
    if feats == "auto":
        feats = "rad-dino" if "rad-dino" in weights else next(iter(weights))
    elif feats == "none":
        feats = ""
    elif feats not in weights:
        raise UserError(f"--privacy-features {feats}: use auto, none or one of the report's backbones "
                        f"({', '.join(weights)})")
    pcfg = PrivacyConfig(train=cfg.train, fake=cfg.fake, out=cfg.out, image_column=cfg.image_column,
                         text_column=cfg.text_column, prompt_key=cfg.prompt_key, k=cfg.k, copy_ratio=cfg.copy_ratio,
                         features=feats, feature_weights=weights.get(feats, ""), reid_weights=cfg.reid_weights,
                         reid_train=cfg.reid_train, patient_column=cfg.patient_column,
                         reid_threshold=cfg.reid_threshold, batch_size=cfg.batch_size, seed=cfg.seed,
                         device=cfg.device, cache_dir=cfg.cache_dir)
    input_paths(pcfg)
    return pcfg


# ---------------------------------------------------------------- computing

def _fid_config(cfg: ReportConfig, spec: str, weights: str, by: list[str]) -> FidConfig:
    return FidConfig(real=cfg.real, fake=cfg.fake, features=spec, weights=weights, n=cfg.n, seed=cfg.seed, k=cfg.k,
                     kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size, image_column=cfg.image_column,
                     batch_size=cfg.batch_size, device=cfg.device, cache_dir=cfg.cache_dir, by=by,
                     by_n_boot=cfg.by_n_boot, by_equal_n=cfg.by_equal_n, out="")


def _features(source: str, fcfg: FidConfig, backbone: Backbone, what: str) -> torch.Tensor:
    """The features eval.fid used for one set: the same paths (and --n subset), read back from its cache."""
    paths = subsample(list_images(source, fcfg.image_column), fcfg.n or None, fcfg.seed, what)
    cache = Path(fcfg.cache_dir) if fcfg.cache_dir else default_cache_dir(source)
    return embed_paths(paths, backbone, cache_dir=cache, batch_size=fcfg.batch_size, desc=f"{what} features").features


def nearest_neighbours(real: torch.Tensor, fake: torch.Tensor) -> dict[str, Any]:
    """Each synthetic image's nearest real image (cosine similarity) against each real image's nearest other real
    one: synthetic images closer than the real images' own 99th percentile sit unusually near one real image.

    Args:
        real: (N_real, D) features, N_real >= 2; fake: (N_fake, D) features of the same backbone.
    Returns: medians, the real-real 99th percentile, how many synthetic images exceed it, and both lists."""
    from .memorization import nearest
    fake_real, _ = nearest(fake, real)
    real_real, _ = nearest(real, real, exclude_self=True)
    p99 = float(torch.quantile(real_real, 0.99))
    return {"fake_real_cosine_median": float(fake_real.median()), "real_real_cosine_median": float(real_real.median()),
            "real_real_cosine_p99": p99, "n_fake_closer_than_real_p99": int((fake_real > p99).sum()),
            "share_fake_closer_than_real_p99": float((fake_real > p99).double().mean()),
            "fake_real_cosine": fake_real.tolist(), "real_real_cosine": real_real.tolist()}


def _mark_small(rows: list[dict[str, Any]]) -> list[str]:
    """Note every group under MIN_GROUP_N images in either set; returns their names."""
    small = []
    for row in rows:
        if min(row.get("n_real", 0), row.get("n_fake", 0)) < MIN_GROUP_N:
            row["note"] = "; ".join(x for x in (row.get("note", ""), f"N < {MIN_GROUP_N}") if x)
            small.append(row["group"])
    return small


def _chexgenbench_row(metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """CheXGenBench's results row: the inception and rad-dino `chexgenbench` names merged."""
    return {k: v for r in metrics.values() for k, v in r.get("chexgenbench", {}).items()}


def report(cfg: ReportConfig, progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Every metric the plan names, computed; nothing written (see `write`).

    Returns: real, fake, n_real, n_fake, backbones, chexgenbench (their results row), metrics {backbone: eval.fid
        result, `by` holding per-label rows}, reference (rad-dino only), nearest_neighbour, privacy (or None),
        warnings, notes, settings, seconds; plus `_rows` (privacy's per-image rows, for flags.csv) and `_scorer`
        (a re-id scorer trained here, to save)."""
    t0 = time.perf_counter()
    p = plan(cfg)
    progress(f"loading {', '.join(p.specs)}")
    backbones = {s: load_backbone(s, weights=p.weights[s] or None, device=cfg.device) for s in p.specs}
    scorer = verification = None
    if p.privacy is not None:
        scorer, verification = build_scorer(p.privacy)
    metrics: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    nn: dict[str, Any] = {}
    for spec, backbone in backbones.items():
        progress(f"FID / KID / PRDC on {spec}" + (f", per {', '.join(p.by)}" if p.by else ""))
        fcfg = _fid_config(cfg, spec, p.weights[spec], p.by)
        metrics[spec] = evaluate(fcfg, backbone)
        _readable(metrics[spec], cfg.k)
        if spec == p.nn_spec:
            progress("nearest neighbours")
            real = _features(cfg.real, fcfg, backbone, "real")
            fake = _features(cfg.fake, fcfg, backbone, "fake")
            nn = {"features": spec, "backbone": backbone.name, **nearest_neighbours(real, fake)}
        warnings += metrics[spec]["warnings"]
        small = _mark_small(metrics[spec].get("by", {}).get("label", []))
        if small:
            warnings.append(f"per-label metrics ({spec}): {len(small)} label(s) with N < {MIN_GROUP_N} real or "
                            f"synthetic images ({', '.join(small[:8])}{', ...' if len(small) > 8 else ''}): their "
                            "FID mostly measures N; read KID and the intervals, or generate more.")
    first = metrics[p.specs[0]]
    result: dict[str, Any] = {"real": cfg.real, "fake": cfg.fake, "n_real": first["n_real"],
                              "n_fake": first["n_fake"], "backbones": ", ".join(p.specs),
                              "chexgenbench": _chexgenbench_row(metrics), "metrics": metrics,
                              "reference": None, "nearest_neighbour": nn, "privacy": None}
    if "rad-dino" in metrics:
        result["reference"] = {"metric": "FID (RadDino)", "source": REFERENCE_SOURCE, "models": REFERENCE,
                               "this_run": metrics["rad-dino"]["fid"]}
    rows: list[dict[str, Any]] = []
    if p.privacy is not None:
        priv = privacy(p.privacy, scorer, verification, progress)
        rows = priv.pop("rows")
        result["privacy"] = priv
        result["n_flagged"] = priv["n_flagged"]
    notes = []
    if p.privacy is None:
        notes.append("privacy not checked: pass --train TRAIN (the generator's training images).")
    if "rad-dino" not in metrics:
        notes.append("no RAD-DINO numbers: pass --rad-dino-weights DIR for CheXGenBench's FID (RadDino) and PRDC.")
    result.update(per_label={"computed": not p.label_note, "note": p.label_note},
                  warnings=list(dict.fromkeys(warnings)), notes=notes,
                  settings=dataclasses.asdict(cfg), seconds=round(time.perf_counter() - t0, 2),
                  _rows=rows, _scorer=scorer if verification is not None else None)
    return result


# ---------------------------------------------------------------- writing

def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _prdc_figure(metrics: dict[str, dict[str, Any]]) -> Any:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    width = 0.8 / len(metrics)
    for i, (spec, r) in enumerate(metrics.items()):
        values = [r[m] if _finite(r.get(m)) else np.nan for m in PRDC]
        ax.bar(np.arange(len(PRDC)) + i * width, values, width, label=f"{spec} (k={r['prdc_k']})")
    ax.set_xticks(np.arange(len(PRDC)) + width * (len(metrics) - 1) / 2, PRDC)
    ax.axhline(1.0, ls="--", lw=0.8, color="k")
    ax.set_title(f"precision / recall / density / coverage (N {r['n_real']} real, {r['n_fake']} synthetic)")
    ax.legend(fontsize=7)
    return fig


def _label_figure(metrics: dict[str, dict[str, Any]]) -> Any:
    import matplotlib.pyplot as plt
    per = {s: [g for g in r["by"]["label"] if _finite(g.get("fid"))] for s, r in metrics.items() if "by" in r}
    width = max(6.0, 0.55 * max(len(g) for g in per.values()) + 2)
    fig, axes = plt.subplots(len(per), 1, figsize=(width, 3.8 * len(per)), squeeze=False, layout="constrained")
    for ax, (spec, rows) in zip(axes[:, 0], per.items()):
        x, fid = np.arange(len(rows)), np.array([g["fid"] for g in rows])
        ci = np.array([g.get("ci", {}).get("fid") or [v, v] for g, v in zip(rows, fid)], dtype=float).reshape(-1, 2)
        small = [min(g["n_real"], g["n_fake"]) < MIN_GROUP_N for g in rows]
        ax.bar(x, fid, yerr=np.clip([fid - ci[:, 0], ci[:, 1] - fid], 0, None), capsize=2,
               color=["lightgray" if s else "tab:blue" for s in small])
        ax.axhline(metrics[spec]["fid"], ls="--", lw=0.8, color="k", label="all images")
        ax.set_xticks(x, [f"{g['group']} ({g['n_real']}/{g['n_fake']})" for g in rows], rotation=30, ha="right",
                      fontsize=7)
        ax.set_ylabel("FID")
        ax.set_title(f"FID per label, {spec} (label (N real/synthetic); grey: N < {MIN_GROUP_N}; whiskers: CI)",
                     fontsize=9)
        ax.legend(fontsize=7)
    return fig


def _reference_figure(ref: dict[str, Any], n_real: int, n_fake: int) -> Any:
    import matplotlib.pyplot as plt
    names = [*ref["models"], f"this run\n(N {n_real}/{n_fake})"]
    values = [*ref["models"].values(), ref["this_run"]]
    fig, ax = plt.subplots(figsize=(6.5, 3))
    ax.barh(names, values, color=["tab:gray"] * len(ref["models"]) + ["tab:red"])
    for v in ref["models"].values():
        ax.axvline(v, ls=":", lw=0.6, color="gray")
    ax.invert_yaxis()
    ax.set_xlabel("FID (RadDino), lower is better")
    ax.set_title("CheXGenBench leaderboard (arXiv 2505.10496) vs this run", fontsize=9)
    return fig


def _nn_figure(nn: dict[str, Any], priv: dict[str, Any] | None, rows: list[dict[str, Any]]) -> Any:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2 if priv else 1, figsize=(11 if priv else 6, 3.5), squeeze=False,
                             layout="constrained")
    ax = axes[0, 0]
    ax.hist(nn["fake_real_cosine"], bins=40, alpha=0.7, density=True, label="synthetic -> nearest real")
    ax.hist(nn["real_real_cosine"], bins=40, alpha=0.5, density=True, label="real -> nearest other real")
    ax.axvline(nn["real_real_cosine_p99"], ls="--", lw=0.8, color="k", label="real-real 99th pct")
    ax.set_xlabel(f"nearest-neighbour cosine ({nn['features']} features)")
    ax.legend(fontsize=7)
    if priv:
        ax = axes[0, 1]
        for key, what in (("pixel_ratio", "pixels"), ("feature_ratio", "features")):
            values = [r[key] for r in rows if _finite(r[key])]
            if values:
                ax.hist(values, bins=40, alpha=0.6, label=f"{what}")
        ax.axvline(priv["copy_ratio"], ls="--", lw=0.8, color="k", label=f"copy flag ({priv['copy_ratio']})")
        ax.set_xlabel("nearest training image distance / its k-th neighbour distance")
        ax.set_title(f"privacy: {priv['n_flagged']} of {priv['n_fake']} flagged", fontsize=9)
        ax.legend(fontsize=7)
    return fig


def _reid_figure(priv: dict[str, Any], rows: list[dict[str, Any]]) -> Any:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, what in (("prompt_reid", "vs its prompt's training image"), ("reid_nearest", "highest vs any training "
                                                                           "image")):
        values = [r[key] for r in rows if _finite(r[key])]
        if values:
            ax.hist(values, bins=40, range=(0, 1), alpha=0.6, label=what)
    ax.axvline(priv["reid_threshold"], ls="--", lw=0.8, color="k", label=f"threshold {priv['reid_threshold']}")
    ax.set_xlabel("re-identification score (same-patient probability)")
    ax.legend(fontsize=7)
    return fig


def _metric_rows(metrics: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"backbone": r["backbone"], "N real": r["n_real"], "N synthetic": r["n_fake"], "FID": r["fid"],
             "KID": f"{r['kid_mean']:.4g} ± {r['kid_std']:.2g} (subset {r['kid_subset_size']})",
             **{m: r[m] if _finite(r.get(m)) else "n/a" for m in PRDC}, "k": r["prdc_k"],
             "weights sha256": (r.get("weights_sha256") or "")[:12]} for r in metrics.values()]


def _sections(result: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, str]:
    from .outputs import markdown_table
    metrics, nn, priv, ref = result["metrics"], result["nearest_neighbour"], result["privacy"], result["reference"]
    out = {"Distribution metrics (FID, KID, PRDC)": markdown_table(_metric_rows(metrics)) + "\n\n" + "  \n".join(
        f"{s}: resize {r['resize']}" for s, r in metrics.items())}
    row = result["chexgenbench"]
    out["CheXGenBench names"] = (markdown_table([{"N real": result["n_real"], "N synthetic": result["n_fake"], **row}])
                                 if row else "_(no inception or rad-dino backbone ran)_") + (
        "\n\nTheir metric names, our values unrounded; comparable where their protocol is followed (their prompts "
        "and real test images, inception + rad-dino, k = 5, --kid-subset-size 0).")
    if ref:
        out["CheXGenBench leaderboard (FID on RAD-DINO)"] = markdown_table(
            [{"model": m, "FID (RadDino)": v} for m, v in ref["models"].items()]
            + [{"model": f"**this run** (N {result['n_real']} real / {result['n_fake']} synthetic)",
                "FID (RadDino)": ref["this_run"]}]) + f"\n\nReference numbers: {ref['source']}. They hold for " \
            "their MIMIC-CXR test prompts and real test images; FID depends on N and on the real set."
    else:
        out["CheXGenBench leaderboard (FID on RAD-DINO)"] = "_(needs --rad-dino-weights)_"
    label_sections = {s: r["by"]["label"] for s, r in metrics.items() if "label" in r.get("by", {})}
    if label_sections:
        for spec, groups in label_sections.items():
            body = sections({"label": groups}, BY_KEYS)
            out[f"Per-label metrics ({spec})"] = next(iter(body.values())) + (
                f"\n\nEach label's own images on both sides (an image with two labels is in both); 95% bootstrap "
                f"CI; N < {MIN_GROUP_N} marked.")
    else:
        out["Per-label metrics"] = "_" + result["per_label"]["note"] + "_"
    for spec, r in metrics.items():
        extra = {c: g for c, g in r.get("by", {}).items() if c != "label"}
        out.update({f"{head} ({spec})": body for head, body in sections(extra, BY_KEYS).items()})
    out["Nearest neighbours"] = (
        f"Backbone {nn['backbone']}: median cosine of each synthetic image to its nearest real image "
        f"{nn['fake_real_cosine_median']:.4f}, of each real image to its nearest other real image "
        f"{nn['real_real_cosine_median']:.4f}. {nn['n_fake_closer_than_real_p99']} synthetic image(s) "
        f"({nn['share_fake_closer_than_real_p99']:.1%}) are closer to a real image than 99% of real images are "
        "to their own nearest neighbour (when REAL is the training set, inspect those: eval.memorization).")
    if priv is None:
        out["Privacy"] = "_not run: pass --train TRAIN (the generator's training images)_"
        return out
    cols = ["file", "flagged_by", "nearest_train", "match", "pixel_ratio", "feature_ratio", "prompt_reid"]
    top = [{c: Path(r[c]).name if c in ("file", "nearest_train") else "n/a" if r[c] is None else r[c] for c in cols}
           for r in suspicion_order(rows)[:TOP_PAIRS]]
    out["Privacy"] = (f"**Methods:** {priv['method']}  \n**N:** {priv['n_train']} training, {priv['n_fake']} "
                      f"synthetic; **flagged** {priv['n_flagged']} ({priv['share_flagged']:.1%}); every image in "
                      f"flags.csv\n\n" + markdown_table(top))
    if "reid_prompt_mean" in priv:
        out["Re-identification"] = (
            f"Per training prompt (as CheXGenBench): mean score {priv['reid_prompt_mean']:.3f}, mean of maxima "
            f"{priv['reid_prompt_max_mean']:.3f}; {priv['reid_share_over_threshold']:.1%} of images at or over "
            f"{priv['reid_threshold']}.\n\n" + markdown_table(priv["per_prompt"][:50]))
    else:
        out["Re-identification"] = ("_not run: pass --reid-weights (CheXGenBench's) or --reid-train MANIFEST; "
                                    "scores need the training manifest's text matched to the images' prompts_")
    return out


def write(cfg: ReportConfig, result: dict[str, Any]) -> dict[str, str]:
    """report.json / report.md / plots (and flags.csv, a trained re-id scorer) under cfg.out; returns the paths.
    Removes `_rows` and `_scorer` from `result`, so what is returned is what report.json holds."""
    from .outputs import write_report
    rows, scorer = result.pop("_rows"), result.pop("_scorer")
    out = Path(cfg.out)
    priv = result["privacy"]
    if priv is not None:
        from .reid import save_reid
        if scorer is not None:
            priv["reid_scorer"] = str(save_reid(scorer, out / "reid_scorer.safetensors", **priv["verification"]))
        priv["flags_csv"] = str(write_flags(out / "flags.csv", rows))
    figures = {"prdc": _prdc_figure(result["metrics"])}
    if any("label" in r.get("by", {}) for r in result["metrics"].values()):
        figures["per_label_fid"] = _label_figure(result["metrics"])
    if result["reference"]:
        figures["fid_reference"] = _reference_figure(result["reference"], result["n_real"], result["n_fake"])
    figures["nearest_neighbour"] = _nn_figure(result["nearest_neighbour"], priv, rows)
    if priv is not None and priv.get("reid_threshold") is not None:
        figures["reid"] = _reid_figure(priv, rows)
    if priv is not None and rows:
        figures["suspicious_pairs"] = pairs_sheet(suspicion_order(rows)[:8])
    notes = [f"**Real:** {cfg.real} (N {result['n_real']})  ", f"**Synthetic:** {cfg.fake} (N {result['n_fake']})",
             f"**Backbones:** {result['backbones']}", *result["notes"]]
    if result["per_label"]["note"]:
        notes.append(result["per_label"]["note"])
    return write_report(out, "report", result, title="Synthetic chest X-rays: fidelity, per-label and privacy",
                        notes=notes, warnings=result["warnings"], sections=_sections(result, rows), figures=figures)


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse(ReportConfig, argv, "One report: FID/KID/PRDC per backbone under CheXGenBench's names, per-label "
                "metrics, nearest neighbours and (with --train) the privacy check, as Markdown, JSON and plots "
                "(`python -m eval.report REAL FAKE --rad-dino-weights DIR --train TRAIN`).",
                positional=("real", "fake"))
    setup_logging(cfg.verbose)
    with user_errors():
        result = report(cfg)
        paths = write(cfg, result)
    result["report"] = paths
    headline = "  ".join(f"{s}: FID {r['fid']:.3f}" for s, r in result["metrics"].items())
    print(f"{headline}  N real {result['n_real']} fake {result['n_fake']}"
          + (f"  flagged {result['n_flagged']}" if "n_flagged" in result else "") + f"  report {paths['markdown']}")
    return result


if __name__ == "__main__":
    main()

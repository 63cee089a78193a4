"""Privacy: does a synthetic image copy a training image, or re-identify a training patient?

Three methods, each used when it can be (the report names those used):
- pixel nearest neighbour (always): RMS difference of images resized to `pixel_size`, in float (never wrapped
  integers), against every training image, the synthetic image mirrored too and compared with crops (up to 10%)
  of its closest training candidates, so flipped and trimmed copies are found;
- feature nearest neighbour (with `--features`): cosine distance of an eval.features backbone, mirrored too;
- re-identification (with `--reid-weights` or `--reid-train`): eval.reid's Siamese score of each image against
  the real image of ITS training prompt, as CheXGenBench does (per-prompt mean, max, share >= threshold).

A distance means little alone (some X-rays are alike), so each is divided by the training image's own scale:
its distance to its k-th nearest other training image. A ratio under `copy_ratio` (a synthetic image several
times closer than the training image's own neighbours are) flags a copy; so does a prompt re-id score at or over
the threshold. The re-id score against the whole set is reported, not flagged: a maximum over many pairs grows
with the set."""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from cxrcommon.atomic import atomic_write_text
from cxrcommon.cli import cli_entry
from cxrcommon.config import field
from cxrcommon.csv_cells import safe_row
from cxrcommon.errors import UserError
from cxrcommon.logs import setup_logging
from cxrcommon.paths import check_out_dir

from . import reid
from .cli import parse, user_errors
from .nearest import CHUNK, crop_views, distance_matrix, kth_neighbour, nearest_ratio, thumb
from .sources import list_images

log = logging.getLogger(__name__)
COARSE = 16                        # side of the thumbnails that shortlist candidates
FLAG_COLUMNS = ("file", "flagged", "flagged_by", "nearest_train", "match", "pixel_rmse", "pixel_ratio",
                "feature_distance", "feature_ratio", "prompt_train", "prompt_reid", "prompt_pixel_rmse",
                "prompt_feature_distance", "reid_nearest", "reid_nearest_train")


@dataclasses.dataclass
class PrivacyConfig:
    train: str = field("", "folder or manifest of the generator's training images (a manifest with a report "
                           "column also pairs each synthetic image with its prompt's real image)")
    fake: str = field("", "folder (PNG prompt tags / manifest.jsonl) or manifest of synthetic images")
    out: str = field("eval_out/privacy", "folder for privacy.json, .md, the pairs sheet and flags.csv")
    image_column: str = field("image", "manifest column holding image paths")
    text_column: str = field("text", "training manifest column holding the report each image was trained with")
    prompt_key: str = field("prompt", "synthetic images' prompt: PNG text chunk / manifest key")
    k: int = field(5, "a training image's scale is its distance to its k-th nearest other training image")
    copy_ratio: float = field(0.4, "flag when a nearest-neighbour distance is below this share of that scale")
    pixel_size: int = field(64, "side images are resized to for pixel distances")
    shortlist: int = field(8, "closest training images (at 16 px) searched with mirrored and cropped views")
    features: str = field("", "also feature distances with this eval.features backbone (rad-dino, clip, xrv, "
                              "inception, tiny or a TorchScript file); empty: pixel only")
    feature_weights: str = field("", "local weights of --features (file or folder)")
    reid_weights: str = field("", "re-identification weights: CheXGenBench's ResNet-50_epoch11_data_handling_RPN.pth "
                                  "(Patient_ReIdentification_MIMIC) or a scorer saved by --reid-train")
    reid_train: str = field("", "instead, train the re-id scorer on this manifest's same-patient pairs "
                                "(needs --patient-column); saved as OUT/reid_scorer.safetensors")
    patient_column: str = field("patient", "--reid-train manifest column holding patient ids")
    reid_threshold: float = field(reid.THRESHOLD, "re-id score (same-patient probability) that flags an image")
    reid_arch: str = field("resnet50", "--reid-train: ResNet of both branches (resnet50 is CheXGenBench's)")
    reid_size: int = field(reid.SIZE, "--reid-train: input side in pixels")
    reid_epochs: int = field(5, "--reid-train: epochs of freshly drawn balanced pairs")
    reid_pairs: int = field(2000, "--reid-train: pairs per epoch (and most held-out pairs scored)")
    reid_lr: float = field(1e-4, "--reid-train: Adam learning rate (Packhäuser et al.: 1e-4)")
    reid_val_fraction: float = field(0.2, "--reid-train: share of images whose patients are held out for the AUC")
    top_k: int = field(16, "most suspicious pairs shown side by side")
    batch_size: int = field(32, "images per feature / re-id batch")
    seed: int = field(0, "seed of --reid-train")
    device: str = field("auto", "cpu, cuda, mps, xpu or auto")
    cache_dir: str = field("", "feature cache folder (default: one per input under the user cache)")
    verbose: bool = field(False, "debug logging")


# ---------------------------------------------------------------- reading both sets

@dataclasses.dataclass
class ImageSet:
    """What each method needs of a set, read in one pass: thumbnails, plus re-id branch features."""
    paths: list[Path]
    coarse: torch.Tensor                 # (N, 16*16), or (N, 2, ...) with the mirror for synthetic sets
    fine: torch.Tensor                   # (N, pixel_size**2) ...
    reid: torch.Tensor | None
    skipped: list[str]


def read_set(paths: Sequence[Path], pixel_size: int, scorer: reid.ReidScorer | None, *, mirror: bool,
             batch_size: int = 32, desc: str = "images") -> ImageSet:
    """Thumbnails (and re-id features) of every readable image; with `mirror` each row holds [as is, mirrored]."""
    from cxrcommon.imageio import ImageReadError, read_image
    kept, coarse, fine, feats, skipped = [], [], [], [], []
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, leave=False):
        imgs = []
        for p in paths[start:start + batch_size]:
            try:
                img = read_image(p)
            except (ImageReadError, OSError) as exc:
                log.warning("skipping %s: %s", p, exc)
                skipped.append(f"{p}: {exc}")
                continue
            kept.append(Path(p))
            both = [img, np.ascontiguousarray(img[:, ::-1])] if mirror else [img]
            imgs += both
            coarse.append(torch.cat([thumb(v, COARSE) for v in both]).float())
            fine.append(torch.cat([thumb(v, pixel_size) for v in both]).float())
        if scorer is not None and imgs:
            feats.append(scorer.embed(imgs, batch_size))
    n = 2 if mirror else 1

    def stack(rows: list[torch.Tensor], d: int) -> torch.Tensor:
        t = torch.stack(rows) if rows else torch.zeros(0, n, d)
        return t if mirror else t[:, 0]
    rf = torch.cat(feats).reshape(len(kept), n, -1) if feats else None
    return ImageSet(kept, stack(coarse, COARSE ** 2), stack(fine, pixel_size ** 2),
                    None if rf is None else (rf if mirror else rf[:, 0]), skipped)


def _train_texts(source: str | Path, paths: list[Path], image_column: str, text_column: str) -> dict[Path, str]:
    """Training image -> normalised report, from a manifest's text column (empty for a folder)."""
    src = Path(source)
    if not (src.is_file() and text_column):
        return {}
    from cxrcommon.manifest import Columns, read_manifest
    from cxrcommon.reports import normalize_report
    records = read_manifest(src, Columns(image=image_column, text=None), on_error="skip")
    return {r.image: normalize_report(str(r.extra[text_column])) for r in records if r.extra.get(text_column)}


def _fake_prompts(source: str | Path, image_column: str, prompt_key: str) -> dict[Path, str]:
    """Synthetic image -> normalised prompt, from PNG tags / manifest.jsonl (folder) or a manifest column."""
    from cxrcommon.reports import normalize_report
    src = Path(source)
    if src.is_dir():
        from .diversity import group_images
        return {p: normalize_report(text) for text, ps in group_images(src, prompt_key).items() for p in ps}
    from cxrcommon.manifest import Columns, read_manifest
    records = read_manifest(src, Columns(image=image_column, text=None), on_error="skip")
    return {r.image: normalize_report(str(r.extra[prompt_key])) for r in records if r.extra.get(prompt_key)}


# ---------------------------------------------------------------- the methods

def _pixel_search(train: ImageSet, fake: ImageSet, scale: torch.Tensor, pixel_size: int,
                  shortlist: int) -> list[dict[str, Any]]:
    """Per synthetic image: the training image with the smallest pixel ratio over mirror x crop views."""
    from cxrcommon.imageio import read_image
    cache: dict[int, tuple[list[str], torch.Tensor]] = {}

    def views(j: int) -> tuple[list[str], torch.Tensor]:
        if j not in cache:
            named = crop_views(read_image(train.paths[j]))
            cache[j] = ([n for n, _ in named], torch.cat([thumb(np.ascontiguousarray(v), pixel_size)
                                                         for _, v in named]))
        return cache[j]

    m = min(shortlist, len(train.paths))
    q = fake.coarse.reshape(-1, COARSE ** 2)
    cands = torch.cat([distance_matrix(q[s:s + CHUNK], train.coarse, "rms").topk(m, dim=1, largest=False).indices
                       for s in range(0, len(q), CHUNK)]).reshape(len(fake.paths), -1)
    out = []
    for i in tqdm(range(len(fake.paths)), desc="pixel search", leave=False):
        best = {"pixel_ratio": math.inf}
        for j in sorted(set(cands[i].tolist())):
            names, bank = views(j)
            for o, orient in enumerate(("", "mirrored")):
                d = distance_matrix(fake.fine[i, o][None], bank, "rms")[0]
                v = int(d.argmin())
                if float(d[v] / scale[j]) < best["pixel_ratio"]:
                    how = ", ".join(x for x in (orient, names[v]) if x) or "as is"
                    best = {"pixel_ratio": float(d[v] / scale[j]), "pixel_rmse": float(d[v]), "pixel_train": j,
                            "match": how}
        out.append(best)
        if len(cache) > 4096:
            cache.clear()
    return out


def _feature_search(cfg: PrivacyConfig, train: ImageSet, fake: ImageSet) -> dict[str, Any]:
    """Feature ratio and distance of each synthetic image (the better of as-is and mirrored)."""
    from cxrcommon.imageio import read_image

    from .cache import default_cache_dir
    from .features import embed_paths, load_backbone
    bb = load_backbone(cfg.features, weights=cfg.feature_weights or None, device=cfg.device)
    bs = cfg.batch_size

    def embed(paths: list[Path], source: str, desc: str) -> torch.Tensor:
        e = embed_paths(paths, bb, batch_size=bs, desc=desc,
                        cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(source))
        if len(e.paths) != len(paths):
            raise ValueError(f"{bb.name} could not read {len(paths) - len(e.paths)} image(s): {e.skipped[:2]}")
        return e.features
    ft = embed(train.paths, cfg.train, "train features")
    ff = embed(fake.paths, cfg.fake, "fake features")
    fm = torch.cat([bb.embed([np.ascontiguousarray(read_image(p)[:, ::-1]) for p in fake.paths[s:s + bs]])
                    for s in tqdm(range(0, len(fake.paths), bs), desc="mirrored features", leave=False)])
    scale = kth_neighbour(ft, cfg.k, "cosine")
    r0, i0, d0 = nearest_ratio(ff, ft, scale, "cosine")
    r1, i1, d1 = nearest_ratio(fm, ft, scale, "cosine")
    mirrored = r1 < r0
    return {"backbone": bb.name, "scale": scale, "ratio": torch.where(mirrored, r1, r0),
            "index": torch.where(mirrored, i1, i0), "distance": torch.where(mirrored, d1, d0), "mirrored": mirrored,
            "plain": ff, "train": ft}


def _reid_scores(scorer: reid.ReidScorer, train: ImageSet, fake: ImageSet,
                 prompt_rows: list[list[int]]) -> tuple[list[float | None], torch.Tensor, torch.Tensor]:
    """Per synthetic image: score against its prompt's real image(s) (None without one, the better of as-is and
    mirrored), and its highest score against any training image with that image's index."""
    best_all, best_idx, prompt = [], [], []
    for s in range(0, len(fake.paths), 256):
        sc = torch.stack([scorer.score(fake.reid[s:s + 256, o], train.reid) for o in (0, 1)]).amax(0)
        v = sc.max(dim=1)
        best_all.append(v.values)
        best_idx.append(v.indices)
        prompt += [float(sc[i - s, rows].max()) if rows else None
                   for i, rows in enumerate(prompt_rows[s:s + 256], start=s)]
    return prompt, torch.cat(best_all), torch.cat(best_idx)


# ---------------------------------------------------------------- the check

def input_paths(cfg: PrivacyConfig) -> tuple[list[Path], list[Path]]:
    """Both sets' image paths, checked before any costly work: the training set needs k + 1 images."""
    if cfg.k < 1 or not 0 < cfg.copy_ratio or cfg.pixel_size < 8 or cfg.shortlist < 1:
        raise ValueError("--k and --shortlist must be >= 1, --copy-ratio > 0 and --pixel-size >= 8")
    train_paths = list_images(cfg.train, cfg.image_column)
    if len(train_paths) < cfg.k + 1:
        raise ValueError(f"{cfg.train}: {len(train_paths)} training image(s), fewer than --k + 1 = {cfg.k + 1}: each "
                         "training image's scale is its distance to its k-th nearest other one; add images or "
                         "lower --k")
    fake_paths = list_images(cfg.fake, cfg.image_column)
    check_out_dir(cfg.out, (cfg.train, cfg.fake))  # its pairs sheet is a PNG: not to be read back as an image
    return train_paths, fake_paths


def build_scorer(cfg: PrivacyConfig) -> tuple[reid.ReidScorer | None, dict[str, Any] | None]:
    """The re-id scorer the options ask for (loaded, or trained with its held-out metrics), or (None, None)."""
    if cfg.reid_weights and cfg.reid_train:
        raise UserError("give --reid-weights (a trained scorer) or --reid-train (train one), not both")
    if cfg.reid_weights:
        return reid.load_reid(cfg.reid_weights, cfg.device), None
    if cfg.reid_train:
        return reid.train_reid(cfg.reid_train, patient_column=cfg.patient_column, image_column=cfg.image_column,
                               arch=cfg.reid_arch, size=cfg.reid_size, epochs=cfg.reid_epochs, pairs=cfg.reid_pairs,
                               batch_size=cfg.batch_size, lr=cfg.reid_lr, val_fraction=cfg.reid_val_fraction,
                               seed=cfg.seed, device=cfg.device)
    return None, None


def _per_prompt(rows: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """CheXGenBench's table: per training prompt, its images' mean and max re-id score, share >= threshold,
    mean and min pixel / feature distance to that prompt's real image."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["prompt_train"]:
            groups.setdefault(r["prompt_train"], []).append(r)
    out = []
    for train_path, rs in groups.items():
        row: dict[str, Any] = {"prompt_train": train_path, "n_images": len(rs)}
        reids = [r["prompt_reid"] for r in rs if r["prompt_reid"] is not None]
        if reids:
            row.update(reid_mean=float(np.mean(reids)), reid_max=max(reids),
                       share_over_threshold=float(np.mean([s >= threshold for s in reids])))
        for key in ("prompt_pixel_rmse", "prompt_feature_distance"):
            vals = [r[key] for r in rs if r[key] is not None]
            if vals:
                row.update({f"{key}_mean": float(np.mean(vals)), f"{key}_min": min(vals)})
        out.append(row)
    return out


def privacy(cfg: PrivacyConfig, scorer: reid.ReidScorer | None = None, verification: dict[str, Any] | None = None,
            progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Every synthetic image against the training set by each available method; flags copies.

    `scorer` (see `build_scorer`) adds the re-id method; `verification` is its held-out result, if trained.

    Returns: methods (what was used), sizes, n_flagged / share_flagged, the thresholds, per-prompt summaries
    (reid_prompt_mean / reid_prompt_max_mean: means over prompts of each prompt's mean and max score,
    reid_share_over_threshold over images), `rows` (one per synthetic image, the FLAG_COLUMNS), `per_prompt`,
    `verification` (the trained scorer's held-out AUC) and the training images' pixel scales."""
    train_paths, fake_paths = input_paths(cfg)
    train = read_set(train_paths, cfg.pixel_size, scorer, mirror=False, batch_size=cfg.batch_size,
                     desc="training images")
    fake = read_set(fake_paths, cfg.pixel_size, scorer, mirror=True, batch_size=cfg.batch_size,
                    desc="synthetic images")
    if len(train.paths) < cfg.k + 1 or not fake.paths:
        raise ValueError(f"only {len(train.paths)} training and {len(fake.paths)} synthetic image(s) were readable; "
                         f"need at least --k + 1 = {cfg.k + 1} and 1")
    texts = _train_texts(cfg.train, train.paths, cfg.image_column, cfg.text_column)
    by_text: dict[str, list[int]] = {}
    for j, p in enumerate(train.paths):
        if p in texts:
            by_text.setdefault(texts[p], []).append(j)
    prompts = _fake_prompts(cfg.fake, cfg.image_column, cfg.prompt_key) if by_text else {}
    prompt_rows = [by_text.get(prompts.get(p, ""), []) for p in fake.paths]

    progress("pixel nearest neighbours")
    pixel_scale = kth_neighbour(train.fine, cfg.k, "rms")
    pix = _pixel_search(train, fake, pixel_scale, cfg.pixel_size, cfg.shortlist)
    feat = None
    if cfg.features:
        progress(f"feature nearest neighbours ({cfg.features})")
        feat = _feature_search(cfg, train, fake)
    reid_prompt: list[float | None] = [None] * len(fake.paths)
    reid_all = reid_idx = None
    if scorer is not None:
        progress("re-identification scores")
        reid_prompt, reid_all, reid_idx = _reid_scores(scorer, train, fake, prompt_rows)

    rows = []
    for i, p in enumerate(fake.paths):
        px, js = pix[i], prompt_rows[i]
        row: dict[str, Any] = {"file": str(p), "flagged": False, "flagged_by": "",
                               "nearest_train": str(train.paths[px["pixel_train"]]), "match": px["match"],
                               "pixel_rmse": px["pixel_rmse"], "pixel_ratio": px["pixel_ratio"],
                               "feature_distance": None, "feature_ratio": None,
                               "prompt_train": str(train.paths[js[0]]) if js else "", "prompt_reid": reid_prompt[i],
                               "prompt_pixel_rmse": None, "prompt_feature_distance": None,
                               "reid_nearest": None if reid_all is None else float(reid_all[i]),
                               "reid_nearest_train": "" if reid_idx is None else str(train.paths[int(reid_idx[i])])}
        if js:
            row["prompt_pixel_rmse"] = float(distance_matrix(fake.fine[i, :1], train.fine[js], "rms").min())
        by = ["pixel"] if px["pixel_ratio"] < cfg.copy_ratio else []
        if feat is not None:
            row["feature_distance"], row["feature_ratio"] = float(feat["distance"][i]), float(feat["ratio"][i])
            if js:
                row["prompt_feature_distance"] = float(distance_matrix(feat["plain"][i:i + 1], feat["train"][js],
                                                                       "cosine").min())
            if row["feature_ratio"] < cfg.copy_ratio:
                by.append("feature")
                if row["feature_ratio"] < row["pixel_ratio"]:  # the stronger evidence names the training image
                    row["nearest_train"] = str(train.paths[int(feat["index"][i])])
                    row["match"] = "mirrored" if bool(feat["mirrored"][i]) else "as is"
        if row["prompt_reid"] is not None and row["prompt_reid"] >= cfg.reid_threshold:
            by.append("reid")
        row["flagged"], row["flagged_by"] = bool(by), ";".join(by)
        rows.append(row)

    methods = [f"pixel nearest neighbour ({cfg.pixel_size} px RMS, mirrored and cropped views)"]
    if feat is not None:
        methods.append(f"feature nearest neighbour ({feat['backbone']}, cosine, mirrored)")
    if scorer is not None:
        methods.append(f"re-identification ({scorer.source}, threshold {cfg.reid_threshold})")
    per_prompt = _per_prompt(rows, cfg.reid_threshold)
    scored = [r["prompt_reid"] for r in rows if r["prompt_reid"] is not None]
    pq = np.quantile(pixel_scale.numpy(), [0.05, 0.5, 0.95])
    result = {"train": str(cfg.train), "fake": str(cfg.fake), "methods": methods, "method": "; ".join(methods),
              "n_train": len(train.paths), "n_fake": len(fake.paths), "k": cfg.k, "copy_ratio": cfg.copy_ratio,
              "reid_threshold": cfg.reid_threshold if scorer is not None else None,
              "n_flagged": sum(r["flagged"] for r in rows),
              "share_flagged": float(np.mean([r["flagged"] for r in rows])), "n_prompts_matched": len(per_prompt),
              "n_images_with_prompt_image": sum(bool(r["prompt_train"]) for r in rows),
              "pixel_ratio_min": min(r["pixel_ratio"] for r in rows),
              "pixel_scale_p05_p50_p95": [float(v) for v in pq], "skipped": train.skipped + fake.skipped}
    if scored:
        with_reid = [g for g in per_prompt if "reid_mean" in g]
        result.update(reid_prompt_mean=float(np.mean([g["reid_mean"] for g in with_reid])),
                      reid_prompt_max_mean=float(np.mean([g["reid_max"] for g in with_reid])),
                      reid_share_over_threshold=float(np.mean([s >= cfg.reid_threshold for s in scored])))
    if feat is not None:
        result["backbone"] = feat["backbone"]
    if verification is not None:
        result["verification"] = verification
        result["verification_auc"] = verification["verification_auc"]
    result["per_prompt"] = per_prompt
    result["rows"] = rows
    return result


# ---------------------------------------------------------------- outputs

def suspicion_order(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flagged first, then by the smallest nearest-neighbour ratio, then by the highest re-id score."""
    def key(r: dict[str, Any]) -> tuple[bool, float, float]:
        ratio = min(x for x in (r["pixel_ratio"], r["feature_ratio"]) if x is not None)
        return (not r["flagged"], ratio, -(r["prompt_reid"] or 0.0))
    return sorted(rows, key=key)


def write_flags(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """flags.csv: one row per synthetic image, cells neutralised for spreadsheets."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(FLAG_COLUMNS)
    for r in rows:
        cells = [("true" if r[c] else "false") if c == "flagged" else
                 ("" if r[c] is None else repr(r[c]) if isinstance(r[c], float) else r[c]) for c in FLAG_COLUMNS]
        w.writerow(safe_row(cells))
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def pairs_sheet(rows: Sequence[dict[str, Any]]) -> Any:
    """A figure of the given pairs side by side (synthetic | nearest training image) with their scores, for a
    reader to judge the most suspicious ones by eye."""
    import matplotlib.pyplot as plt

    from cxrcommon.imageio import read_image
    fig, axes = plt.subplots(max(1, len(rows)), 2, figsize=(5, 2.5 * max(1, len(rows))), squeeze=False)
    for ax_row, r in zip(axes, rows):
        for a, key in zip(ax_row, ("file", "nearest_train")):
            a.imshow(read_image(r[key]), cmap="gray", vmin=0, vmax=1)
            a.set_title(f"{'synthetic' if key == 'file' else 'train'}: {Path(r[key]).name[:28]}", fontsize=6)
        text = f"pixel ratio {r['pixel_ratio']:.3f} ({r['match']})"
        if r["feature_ratio"] is not None:
            text += f"\nfeature ratio {r['feature_ratio']:.3f}"
        if r["prompt_reid"] is not None:
            text += f"\nre-id (prompt image) {r['prompt_reid']:.3f}"
        ax_row[0].text(0.02, 0.02, ("FLAGGED " if r["flagged"] else "") + text, color="yellow", fontsize=6,
                       transform=ax_row[0].transAxes)
    for a in axes.ravel():
        a.set_axis_off()
    return fig


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse(PrivacyConfig, argv, "Privacy of synthetic images: nearest training image by pixels (mirrored, "
                "cropped) and features, patient re-identification score; flags copies, writes flags.csv and a "
                "report with the most suspicious pairs side by side.")
    setup_logging(cfg.verbose)
    if not cfg.train or not cfg.fake:
        raise UserError("give both --train and --fake (folders or manifests)")
    from .outputs import markdown_table, write_report
    with user_errors():
        input_paths(cfg)
        scorer, verification = build_scorer(cfg)
        result = privacy(cfg, scorer, verification)
    out = Path(cfg.out)
    if verification is not None:
        result["reid_scorer"] = str(reid.save_reid(scorer, out / "reid_scorer.safetensors",
                                                    **result["verification"]))
    result["flags_csv"] = str(write_flags(out / "flags.csv", result["rows"]))
    top = suspicion_order(result["rows"])[:cfg.top_k]
    notes = [f"**Methods:** {result['method']}",
             f"**N:** {result['n_train']} training, {result['n_fake']} synthetic images; "
             f"{result['n_images_with_prompt_image']} paired with their prompt's training image",
             f"**Flag:** a nearest-neighbour distance under {cfg.copy_ratio} x the training image's distance to its "
             f"{cfg.k}-th nearest other training image" + (f", or a re-id score >= {cfg.reid_threshold} against the "
                                                          "prompt's real image" if scorer else ""),
             f"**Flagged:** {result['n_flagged']} of {result['n_fake']} ({result['share_flagged']:.1%}); "
             f"every image in {result['flags_csv']}"]
    if "verification_auc" in result:
        notes.append(f"**Re-id scorer:** verification AUC {result['verification_auc']:.3f} on "
                     f"{result['verification']['n_val_pairs']} pairs of {result['verification']['n_val_patients']} "
                     "held-out patients")
    cols = ["file", "flagged_by", "nearest_train", "match", "pixel_ratio", "feature_ratio", "prompt_reid"]
    sections = {"Most suspicious pairs": markdown_table([{c: (Path(r[c]).name if c in ("file", "nearest_train")
                                                              else r[c]) for c in cols} for r in top])}
    if result["per_prompt"]:
        sections["Per training prompt"] = markdown_table(result["per_prompt"][:50])
    result["report"] = write_report(out, "privacy", result, title="Privacy: copies and patient re-identification",
                                    notes=notes, sections=sections, figures={"pairs": pairs_sheet(top)})
    print(f"{result['n_flagged']} of {result['n_fake']} synthetic image(s) flagged ({result['method']}); "
          f"report {result['report']['markdown']}")
    return result


if __name__ == "__main__":
    main()

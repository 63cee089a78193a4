"""Downstream utility: does adding synthetic images to the real training set help a classifier?

Trains the same small classifier (torchvision resnet18, random init) twice, on real and on real+synthetic,
and compares AUC/accuracy on a held-out real test set with bootstrap CIs (paired, so the difference has a
CI too). Metrics are sklearn's; predictions are saved so anyone can recompute them.

`--by COLUMN` splits the test set by a column of the test manifest (sex, age_band, race, label, ...; see
eval.subgroups) and reports, per group and per model, AUC and the underdiagnosis rate with bootstrap intervals,
plus the underdiagnosis gap between groups. Underdiagnosis follows Seyyed-Kalantari et al. 2021 (Nature
Medicine 27:2176, "Underdiagnosis bias of artificial intelligence algorithms applied to chest radiographs in
under-served patient populations"): the false-positive rate of the "No Finding" label, i.e. of the test images
that have a finding (true label other than No Finding), the share the classifier labels No Finding — a sick
patient sent home. The paper thresholds a binary No Finding score at the F1-maximising cut-off of a validation
set; this classifier is single-label, so its call is its most probable class (no validation set is involved)."""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cxrcommon.atomic import atomic_write_text
from cxrcommon.cli import cli_entry
from cxrcommon.config import field
from cxrcommon.csv_cells import safe_row
from cxrcommon.device import pick_device
from cxrcommon.errors import UserError
from cxrcommon.logs import setup_logging
from cxrcommon.optional import require

from .cli import parse, user_errors
from .features import to_square_tensor
from .subgroups import UNKNOWN, bootstrap_ci, check_by, groups, per_group, rows_for, sections, split_by

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AugmentConfig:
    real_train: str = field("", "manifest (.csv/.jsonl) of real training images with a label column")
    synthetic: str = field("", "manifest of synthetic images with the same label column")
    test: str = field("", "manifest of held-out REAL test images (patients not in real_train)")
    image_column: str = field("image", "manifest column holding image paths")
    label_column: str = field("label", "manifest column holding the class label")
    arch: str = field("resnet18", "torchvision classifier, random init (weights=None)")
    size: int = field(128, "square input side")
    epochs: int = field(10, "training epochs (same for both runs)")
    batch_size: int = field(32, "batch size")
    lr: float = field(1e-3, "AdamW learning rate")
    seed: int = field(0, "seed for initialisation, shuffling and bootstrap")
    n_boot: int = field(1000, "bootstrap resamples of the test set for CIs (per group too, with --by)")
    by: list[str] = field([], "also report AUC and underdiagnosis per group of these TEST manifest columns: sex, "
                          "age_band, race, label (each '|' label) or any column (`--by sex race` or `--by sex,race`)")
    no_finding: str = field("No Finding", "the label meaning no finding: underdiagnosis = a test image with a "
                            "finding that the classifier labels this (Seyyed-Kalantari et al. 2021)")
    device: str = field("auto", "cpu, cuda, mps, xpu or auto")
    out: str = field("eval_out/augment", "folder for augment.json, .md, predictions.csv and plots")
    verbose: bool = field(False, "debug logging")


def load_set(manifest: str | Path, size: int, image_column: str = "image",
             label_column: str = "label") -> tuple[torch.Tensor, list[str], list[Path]]:
    """(N, 1, size, size) images in [0, 1], their labels and paths; unreadable or unlabeled rows are skipped."""
    from cxrcommon.imageio import ImageReadError, read_image
    from cxrcommon.manifest import Columns, read_manifest
    records = read_manifest(manifest, Columns(image=image_column, text=None, label=label_column), on_error="skip")
    imgs, labels, paths = [], [], []
    for r in records:
        if not r.label:
            log.warning("%s:%d: no %r; skipped", manifest, r.line, label_column)
            continue
        try:
            imgs.append(to_square_tensor(read_image(r.image), size))
        except (ImageReadError, OSError) as exc:
            log.warning("%s:%d: skipping %s: %s", manifest, r.line, r.image, exc)
            continue
        labels.append(r.label)
        paths.append(r.image)
    if not imgs:
        raise ValueError(f"{manifest}: no readable, labelled images (columns {image_column!r}, {label_column!r})")
    return torch.cat(imgs), labels, paths


def train_classifier(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, arch: str = "resnet18", epochs: int = 10,
                     batch_size: int = 32, lr: float = 1e-3, seed: int = 0, device: str = "auto",
                     desc: str = "train") -> torch.nn.Module:
    """A randomly initialised torchvision classifier trained with AdamW + cross-entropy.

    Args:
        x: (N, 1, S, S) float gray images in [0, 1] (repeated to 3 channels for the network), on any device.
        y: (N,) int64 class indices in [0, n_classes).
        n_classes: number of classes, >= 2.
        arch: a torchvision model name (`torchvision.models.get_model`), e.g. "resnet18".
        epochs: passes over the shuffled data, >= 0.
        batch_size: images per step, >= 2 (a final batch of one is skipped: BatchNorm needs two).
        lr: AdamW learning rate, > 0.
        seed: seeds the weight init and the shuffling.
        device: "auto" or a torch device name to train on.
        desc: label of the progress bar.
    Returns: the trained model in eval mode, on `device`, giving (N, n_classes) logits."""
    require("eval.augment's classifier", "torchvision")
    import torchvision
    dev = pick_device(device)
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None, num_classes=n_classes).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            if len(idx) < 2:  # BatchNorm cannot train on one image
                continue
            loss = F.cross_entropy(model(x[idx].expand(-1, 3, -1, -1).to(dev)), y[idx].to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.inference_mode()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    dev = next(model.parameters()).device
    out = [model(part.expand(-1, 3, -1, -1).to(dev)).softmax(1).cpu() for part in x.split(batch_size)]
    return torch.cat(out).double().numpy()


def auc(y: np.ndarray, probs: np.ndarray) -> float:
    """sklearn ROC AUC: binary on the second class, else macro one-vs-rest."""
    from sklearn.metrics import roc_auc_score
    if probs.shape[1] == 2:
        return float(roc_auc_score(y == 1, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1]))))


def accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score
    return float(accuracy_score(y, probs.argmax(1)))


def underdiagnosis(y: np.ndarray, probs: np.ndarray, no_finding: int) -> float:
    """Seyyed-Kalantari et al. 2021's underdiagnosis rate: the false-positive rate of the No Finding label, i.e.
    of the images whose true class is not `no_finding` (they have a finding), the share whose most probable
    class is `no_finding`. NaN when no image has a finding.

    Args:
        y: (N,) true class indices; probs: (N, C) class probabilities; no_finding: the No Finding class index."""
    sick = y != no_finding
    return float(np.mean(probs[sick].argmax(1) == no_finding)) if sick.any() else float("nan")


def _auc_or_nan(y: np.ndarray, probs: np.ndarray) -> float:
    """AUC, or NaN where a group lacks a class and AUC is undefined."""
    from sklearn.exceptions import UndefinedMetricWarning
    if len(np.unique(y)) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        try:
            return auc(y, probs)
        except ValueError:
            return float("nan")


def group_metrics(y: np.ndarray, a: np.ndarray, b: np.ndarray, no_finding: int | None):
    """The per-group metric of models a (real) and b (real+synthetic) on test rows i: AUCs, underdiagnosis
    rates (when there is a No Finding class) and their differences b - a."""
    def metric(i: np.ndarray) -> dict[str, float]:
        out = {"auc_real": _auc_or_nan(y[i], a[i]), "auc_real_plus_synthetic": _auc_or_nan(y[i], b[i])}
        out["auc_diff"] = out["auc_real_plus_synthetic"] - out["auc_real"]
        if no_finding is not None:
            out["underdiagnosis_real"] = underdiagnosis(y[i], a[i], no_finding)
            out["underdiagnosis_real_plus_synthetic"] = underdiagnosis(y[i], b[i], no_finding)
            out["underdiagnosis_diff"] = out["underdiagnosis_real_plus_synthetic"] - out["underdiagnosis_real"]
        return out
    return metric


def underdiagnosis_gap(y: np.ndarray, a: np.ndarray, b: np.ndarray, index: dict[str, np.ndarray], no_finding: int,
                       n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The underdiagnosis gap of models a (real) and b (real+synthetic): highest minus lowest group rate, over
    groups with at least one image with a finding (not "unknown"), and its change b - a, with a paired percentile
    bootstrap of the whole test set (a resample that leaves a group without such an image is dropped).

    Args:
        y: (N,) true class indices; a, b: (N, C) probabilities of the two models.
        index: group -> test row indices (groups may overlap, e.g. labels).
        no_finding: the No Finding class index.
    Returns: gap_real, gap_real_plus_synthetic, gap_diff, the groups with the highest / lowest rate per model,
        ci95 of the three gaps, n_boot_used; empty without two scorable groups."""
    member = {g: np.isin(np.arange(len(y)), ix) for g, ix in index.items()
              if g != UNKNOWN and (y[ix] != no_finding).any()}
    if len(member) < 2:
        return {}

    def rates(i: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        out = {g: underdiagnosis(y[i[m[i]]], probs[i[m[i]]], no_finding) for g, m in member.items()}
        if not all(np.isfinite(v) for v in out.values()):
            raise ValueError("a group has no image with a finding in this resample")
        return out

    def gaps(i: np.ndarray) -> dict[str, float]:
        ra, rb = rates(i, a), rates(i, b)
        ga, gb = max(ra.values()) - min(ra.values()), max(rb.values()) - min(rb.values())
        return {"gap_real": ga, "gap_real_plus_synthetic": gb, "gap_diff": gb - ga}
    everyone = np.arange(len(y))
    result: dict[str, Any] = gaps(everyone)
    for name, probs in (("real", a), ("real_plus_synthetic", b)):
        r = rates(everyone, probs)
        result[f"highest_{name}"], result[f"lowest_{name}"] = max(r, key=r.get), min(r, key=r.get)
    ci, used = bootstrap_ci(gaps, [everyone], n_boot=n_boot, seed=seed)
    return {**result, "ci95": ci, "n_boot_used": used}


def bootstrap(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Paired percentile bootstrap (95%) of AUC and accuracy for models a and b and of b - a."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in ("auc_a", "auc_b", "acc_a", "acc_b")}
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if len(np.unique(y[i])) < len(np.unique(y)):  # AUC undefined without every class present
            continue
        draws["auc_a"].append(auc(y[i], a[i]))
        draws["auc_b"].append(auc(y[i], b[i]))
        draws["acc_a"].append(accuracy(y[i], a[i]))
        draws["acc_b"].append(accuracy(y[i], b[i]))
    d = {k: np.asarray(v) for k, v in draws.items()}
    d["auc_diff"], d["acc_diff"] = d["auc_b"] - d["auc_a"], d["acc_b"] - d["acc_a"]
    ci = {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [float("nan")] * 2
          for k, v in d.items()}
    return {"n_boot_used": len(d["auc_a"]), "ci95": ci}


def augment(real_train: str | Path, synthetic: str | Path, test: str | Path, *, image_column: str = "image",
            label_column: str = "label", arch: str = "resnet18", size: int = 128, epochs: int = 10,
            batch_size: int = 32, lr: float = 1e-3, seed: int = 0, n_boot: int = 1000, device: str = "auto",
            out: str | Path | None = None, by: Sequence[str] = (), no_finding: str = "No Finding") -> dict[str, Any]:
    """Train on real and on real+synthetic; AUC/accuracy on the real test set with paired bootstrap CIs.

    Args:
        real_train: manifest of the real training images and labels.
        synthetic: manifest of the synthetic images and labels (added to the real ones for the second model).
        test: manifest of the real test set; its labels must all occur in training.
        image_column: the manifests' image-path column.
        label_column: the manifests' label column (rows without a label are skipped); >= 2 classes.
        arch: a torchvision model name, trained from scratch (weights=None).
        size: side in pixels the images are resized to, > 0.
        epochs: training epochs of each model, >= 0.
        batch_size: images per training step, >= 2.
        lr: AdamW learning rate, > 0.
        seed: seeds both models' training (the same for both) and the bootstrap.
        n_boot: bootstrap resamples of the test set, >= 1 (resamples missing a class are dropped).
        device: "auto" or a torch device name.
        out: folder for predictions.csv and the report, or None to write nothing.
        by: test-manifest columns to split the test set by (eval.subgroups); checked before anything is trained.
        no_finding: the class meaning no finding, for the underdiagnosis rate (skipped when no class has it).
    Returns: classes, set sizes, auc_real, auc_real_plus_synthetic, acc_real, acc_real_plus_synthetic (AUC
        and accuracy in [0, 1]), auc_diff, n_boot_used, ci95 (95% intervals of each and of the differences),
        underdiagnosis_real / _real_plus_synthetic (with a No Finding class), with `by` per column: `by` (one row
        per group: n_test, n_with_finding, the metrics, ci) and `underdiagnosis_gap`, and with `out` the
        report's paths."""
    by = split_by(by)
    if by:
        check_by(by, {"--test": test})
    xr, lr_, _ = load_set(real_train, size, image_column, label_column)
    xs, ls, _ = load_set(synthetic, size, image_column, label_column)
    xt, lt, pt = load_set(test, size, image_column, label_column)
    classes = sorted(set(lr_) | set(ls))
    unknown = sorted(set(lt) - set(classes))
    if unknown or len(classes) < 2:
        raise ValueError(f"{test}: test labels {unknown} never occur in training" if unknown else
                         f"{real_train}: need at least two classes, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    yr, ys, yt = (torch.tensor([index[c] for c in labels]) for labels in (lr_, ls, lt))
    kw = dict(arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device)
    p_real = predict(train_classifier(xr, yr, len(classes), desc="real only", **kw), xt)
    p_aug = predict(train_classifier(torch.cat([xr, xs]), torch.cat([yr, ys]), len(classes),
                                     desc="real+synthetic", **kw), xt)
    y = yt.numpy()
    boot = bootstrap(y, p_real, p_aug, n_boot, seed)
    result = {"classes": classes, "n_real_train": len(lr_), "n_synthetic": len(ls), "n_test": len(lt),
              "arch": f"{arch} (torchvision, weights=None)", "size": size, "epochs": epochs,
              "auc_real": auc(y, p_real), "auc_real_plus_synthetic": auc(y, p_aug),
              "acc_real": accuracy(y, p_real), "acc_real_plus_synthetic": accuracy(y, p_aug), **boot}
    result["auc_diff"] = result["auc_real_plus_synthetic"] - result["auc_real"]
    nf = index.get(no_finding)
    if nf is None and no_finding:
        log.warning("no class is %r (classes: %s): underdiagnosis not computed; set --no-finding", no_finding,
                    ", ".join(classes))
    if nf is not None:
        result["underdiagnosis_real"] = underdiagnosis(y, p_real, nf)
        result["underdiagnosis_real_plus_synthetic"] = underdiagnosis(y, p_aug, nf)
    if by:
        rows = rows_for(pt, test, image_column)
        result["by"], result["underdiagnosis_gap"] = {}, {}
        for col in by:
            index_col = groups(rows, col)
            result["by"][col] = per_group(group_metrics(y, p_real, p_aug, nf), {g: [ix] for g, ix in index_col.items()},
                                          names=("test",), n_boot=n_boot, seed=seed)
            for row in result["by"][col]:
                row["n_with_finding"] = int((y[index_col[row["group"]]] != nf).sum()) if nf is not None else None
            if nf is not None:
                result["underdiagnosis_gap"][col] = underdiagnosis_gap(y, p_real, p_aug, index_col, nf, n_boot, seed)
    if out:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(safe_row(["image", "label", "model"] + [f"p_{c}" for c in classes]))
        for name, probs in (("real", p_real), ("real+synthetic", p_aug)):
            w.writerows(safe_row([str(p), lt[i], name] + [repr(float(v)) for v in probs[i]]) for i, p in enumerate(pt))
        atomic_write_text(Path(out) / "predictions.csv", buf.getvalue())
        result["report"] = _report(out, result)
    return result


def _report(out: str | Path, r: dict[str, Any]) -> dict[str, str]:
    import matplotlib.pyplot as plt

    from .outputs import write_report
    ci = r["ci95"]
    fig, ax = plt.subplots(figsize=(5, 3))
    for x, (name, m, c) in enumerate([("real", r["auc_real"], ci["auc_a"]),
                                      ("real+synthetic", r["auc_real_plus_synthetic"], ci["auc_b"])]):
        ax.errorbar(x, m, yerr=[[m - c[0]], [c[1] - m]], fmt="o", capsize=4)
    ax.set_xticks([0, 1], ["real", "real+synthetic"])
    ax.set_ylabel("test AUC (95% bootstrap CI)")
    notes = [f"**Classifier:** {r['arch']}, {r['size']}x{r['size']}, {r['epochs']} epochs",
             f"**N:** {r['n_real_train']} real train, {r['n_synthetic']} synthetic, {r['n_test']} real test",
             f"**AUC difference (real+synthetic - real):** {r['auc_diff']:+.4f}, 95% CI "
             f"[{ci['auc_diff'][0]:+.4f}, {ci['auc_diff'][1]:+.4f}] ({r['n_boot_used']} paired bootstrap resamples)"]
    if "underdiagnosis_real" in r:
        notes.append(f"**Underdiagnosis** (No Finding false-positive rate among images with a finding, "
                     f"Seyyed-Kalantari et al. 2021): real {r['underdiagnosis_real']:.4f}, real+synthetic "
                     f"{r['underdiagnosis_real_plus_synthetic']:.4f}")
    for col, gap in r.get("underdiagnosis_gap", {}).items():
        if gap:
            low, high = gap["ci95"].get("gap_diff", [float("nan")] * 2)
            notes.append(f"**Underdiagnosis gap by {col}** (highest - lowest group): real {gap['gap_real']:.4f} "
                         f"({gap['highest_real']} vs {gap['lowest_real']}), real+synthetic "
                         f"{gap['gap_real_plus_synthetic']:.4f} ({gap['highest_real_plus_synthetic']} vs "
                         f"{gap['lowest_real_plus_synthetic']}); change {gap['gap_diff']:+.4f}, 95% CI "
                         f"[{low:+.4f}, {high:+.4f}] ({gap['n_boot_used']} paired resamples)")
    keys = [k for k in ("auc_real", "auc_real_plus_synthetic", "auc_diff", "underdiagnosis_real",
                        "underdiagnosis_real_plus_synthetic", "underdiagnosis_diff")
            if any(k in row for rows in r.get("by", {}).values() for row in rows)]
    return write_report(out, "augment", r, title="Downstream utility: real vs real+synthetic training",
                        notes=notes, figures={"auc": fig}, sections=sections(r.get("by", {}), keys))


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse(AugmentConfig, argv, "Train a small classifier on real vs real+synthetic images and compare "
                "test AUC/accuracy with bootstrap CIs.")
    setup_logging(cfg.verbose)
    if not (cfg.real_train and cfg.synthetic and cfg.test):
        raise UserError("give --real-train, --synthetic and --test manifests")
    with user_errors():
        result = augment(cfg.real_train, cfg.synthetic, cfg.test, image_column=cfg.image_column,
                         label_column=cfg.label_column, arch=cfg.arch, size=cfg.size, epochs=cfg.epochs,
                         batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, n_boot=cfg.n_boot, device=cfg.device,
                         out=cfg.out, by=cfg.by, no_finding=cfg.no_finding)
    print(f"AUC real {result['auc_real']:.4f} -> real+synthetic {result['auc_real_plus_synthetic']:.4f} "
          f"(diff {result['auc_diff']:+.4f}); report {result['report']['markdown']}")
    return result


if __name__ == "__main__":
    main()

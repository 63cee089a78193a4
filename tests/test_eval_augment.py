"""eval.augment: end to end on tiny two-class data; reported metrics equal sklearn on the saved predictions."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import needs_torchvision
from sklearn.metrics import accuracy_score, roc_auc_score

from cxrcommon.imageio import write_png
from eval.augment import auc, bootstrap, main


def make_set(folder, n, seed):
    """Class 'effusion' = bright lower band, 'normal' = none, both with noise; a manifest with labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        label = ("normal", "effusion")[i % 2]
        img = rng.uniform(0.1, 0.5, (32, 32)).astype(np.float32)
        if label == "effusion":
            img[20:] += 0.4
        write_png(folder / f"{i}.png", np.clip(img, 0, 1))
        rows.append({"image": f"{i}.png", "label": label})
    with open(folder / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "label"])
        w.writeheader()
        w.writerows(rows)
    return folder / "manifest.csv"


@needs_torchvision
def test_augment_end_to_end_matches_sklearn(tmp_path):
    real, syn, test = (make_set(tmp_path / name, n, s) for name, n, s in (("real", 12, 0), ("syn", 12, 1),
                                                                            ("test", 16, 2)))
    out = tmp_path / "out"
    r = main(["--real-train", str(real), "--synthetic", str(syn), "--test", str(test), "--size", "32",
              "--epochs", "2", "--batch-size", "8", "--n-boot", "50", "--out", str(out)])
    assert r["classes"] == ["effusion", "normal"] and (r["n_real_train"], r["n_synthetic"], r["n_test"]) == (12, 12, 16)
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 32
    for model, key in (("real", "real"), ("real+synthetic", "real_plus_synthetic")):
        mine = [row for row in rows if row["model"] == model]
        y = np.array([row["label"] == "normal" for row in mine])
        p = np.array([float(row["p_normal"]) for row in mine])
        assert r[f"auc_{key}"] == pytest.approx(roc_auc_score(y, p))
        said = np.array([float(row["p_normal"]) > float(row["p_effusion"]) for row in mine])
        assert r[f"acc_{key}"] == pytest.approx(accuracy_score(y, said))
    assert r["auc_diff"] == pytest.approx(r["auc_real_plus_synthetic"] - r["auc_real"])
    assert 0 < r["n_boot_used"] <= 50 and r["ci95"]["auc_a"][0] <= r["ci95"]["auc_a"][1]
    saved = json.loads((out / "augment.json").read_text())
    assert saved["auc_real"] == r["auc_real"] and (out / "augment_auc.png").is_file()


def test_auc_multiclass_and_bootstrap_against_sklearn():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    probs = rng.dirichlet([1, 1, 1], 30)
    assert auc(y, probs) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    same = bootstrap(y, probs, probs, n_boot=30, seed=1)
    assert same["ci95"]["auc_diff"] == [0.0, 0.0] and same["n_boot_used"] == 30


def test_augment_rejects_unknown_test_label(tmp_path):
    from eval.augment import augment
    real, syn = make_set(tmp_path / "real", 6, 0), make_set(tmp_path / "syn", 6, 1)
    test = make_set(tmp_path / "test", 4, 2)
    test.write_text(test.read_text().replace("effusion", "pneumothorax"))
    with pytest.raises(ValueError, match="pneumothorax"):
        augment(real, syn, test, size=32, epochs=1)

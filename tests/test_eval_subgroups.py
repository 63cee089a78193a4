"""eval.subgroups and every eval command's --by: groups, bootstrap intervals, per-group FID that shows what the
pooled one hides, the underdiagnosis rate and gap on a hand-made example, and a bad --by refused before writing."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import needs_torchvision

from cxrcommon.imageio import write_png
from eval.augment import group_metrics, underdiagnosis, underdiagnosis_gap
from eval.fid import FidConfig, distances, distances_by, frechet_distance
from eval.subgroups import bootstrap_ci, groups, per_group, split_by


def write_manifest(folder, rows, name="manifest.csv"):
    """Images (smooth noise, brighter when row['bright']) and a CSV manifest of them with the rows' columns."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(rows))
    for i, row in enumerate(rows):
        img = rng.uniform(0.2, 0.5, (32, 32)).astype(np.float32) + (0.4 if row.pop("bright", False) else 0.0)
        write_png(folder / f"{i}.png", np.clip(img, 0, 1))
        row["image"] = f"{i}.png"
    with open(folder / name, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder / name


def test_groups_derive_age_band_and_labels_and_normalise_sex():
    rows = [{"sex": "Female", "age": "34", "labels": "Effusion|Edema"}, {"sex": "M", "age": "070Y", "labels": ""},
            {"sex": "F", "age": "", "labels": "Effusion"}, {"sex": "", "age": "50", "labels": "No Finding"}]
    assert {g: ix.tolist() for g, ix in groups(rows, "sex").items()} == {"F": [0, 2], "M": [1], "unknown": [3]}
    assert {g: ix.tolist() for g, ix in groups(rows, "age_band").items()} == {
        "40-65": [3], "<40": [0], ">65": [1], "unknown": [2]}
    assert {g: ix.tolist() for g, ix in groups(rows, "label").items()} == {
        "Edema": [0], "Effusion": [0, 2], "No Finding": [3], "unknown": [1]}
    assert split_by(["sex,race", "sex", "label"]) == ["sex", "race", "label"]


@pytest.mark.numerics
def test_bootstrap_interval_holds_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 2000)

    def mean(i):
        return {"mean": float(x[i].mean())}
    rows = per_group(mean, {"small": [np.arange(20)], "large": [np.arange(20, 2000)]}, names=("x",), n_boot=300)
    widths = {}
    for row in rows:
        low, high = row["ci"]["mean"]
        assert low < row["mean"] < high and row["n_boot_used"] == 300
        widths[row["group"]] = high - low
    assert rows[0]["n_x"] == 20 and widths["large"] < widths["small"] / 5
    again, _ = bootstrap_ci(mean, [np.arange(20)], n_boot=300, seed=[0, 1])
    same, _ = bootstrap_ci(mean, [np.arange(20)], n_boot=300, seed=[0, 1])
    assert again == same  # seeded


def test_frechet_distance_equals_torchmetrics_both_sides_of_the_dimension():
    torch.manual_seed(0)
    for n in (20, 300):  # N < D (N x N SVD) and N > D (D x D square roots)
        a, b = torch.randn(n, 64) * torch.rand(64), torch.randn(n, 64) + 0.3
        assert frechet_distance(a, b) == pytest.approx(distances(a, b, FidConfig(kid_subsets=2))["fid"], rel=1e-6)


@pytest.mark.numerics
def test_per_group_fid_shows_the_shifted_group_the_pooled_fid_hides():
    torch.manual_seed(0)
    n = 300
    real, fake = torch.randn(2 * n, 8), torch.randn(2 * n, 8)
    fake[:n] += 0.7                                   # only group F's synthetic images are off
    rows = [{"sex": "F" if i < n else "M"} for i in range(2 * n)]
    fake_rows = rows[:n] + [{"sex": "male"} for _ in range(n - 50)] + [{"sex": ""} for _ in range(50)]
    out, warns = distances_by(real, fake, rows, fake_rows, "sex", FidConfig(by_n_boot=30, kid_subset_size=100))
    by = {r["group"]: r for r in out}
    pooled = distances(real, fake, FidConfig(kid_subset_size=100))["fid"]
    assert by["F"]["fid"] > 2.5 and by["M"]["fid"] < 0.3 and by["M"]["fid"] < pooled < by["F"]["fid"] / 2
    assert (by["F"]["n_real"], by["F"]["n_fake"]) == (250, 250)    # equal N: the smallest group's (M: 250 fakes)
    assert by["unknown"]["n_real"] == 0 and "not scored" in by["unknown"]["note"]
    for g in ("F", "M"):
        low, high = by[g]["ci"]["fid"]
        assert low <= by[g]["fid"] <= high and by[g]["n_boot_used"] == 30
    assert by["F"]["ci"]["fid"][0] > by["M"]["ci"]["fid"][1]      # the intervals separate the groups
    assert any("biased upwards" in w for w in warns)


def test_underdiagnosis_rate_and_gap_on_a_hand_made_example():
    # classes: 0 Effusion, 1 No Finding. Group F: 4 with a finding, the real-only model calls 2 of them No Finding
    # (rate 0.5); group M: 4 with a finding, 1 called No Finding (0.25). The healthy images (one per group, one
    # called Effusion) are not in the rate's denominator. real+synthetic: F 1/4, M 1/4.
    y = np.array([0, 0, 0, 0, 1, 0, 0, 0, 0, 1])
    nf_real = np.array([1, 1, 0, 0, 0, 1, 0, 0, 0, 1])
    nf_aug = np.array([1, 0, 0, 0, 1, 0, 1, 0, 0, 1])
    a, b = np.eye(2)[nf_real] * 0.8 + 0.1, np.eye(2)[nf_aug] * 0.8 + 0.1
    index = {"F": np.arange(5), "M": np.arange(5, 10)}
    assert underdiagnosis(y[index["F"]], a[index["F"]], 1) == 0.5
    assert underdiagnosis(y[index["M"]], a[index["M"]], 1) == 0.25
    assert np.isnan(underdiagnosis(np.array([1, 1]), a[:2], 1))           # nobody with a finding
    rows = per_group(group_metrics(y, a, b, 1), {g: [ix] for g, ix in index.items()}, names=("test",), n_boot=50)
    f, m = rows
    assert (f["underdiagnosis_real"], f["underdiagnosis_real_plus_synthetic"], f["underdiagnosis_diff"]) == \
        (0.5, 0.25, -0.25)
    assert (m["underdiagnosis_real"], m["underdiagnosis_real_plus_synthetic"]) == (0.25, 0.25)
    gap = underdiagnosis_gap(y, a, b, {**index, "unknown": np.array([4, 5])}, 1, n_boot=200)  # unknown: left out
    assert (gap["gap_real"], gap["gap_real_plus_synthetic"], gap["gap_diff"]) == (0.25, 0.0, -0.25)
    assert (gap["highest_real"], gap["lowest_real"]) == ("F", "M")
    low, high = gap["ci95"]["gap_diff"]
    assert low <= -0.25 <= high and 0 < gap["n_boot_used"] <= 200


def test_fid_by_end_to_end_and_report(tmp_path):
    from eval.fid import main
    rows = [{"sex": "F" if i % 2 else "M", "age": 30 + 5 * i, "bright": i % 2} for i in range(16)]
    real = write_manifest(tmp_path / "real", [dict(r, bright=0) for r in rows])
    fake = write_manifest(tmp_path / "fake", rows)
    r = main([str(real), str(fake), "--features", "tiny", "--no-cache", "--by", "sex,age_band", "--by-n-boot", "5",
              "--kid-subset-size", "4", "--k", "2", "--out", str(tmp_path / "out")])
    by = {g["group"]: g for g in r["by"]["sex"]}
    assert set(by) == {"F", "M"} and by["F"]["fid"] > by["M"]["fid"] and by["F"]["n_real"] == 8
    assert {g["group"] for g in r["by"]["age_band"]} == {"<40", "40-65", ">65"}
    saved = json.loads((tmp_path / "out" / "fid.json").read_text())
    assert saved["by"]["sex"][0]["group"] == "F"
    md = (tmp_path / "out" / "fid.md").read_text()
    assert "## By sex (95% bootstrap CI)" in md and "## By age_band" in md


@pytest.mark.parametrize("command", ["fid", "augment", "diversity", "memorization"])
def test_bad_by_is_one_line_and_writes_nothing(tmp_path, capsys, command):
    import importlib
    rows = [{"sex": "FM"[i % 2], "label": ("No Finding", "Effusion")[i % 2]} for i in range(6)]
    man = write_manifest(tmp_path / "set", rows)
    (tmp_path / "set" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = {"fid": [str(man), str(man), "--features", "tiny", "--cache-dir", str(cache)],
            "augment": ["--real-train", str(man), "--synthetic", str(man), "--test", str(man)],
            "diversity": [str(tmp_path / "set")],
            "memorization": ["--train", str(man), "--fake", str(man), "--features", "tiny", "--cache-dir", str(cache)],
            }[command]
    main = importlib.import_module(f"eval.{command}").main
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--by", "sex,ethnicity", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "--by ethnicity" in err and "has no 'ethnicity' column" in err
    assert not out.exists() and not cache.exists()


def test_fid_by_refuses_a_folder_without_a_manifest(tmp_path, capsys):
    from eval.fid import main
    man = write_manifest(tmp_path / "set", [{"sex": "F"}, {"sex": "M"}, {"sex": "F"}])
    with pytest.raises(SystemExit):
        main([str(man), str(tmp_path / "set"), "--features", "tiny", "--by", "sex", "--out", str(tmp_path / "o")])
    assert "--fake" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_diversity_by_splits_pairs_within_the_subgroup(tmp_path):
    from eval.diversity import main
    rng = np.random.default_rng(0)
    folder = tmp_path / "gen"
    folder.mkdir()
    rows, bases = [], [rng.uniform(0.2, 0.8, (8, 8)) for _ in range(6)]
    for i in range(8):               # prompts p0, p1 (sex F): near-copies; p2, p3 (M): unrelated images
        base = bases[i // 2] if i < 4 else bases[i - 2]
        img = np.kron(base, np.ones((24, 24))) + (rng.normal(0, 0.01, (192, 192)) if i < 4 else 0)
        write_png(folder / f"{i}.png", np.clip(img, 0, 1).astype(np.float32))
        rows.append({"file": f"{i}.png", "prompt": f"p{i // 2}", "sex": "F" if i < 4 else "M"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = main([str(folder), "--size", "192", "--by", "sex", "--n-boot", "50", "--out", str(tmp_path / "out")])
    by = {g["group"]: g for g in r["by"]["sex"]}
    assert (by["F"]["n_prompts"], by["F"]["n_images"], by["M"]["n_prompts"]) == (2, 4, 2)
    assert by["F"]["ms_ssim"] > 0.95 > by["M"]["ms_ssim"]
    assert "## By sex" in (tmp_path / "out" / "diversity.md").read_text()


@needs_torchvision
@pytest.mark.numerics
def test_augment_by_reports_groups_and_the_gap(tmp_path):
    from eval.augment import main

    def rows(n):
        return [{"label": ("No Finding", "Effusion")[i % 2], "bright": i % 2, "sex": "FM"[(i // 2) % 2]}
                for i in range(n)]
    real, syn, test = (write_manifest(tmp_path / name, rows(n)) for name, n in (("r", 12), ("s", 12), ("t", 16)))
    r = main(["--real-train", str(real), "--synthetic", str(syn), "--test", str(test), "--size", "32",
              "--epochs", "2", "--batch-size", "8", "--n-boot", "50", "--by", "sex", "--out", str(tmp_path / "o")])
    by = {g["group"]: g for g in r["by"]["sex"]}
    assert set(by) == {"F", "M"} and by["F"]["n_test"] == 8 and by["F"]["n_with_finding"] == 4
    with open(tmp_path / "o" / "predictions.csv") as fh:        # the rate recomputed from the saved predictions
        pred = [row for row in csv.DictReader(fh) if row["model"] == "real" and row["label"] == "Effusion"]
    called = [float(row["p_No Finding"]) > float(row["p_Effusion"]) for row in pred]
    assert r["underdiagnosis_real"] == pytest.approx(np.mean(called))
    assert "gap_real" in r["underdiagnosis_gap"]["sex"]
    assert "Underdiagnosis gap by sex" in (tmp_path / "o" / "augment.md").read_text()


def test_memorization_by_puts_the_copies_in_their_group(tmp_path):
    from eval.memorization import main
    train_rows = [{"sex": "FM"[i % 2], "bright": i % 3 == 0} for i in range(12)]
    train = write_manifest(tmp_path / "train", train_rows)
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    rows = []
    for i in range(8):        # F: copies of training images; M: fresh noise
        src = tmp_path / "train" / f"{i}.png" if i < 4 else None
        if src:
            (fake_dir / f"{i}.png").write_bytes(src.read_bytes())
        else:
            write_png(fake_dir / f"{i}.png", np.random.default_rng(i).uniform(0, 1, (32, 32)).astype(np.float32))
        rows.append({"file": f"{i}.png", "sex": "F" if i < 4 else "M"})
    (fake_dir / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = main(["--train", str(train), "--fake", str(fake_dir), "--features", "tiny", "--cache-dir",
              str(tmp_path / "cache"), "--by", "sex", "--n-boot", "50", "--top-k", "2", "--out", str(tmp_path / "o")])
    by = {g["group"]: g for g in r["by"]["sex"]}
    assert by["F"]["n_fake"] == by["M"]["n_fake"] == 4
    assert by["F"]["cosine_median"] == pytest.approx(1.0) and by["F"]["share_closer_than_train_p99"] == 1.0
    assert by["M"]["share_closer_than_train_p99"] < 1.0
    assert "## By sex" in (tmp_path / "o" / "memorization.md").read_text()

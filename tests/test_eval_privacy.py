"""eval.privacy / eval.reid: planted copies are flagged and fresh images are not, each image is scored against its
own prompt's real image, pixel distances never wrap, the CheXGenBench re-id layout loads, a scorer learns
patients, and bad input ends in one line with nothing written."""
from __future__ import annotations

import csv
import json
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import needs_torchvision

from cxrcommon.imageio import read_image, write_png
from cxrcommon.optional import MissingPackageError
from eval import privacy as pv
from eval import reid
from eval.nearest import pixel_distance

SIZE = 64


def xray_like(seed: int, size: int = SIZE) -> np.ndarray:
    """A smooth random image with some fine structure (different seeds: different 'patients')."""
    rng = np.random.default_rng(seed)
    low = cv2.resize(rng.uniform(0.1, 0.9, (6, 6)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    fine = cv2.resize(rng.uniform(-0.1, 0.1, (16, 16)).astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    return np.clip(low + fine, 0, 1)


def crop5(img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    ch, cw = round(h * 0.05), round(w * 0.05)
    return cv2.resize(img[1:1 + h - ch, 2:2 + w - cw], (w, h), interpolation=cv2.INTER_AREA)


PLANTS = {"copy": lambda a: a, "mirrored": lambda a: a[:, ::-1], "cropped": crop5,
          "resized": lambda a: cv2.resize(a, (SIZE // 2, SIZE // 2), interpolation=cv2.INTER_AREA),
          "noisy": lambda a: np.clip(a + np.random.default_rng(7).normal(0, 0.02, a.shape), 0, 1).astype(np.float32)}


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    """12 training images in a folder plus a manifest pairing each with a report."""
    root = tmp_path_factory.mktemp("train")
    rows = []
    for i in range(12):
        write_png(root / f"train_{i:02d}.png", xray_like(i))
        rows.append({"image": f"train_{i:02d}.png", "text": f"Report number {i}. Effusion grade {i % 3}."})
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "text"])
        w.writeheader()
        w.writerows(rows)
    return root


def run(argv, tmp_path):
    return pv.main([*argv, "--out", str(tmp_path / "out")])


def test_pixel_distance_is_taken_in_float_not_wrapping_uint8():
    black, white = np.zeros((8, 8), np.uint8), np.full((8, 8), 255, np.uint8)
    dark, light = np.full((8, 8), 10, np.uint8), np.full((8, 8), 200, np.uint8)
    # uint8 subtraction wraps: 0 - 255 = 1 and 10 - 200 = 66, so the anchor's distances were 1/255 and 66/255
    assert pixel_distance(black, white, 8) == pytest.approx(1.0)
    assert pixel_distance(white, black, 8) == pytest.approx(1.0)
    assert pixel_distance(dark, light, 8) == pytest.approx(190 / 255)
    assert pixel_distance(light, dark, 8) == pytest.approx(190 / 255)
    assert pixel_distance(np.full((8, 8), 65535, np.uint16), black.astype(np.uint16), 8) == pytest.approx(1.0)


def test_each_image_is_scored_against_its_prompts_image_not_the_last_one(train_set, tmp_path):
    """The anchor measured every image of a prompt against the LAST generated image: the copy, written first,
    must score 0 and the others their own (different) distances."""
    fake = tmp_path / "fake"
    fake.mkdir()
    imgs = [xray_like(3), xray_like(101), xray_like(102)]          # the first copies prompt 3's training image
    for i, img in enumerate(imgs):
        write_png(fake / f"gen_{i}.png", img)
    (fake / "manifest.jsonl").write_text("".join(
        json.dumps({"file": f"gen_{i}.png", "prompt": "Report number 3.  Effusion grade 0."}) + "\n" for i in range(3)))
    r = pv.privacy(pv.PrivacyConfig(train=str(train_set / "train.csv"), fake=str(fake)))
    rows = {row["file"].rsplit("/", 1)[1]: row for row in r["rows"]}
    assert all(row["prompt_train"].endswith("train_03.png") for row in rows.values())
    d = [rows[f"gen_{i}.png"]["prompt_pixel_rmse"] for i in range(3)]
    expected = [pixel_distance(read_image(fake / f"gen_{i}.png"), read_image(train_set / "train_03.png"))
                for i in range(3)]
    assert d == pytest.approx(expected) and d[0] < 1e-6 and min(d[1:]) > 0.05 and d[1] != pytest.approx(d[2])
    (prompt,) = r["per_prompt"]
    assert prompt["n_images"] == 3 and prompt["prompt_pixel_rmse_min"] < 1e-6
    assert prompt["prompt_pixel_rmse_mean"] == pytest.approx(np.mean(expected))
    assert rows["gen_0.png"]["flagged"] and not rows["gen_1.png"]["flagged"] and not rows["gen_2.png"]["flagged"]


def test_planted_copies_are_flagged_fresh_images_are_not_and_flags_csv(train_set, tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    for n, (kind, fn) in enumerate(PLANTS.items()):
        write_png(fake / f"{kind}.png", np.ascontiguousarray(fn(xray_like(n + 2))))
    for s in range(4):
        write_png(fake / f"fresh_{s}.png", xray_like(200 + s))
    r = run(["--train", str(train_set), "--fake", str(fake), "--top-k", "4"], tmp_path)
    rows = {row["file"].rsplit("/", 1)[1][:-4]: row for row in r["rows"]}
    for n, kind in enumerate(PLANTS):
        assert rows[kind]["flagged"] and rows[kind]["flagged_by"] == "pixel", (kind, rows[kind])
        assert rows[kind]["nearest_train"].endswith(f"train_{n + 2:02d}.png")
    assert "mirrored" in rows["mirrored"]["match"] and "crop" in rows["cropped"]["match"]
    assert not any(rows[f"fresh_{s}"]["flagged"] for s in range(4)), [rows[f"fresh_{s}"] for s in range(4)]
    assert min(rows[f"fresh_{s}"]["pixel_ratio"] for s in range(4)) > 2 * max(rows[k]["pixel_ratio"] for k in PLANTS)
    assert r["methods"] == ["pixel nearest neighbour (64 px RMS, mirrored and cropped views)"]
    with open(tmp_path / "out" / "flags.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 9 and list(table[0])[:4] == ["file", "flagged", "flagged_by", "nearest_train"]
    flagged = {row["file"].rsplit("/", 1)[1]: row["flagged"] for row in table}
    assert flagged == {**{f"{k}.png": "true" for k in PLANTS}, **{f"fresh_{s}.png": "false" for s in range(4)}}
    assert float(next(row for row in table if row["file"].endswith("copy.png"))["pixel_ratio"]) < 1e-6
    md = (tmp_path / "out" / "privacy.md").read_text()
    assert "pixel nearest neighbour" in md and "Most suspicious pairs" in md and "5 of 9" in md
    assert (tmp_path / "out" / "privacy_pairs.png").stat().st_size > 1000


def test_feature_method_catches_mirrored_copy(train_set, tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    write_png(fake / "mirror.png", np.ascontiguousarray(xray_like(4)[:, ::-1]))
    write_png(fake / "fresh.png", xray_like(300))
    r = pv.privacy(pv.PrivacyConfig(train=str(train_set), fake=str(fake), features="tiny", cache_dir=str(tmp_path)))
    rows = {row["file"].rsplit("/", 1)[1]: row for row in r["rows"]}
    assert rows["mirror.png"]["feature_ratio"] < 1e-6 and rows["mirror.png"]["flagged_by"] == "pixel;feature"
    assert rows["fresh.png"]["feature_ratio"] > 0.4 and not rows["fresh.png"]["flagged"]
    assert any("feature nearest neighbour (tiny" in m for m in r["methods"])


def test_fewer_training_images_than_k_plus_one_is_refused(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    for i in range(3):
        write_png(train / f"t{i}.png", xray_like(i))
    with pytest.raises(SystemExit, match=r"3 training image\(s\), fewer than --k \+ 1 = 4"):
        run(["--train", str(train), "--fake", str(train), "--k", "3"], tmp_path)
    assert not (tmp_path / "out").exists()


@needs_torchvision
def test_chexgenbench_layout_random_resnet50_saves_loads_and_scores(train_set, tmp_path):
    torch.manual_seed(0)
    net = reid.SiameseNetwork("resnet50").eval()
    sd = net.state_dict()
    assert sd["model.fc.weight"].shape == (128, 2048) and sd["fc_end.weight"].shape == (1, 128)
    assert "model.layer1.0.conv3.weight" in sd and "model.conv1.weight" in sd
    plain = tmp_path / "ResNet-50_epoch11_data_handling_RPN.pth"
    torch.save(sd, plain)
    wrapped = tmp_path / "checkpoint.pth"  # Packhäuser's training checkpoint, DataParallel-prefixed
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 11}, wrapped)
    a, b = xray_like(0, 96), xray_like(1, 96)
    with torch.inference_mode():
        ref = torch.sigmoid(net(*(torch.from_numpy(x)[None, None].expand(1, 3, -1, -1) for x in
                                  (cv2.resize(a, (224, 224), interpolation=cv2.INTER_AREA),
                                   cv2.resize(b, (224, 224), interpolation=cv2.INTER_AREA)))))
    for path in (plain, wrapped):
        scorer = reid.load_reid(path, "cpu")
        assert scorer.arch == "resnet50" and scorer.size == 224 and scorer.in_channels == 3
        fa, fb = scorer.embed([a]), scorer.embed([b])
        got = scorer.score(fa, fb)
        assert got.shape == (1, 1) and got[0, 0] == pytest.approx(float(ref), abs=0.02)
    # the whole check with these weights: one re-id score per image against its prompt's training image
    fake = tmp_path / "fake"
    fake.mkdir()
    for i in range(2):
        write_png(fake / f"g{i}.png", xray_like(50 + i))
    (fake / "manifest.jsonl").write_text("".join(json.dumps({"file": f"g{i}.png", "prompt": f"Report number {i}. "
                                                             f"Effusion grade {i % 3}."}) + "\n" for i in range(2)))
    r = run(["--train", str(train_set / "train.csv"), "--fake", str(fake), "--reid-weights", str(plain),
             "--reid-threshold", "0.0"], tmp_path)
    assert r["n_prompts_matched"] == 2 and all(0 < row["prompt_reid"] < 1 for row in r["rows"])
    assert r["reid_share_over_threshold"] == 1.0 and all("reid" in row["flagged_by"] for row in r["rows"])
    assert r["reid_prompt_max_mean"] == pytest.approx(np.mean([row["prompt_reid"] for row in r["rows"]]))
    assert "re-identification (ResNet-50_epoch11" in r["method"]


@needs_torchvision
def test_weights_of_another_architecture_are_refused_and_nothing_written(train_set, tmp_path):
    import torchvision
    classifier = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), classifier)
    with pytest.raises(SystemExit, match="not a Siamese ResNet") as err:
        run(["--train", str(train_set), "--fake", str(train_set), "--reid-weights", str(classifier)], tmp_path)
    assert "\n" not in str(err.value) and "Patient_ReIdentification_MIMIC" in str(err.value)
    sd = reid.SiameseNetwork("resnet18").state_dict()
    sd["fc_end.weight"] = torch.zeros(1, 64)                      # 64 features where model.fc gives 128
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(SystemExit, match="does not fit the architecture"):
        run(["--train", str(train_set), "--fake", str(train_set), "--reid-weights", str(tmp_path / "bad.safetensors")],
            tmp_path)
    evil = tmp_path / "evil.pth"
    torch.save({"x": reid.ReidScorer}, evil)
    with pytest.raises(SystemExit, match="not a plain PyTorch state dict"):
        run(["--train", str(train_set), "--fake", str(train_set), "--reid-weights", str(evil)], tmp_path)
    assert not (tmp_path / "out").exists()


@needs_torchvision  # without it, the missing package is the first thing said (see the no-torchvision test)
def test_reid_training_manifest_without_patients_is_refused(train_set, tmp_path):
    with pytest.raises(SystemExit, match="no patient ids in column 'patient'") as err:
        run(["--train", str(train_set), "--fake", str(train_set), "--reid-train", str(train_set / "train.csv")],
            tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_without_torchvision_reid_refuses_and_pixel_path_still_works(train_set, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    weights = tmp_path / "w.pth"
    torch.save({"model.conv1.weight": torch.zeros(64, 3, 7, 7)}, weights)
    with pytest.raises(MissingPackageError, match="re-identification scorer.*torchvision"):
        reid.SiameseNetwork()
    for flag, value in (("--reid-weights", weights), ("--reid-train", train_set / "train.csv")):
        with pytest.raises(SystemExit, match="needs torchvision"):
            run(["--train", str(train_set), "--fake", str(train_set), flag, str(value)], tmp_path)
    assert not (tmp_path / "out").exists()
    r = pv.privacy(pv.PrivacyConfig(train=str(train_set), fake=str(train_set)))
    assert r["n_flagged"] == 12  # the training set against itself: every image is its own copy


def patient_manifest(root, n_patients: int, per_patient: int, seed: int):
    """Patients are a fixed random pattern each; their films add noise and a small brightness change."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        base = rng.uniform(0, 1, (8, 8)).astype(np.float32)
        for j in range(per_patient):
            img = cv2.resize(base, (32, 32), interpolation=cv2.INTER_NEAREST) + rng.normal(0, 0.15, (32, 32))
            write_png(root / f"p{p}_{j}.png", np.clip(img * rng.uniform(0.8, 1.0), 0, 1).astype(np.float32))
            rows.append(f"p{p}_{j}.png,P{p:03d}\n")
    (root / "patients.csv").write_text("image,patient\n" + "".join(rows))
    return root / "patients.csv"


@pytest.mark.numerics
@needs_torchvision
def test_trained_scorer_verifies_held_out_patients(tmp_path):
    """ResNet-18 at 32 px for time (the layout is ResNet-50's with 512 branch inputs). Measured, torch 2.14 CPU,
    seeds 0-3: AUC 0.86, 0.90, 0.91, 0.88 (16 patients instead of 24 gave 0.75-0.97: too few held out)."""
    manifest = patient_manifest(tmp_path, 24, 4, seed=0)
    aucs = []
    for seed in (0, 1):
        scorer, m = reid.train_reid(manifest, arch="resnet18", size=32, epochs=5, pairs=128, batch_size=16, lr=1e-3,
                                    val_fraction=0.25, seed=seed, device="cpu")
        aucs.append(m["verification_auc"])
        assert m["n_val_patients"] == 6 and m["n_train_patients"] == 18 and m["n_val_pairs"] == 128
    assert min(aucs) > 0.75, aucs
    path = reid.save_reid(scorer, tmp_path / "s.safetensors", verification_auc=aucs[-1])
    loaded = reid.load_reid(path, "cpu")
    assert loaded.size == 32 and loaded.arch == "resnet18"
    imgs = [read_image(tmp_path / f"p{p}_0.png") for p in range(3)]
    assert torch.allclose(loaded.embed(imgs), scorer.embed(imgs), atol=1e-5)

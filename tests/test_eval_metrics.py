"""eval: FID/KID/PRDC on a weight-free extractor, the feature cache, backbones, diversity, memorisation."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import needs_torch_fidelity, needs_torchvision

from cxrcommon.imageio import write_png
from eval import features as feats
from eval.fid import FidConfig, distances, evaluate
from eval.prdc import prdc

SIZE = 48


def blobs(seed: int, n: int, noise: float = 0.0, size: int = SIZE) -> list[np.ndarray]:
    """Smooth random images; the same seed gives the same base images, `noise` adds Gaussian noise."""
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng(seed + 1000)
    out = []
    for _ in range(n):
        low = rng.uniform(0.2, 0.8, (6, 6)).astype(np.float32)
        img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
        img = img + noise_rng.normal(0, noise, img.shape).astype(np.float32) if noise else img
        out.append(np.clip(img, 0, 1))
    return out


def write_set(folder, images, text=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        write_png(folder / f"img_{i:03d}.png", img, text=text(i) if text else None)
    return folder


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    return write_set(tmp_path_factory.mktemp("real") / "real", blobs(0, 40))


@pytest.mark.numerics
def test_fid_self_is_zero_and_grows_with_noise(real_dir, tmp_path):
    results = []
    for noise in (0.0, 0.1, 0.2, 0.4):
        fake = write_set(tmp_path / f"fake_{noise}", blobs(0, 40, noise))
        results.append(evaluate(FidConfig(real=str(real_dir), fake=str(fake), features="tiny", no_cache=True, out="")))
    fids = [r["fid"] for r in results]
    kids = [r["kid_mean"] for r in results]
    # Measured, both torch routes (identical to 5 digits), blob seeds 0/1/2: fid 0, 2.7-3.4e-4, 1.3-1.6e-3,
    # 1.0-1.1e-2; kid -2.21e-3, -2.20e-3, -2.06e-3, -1.42e-3 (seed 0). The smallest kid step (1e-5) is ~100x the
    # rounding of the float32 block-mean features (KID itself is computed in float64 on fixed subsets).
    assert abs(fids[0]) < 1e-6
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(kids, kids[1:])), kids
    assert results[0]["precision"] == results[0]["recall"] == results[0]["coverage"] == 1.0


@pytest.mark.numerics
def test_kid_near_zero_for_same_distribution_and_large_for_shifted():
    bb = feats.load_backbone("tiny")
    real, same = bb.embed(blobs(0, 40)), bb.embed(blobs(1, 40))
    shifted = bb.embed([np.clip(x + 0.1, 0, 1) for x in blobs(2, 40)])
    near, far = distances(real, same), distances(real, shifted)
    # measured, both routes, seeds 0/1/2 (and +1, +2): near kid -1.4e-3..2e-4, far 0.066..0.067; coverage near
    # 0.93..1.0, far 0.23..0.43; fid near 0.036..0.044, far 0.205..0.210
    assert abs(near["kid_mean"]) < 0.005 and far["kid_mean"] > 0.03
    assert far["fid"] > near["fid"] and far["coverage"] < near["coverage"]


def test_report_states_n_backbone_resize_and_small_n_warning(real_dir, tmp_path):
    fake = write_set(tmp_path / "fake", blobs(5, 12))
    r = evaluate(FidConfig(real=str(real_dir), fake=str(fake), features="tiny", cache_dir=str(tmp_path / "cache"),
                           out=str(tmp_path / "out")))
    saved = json.loads((tmp_path / "out" / "fid.json").read_text())
    assert saved["n_real"] == 40 and saved["n_fake"] == 12
    assert saved["backbone"].startswith("tiny") and "32x32" in saved["resize"]
    md = (tmp_path / "out" / "fid.md").read_text()
    assert "40 real, 12 synthetic" in md and "32x32" in md and "N < 2000" in md and "biased" in md
    assert (tmp_path / "out" / "fid_features.png").stat().st_size > 1000
    assert r["fid"] > 0


def test_n_subsamples_and_manifest_input(real_dir, tmp_path):
    manifest = tmp_path / "fake.csv"
    rows = ["image"] + [str(p) for p in sorted(real_dir.glob("*.png"))[:20]]
    manifest.write_text("\n".join(rows) + "\n")
    r = evaluate(FidConfig(real=str(real_dir), fake=str(manifest), features="tiny", n=15, no_cache=True, out=""))
    assert r["n_real"] == 15 and r["n_fake"] == 15


@needs_torch_fidelity
def test_prdc_identical_disjoint_and_matches_torch_fidelity():
    from torch_fidelity.metric_prc import calculate_precision_recall_full
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=g)
    same = prdc(real, real.clone(), k=5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["density"] == pytest.approx(6 / 5)  # each point lies in its own ball and in k others on average
    far = prdc(real, real + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    fake = torch.randn(150, 8, generator=g) * 1.5 + 0.5
    ours = prdc(real, fake, k=3)
    p, r = calculate_precision_recall_full(fake, real, neighborhood=3)
    assert ours["precision"] == pytest.approx(p) and ours["recall"] == pytest.approx(r)
    assert 0 < ours["precision"] < 1 and 0 < ours["coverage"] < 1
    with pytest.raises(ValueError, match="k=5"):
        prdc(real[:5], fake, k=5)


def test_distances_needs_two_per_set():
    with pytest.raises(ValueError, match="at least 2"):
        distances(torch.randn(1, 4), torch.randn(5, 4))


class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.calls, self.images = feats.TinyFeatures(), 0, 0

    def forward(self, x):
        self.calls += 1
        self.images += len(x)
        return self.inner(x)


def test_cache_hits_on_second_run_and_invalidates_changed_file(tmp_path):
    folder = write_set(tmp_path / "imgs", blobs(3, 10))
    counter = Counting()
    bb = feats.Backbone("count", "count-v1", counter, 32, feats.rgb)
    paths = sorted(folder.glob("*.png"))
    first = feats.embed_paths(paths, bb, cache_dir=tmp_path / "cache", batch_size=4)
    assert (counter.images, first.cache_hits, first.extracted) == (10, 0, 10)
    second = feats.embed_paths(paths, bb, cache_dir=tmp_path / "cache", batch_size=4)
    assert (counter.images, second.cache_hits) == (10, 10)
    assert torch.equal(first.features, second.features)
    write_png(paths[2], blobs(99, 1)[0])                       # edit one file
    (folder / "img_005.png").rename(folder / "renamed.png")    # rename another: content unchanged
    third = feats.embed_paths(sorted(folder.glob("*.png")), bb, cache_dir=tmp_path / "cache")
    assert (counter.images, third.cache_hits, third.extracted) == (11, 9, 1)
    assert not torch.equal(third.features[2], first.features[2])


def test_evaluate_caches_in_user_cache_not_beside_the_data(real_dir, tmp_path):
    fake = write_set(tmp_path / "fake", blobs(8, 10))
    first = evaluate(FidConfig(real=str(real_dir), fake=str(fake), features="tiny", out=""))
    second = evaluate(FidConfig(real=str(real_dir), fake=str(fake), features="tiny", out=""))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake"]  # nothing written beside the data
    assert list((Path(os.environ["SYNTHCXR_CACHE"]) / "features").glob("fake-*/*.safetensors"))
    assert second["cache"]["fake_hits"] == 10 and second["cache"]["fake_extracted"] == 0
    assert second["fid"] == pytest.approx(first["fid"])


def test_unreadable_image_is_skipped_and_reported(real_dir, tmp_path):
    fake = write_set(tmp_path / "fake", blobs(8, 10))
    (fake / "broken.png").write_bytes(b"not a png")
    r = evaluate(FidConfig(real=str(real_dir), fake=str(fake), features="tiny", no_cache=True, out=""))
    assert r["n_fake"] == 10 and len(r["skipped"]) == 1 and "broken.png" in r["skipped"][0]


@needs_torch_fidelity
def test_missing_inception_weights_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(feats.WeightsMissingError) as err:
        feats.load_backbone("inception")
    msg = str(err.value)
    assert feats.INCEPTION_FILE in msg and "--inception-weights" in msg
    assert str(tmp_path / "empty" / "hub" / "checkpoints") in msg
    from eval.fid import main
    with pytest.raises(SystemExit, match=feats.INCEPTION_FILE):
        main(["--real", str(tmp_path), "--fake", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(feats.WeightsMissingError, match="does not exist"):
        feats.load_backbone("inception", inception_weights=tmp_path / "nope.pth")


class NotATensor:
    pass


@needs_torch_fidelity
def test_inception_path_with_stand_in_weights(tmp_path, monkeypatch):
    """The real Inception code path (weights_only check, uint8 3-channel input, 2048-d pool) with random
    weights saved under the expected name: the real file cannot be downloaded here."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    dummy = tmp_path / "dummy.pth"
    torch.save({}, dummy)
    with monkeypatch.context() as m:
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        random_net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(dummy))
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / feats.INCEPTION_FILE
    ckpt.parent.mkdir(parents=True)
    torch.save(random_net.state_dict(), ckpt)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    bb = feats.load_backbone("inception", device="cpu")
    out = bb.embed(blobs(0, 3, size=40))
    assert out.shape == (3, 2048) and torch.isfinite(out).all() and "299x299" in bb.resize and "uint8" in bb.resize
    evil = tmp_path / "evil.pth"
    torch.save({"x": NotATensor()}, evil)
    with pytest.raises(ValueError, match="not a plain InceptionV3 state dict"):
        feats.load_backbone("inception", inception_weights=evil)


@needs_torchvision
def test_xrv_without_weights_names_the_conversion():
    with pytest.raises(feats.WeightsMissingError, match="--weights FILE.*save_file"):
        feats.load_backbone("xrv")


def test_torchscript_backbone(real_dir, tmp_path):
    path = tmp_path / "net.pt"
    torch.jit.script(feats.TinyFeatures()).save(str(path))
    r = evaluate(FidConfig(real=str(real_dir), fake=str(real_dir), features=str(path), input_size=40, no_cache=True,
                           out=""))
    assert r["backbone"] == "torchscript net.pt" and "40x40" in r["resize"] and abs(r["fid"]) < 1e-4
    with pytest.raises(ValueError, match="inception, rad-dino, clip, xrv, tiny"):
        feats.load_backbone(str(tmp_path / "missing.pt"))


@pytest.mark.numerics
def test_diversity_lower_for_diverse_than_near_duplicates(tmp_path):
    from eval.diversity import diversity
    rng = np.random.default_rng(0)
    dup, div = [], []
    for g in range(2):
        base = blobs(10 + g, 1, size=64)[0]
        dup += [np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1).astype(np.float32) for _ in range(4)]
        div += blobs(20 + g, 4, size=64)
    write_set(tmp_path / "dup", dup, text=lambda i: {"prompt": f"p{i // 4}"})
    write_set(tmp_path / "div", div, text=lambda i: {"prompt": f"p{i // 4}"})
    a, b = diversity(tmp_path / "dup"), diversity(tmp_path / "div")
    assert a["n_groups"] == b["n_groups"] == 2 and a["n_pairs"] == b["n_pairs"] == 12
    assert a["ms_ssim_mean"] > 0.9 and b["ms_ssim_mean"] < a["ms_ssim_mean"] - 0.1


def test_diversity_groups_from_manifest_jsonl(tmp_path):
    from eval.diversity import main
    folder = write_set(tmp_path / "gen", blobs(1, 6, size=64))
    rows = [{"image": f"img_{i:03d}.png", "prompt": "left effusion" if i < 3 else "normal"} for i in range(6)]
    (folder / "broken.png").write_bytes(b"\x89PNG truncated")
    rows.append({"image": "broken.png", "prompt": "normal"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = main([str(folder), "--out", str(tmp_path / "out")])
    assert r["n_groups"] == 2 and r["n_pairs"] == 6 and r["n_images"] == 6
    assert len(r["skipped"]) == 1 and "broken.png" in r["skipped"][0]
    assert {g["group"] for g in r["groups"]} == {"left effusion", "normal"}
    assert (tmp_path / "out" / "diversity_hist.png").is_file()


@pytest.mark.numerics
def test_memorization_finds_the_copied_training_image(tmp_path):
    from eval.memorization import main
    train_imgs = blobs(30, 12, size=64)
    train = write_set(tmp_path / "train", train_imgs)
    fake = write_set(tmp_path / "fake", blobs(40, 4, size=64) + [train_imgs[7]])
    r = main(["--train", str(train), "--fake", str(fake), "--features", "tiny", "--top-k", "3",
              "--out", str(tmp_path / "out")])
    top = r["pairs"][0]
    assert top["fake"].endswith("img_004.png") and top["train"].endswith("img_007.png")
    assert top["cosine"] == pytest.approx(1.0) and top["ssim"] == pytest.approx(1.0, abs=1e-4)
    assert all(p["ssim"] < 0.99 for p in r["pairs"][1:])
    assert r["n_fake_closer_than_train_p99"] >= 1
    assert (tmp_path / "out" / "memorization_closest_pairs.png").stat().st_size > 1000

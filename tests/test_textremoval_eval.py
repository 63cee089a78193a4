"""textremoval evaluation harness: rendered ground truth, metrics, an end-to-end run on a tiny folder."""
from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest
from conftest import ROOT

from cxrcommon.config import from_dict, load_yaml, to_dict
from textremoval.config import TextRemovalConfig
from textremoval.detect import build_detector
from textremoval.evaluate import EvalConfig, covered, eval_indices, evaluate, ioa, psnr, sample, ssim_map
from textremoval.synth_text import render


def test_yaml_mirrors_the_config_dataclass():
    cfg = from_dict(TextRemovalConfig, load_yaml(ROOT / "configs" / "textremoval.yaml"), "textremoval.yaml")
    assert to_dict(cfg) == to_dict(TextRemovalConfig())


def test_render_keeps_original_and_ground_truth():
    base = np.full((256, 256), 90, np.uint8)
    s = render(base, np.random.default_rng(3), n_items=(3, 3))
    assert np.array_equal(s.original, base) and len(s.boxes) == len(s.texts) >= 1
    assert s.mask.any() and not np.array_equal(s.image[s.mask], base[s.mask])
    outside = np.ones_like(s.mask)
    for x0, y0, x1, y1 in s.boxes:
        assert s.mask[y0:y1, x0:x1].any()
        outside[y0:y1, x0:x1] = False
    assert np.array_equal(s.image[outside], base[outside])   # text only where the boxes say


def test_metrics():
    assert ioa((0, 0, 10, 10), (5, 0, 30, 10)) == 0.5 and ioa((0, 0, 5, 5), (6, 6, 9, 9)) == 0
    assert covered((0, 0, 10, 10), [(0, 0, 5, 10)], (20, 20)) == 0.5
    a = np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)
    assert psnr(a, a) == 99.0 and np.allclose(ssim_map(a, a), 1.0)
    b = np.clip(a.astype(int) + 20, 0, 255).astype(np.uint8)
    assert psnr(a, b) < 30 and ssim_map(a, b).mean() < 1.0


def test_whole_image_boxes_are_dropped():
    det = build_detector(TextRemovalConfig(recognize=False))
    quads = np.array([[[0, 0], [99, 0], [99, 99], [0, 99]], [[10, 10], [40, 10], [40, 20], [10, 20]]], np.float32)
    det.detect_at = lambda gray, size: (quads, [0.9, 0.9])
    regions = det(np.zeros((100, 100), np.uint8))
    assert [r.box for r in regions] == [(10, 10, 41, 21)]


def test_extra_passes_add_only_boxes_the_first_pass_missed():
    det = build_detector(TextRemovalConfig(recognize=False, det_max_side=256, det_extra_sides=[128, 64, 130]))
    assert det.pass_sizes(512, 400) == [(256, 192), (128, 96), (64, 64)]   # multiples of 32, no repeats
    quad = lambda x0, y0, x1, y1: [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]  # noqa: E731
    per_pass = {(256, 192): [quad(10, 10, 100, 40)],
                (128, 96): [quad(12, 8, 104, 42), quad(300, 450, 330, 490)],  # a repeat and a new letter
                (64, 64): [quad(302, 452, 331, 488)]}                          # a repeat of the new letter
    seen = []
    det.detect_at = lambda gray, size: seen.append(size) or (np.float32(per_pass[size]), [0.8] * len(per_pass[size]))
    regions = det(np.zeros((512, 400), np.uint8))
    assert seen == [(256, 192), (128, 96), (64, 64)]
    assert [r.box for r in regions] == [(10, 10, 101, 41), (300, 450, 331, 491)]


@pytest.mark.numerics
def test_evaluate_end_to_end_on_a_tiny_folder(tmp_path):
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        img = cv2.GaussianBlur(rng.integers(40, 120, (320, 320)).astype(np.uint8), (0, 0), 8)
        cv2.imwrite(str(tmp_path / "images" / f"x{i}.png"), img)
        rows.append({"file": f"x{i}.png", "has_burnt_text": "yes" if i else "no"})
    cv2.putText(img, "PORTABLE", (20, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.2, 255, 3)
    cv2.imwrite(str(tmp_path / "images" / "x1.png"), img)
    with open(tmp_path / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["file", "has_burnt_text"])
        w.writeheader()
        w.writerows(rows)
    rep = evaluate(EvalConfig(data=str(tmp_path), n=2, report=str(tmp_path / "r.json")))
    r = rep["rendered"]
    assert r["images"] == 2 and r["gt_items"] >= 2 and r["images_changed_outside_mask"] == 0
    assert r["recall"] > 0.5 and r["psnr_text_regions"] > r["psnr_text_regions_before"]
    assert rep["burnt"]["images"] == 1 and rep["burnt"]["erased_regions"] >= 1
    assert (tmp_path / "r.json").is_file()


def test_dev_split_is_disjoint_from_the_reported_sample():
    report = eval_indices(446, 100, 0)
    assert report == sample(446, 100, 0) and len(set(report)) == 100        # no exclusion: the old sampling
    dev = eval_indices(446, 80, 1, exclude_seed=0)
    assert len(set(dev)) == 80 and not set(dev) & set(report)
    assert dev == eval_indices(446, 80, 1, exclude_seed=0) != eval_indices(446, 80, 2, exclude_seed=0)
    with pytest.raises(ValueError, match="exclude-seed"):
        eval_indices(50, 10, 1, exclude_seed=0)

"""eval.report: one command, one report with every section, CheXGenBench's names and leaderboard, per-label FID
that finds the label whose synthetic images differ, the small-N warnings, each image embedded once per backbone,
a JSON that round-trips, and bad input ending in one line with nothing written."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import needs_torchvision
from test_eval_backbones import save_dino
from test_eval_metrics import blobs

from cxrcommon.imageio import write_png
from eval import features as feats
from eval.report import REFERENCE, main

N = 20  # images per label per set


def labelled_sets(root, n=N, shift=0.35):
    """real/real.csv (labels Edema, Effusion; a report each) and a generated-style fake/ folder whose
    manifest.jsonl gives each image's label and prompt: its Effusion images are brighter, its Edema ones not."""
    (root / "real").mkdir(parents=True)
    (root / "fake").mkdir(parents=True)
    rows, gen = [], []
    real_imgs, fake_imgs = blobs(0, 2 * n), blobs(1, 2 * n)
    for i in range(2 * n):
        label = "Edema" if i < n else "Effusion"
        write_png(root / "real" / f"r{i:03d}.png", real_imgs[i])
        rows.append({"image": f"r{i:03d}.png", "labels": label, "text": f"Report {i}: {label}."})
        fake = np.clip(fake_imgs[i] + (shift if label == "Effusion" else 0.0), 0, 1)
        write_png(root / "fake" / f"g{i:03d}.png", fake)
        gen.append({"file": f"g{i:03d}.png", "label": label, "prompt": f"Report {i}: {label}."})
    with open(root / "real" / "real.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["image", "labels", "text"])
        w.writeheader()
        w.writerows(rows)
    (root / "fake" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    return root / "real" / "real.csv", root / "fake"


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One whole report: tiny + a random-weight RAD-DINO, per label, privacy against the real (= training) set;
    every image each backbone embeds is counted."""
    root = tmp_path_factory.mktemp("report")
    real, fake = labelled_sets(root)
    dino = save_dino(root / "rad-dino")
    embedded: dict[str, int] = {}
    original = feats.Backbone.embed

    def counting(self, images):
        embedded[self.family] = embedded.get(self.family, 0) + len(images)
        return original(self, images)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(feats.Backbone, "embed", counting)
        result = main([str(real), str(fake), "--features", "tiny", "rad-dino", "--rad-dino-weights", str(dino),
                       "--train", str(real), "--by-n-boot", "5", "--device", "cpu",
                       "--cache-dir", str(root / "cache"), "--out", str(root / "out")])
    return result, root / "out", embedded


def test_report_has_every_section_chexgenbench_names_and_the_leaderboard(full):
    result, out, _ = full
    md = (out / "report.md").read_text()
    for head in ("## Distribution metrics (FID, KID, PRDC)", "## CheXGenBench names",
                 "## CheXGenBench leaderboard (FID on RAD-DINO)", "## Per-label metrics (tiny)",
                 "## Per-label metrics (rad-dino)", "## Nearest neighbours", "## Privacy", "## Re-identification"):
        assert head in md, head
    names = result["chexgenbench"]
    assert set(names) == {"FID (RadDino)", "KID (RadDino)", "Precision", "Recall", "Density", "Coverage"}
    assert names["FID (RadDino)"] == result["metrics"]["rad-dino"]["fid"] > 0
    for name in names:
        assert f"| {name} " in md or f" {name} |" in md
    assert "Sana 0.6B" in md and "54.23" in md and "arXiv 2505.10496" in md and "**this run**" in md
    assert result["reference"]["models"] == REFERENCE and result["reference"]["this_run"] == names["FID (RadDino)"]
    for fig in ("prdc", "per_label_fid", "fid_reference", "nearest_neighbour", "suspicious_pairs"):
        assert (out / f"report_{fig}.png").stat().st_size > 1000, fig
    assert not (out / "report_reid.png").exists()  # no re-id scorer given
    flags = list(csv.DictReader(open(out / "flags.csv")))
    assert len(flags) == 2 * N and result["privacy"]["n_fake"] == 2 * N
    assert "re-identification" not in result["privacy"]["method"] and "feature nearest neighbour" in \
        result["privacy"]["method"]


@pytest.mark.numerics
def test_per_label_fid_shows_the_label_whose_synthetic_images_differ(full):
    result, _, _ = full
    for spec in ("tiny", "rad-dino"):
        by = {g["group"]: g for g in result["metrics"][spec]["by"]["label"]}
        assert set(by) == {"Edema", "Effusion"}
        assert (by["Effusion"]["n_real"], by["Effusion"]["n_fake"]) == (N, N)
    tiny = {g["group"]: g for g in result["metrics"]["tiny"]["by"]["label"]}
    assert tiny["Effusion"]["fid"] > 5 * tiny["Edema"]["fid"]
    assert tiny["Effusion"]["kid_mean"] > tiny["Edema"]["kid_mean"]


def test_small_n_warnings_in_the_report(full):
    result, out, _ = full
    md = (out / "report.md").read_text()
    warnings = [line for line in md.splitlines() if line.startswith("> **Warning:**")]
    assert any("N < 2000" in w and "biased upwards" in w for w in warnings)
    assert any("N < 100" in w and "Edema" in w and "Effusion" in w for w in warnings)
    assert all("N < 100" in g["note"] for g in result["metrics"]["tiny"]["by"]["label"])
    assert len(warnings) == len(set(warnings))  # the same warning from two backbones is shown once


def test_each_image_is_embedded_once_per_backbone(full):
    result, _, embedded = full
    # tiny: real + fake once (the nearest-neighbour step reads them back from the cache);
    # rad-dino: real + fake once, and privacy's mirrored synthetic images (new images); the training set is REAL
    assert embedded == {"tiny": 4 * N, "rad-dino": 4 * N + 2 * N}
    assert result["nearest_neighbour"]["backbone"].startswith("rad-dino")
    assert len(result["nearest_neighbour"]["fake_real_cosine"]) == 2 * N


def test_json_round_trips(full):
    result, out, _ = full
    saved = json.loads((out / "report.json").read_text())
    expected = json.loads(json.dumps({k: v for k, v in result.items() if k != "report"}))
    assert saved == expected
    assert saved["metrics"]["rad-dino"]["n_real"] == 2 * N and saved["settings"]["k"] == 5
    assert result["report"]["markdown"].endswith("report.md")


def test_unlabelled_fake_set_still_reports_and_says_why(tmp_path):
    real, fake = labelled_sets(tmp_path, n=4)
    (fake / "manifest.jsonl").unlink()
    r = main([str(real), str(fake), "--features", "tiny", "--by-n-boot", "0", "--cache-dir", str(tmp_path / "c"),
              "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Per-label metrics" in md and "per-label metrics not computed" in md and "manifest.jsonl" in md
    assert "_not run: pass --train TRAIN" in md and "_(needs --rad-dino-weights)_" in md
    assert "by" not in r["metrics"]["tiny"] and r["reference"] is None and r["privacy"] is None
    assert not (tmp_path / "out" / "report_per_label_fid.png").exists()


def _few(folder, n):
    folder.mkdir()
    for i, img in enumerate(blobs(3, n)):
        write_png(folder / f"{i}.png", img)
    return str(folder)


def _bad_argv(case, tmp_path, real, fake):
    """The command line of one bad-input case (and whatever files it needs)."""
    argv = [str(real), str(fake), "--features", "tiny"]
    if case == "few_real":
        return [_few(tmp_path / "few", 5), *argv[1:]]
    if case == "missing_label_column":
        (fake / "manifest.jsonl").write_text("".join(json.dumps({"file": f"g{i:03d}.png"}) + "\n" for i in range(8)))
        return argv + ["--labels", "require"]
    if case == "unknown_by":
        return argv + ["--by", "ethnicity"]
    if case == "wrong_architecture":
        folder = tmp_path / "clip-as-dino"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPModel"]}))
        (folder / "model.safetensors").write_bytes(b"")
        return argv + ["rad-dino", "--rad-dino-weights", str(folder)]
    if case == "weights_without_backbone":
        return argv + ["--rad-dino-weights", str(tmp_path)]
    return argv + ["--train", _few(tmp_path / "few", 3)]  # few_train


@pytest.mark.parametrize("case, expect", [
    ("few_real", "5 image(s), fewer than --k + 1 = 6"),
    ("missing_label_column", "--labels require: --by label: FAKE"),
    ("unknown_by", "--by ethnicity: REAL manifest"),
    ("wrong_architecture", "model_type 'clip'"),
    ("weights_without_backbone", "--rad-dino-weights is given but --features tiny leaves rad-dino out"),
    ("few_train", "3 training image(s), fewer than --k + 1 = 6"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, expect):
    real, fake = labelled_sets(tmp_path, n=4)
    out, cache = tmp_path / "out", tmp_path / "cache"
    with pytest.raises(SystemExit) as exc:
        main(_bad_argv(case, tmp_path, real, fake) + ["--cache-dir", str(cache), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and expect in err, err
    assert not out.exists() and not cache.exists()


@needs_torchvision
def test_reid_scores_get_their_histogram_and_per_prompt_table(tmp_path):
    import torch

    from eval import reid
    real, fake = labelled_sets(tmp_path, n=4)
    torch.manual_seed(0)
    scorer = reid.ReidScorer(reid.SiameseNetwork("resnet18", in_channels=1).eval(), 32, 1, "test", "resnet18")
    weights = reid.save_reid(scorer, tmp_path / "reid.safetensors")
    r = main([str(real), str(fake), "--features", "tiny", "--train", str(real), "--reid-weights", str(weights),
              "--reid-threshold", "0", "--by-n-boot", "0", "--cache-dir", str(tmp_path / "c"),
              "--out", str(tmp_path / "out")])
    priv = r["privacy"]
    assert priv["n_prompts_matched"] == 8 and priv["reid_share_over_threshold"] == 1.0 and r["n_flagged"] == 8
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Re-identification" in md and "Per training prompt (as CheXGenBench)" in md
    assert (tmp_path / "out" / "report_reid.png").stat().st_size > 1000

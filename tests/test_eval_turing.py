"""eval.turing: blinded study building and reader scoring, checked against hand-computed numbers."""
from __future__ import annotations

import csv
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrcommon.imageio import read_png_text, write_png
from cxrcommon.provenance import provenance
from eval.turing import KEY, SHEET, fleiss_kappa, main, rate, score_study


def exact_two_sided(k: int, n: int) -> float:
    """Two-sided binomial p vs 0.5, by hand: the distribution is symmetric, so double the smaller tail."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def test_seed_numbers_147_of_275():
    r = rate(147, 275)
    assert round(100 * r["rate"], 1) == 53.5
    assert r["p_value"] == pytest.approx(0.278, abs=5e-4)
    assert r["p_value"] == pytest.approx(exact_two_sided(147, 275), rel=1e-9)
    assert r["ci_low"] < 0.5 < r["ci_high"]


def test_fleiss_kappa_textbook_example():
    # Fleiss (1971) as reproduced on Wikipedia: 10 subjects, 14 raters, 5 categories -> kappa 0.210.
    table = np.array([[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                      [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]])
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)
    # Two raters, four items [real, synthetic]: P = 0.75, Pe = 34/64 -> kappa = 7/15 (worked by hand).
    assert fleiss_kappa(np.array([[0, 2], [1, 1], [2, 0], [2, 0]])) == pytest.approx(7 / 15)
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa(np.array([[0, 2], [1, 2]]))


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture()
def seed_study(tmp_path):
    """275 synthetic + 25 real images in the key; reader A calls 147 synthetic ones synthetic, 20 real ones real."""
    truth = ["synthetic"] * 275 + ["real"] * 25
    names = [f"case_{i:03d}.png" for i in range(300)]
    write_csv(tmp_path / "study" / KEY, [{"image": n, "truth": t} for n, t in zip(names, truth)], ["image", "truth"])
    a = ["synthetic"] * 147 + ["real"] * 128 + ["real"] * 20 + ["synthetic"] * 5
    b = ["synthetic"] * 275 + ["real"] * 25    # a perfect reader
    fa, fb = (write_csv(tmp_path / f"answers_{r}.csv", [{"image": n, "answer": x} for n, x in zip(names, said)],
                        ["image", "answer"]) for r, said in (("a", a), ("b", b)))
    return tmp_path / "study", fa, fb, a, b


def test_score_per_reader_pooled_and_kappa(seed_study):
    study, fa, fb, a, b = seed_study
    r = score_study(study, [fa, fb])
    ra = r["readers"]["answers_a"]
    assert (ra["sensitivity"]["k"], ra["sensitivity"]["n"]) == (147, 275)
    assert ra["sensitivity"]["p_value"] == pytest.approx(0.278, abs=5e-4)
    assert (ra["specificity"]["k"], ra["specificity"]["n"]) == (20, 25)
    assert ra["specificity"]["p_value"] == pytest.approx(exact_two_sided(20, 25))
    assert (ra["accuracy"]["k"], ra["accuracy"]["n"]) == (167, 300)
    assert ra["accuracy"]["p_value"] == pytest.approx(exact_two_sided(167, 300))
    assert r["readers"]["answers_b"]["accuracy"]["rate"] == 1.0
    assert (r["pooled"]["accuracy"]["k"], r["pooled"]["accuracy"]["n"]) == (467, 600)
    # kappa by hand: 167 items where both agree (P_i = 1), 133 where they split (P_i = 0)
    p_bar = 167 / 300
    n_syn = a.count("synthetic") + b.count("synthetic")
    p_e = (n_syn / 600) ** 2 + (1 - n_syn / 600) ** 2
    assert r["fleiss_kappa"] == pytest.approx((p_bar - p_e) / (1 - p_e))


def test_score_cli_writes_report_and_rejects_bad_rows(seed_study, tmp_path):
    study, fa, fb, *_ = seed_study
    r = main(["score", str(study), str(fa), str(fb)])
    md = Path(r["report"]["markdown"]).read_text()
    assert "answers_a" in md and "53.5% (147/275)" in md and Path(r["report"]["accuracy"]).is_file()
    bad = write_csv(tmp_path / "bad.csv", [{"image": "case_000.png", "answer": "maybe"}], ["image", "answer"])
    with pytest.raises(ValueError, match=r"bad.csv:2: answer 'maybe'"):
        score_study(study, [bad])
    stray = write_csv(tmp_path / "stray.csv", [{"image": "nope.png", "answer": "real"}], ["image", "answer"])
    with pytest.raises(ValueError, match=r"stray.csv:2: image 'nope.png' is not in"):
        score_study(study, [stray])


def png_chunk_types(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    types, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        types.append(kind.decode())
        pos += 12 + length
    return types


def test_build_blinds_and_strips_provenance(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "real").mkdir()
    for i in range(6):  # real images as JPEGs with EXIF and a different size
        img = Image.fromarray((rng.uniform(0, 1, (80, 60)) * 255).astype(np.uint8))
        exif = Image.Exif()
        exif[0x010E] = f"patient {i}"  # ImageDescription
        img.save(tmp_path / "real" / f"real_{i}.jpg", exif=exif)
    for i in range(6):
        write_png(tmp_path / "fake" / f"synthetic_{i}.png", rng.uniform(0, 1, (64, 64)).astype(np.float32),
                  text=provenance(prompt="left effusion", seed=i))
    assert read_png_text(tmp_path / "fake" / "synthetic_0.png")["synthetic"] == "true"
    out = tmp_path / "study"
    r = main(["build", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--n", "5",
              "--size", "32", "--out", str(out)])
    assert (r["n_real"], r["n_synthetic"]) == (5, 5)
    images = sorted((out / "images").iterdir())
    assert [p.name for p in images] == [f"case_{i:02d}.png" for i in range(1, 11)]
    for p in images:
        assert not {"tEXt", "iTXt", "zTXt", "eXIf"} & set(png_chunk_types(p)), p
        assert read_png_text(p) == {}
        assert Image.open(p).size == (32, 32)
    with open(out / KEY) as fh:
        key = list(csv.DictReader(fh))
    truths = [k["truth"] for k in key]
    assert truths != sorted(truths) and truths != sorted(truths, reverse=True)
    assert all(("synthetic_" in k["source"]) == (k["truth"] == "synthetic") for k in key)
    with open(out / SHEET) as fh:
        sheet = list(csv.DictReader(fh))
    assert [s["image"] for s in sheet] == [p.name for p in images] and all(s["answer"] == "" for s in sheet)
    with pytest.raises(SystemExit, match="already holds a study"):
        main(["build", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--out", str(out)])

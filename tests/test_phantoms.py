"""The phantoms package: the generator's findings land where they should and the analytic scorer reads them
back; `python -m phantoms.score` writes those reads as a CSV; the package imports no stage."""
from __future__ import annotations

import ast
import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxrcommon.csv_cells import unescape
from cxrcommon.imageio import read_image, read_png_text
from cxrcommon.manifest import read_manifest
from cxrcommon.tokenizer import clip_tokenizer
from phantoms import calibrate as cal
from phantoms import captions, dataset
from phantoms import generator as ph
from phantoms import score as ps

NONE = {k: 0.0 for k in ph.DEFAULT_PROBS}


@pytest.fixture(scope="module")
def clean() -> ph.PhantomSpec:
    """A phantom with no findings, no devices, no text."""
    return ph.sample_spec(np.random.default_rng(11), finding_probs=NONE)


def _region(img: np.ndarray, spec: ph.PhantomSpec, side: str) -> float:
    """Mean of the lower lateral lung of one patient side (patient's left = image right)."""
    n = img.shape[0]
    s = 1 if side == "left" else -1
    u0, u1 = sorted((spec.cx + s * 0.22, spec.cx + s * 0.32))
    return float(img[int(0.6 * n):int(0.72 * n), int(u0 * n):int(u1 * n)].mean())


def test_render_is_deterministic_by_seed(clean):
    spec = dataclasses.replace(clean, text=(("PORTABLE", 0.05, 0.05, 0.04),))
    a, ma = ph.render(spec, 64)
    b, mb = ph.render(spec, 64)
    c, _ = ph.render(spec, 64, seed=spec.seed + 1)
    assert a.dtype == np.float32 and a.shape == (64, 64) and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert not np.array_equal(a, c)
    s1 = ph.sample_spec(np.random.default_rng(3))
    assert s1 == ph.sample_spec(np.random.default_rng(3)) != ph.sample_spec(np.random.default_rng(4))


def test_looks_like_a_chest(clean):
    img, mask = ph.render(clean, 128)
    n = 128
    lung = img[int(0.35 * n):int(0.5 * n), int((clean.cx + 0.18) * n):int((clean.cx + 0.26) * n)].mean()
    heart = img[int(0.55 * n):int(0.62 * n), int((clean.cx - 0.02) * n):int((clean.cx + 0.08) * n)].mean()
    air = img[int(0.5 * n):, :3].mean()
    assert mask is None
    assert heart > lung + 0.2 and lung > air


@pytest.mark.parametrize("side,bright,dark", [("left", "left", "right"), ("right", "right", "left")])
def test_effusion_brightens_its_own_costophrenic_region(clean, side, bright, dark):
    base = ph.render(clean, 96)[0]
    eff = ph.render(dataclasses.replace(clean, effusion=side, effusion_size="large"), 96)[0]
    assert _region(eff, clean, bright) - _region(base, clean, bright) > 0.15
    assert abs(_region(eff, clean, dark) - _region(base, clean, dark)) < 0.02
    # the patient's left is the image right
    n = eff.shape[1]
    right_half = (eff - base)[:, n // 2:].sum()
    left_half = (eff - base)[:, :n // 2].sum()
    assert (right_half > 5 * left_half) if side == "left" else (left_half > 5 * right_half)


def test_findings_change_the_image_where_they_should(clean):
    n = 96
    base = ph.render(clean, n)[0]

    def diff(**kw):
        return np.abs(ph.render(dataclasses.replace(clean, **kw), n)[0] - base)

    # cardiomegaly widens the heart into the image-right lower lung
    d = diff(ctr=0.66)
    assert d[:, n // 2:].sum() > 2 * d[:, :n // 2].sum() and d.sum() > 20
    # pneumothorax on the right: changes confined to the image-left lung
    d = diff(pneumothorax="right", pneumothorax_size=0.35)
    assert d[:, :n // 2].sum() > 5 * d[:, n // 2:].sum() and d.sum() > 10
    # consolidation in the left upper zone: upper image-right quadrant
    d = diff(consolidation="left_upper")
    assert d[:n // 2, n // 2:].sum() > 3 * (d.sum() - d[:n // 2, n // 2:].sum())
    # a pacemaker is metal: a near-white blob in the image-right upper chest
    img = ph.render(dataclasses.replace(clean, devices=("pacemaker",)), n)[0]
    assert img[:n // 3, n // 2:].max() > 0.95 > base[:n // 3, n // 2:].max()
    # an ET tube is a bright line on the midline in the neck
    d = diff(devices=("et_tube",))
    col = int(clean.cx * n)
    assert d[:int(0.2 * n), col - 2:col + 3].mean() > 0.1


def test_demographic_cues_are_drawn_where_a_radiologist_looks(clean):
    """Breast shadows over the lower zones and upper abdomen (F); with age fainter bones, an unfolding aortic knob
    beside the upper mediastinum on the image right, and over 65 a calcified (denser) rim on it."""
    n = 128

    def img(**kw):
        return ph.render(dataclasses.replace(clean, **kw), n)[0]
    c = int(clean.cx * n)
    male, female = img(sex="M", age=30), img(sex="F", age=30)
    d = female - male
    lower = d[int(0.6 * n):int(0.92 * n)]
    assert lower.mean() > 0.03 and d[:int(0.5 * n)].std() < 1e-6  # nothing changes above the lower zones
    assert lower[:, c - 40:c - 15].mean() > 0.05 and lower[:, c + 15:c + 40].mean() > 0.05  # both sides
    knob = (slice(int(0.2 * n), int(0.36 * n)), slice(c + 8, c + 24))
    young, middle, old = img(sex="M", age=25), img(sex="M", age=50), img(sex="M", age=80)
    assert middle[knob].mean() > young[knob].mean() + 0.05  # the knob unfolds into the upper left lung
    assert old[knob].max() > middle[knob].max() + 0.05  # calcium is denser than the aorta
    clavicle = (slice(int(0.08 * n), int(0.2 * n)), slice(c + 30, c + 45))
    assert young[clavicle].mean() > old[clavicle].mean()  # bones fainter with age
    assert clean.age_level == ph.PhantomSpec(age=clean.age).age_level
    assert [ph.PhantomSpec(age=a).age_level for a in (39, 40, 65, 66)] == [0, 1, 1, 2]


def test_sampler_draws_sex_and_age_and_keeps_the_rest_of_a_seed():
    specs = [ph.sample_spec(np.random.default_rng(i)) for i in range(300)]
    assert {s.sex for s in specs} == {"F", "M"} and 0.4 < np.mean([s.sex == "F" for s in specs]) < 0.6
    ages = [s.age for s in specs]
    assert min(ages) >= ph.AGE_RANGE[0] and max(ages) <= ph.AGE_RANGE[1] and len(set(ages)) > 50
    assert {s.age_level for s in specs} == {0, 1, 2}
    spec = specs[0]
    assert ph.PhantomSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert ph.labels(spec)["sex"] == spec.sex and ph.labels(spec)["age"] == spec.age


def test_text_mask_covers_the_rendered_text(clean):
    spec = dataclasses.replace(clean, text=(("L", 0.85, 0.06, 0.06), ("PORTABLE", 0.03, 0.9, 0.04),
                                            ("03/14/2019", 0.5, 0.04, 0.03)))
    with_text, mask = ph.render(spec, 128)
    without, none = ph.render(clean, 128)
    changed = np.abs(with_text - without) > 0.02
    assert none is None and mask.dtype == bool and changed.sum() > 50
    assert changed[~mask].sum() == 0          # every changed pixel is inside the mask
    assert mask.sum() < 0.06 * mask.size       # and it is text-sized, not a blanket
    rows = np.flatnonzero(mask.any(axis=1))
    assert rows.min() < 0.15 * 128 and rows.max() > 0.85 * 128  # top markers and bottom PORTABLE


def test_sampler_honours_exclude_and_probabilities():
    rng = np.random.default_rng(0)
    specs = [ph.sample_spec(rng, exclude=("pneumothorax",), finding_probs={"effusion": 1.0}) for _ in range(100)]
    assert all(s.pneumothorax == "none" for s in specs)
    assert all(s.effusion in ("left", "right", "bilateral") for s in specs)
    assert {s.effusion for s in specs} == {"left", "right", "bilateral"}
    with pytest.raises(ValueError, match="pneumothroax"):
        ph.sample_spec(rng, exclude=("pneumothroax",))


def test_captions_mention_findings_vary_and_fit_clip(clean):
    rng = np.random.default_rng(0)
    spec = dataclasses.replace(clean, effusion="left", effusion_size="moderate", ctr=0.62)
    caps = {captions.caption(spec, rng) for _ in range(40)}
    assert len(caps) >= 8
    for c in caps:
        low = c.lower()
        assert "left" in low and "effusion" in low and "moderate" in low and "right" not in low
        assert any(w in low for w in ("cardiomegaly", "enlarged"))
    normal = {captions.caption(clean, rng) for _ in range(30)}
    assert len(normal) >= 3 and not any("left" in c.lower() or "right" in c.lower() for c in normal)
    ptx = captions.caption(dataclasses.replace(clean, pneumothorax="right", pneumothorax_size=0.3), rng)
    assert "right" in ptx.lower() and "pneumothorax" in ptx.lower()
    tok = clip_tokenizer()
    longest = max(len(tok(captions.caption(ph.sample_spec(rng), rng)).input_ids) for _ in range(300))
    assert longest <= 77


def test_labels_follow_the_spec(clean):
    lab = ph.labels(clean)
    assert lab["normal"] and not lab["cardiomegaly"] and lab["effusion"] == "none"
    lab = ph.labels(dataclasses.replace(clean, ctr=0.6, devices=("et_tube",), effusion="right",
                                        effusion_size="small"))
    assert lab["cardiomegaly"] and lab["et_tube"] and not lab["pacemaker"] and not lab["normal"]
    assert lab["effusion"] == "right" and lab["effusion_size"] == "small"


@pytest.mark.numerics
@pytest.mark.parametrize("size", [128, 64])
def test_scorer_classifies_effusion_on_held_out_phantoms(size):
    """Thresholds come from seeds >= CALIBRATION_SEED; these phantoms use seeds 0..99."""
    assert ps.CALIBRATION_SEED > 1000
    hits: dict[str, list[bool]] = {}
    for img, side in cal.effusion_set(100, size, seed=0):
        hits.setdefault(side, []).append(ps.classify_effusion(img) == side)
    acc = {k: float(np.mean(v)) for k, v in hits.items()}
    assert set(acc) == {"none", "left", "right", "bilateral"} and all(len(v) == 100 for v in hits.values())
    assert min(acc.values()) >= 0.95, acc  # bilateral too: a two-sided effusion never counts as one side


@pytest.mark.numerics
@pytest.mark.parametrize("size", [128, 64])
def test_scorer_finds_the_pneumothorax_side_on_held_out_phantoms(size):
    hits: dict[str, list[bool]] = {}
    for img, side in cal.pneumothorax_set(100, size, seed=0):
        hits.setdefault(side, []).append(ps.classify_pneumothorax(img) == side)
    acc = {k: float(np.mean(v)) for k, v in hits.items()}
    assert set(acc) == {"none", "left", "right"}
    assert min(acc.values()) >= 0.85, acc
    # an effusion is mostly not read as a pneumothorax (a large one reaches into the upper box: 70/90 at 128)
    eff = [ps.classify_pneumothorax(img) for img, side in cal.effusion_set(30, size, seed=500) if side != "none"]
    assert eff.count("none") >= 0.7 * len(eff)


@pytest.mark.numerics
def test_scorer_reads_sex_and_age_band_on_held_out_phantoms():
    """10 phantoms x 2 sexes x 3 age bands at 64 px, any findings and devices; measured 0.98 to 1.00 per class
    on 60 x 6 (seeds 0..59), so 0.9 leaves room for one bad draw in 20."""
    hits: dict[str, list[bool]] = {}
    for img, sex, band in cal.demographics_set(10, 64, seed=0):
        hits.setdefault(sex, []).append(ps.read_sex(img) == sex)
        hits.setdefault(band, []).append(ps.read_age_band(img) == band)
    acc = {k: float(np.mean(v)) for k, v in hits.items()}
    assert set(acc) == {"F", "M", "<40", "40-65", ">65"} and len(hits["F"]) == 30 and len(hits[">65"]) == 20
    assert min(acc.values()) >= 0.9, acc
    assert ps.prompt_adherence([img for img, _, _ in cal.demographics_set(2, 64, seed=100)],
                               [{"sex": s, "age_band": b} for _, s, b in cal.demographics_set(2, 64, seed=100)],
                               "sex") >= 0.9


@pytest.mark.numerics
def test_scorer_ctr_rises_with_the_cardiomegaly_parameter(clean):
    ctrs = [0.40, 0.48, 0.56, 0.64]
    measured = [np.mean([ps.measure(ph.render(dataclasses.replace(clean, ctr=c), 128, seed=s)[0])["ctr"]
                         for s in range(3)]) for c in ctrs]
    assert all(b > a for a, b in zip(measured, measured[1:])), measured
    assert abs(measured[-1] - 0.64) < 0.08 and abs(measured[1] - 0.48) < 0.08


def test_prompt_adherence_and_input_forms(clean, tmp_path):
    imgs = [ph.render(dataclasses.replace(clean, effusion=s, effusion_size="large"), 128)[0]
            for s in ("left", "right")] + [ph.render(clean, 128)[0]]
    assert ps.prompt_adherence(imgs, ["left", "right", "none"]) == 1.0
    assert ps.prompt_adherence(imgs, [{"effusion": "right"}, {"effusion": "left"}, {"effusion": "none"}]) == \
        pytest.approx(1 / 3)
    # uint8 RGB at another size, and a file path, read the same
    rgb = np.repeat((imgs[0] * 255).astype(np.uint8)[..., None], 3, axis=2)
    assert ps.classify_effusion(rgb) == "left"
    from cxrcommon.imageio import write_png
    path = write_png(tmp_path / "x.png", ph.render(dataclasses.replace(clean, effusion="right",
                                                                        effusion_size="large"), 200)[0])
    assert ps.classify_effusion(path) == "right"
    with pytest.raises(ValueError, match="2 images but 1"):
        ps.prompt_adherence(imgs[:2], ["left"])
    with pytest.raises(ValueError, match="unknown attribute"):
        ps.prompt_adherence(imgs, ["left"] * 3, attribute="nodule")


def test_dataset_writer_is_imagefolder_and_resumes(tmp_path):
    out = tmp_path / "ph"
    meta = dataset.make_dataset(out, 12, size=48, seed=5, exclude=("pneumothorax",), progress=False)
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    assert len(rows) == 12 and all(r["pneumothorax"] == "none" for r in rows)
    assert {"file_name", "text", "patient_id", "effusion", "cardiomegaly"} <= set(rows[0])
    assert len({r["patient_id"] for r in rows}) == 12
    for r in rows:
        img = read_image(out / r["file_name"])
        assert img.shape == (48, 48)
        assert bool(r["text_mask"]) == r["burnt_in_text"]
    tags = read_png_text(out / rows[0]["file_name"])
    assert tags["synthetic"] == "true" and tags["caption"] == rows[0]["text"]
    records = read_manifest(meta)
    assert len(records) == 12 and records[3].text == rows[3]["text"]
    # resume: delete one image, touch nothing else; only that one is redrawn, identically
    victim = out / rows[4]["file_name"]
    before = read_image(victim)
    victim.unlink()
    keep = out / rows[5]["file_name"]
    mtime = keep.stat().st_mtime_ns
    meta2 = dataset.make_dataset(out, 12, size=48, seed=5, exclude=("pneumothorax",), progress=False)
    assert meta2.read_text() == meta.read_text()
    assert np.array_equal(read_image(victim), before) and keep.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="another --out folder"):
        dataset.make_dataset(out, 12, size=64, seed=5, progress=False)


# ----------------------------------------------------------------------------- the package sits below the stages

STAGES = {"finetune", "inference", "eval", "textremoval", "app", "bench"}
PACKAGE = Path(ph.__file__).resolve().parent


def _stage_imports(source: str) -> list[str]:
    """Every import in `source` that reaches a stage (or, relatively, out of the package), lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in STAGES]
        elif isinstance(node, ast.ImportFrom):
            if node.level >= 2 or (node.level == 0 and (node.module or "").split(".")[0] in STAGES):
                found.append("." * node.level + (node.module or ""))
    return found


def test_phantoms_imports_no_stage():
    """architecture.md: phantoms/ is below finetune, inference, eval and textremoval; they import it, never
    the other way round."""
    assert sorted(_stage_imports("def f():\n    from eval import fid\nimport finetune.train\nfrom ..eval import x\n"
                          "from .score import measure\nimport cxrcommon.imageio\n")) == \
        ["..eval", "eval", "finetune.train"]  # the check itself sees lazy, dotted and relative imports
    modules = sorted(PACKAGE.glob("*.py"))
    assert {"generator.py", "score.py", "recipe.py"} <= {m.name for m in modules}
    bad = {m.name: hits for m in modules if (hits := _stage_imports(m.read_text(encoding="utf-8")))}
    assert not bad, f"phantoms/ must import only cxrcommon and third-party packages: {bad}"


# ----------------------------------------------------------------------------- python -m phantoms.score DIR

def _write_phantoms(folder: Path, clean: ph.PhantomSpec) -> dict[str, list[str]]:
    """Large effusions of known side (and none), each of a known sex and age, as PNGs, one in a subfolder, one
    with a formula-like name; returns file -> [effusion side, sex, age band]."""
    from cxrcommon.imageio import write_png
    expected = {"left.png": ["left", "F", ">65"], "sub/right.png": ["right", "M", "<40"],
                "none.png": ["none", "F", "40-65"], "=HYPERLINK(1).png": ["bilateral", "M", ">65"]}
    for (name, (side, sex, band)), age in zip(expected.items(), (80, 25, 52, 71)):
        spec = dataclasses.replace(clean, sex=sex, age=age)
        if side != "none":
            spec = dataclasses.replace(spec, effusion=side, effusion_size="large")
        write_png(folder / name, ph.render(spec, 128)[0])
    (folder / "notes.txt").write_text("not an image")
    return expected


def test_score_cli_writes_what_it_reads(clean, tmp_path, capsys):
    expected = _write_phantoms(tmp_path / "imgs", clean)
    out = ps.main([str(tmp_path / "imgs"), "--out", str(tmp_path / "reads.csv")])
    assert out == tmp_path / "reads.csv" and "4 images" in capsys.readouterr().out
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["file", "effusion_side", "sex", "age_band"]
    got = {unescape(r[0]): r[1:] for r in rows[1:]}
    assert got == expected
    assert "'=HYPERLINK(1).png" in {r[0] for r in rows}  # the file cell is text, never a formula
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_score_cli_bad_input_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "reads.csv"
    with pytest.raises(SystemExit, match="no such folder"):
        ps.main([str(tmp_path / "missing"), "--out", str(out)])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(SystemExit, match="no images"):
        ps.main([str(tmp_path / "empty"), "--out", str(out)])
    from cxrcommon.imageio import write_png
    write_png(tmp_path / "tiny" / "ok.png", np.zeros((32, 32), np.float32))
    write_png(tmp_path / "tiny" / "small.png", np.zeros((8, 8), np.float32))
    with pytest.raises(SystemExit, match=r"small\.png: expected .* at least 16x16"):
        ps.main([str(tmp_path / "tiny"), "--out", str(out)])
    assert not out.exists()
    run = subprocess.run([sys.executable, "-m", "phantoms.score", str(tmp_path / "missing"), "--out", str(out)],
                         capture_output=True, text=True, cwd=PACKAGE.parent, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "no such folder" in run.stderr
    assert not out.exists()


def test_calibrate_cli_prints_thresholds_in_its_grid(capsys):
    t = cal.main(["--n", "3", "--size", "64"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["effusion"] == t.effusion and 0.02 <= t.effusion <= 0.5 and 0 <= t.pneumothorax <= 0.03
    assert -0.1 <= t.breast <= 0.1 and 0.05 <= t.knob <= 0.25 and 0 <= t.calcification <= 0.6

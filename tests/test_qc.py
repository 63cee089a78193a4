"""The quality check that regenerates (#21 item 3): the rules, the retry loop, the QC folder's weight formats, and
classifiers trained on a real manifest."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from cxrcommon.demographics import Demographics
from cxrcommon.imageio import write_png
from cxrcommon.optional import available
from eval.demographic_models import (
    Classifier,
    DemographicModels,
    Prediction,
    TrainConfig,
    load_models,
    train_models,
)
from eval.features import WeightsMismatchError, WeightsMissingError
from inference.qc import QCStats, check_and_regenerate, finished, judge, retry_seed

needs_torchvision = pytest.mark.skipif(not available("torchvision"), reason="torchvision: full torch route only")


# ---------------------------------------------------------------- rules and seeds

def test_rules_sex_age_race_as_roentgen():
    asked = Demographics("F", 50, "BLACK")
    races = ("ASIAN", "BLACK", "WHITE")
    assert judge(asked, Prediction("F", 50.0, "40-65", "BLACK"), races).passed
    assert judge(asked, Prediction("M", 50.0, "40-65", "BLACK"), races).failed == ("sex",)
    assert judge(asked, Prediction("F", None, "<40", "BLACK"), races).failed == ("age",)  # band model: band decides
    assert judge(asked, Prediction("F", 66.0, ">65", "BLACK"), races).passed           # 16 years off: passes
    assert judge(asked, Prediction("F", 67.0, ">65", "BLACK"), races).failed == ("age",)  # 17 off, other band
    assert judge(Demographics("F", 41), Prediction("F", 64.0, "40-65")).passed           # same band, 23 off
    assert judge(asked, Prediction("F", 50.0, "40-65", "WHITE"), races).failed == ("race",)
    hispanic = judge(Demographics(race="HISPANIC/LATINO"), Prediction(race="WHITE"), races)
    assert hispanic.passed and hispanic.checked == ()     # a group the race model cannot tell is not checked
    assert judge(Demographics(), Prediction("M", 80.0, ">65", "ASIAN"), races).checked == ()  # nothing asked


def test_retry_seeds_are_the_job_seed_first_then_fixed_and_distinct():
    assert retry_seed(123, 0) == 123
    seeds = [retry_seed(123, t) for t in range(5)]
    assert len(set(seeds)) == 5 and seeds == [retry_seed(123, t) for t in range(5)]
    assert retry_seed(124, 1) != retry_seed(123, 1)


def test_finished_rows_under_more_tries():
    assert finished({"qc_pass": True, "qc_tries": 1}, 3)
    assert finished({"qc_pass": False, "qc_tries": 3}, 3)
    assert not finished({"qc_pass": False, "qc_tries": 3}, 5)   # more tries now: make it again from try 3
    assert not finished({}, 3)                                  # a row made without QC


# ---------------------------------------------------------------- the loop

class _Brightness(nn.Module):
    """Scores (M, F) from an image's mean: bright reads female."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], 1)


def _sex_models() -> DemographicModels:
    clf = Classifier("sex", "toy", "0" * 64, 8, ("M", "F"), lambda x: x, _Brightness())
    return DemographicModels(folder=None, models={"sex": clf})  # type: ignore[arg-type]


def test_failures_are_made_again_with_new_tries_until_they_pass_or_run_out():
    # item a passes at once, b at its third try, c never (asked F, always dark)
    when_bright = {"a": 0, "b": 2, "c": 99}
    calls = []

    def make(items, tries):
        calls.append(list(zip(items, tries)))
        return [np.full((16, 16), 0.9 if t >= when_bright[i] else 0.1, np.float32) for i, t in zip(items, tries)]

    got = check_and_regenerate(["a", "b", "c"], [Demographics("F")] * 3, make, _sex_models(), tries=3)
    assert calls == [[("a", 0), ("b", 0), ("c", 0)], [("b", 1), ("c", 1)], [("b", 2), ("c", 2)]]
    assert [(g.item, g.tries, g.verdict.passed, g.prediction.sex) for g in got] == [
        ("a", 1, True, "F"), ("b", 3, True, "F"), ("c", 3, False, "M")]
    row = got[2].row(seed=7)
    assert row["qc_pass"] is False and row["qc_failed"] == ["sex"] and row["qc_tries"] == 3
    assert row["qc_seed"] == retry_seed(7, 2) and row["qc_sex"] == "M"
    # a resumed run starts where the earlier one stopped, and stops at the same last try
    calls.clear()
    again = check_and_regenerate(["c"], [Demographics("F")], make, _sex_models(), tries=5, first=[3])
    assert calls == [[("c", 3)], [("c", 4)]] and again[0].tries == 5


def test_failure_rate_per_subgroup_is_logged(caplog):
    stats = QCStats()

    def make(items, tries):
        return [np.full((8, 8), 0.9 if (i == "m" or t > 0) else 0.1, np.float32) for i, t in zip(items, tries)]

    for checked in check_and_regenerate(["f", "m"], [Demographics("F", 30), Demographics("M", 70)], make,
                                        _sex_models(), tries=2):
        stats.add(checked)
    with caplog.at_level("INFO", logger="inference.qc"):
        stats.log(tries=2)
    text = caplog.text
    assert "2 image(s) checked; 2 failed their first try, 1 still failed after 2 tries" in text
    assert "sex F: 100.0% at the first try, 0.0% after 2 tries (1 image(s))" in text
    assert "sex M: 100.0% at the first try, 100.0% after 2 tries (1 image(s))" in text
    assert "age <40: 100.0%" in text and "age >65" in text


# ---------------------------------------------------------------- the QC folder's formats

def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_missing_or_empty_qc_folder_is_named(tmp_path):
    with pytest.raises(WeightsMissingError, match="does not exist"):
        load_models(tmp_path / "nope")
    with pytest.raises(WeightsMissingError, match="no classifier there"):
        load_models(tmp_path)


@needs_torchvision
def test_weights_of_another_architecture_are_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet18
    save_file({k: v.contiguous() for k, v in resnet18(num_classes=3).state_dict().items()},
              str(tmp_path / "race-emory.safetensors"))
    with pytest.raises(WeightsMismatchError) as exc:
        load_models(tmp_path)
    assert "emory_hiti RaceModel" in _one_line(exc) and "race-emory.safetensors" in str(exc.value)


def test_a_pickled_object_is_not_loaded(tmp_path):
    torch.save({"model": [1, 2, 3], "note": object.__new__(Prediction)}, tmp_path / "sex-chexpert.pt")
    with pytest.raises(WeightsMismatchError) as exc:
        load_models(tmp_path)
    assert "not a plain state dict" in _one_line(exc) and "save_file" in str(exc.value)


def test_a_json_of_another_kind_is_refused(tmp_path):
    (tmp_path / "sex.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(WeightsMismatchError) as exc:
        load_models(tmp_path)
    assert "eval.demographic_models train" in _one_line(exc)


@needs_torchvision
def test_anchor_formats_load_with_their_wrappers_and_classes(tmp_path):
    from torchvision.models import densenet121, resnet34
    race = resnet34()
    race.fc = nn.Sequential(nn.Linear(512, 3), nn.LogSoftmax(dim=1))
    torch.save({f"module.{k}": v for k, v in race.state_dict().items()}, tmp_path / "race-emory.pt")  # DataParallel
    from safetensors.torch import save_file
    save_file({f"model.{k}": v.contiguous() for k, v in densenet121(num_classes=2).state_dict().items()},
              str(tmp_path / "sex-chexpert.safetensors"))                                          # Lightning

    class Years(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :1, 0, 0] * 0 + 70.0
    torch.jit.script(Years()).save(str(tmp_path / "age-riken.pt"))
    models = load_models(tmp_path)
    assert models.race_classes() == ("ASIAN", "BLACK", "WHITE")
    preds = models.predict([np.random.default_rng(0).random((40, 48), dtype=np.float32)])
    assert preds[0].age == 70.0 and preds[0].age_band == ">65" and preds[0].sex in ("M", "F")
    assert preds[0].race in ("ASIAN", "BLACK", "WHITE")
    assert set(models.identity()) == {"age", "race", "sex"}


# ---------------------------------------------------------------- trained on a real manifest

def _film(female: bool, black: bool, rng: np.random.Generator, side: int = 32) -> np.ndarray:
    """Noise with the planted cues: a bright block top-left for F (bottom-right for M), a dark stripe for BLACK."""
    img = rng.random((side, side), dtype=np.float32) * 0.4 + 0.2
    q = side // 4
    if female:
        img[2:2 + q, 2:2 + q] = 1.0
    else:
        img[-2 - q:-2, -2 - q:-2] = 1.0
    if black:
        img[:, side // 2 - 2:side // 2 + 2] = 0.0
    return img


def _manifest(folder, n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    with open(folder / "real.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "patient", "sex", "age", "race"])
        for i in range(n):
            female, black = bool(i % 2), bool((i // 2) % 2)
            write_png(folder / f"{i}.png", _film(female, black, rng))
            w.writerow([f"{i}.png", f"p{i}", "F" if female else "M", 30 + i, "Black" if black else "White"])
    return str(folder / "real.csv")


@pytest.mark.numerics
@needs_torchvision
def test_classifiers_trained_on_a_manifest_learn_the_planted_cues(tmp_path):
    manifest = _manifest(tmp_path, 48, seed=0)
    out = tmp_path / "qc"
    results = train_models(TrainConfig(manifest=manifest, out=str(out), tasks=["sex", "race"], size=32, epochs=6,
                                       batch_size=8, lr=3e-3, device="cpu"))
    assert results["sex"]["classes"] == ["F", "M"] and results["race"]["classes"] == ["BLACK", "WHITE"]
    meta = json.loads((out / "sex.json").read_text())
    assert meta["size"] == 32 and meta["n_val"] + meta["n_train"] == 48
    models = load_models(out)
    rng = np.random.default_rng(1)   # fresh films, never seen in training
    truth = [(bool(i % 2), bool(i % 3 == 0)) for i in range(40)]
    preds = models.predict([_film(f, b, rng) for f, b in truth])
    sex_acc = np.mean([p.sex == ("F" if f else "M") for p, (f, _) in zip(preds, truth)])
    race_acc = np.mean([p.race == ("BLACK" if b else "WHITE") for p, (_, b) in zip(preds, truth)])
    assert sex_acc >= 0.9 and race_acc >= 0.9, (sex_acc, race_acc)   # chance is 0.5


def test_training_refuses_a_manifest_without_the_column(tmp_path):
    (tmp_path / "real.csv").write_text("image,sex\na.png,F\n")
    with pytest.raises(Exception) as exc:
        train_models(TrainConfig(manifest=str(tmp_path / "real.csv"), out=str(tmp_path / "qc"), tasks=["race"]))
    assert "--race-column 'race'" in str(exc.value) and not (tmp_path / "qc").exists()


# ---------------------------------------------------------------- inside inference.generate (the tiny pipeline)

class _PixelAge(nn.Module):
    """A stand-in for the riken age model (TorchScript, years): one pixel's value, hashed into 0-100 years, so
    whether an image passes looks random across seeds but is fixed for each image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :1, 160, 160] * 1000.0).remainder(100.0)


@pytest.fixture()
def qc_cfg(tmp_path, tiny_model_dir):
    from inference.config import GenerateConfig
    models = tmp_path / "qc_models"
    models.mkdir()
    torch.jit.script(_PixelAge()).save(str(models / "age-riken.pt"))
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,n,sex,age,race\nClear lungs.,4,F,50,\nSmall left effusion.,4,M,50,WHITE\n")
    return GenerateConfig(prompts=str(prompts), out=str(tmp_path / "out"), model=str(tiny_model_dir), steps=2,
                          height=32, width=32, seed=5, guidance=2.0, batch_size=3, demographics_template="roentgen",
                          qc=str(models), qc_tries=3)


def _rows(out) -> dict[str, dict]:
    from cxrcommon.atomic import read_jsonl
    return {r["key"]: r for r in read_jsonl(out / "manifest.jsonl")}


def _pixels(out, rows) -> dict[str, np.ndarray]:
    from cxrcommon.imageio import read_image
    return {k: read_image(out / k) for k in rows}


QC_COLUMNS = ("qc_pass", "qc_tries", "qc_seed", "qc_failed", "qc_age", "qc_age_band")


def test_generate_regenerates_failures_and_records_the_check(qc_cfg, tmp_path, caplog):
    import dataclasses

    from cxrcommon.imageio import read_png_text
    from inference.generate import generate
    with caplog.at_level("INFO", logger="inference.qc"):
        s = generate(qc_cfg)
    rows = _rows(s.out)
    assert s.generated == len(rows) == 8
    for key, r in rows.items():
        assert r["qc_checked"] == ["age"] and r["age"] == 50
        assert 1 <= r["qc_tries"] <= 3 and r["qc_pass"] == (r["qc_failed"] == [])
        assert r["qc_pass"] == (abs(r["qc_age"] - 50) <= 16 or r["qc_age_band"] == "40-65")
        assert r["qc_pass"] or r["qc_tries"] == 3                    # a failure used every try
        assert (r["qc_seed"] == r["seed"]) == (r["qc_tries"] == 1)   # try 0 is the job's own seed
        assert read_png_text(s.out / key)["qc_seed"] == str(r["qc_seed"])
    tries = [r["qc_tries"] for r in rows.values()]
    assert min(tries) == 1 and max(tries) > 1, tries                  # the toy check passes some, fails some
    # an image that passed at once is the very image a run without --qc makes; a regenerated one is not
    plain = generate(dataclasses.replace(qc_cfg, qc=None, out=str(tmp_path / "plain")))
    ref = _pixels(plain.out, rows)
    got = _pixels(s.out, rows)
    assert all(np.array_equal(got[k], ref[k]) == (rows[k]["qc_tries"] == 1) for k in rows)
    assert "QC failure rate, sex F:" in caplog.text and "QC failure rate, age 40-65:" in caplog.text
    assert "race WHITE" in caplog.text and "8 image(s) checked" in caplog.text


def test_qc_resumes_like_the_rest_and_more_tries_retry_only_failures(qc_cfg, tmp_path, monkeypatch):
    import dataclasses

    import inference.generate
    from inference.generate import generate
    ref = generate(dataclasses.replace(qc_cfg, out=str(tmp_path / "ref"))).out
    seen = []

    def crash(path):
        seen.append(path)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(qc_cfg, on_image=crash)
    resumed = generate(qc_cfg)
    assert resumed.skipped == 3 and resumed.generated == 5
    strip = ("created",)
    a, b = _rows(ref), _rows(resumed.out)
    assert {k: {c: v for c, v in r.items() if c not in strip} for k, r in a.items()} == \
           {k: {c: v for c, v in r.items() if c not in strip} for k, r in b.items()}
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(ref, a).values(), _pixels(resumed.out, a).values()))
    # more tries: only the failures are made again, from where they stopped, as one run with 5 tries would
    failed = [k for k, r in a.items() if not r["qc_pass"]]
    before = {k: (resumed.out / k).stat().st_mtime_ns for k in a}
    made_tries = []

    def spy(seed, attempt):
        made_tries.append(attempt)
        return retry_seed(seed, attempt)
    monkeypatch.setattr(inference.generate, "retry_seed", spy)
    more = generate(dataclasses.replace(qc_cfg, qc_tries=5))
    monkeypatch.undo()
    assert made_tries and min(made_tries) == 3      # tries 0-2 were spent by the earlier run
    assert more.generated == len(failed) and more.skipped == 8 - len(failed)
    assert all((resumed.out / k).stat().st_mtime_ns == before[k] for k in a if k not in failed)
    direct = generate(dataclasses.replace(qc_cfg, qc_tries=5, out=str(tmp_path / "five"))).out
    c, d = _rows(resumed.out), _rows(direct)
    assert {k: (r["qc_tries"], r["qc_seed"], r["qc_pass"]) for k, r in c.items()} == \
           {k: (r["qc_tries"], r["qc_seed"], r["qc_pass"]) for k, r in d.items()}


def test_qc_weights_in_a_wrong_format_stop_the_job_in_one_line_before_anything_is_written(qc_cfg, tmp_path):
    import dataclasses

    from cxrcommon.errors import UserError
    from inference.generate import generate
    bad = tmp_path / "bad_qc"
    bad.mkdir()
    (bad / "race-emory.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(UserError) as exc:
        generate(dataclasses.replace(qc_cfg, qc=str(bad)))
    assert "race-emory.safetensors" in _one_line(exc) and not (tmp_path / "out").exists()

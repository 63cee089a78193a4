"""Generation asks for patients (issue #21): prompt-file sex/age/race captioned in the model card's form, bad
values and unknown forms refused before a model loads, joint sex x age band x race balancing, and manifest rows
that record the patient asked for."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import yaml

from cxrcommon.atomic import read_jsonl
from cxrcommon.demographics import CARD_KEY, Demographics, age_band
from cxrcommon.errors import UserError
from cxrcommon.imageio import read_png_text
from inference.balance import balance_prompts, requested_ages
from inference.captions import caption, caption_form
from inference.config import GenerateConfig
from inference.generate import MANIFEST, generate
from inference.prompts import PromptFileError, PromptRow, read_prompts
from inference.targets import apportion

REPORT = "Moderate left pleural effusion."


def card(folder: Path, form: str) -> Path:
    """A model card as finetune.card writes its front matter."""
    folder.mkdir(parents=True, exist_ok=True)
    front = yaml.safe_dump({"base_model": "x", CARD_KEY: {"demographics_template": form}})
    (folder / "README.md").write_text(f"---\n{front}---\n# card\n", encoding="utf-8")
    return folder


@pytest.fixture()
def carded_model(tiny_model_dir, tmp_path):
    """The tiny model in a folder of its own (files linked, not copied), so a test may give it a card."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder, copy_function=os.symlink)
    return folder


@pytest.fixture()
def no_model_load(monkeypatch):
    """Any model load fails the test: bad input must be refused before one."""
    from inference.sampler import CXRSampler

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(CXRSampler, "load", refuse)


def prompts_csv(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "p.csv"
    p.write_text("prompt,sex,age,race\n" + body, encoding="utf-8")
    return p


def cfg_for(tmp_path: Path, model: Path, prompts: Path | None = None, **kw) -> GenerateConfig:
    return GenerateConfig(prompts=str(prompts) if prompts else None, out=str(tmp_path / "out"), model=str(model),
                          steps=2, height=32, width=32, seed=3, guidance=2.0, **kw)


# ---------------------------------------------------------------- prompt files and captions

def test_prompt_columns_are_read_strictly_and_every_bad_value_is_named(tmp_path):
    rows = read_prompts(prompts_csv(tmp_path, f'"{REPORT}",female,71,White\nClear.,,,\nClear.,M,054Y,\n'))
    assert [r.demographics for r in rows] == [Demographics("F", 71, "WHITE"), Demographics(),
                                              Demographics("M", 54, "")]
    bad = prompts_csv(tmp_path, "A.,F,-3,\nB.,F,250,\nC.,X,40,\nD.,M,40,martian\nE.,M,40,ASIAN\n")
    with pytest.raises(PromptFileError) as err:
        read_prompts(bad)
    problems = err.value.problems
    assert [p.split(": ", 1)[0] for p in problems] == [f"{bad}:{i}" for i in (2, 3, 4, 5)]
    assert "age '-3'" in problems[0] and "age '250'" in problems[1] and "sex 'X'" in problems[2]
    assert "race 'martian'" in problems[3] and all(p.count(" — ") == 1 for p in problems)


def test_the_caption_puts_the_patient_first_in_the_cards_form_and_keeps_it_through_a_cut(tmp_path):
    d = Demographics("F", 71, "WHITE")
    assert caption(REPORT, d, "roentgen") == f"71 year old WHITE female. {REPORT}"
    assert caption(REPORT, d, "chexgen") == f"sex:Female, age:71.0, race:White. {REPORT}"
    assert caption(REPORT, Demographics(), "roentgen") == REPORT
    roentgen, chexgen = card(tmp_path / "r", "roentgen"), card(tmp_path / "c", "chexgen")
    assert caption_form("auto", [tmp_path / "nothing", chexgen], asked_for=1) == "chexgen"
    assert caption_form("auto", [roentgen, chexgen], asked_for=1) == "roentgen"    # the LoRA's card comes first
    assert caption_form("roentgen", [chexgen], asked_for=1) == "roentgen"
    assert caption_form("none", [chexgen], asked_for=1) is None
    assert caption_form("auto", [tmp_path / "nothing"], asked_for=0) is None
    with pytest.raises(UserError, match=r"p\.csv: 2 prompt\(s\) ask .* no model card \(nothing\) names a "
                                        r"demographics template.*--demographics-template roentgen"):
        caption_form("auto", [tmp_path / "nothing"], asked_for=2, where="p.csv")
    # a report past the window cap is cut behind the prefix, impression first, as training cut captions
    from cxrcommon.tokenizer import clip_tokenizer
    from inference.prompts import PromptFits
    long = "FINDINGS: " + " ".join(f"Finding number {i} is stable." for i in range(60)) + " IMPRESSION: Effusion."
    fits = PromptFits([PromptRow(long, 1, 1, demographics=d)], clip_tokenizer(), policy="sentence", max_windows=1,
                      source="p.csv", form="roentgen")
    fit = fits[1][1]
    assert fit.cut and fit.text.startswith("71 year old WHITE female. IMPRESSION: Effusion. FINDINGS:")


def test_bad_rows_and_an_unknown_form_are_refused_before_a_model_loads(tmp_path, no_model_load, tiny_model_dir):
    out = tmp_path / "out"
    bad = prompts_csv(tmp_path, "A.,F,250,\n")
    with pytest.raises(PromptFileError, match=r"p\.csv:2: age '250'"):
        generate(cfg_for(tmp_path, tiny_model_dir, bad))
    good = prompts_csv(tmp_path, "A.,F,40,\n")
    # the tiny model has no card: it was not trained with demographics
    with pytest.raises(UserError, match=r"p\.csv: 1 prompt\(s\) ask for .*--demographics-template"):
        generate(cfg_for(tmp_path, tiny_model_dir, good))
    with pytest.raises(UserError, match="--demographics-template 'roentgn' is not one of"):
        generate(cfg_for(tmp_path, tiny_model_dir, good, demographics_template="roentgn"))
    assert not out.exists()


def test_manifest_rows_and_tags_record_the_patient_in_the_cards_form(tmp_path, carded_model):
    card(carded_model, "chexgen")
    p = prompts_csv(tmp_path, f'"{REPORT}",F,71,white\n"{REPORT}",,,\n')
    s = generate(cfg_for(tmp_path, carded_model, p))
    rows = sorted(read_jsonl(s.out / MANIFEST), key=lambda r: r["prompt_index"])
    assert [r["prompt"] for r in rows] == [f"sex:Female, age:71.0, race:White. {REPORT}", REPORT]
    assert [(r["sex"], r["age"], r["race"], r["demographics_template"]) for r in rows] == [
        ("F", 71, "WHITE", "chexgen"), (None, None, None, None)]
    assert rows[0]["prompt_original"] == REPORT and "prompt_truncated" not in rows[0]
    tags = read_png_text(s.out / rows[0]["key"])
    assert (tags["sex"], tags["age"], tags["race"], tags["demographics_template"]) == ("F", "71", "WHITE", "chexgen")
    assert tags["prompt"] == rows[0]["prompt"] and "sex" not in read_png_text(s.out / rows[1]["key"])
    # another patient for the same report is another image; the first is not reused for it
    p.write_text(f'prompt,sex,age,race\n"{REPORT}",F,72,white\n"{REPORT}",,,\n', encoding="utf-8")
    again = generate(cfg_for(tmp_path, carded_model, p))
    assert (again.generated, again.skipped) == (1, 1)
    ages = {r["age"] for r in read_jsonl(s.out / MANIFEST) if r["prompt_index"] == 2}
    assert ages == {71, 72}
    assert any(r["prompt"].startswith("sex:Female, age:72.0") for r in read_jsonl(s.out / MANIFEST))


def test_an_override_writes_the_form_asked_and_none_leaves_the_patient_out(tmp_path, tiny_model_dir):
    p = prompts_csv(tmp_path, f'"{REPORT}",M,95,\n')
    s = generate(cfg_for(tmp_path, tiny_model_dir, p, demographics_template="roentgen"))
    [row] = read_jsonl(s.out / MANIFEST)
    assert row["prompt"] == f"90+ year old male. {REPORT}" and row["age"] == 95
    s = generate(dataclasses.replace(cfg_for(tmp_path, tiny_model_dir, p, demographics_template="none"),
                                     out=str(tmp_path / "none")))
    [row] = read_jsonl(s.out / MANIFEST)
    assert row["prompt"] == REPORT and row["sex"] is None and row["demographics_template"] is None


# ---------------------------------------------------------------- joint balancing

MANIFEST_CSV = """image,report,labels,sex,age,race
a.png,FINDINGS: Clear A.,No Finding,M,30,WHITE
b.png,FINDINGS: Clear B.,No Finding,M,35,WHITE
c.png,FINDINGS: Clear C.,No Finding,M,70,WHITE
d.png,FINDINGS: Clear D.,No Finding,F,50,BLACK
e.png,FINDINGS: Effusion E.,Pleural Effusion,F,80,
f.png,FINDINGS: Heart F.,Cardiomegaly,M,45,WHITE
"""


def planned(rows: list[PromptRow], *, label: bool = False) -> dict:
    out: dict = {}
    for r in rows:
        d = r.demographics
        key = (r.label,) * label + (d.sex, age_band(d.age), d.race)
        out[key] = out.get(key, 0) + r.n
    return out


def test_uniform_balance_fills_each_cells_gap_exactly(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text(MANIFEST_CSV)
    rows = balance_prompts(m, "", mix="uniform")
    # 2 sexes x 3 bands x 2 races present = 12 cells; the fullest (M, <40, WHITE: 2 images) sets 2 per cell;
    # e.png (no race) is not counted
    counts = planned(rows)
    assert len(counts) == 11 and ("M", "<40", "WHITE") not in counts
    assert counts[("F", "40-65", "BLACK")] == counts[("M", "40-65", "WHITE")] == counts[("M", ">65", "WHITE")] == 1
    assert sum(counts.values()) == 12 * 2 - 5
    # ages: quantiles of the real ages in the band, all patients pooled; reports: same sex first
    assert {r.demographics.age for r in rows if r.demographics.sex == "F" and r.demographics.race == "WHITE"} == \
        {30, 35, 45, 50, 70, 80}
    assert {r.prompt for r in rows if r.demographics.sex == "F"} <= {"Clear D.", "Effusion E."}
    assert all(r.seed is None for r in rows)
    # a total: the real images of a cell already over its share get none, the others fill up to it
    assert sum(planned(balance_prompts(m, "", mix="uniform", target=48)).values()) == 12 * 4 - 5


def test_explicit_shares_and_classes_balance_each_class_alike(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text(MANIFEST_CSV)
    shares = tmp_path / "target.csv"
    shares.write_text("sex,share\nF,0.75\nM,0.25\n")
    rows = balance_prompts(m, "label", mix=str(shares))   # 'labels' of the prepared manifest found by itself
    # No Finding: 3 M, 1 F -> a total of 12 (3 M = 25%): 9 F + 0 M; Cardiomegaly: 1 M -> 4: 3 F; Effusion 1 F;
    # every class ends at 12 (the largest class's smallest total)
    assert planned(rows, label=True) == {("No Finding", "F", "unknown", ""): 8, ("Cardiomegaly", "F", "unknown", ""): 9,
                                         ("Cardiomegaly", "M", "unknown", ""): 2,
                                         ("Pleural Effusion", "F", "unknown", ""): 8,
                                         ("Pleural Effusion", "M", "unknown", ""): 3}
    assert {r.prompt for r in rows if r.label == "Cardiomegaly"} == {"Heart F."}


@pytest.mark.parametrize("text, match", [
    ("sex,share\nF,0.5\nM,0.4\n", r"target\.csv: the shares sum to 0\.9, not 1"),
    ("sex,age_band,share\nF,<40,0.5\nF,young,0.5\n", r"target\.csv:3: age_band 'young' is not one of"),
    ("sex,share\nF,0.5\nF,0.5\n", r"target\.csv:3: cell F is given twice"),
    ("race,share\nWHITE,1\n", "splits by race, but .*m.csv records none"),
    ("gender,share\nF,1\n", "needs a 'share' column and at least one of"),
])
def test_a_bad_target_is_one_line_and_nothing_is_written(tmp_path, text, match, no_model_load, tiny_model_dir):
    m = tmp_path / "m.csv"
    m.write_text(MANIFEST_CSV.replace(",WHITE\n", ",\n").replace(",BLACK\n", ",\n"))
    (tmp_path / "target.csv").write_text(text)
    with pytest.raises(UserError, match=match) as err:
        generate(cfg_for(tmp_path, tiny_model_dir, balance=str(m), balance_target=str(tmp_path / "target.csv"),
                         demographics_template="roentgen"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_manifest_mix_is_given_to_every_class_and_a_model_without_a_form_is_refused(tmp_path, no_model_load,
                                                                                       tiny_model_dir):
    m = tmp_path / "m.csv"
    m.write_text("image,report,labels,sex\na.png,A1.,A,M\nb.png,A2.,A,M\nc.png,A3.,A,M\nd.png,B1.,B,F\n")
    # the whole set is 3 M : 1 F; each class ends at 4 images in that mix
    rows = balance_prompts(m, "label", mix="manifest")
    assert planned(rows, label=True) == {("A", "F", "unknown", ""): 1, ("B", "M", "unknown", ""): 3}
    with pytest.raises(UserError, match=r"m\.csv: 2 prompt\(s\) ask for a patient's sex/age/race"):
        generate(cfg_for(tmp_path, tiny_model_dir, balance=str(m), balance_target="manifest"))
    assert not (tmp_path / "out").exists()


def test_requested_ages_follow_the_real_ages_of_the_band():
    assert requested_ages(4, ">65", [30, 70, 72, 90, 100]) == [70, 72, 90, 100]
    assert requested_ages(2, ">65", [70, 72, 90, 100]) == [72, 100]
    assert requested_ages(3, "<40", []) == [21, 29, 36]           # no real age in the band: spread over 18-39
    assert apportion(10, {("a",): 1 / 3, ("b",): 1 / 3, ("c",): 1 / 3}) == {("a",): 4, ("b",): 3, ("c",): 3}


def test_a_balanced_run_writes_the_plan_and_records_each_patient(tmp_path, carded_model):
    card(carded_model, "roentgen")
    m = tmp_path / "m.csv"
    m.write_text(MANIFEST_CSV)
    s = generate(cfg_for(tmp_path, carded_model, balance=str(m), balance_target="uniform", label_column=""))
    rows = read_jsonl(s.out / MANIFEST)
    assert s.generated == len(rows) == 19
    plan = read_jsonl(s.out / "balance_prompts.jsonl")
    assert sum(r["n"] for r in plan) == 19 and all({"sex", "age", "race"} <= set(r) for r in plan)
    for r in rows:
        words = f"{r['age']} year old {r['race']} {'female' if r['sex'] == 'F' else 'male'}."
        assert r["prompt"].startswith(words) and r["demographics_template"] == "roentgen"

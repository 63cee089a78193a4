"""Demographics in captions: the anchors' forms, 90+, strict input, per-row dropout, never cut, and the card
that tells generation which form the model learnt."""
from __future__ import annotations

import pytest

from cxrcommon.demographics import (
    Demographics,
    age_band,
    caption_with,
    card_template,
    drop_fields,
    parse_demographics,
    prefix,
    race_group,
)
from cxrcommon.errors import UserError
from cxrcommon.imageio import write_png
from cxrcommon.reports import prepare_reports
from cxrcommon.tokenizer import clip_tokenizer
from finetune.config import TrainConfig
from finetune.data import load_train_data
from finetune.toy import CAPTIONS, pattern


def test_the_anchors_forms():
    d = Demographics("F", 28, "WHITE")
    assert caption_with("No acute disease.", d) == "28 year old WHITE female. No acute disease."
    assert caption_with("Effusion.", Demographics("M", 71, "BLACK"), "chexgen") == \
        "sex:Male, age:71.0, race:Black. Effusion."
    assert prefix(Demographics("M", 93, "")) == "90+ year old male."  # HIPAA Safe Harbor
    assert prefix(Demographics("", 93, "ASIAN"), "chexgen") == "age:90+, race:Asian."
    assert prefix(Demographics("", None, "BLACK")) == "BLACK patient."
    assert prefix(Demographics()) == "" and caption_with("Clear.", Demographics()) == "Clear."
    assert [age_band(a) for a in (None, 39, 40, 65, 66)] == ["unknown", "<40", "40-65", "40-65", ">65"]
    assert race_group("BLACK/AFRICAN AMERICAN") == "BLACK" and race_group("PATIENT DECLINED TO ANSWER") == ""
    assert race_group("White, non-Hispanic") == "WHITE" and race_group("Non-Hispanic") == ""
    assert race_group("White, Hispanic") == "HISPANIC/LATINO" and race_group("Other, not Hispanic") == "OTHER"


@pytest.mark.parametrize("sex,age,race,what", [("X", "", "", "sex 'X'"), ("", "-3", "", "age '-3'"),
                                               ("", "250", "", "age '250'"), ("", "", "Martian", "race 'Martian'")])
def test_bad_values_name_the_row(sex, age, race, what):
    with pytest.raises(UserError, match=f"prompts.csv:4: {what}"):
        parse_demographics(sex, age, race, where="prompts.csv:4")


def test_dropout_is_per_field_seeded_and_near_its_rate():
    d = Demographics("F", 50, "ASIAN")
    dropped = [drop_fields(d, 0.3, 0, f"img{i}") for i in range(2000)]
    assert dropped == [drop_fields(d, 0.3, 0, f"img{i}") for i in range(2000)]  # same row, same caption
    for field in ("sex", "age", "race"):
        rate = sum(getattr(x, field) in ("", None) for x in dropped) / len(dropped)
        assert 0.25 < rate < 0.35
    both = sum(x.sex == "" and x.race == "" for x in dropped) / len(dropped)
    assert 0.06 < both < 0.12  # independent: about 0.3 * 0.3
    assert drop_fields(d, 0.0, 0, "x") == d


def test_the_prefix_survives_any_cut():
    long = "FINDINGS: " + " ".join(f"Finding number {i} is described here in words." for i in range(60)) + \
        " IMPRESSION: Large right effusion."
    head = "93 year old WHITE female."
    for policy in ("sentence", "hard"):
        texts, stats = prepare_reports([long], clip_tokenizer(), max_windows=1, policy=policy, prefixes=[head])
        assert stats.cut == 1 and texts[0].startswith(head)
        assert "Large right effusion" in texts[0]  # and the impression still comes right after it


def _manifest(tmp, rows):
    lines = ["image,report,patient,sex,age,race"]
    for i, (sex, age, race) in enumerate(rows):
        write_png(tmp / f"i{i}.png", pattern(CAPTIONS[0], 16))
        lines.append(f"i{i}.png,FINDINGS: {CAPTIONS[0]}.,p{i},{sex},{age},{race}")
    (tmp / "m.csv").write_text("\n".join(lines) + "\n")
    return tmp / "m.csv"


def test_training_captions_carry_demographics(tmp_path):
    path = _manifest(tmp_path, [("F", 28, "WHITE"), ("M", 95, "BLACK"), ("", "", "")])
    cfg = TrainConfig(train_data=str(path), val_fraction=0.0, demographics_dropout=0.0)
    caps = load_train_data(cfg, clip_tokenizer()).captions
    assert caps == [f"28 year old WHITE female. {CAPTIONS[0]}.", f"90+ year old BLACK male. {CAPTIONS[0]}.",
                    f"{CAPTIONS[0]}."]
    cfg.demographics_template = "chexgen"
    assert load_train_data(cfg, clip_tokenizer()).captions[0].startswith("sex:Female, age:28.0, race:White. ")
    cfg.demographics_template = "none"
    assert load_train_data(cfg, clip_tokenizer()).captions[0] == f"{CAPTIONS[0]}."
    bad = _manifest(tmp_path, [("F", 28, "WHITE"), ("F", 250, "")])
    with pytest.raises(UserError, match=r"m.csv:3: age '250'"):
        load_train_data(TrainConfig(train_data=str(bad), val_fraction=0.0), clip_tokenizer())


def test_the_card_records_the_form_for_generation(tmp_path):
    from finetune.card import write_model_card
    cfg = TrainConfig(demographics_template="chexgen", demographics_dropout=0.2)
    write_model_card(tmp_path, cfg, n_train=1, n_val=0, steps=1, final_loss=None, mixed_precision="no",
                     prediction_type="epsilon")
    (tmp_path / "lora").mkdir()
    assert card_template(tmp_path) == "chexgen" and card_template(tmp_path / "lora") == "chexgen"
    text = (tmp_path / "README.md").read_text()
    assert "sex:Female, age:71.0, race:White. Moderate left pleural effusion." in text
    write_model_card(tmp_path, TrainConfig(demographics_template="none"), n_train=1, n_val=0, steps=1,
                     final_loss=None, mixed_precision="no", prediction_type="epsilon")
    assert card_template(tmp_path) == "none"  # said, not unknown: a base model's card must not override it
    assert card_template(tmp_path / "lora" / "nothing") is None
    from inference.captions import caption_form
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nsynthcxr:\n  demographics_template: roentgen\n---\n")
    assert caption_form("auto", [base]) == "roentgen"
    with pytest.raises(UserError, match="names a demographics template"):
        caption_form("auto", [tmp_path / "lora", base], asked_for=1)  # the LoRA's own card wins

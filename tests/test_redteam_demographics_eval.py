"""Red-team inputs for issues #21 (demographics) and #22 (evaluation): each test is one class of input that was
misread, crashed, or wrote files, and is now read right or refused in one line with nothing written."""
from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import torch
from conftest import needs_torchvision
from test_eval_backbones import save_dino
from test_eval_metrics import blobs, write_set
from test_generate_demographics import MANIFEST_CSV, card, cfg_for, no_model_load  # noqa: F401 (a fixture)

from cxrcommon.demographics import parse_demographics, race_group
from cxrcommon.errors import UserError
from eval import features as feats
from eval import fid, privacy, report
from eval.demographic_models import FORMAT, load_models
from inference.generate import generate
from inference.generate import main as generate_main
from inference.prompts import PromptFileError, read_prompts
from inference.targets import choose

# ---------------------------------------------------------------- #21: demographics


@pytest.mark.parametrize("value, group", [
    ("BLACKWELL", "OTHER"),                    # a word containing BLACK was BLACK
    ("NOT HISPANIC OR LATINO", ""),            # was HISPANIC/LATINO (only "NOT HISPANIC" was taken off)
    ("not white", ""),                         # was WHITE
    ("Black and White", "OTHER"),              # two groups: was WHITE (the first key found)
    ("WHITE - OTHER EUROPEAN", "WHITE"),       # OTHER's word beside a group keeps the group
    ("Race and Ethnicity Unknown", ""),        # CheXpert Plus: was OTHER
    ("Patient Refused", ""),                   # CheXpert Plus: was OTHER
    ("White, non-Hispanic", "WHITE"), ("White, Non-Hispanic/Non-Latino", "WHITE"),
    ("Other, Hispanic", "HISPANIC/LATINO"), ("BLACK/AFRICAN", "BLACK"),
])
def test_race_strings_are_read_by_whole_words_negations_and_groups(value, group):
    assert race_group(value) == group


@pytest.mark.parametrize("value", ["Non-Hispanic", "non hispanic", "BLACKWELL", "not white", "whiteish"])
def test_a_race_the_template_cannot_write_is_refused_not_dropped_or_guessed(value):
    with pytest.raises(UserError, match=f"p.csv:2: race {value!r} is not one the template knows"):
        parse_demographics(race=value, where="p.csv:2")


def test_full_width_sex_is_read_and_invisible_characters_are_named():
    assert parse_demographics("Ｍ").sex == "M" and parse_demographics("ｆｅｍａｌｅ").sex == "F"
    with pytest.raises(UserError, match=r"sex 'Male\\u200b'"):
        parse_demographics("Male\u200b")


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("data, match", [
    (b"sex,share\nF,0,25\nM,1,0\n", r"target\.csv:2: more cells than the header"),  # decimal comma: was F 0, M 1
    (b"sex,sex,share\nF,M,0.5\nM,F,0.5\n", r"sex appear twice in the header"),        # the last one silently won
    (b"sex,share,note\nF,0.5,caf\xe9\nM,0.5,x\n", r"target\.csv: not UTF-8 text"),    # was UnicodeDecodeError
    (b"sex,share\nF,50\nM,50\n", r"sum to 100, not 1 \(they look like percentages"),
    (b"sex,share\n\nF,0.5\n\nM,x\n", r"target\.csv:5: share 'x'"),                   # was line 3: blank lines
])
def test_a_bad_shares_file_is_one_line_naming_the_row_and_nothing_is_written(tmp_path, tiny_model_dir, data, match):
    m = tmp_path / "m.csv"
    m.write_text(MANIFEST_CSV)
    (tmp_path / "target.csv").write_bytes(data)
    with pytest.raises(UserError, match=match) as err:
        generate(cfg_for(tmp_path, tiny_model_dir, balance=str(m), balance_target=str(tmp_path / "target.csv"),
                         demographics_template="roentgen"))
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_a_shares_header_in_capitals_is_a_shares_file(tmp_path):
    (tmp_path / "t.csv").write_text("Sex,Share\nF,0.25\nM,0.75\n")  # was read as a manifest: "missing 'image'"
    target = choose(str(tmp_path / "t.csv"), [parse_demographics("F"), parse_demographics("M")], "m.csv")
    assert target.shares == {("F",): 0.25, ("M",): 0.75}


@pytest.mark.parametrize("name, why", [
    ("a\x00b.png", "control character"),       # crashed when the image was written
    ("a\nb.png", "control character"), ("\u202egnp.png", "control character"),
    ("x" * 210 + ".png", "longer than 200 bytes"),   # OSError (name too long) when the image was written
    ("con.png", "Windows device name"), ("sub/LPT1.x.png", "Windows device name"),
])
def test_img_savenames_no_file_system_takes_are_refused_naming_the_row(tmp_path, name, why):
    path = tmp_path / "p.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["prompt", "img_savename"], ["fine", "ok.png"], ["bad", name]])
    with pytest.raises(PromptFileError, match=f"p.csv:3: .*{why}"):
        read_prompts(path)


def test_img_savenames_equal_once_unicode_normalised_are_duplicates(tmp_path, tiny_model_dir):
    path = tmp_path / "p.csv"
    path.write_text("prompt,img_savename\na,\u00e9.png\nb,e\u0301.png\n", encoding="utf-8")  # one file on macOS
    with pytest.raises(PromptFileError, match="p.csv:3: .* is already used on line 2"):
        read_prompts(path)
    long = tmp_path / "long.csv"
    long.write_text(f"prompt,img_savename\na,{'y' * 300}.png\n")
    with pytest.raises(SystemExit, match="longer than 200 bytes"):
        generate_main(["--prompts", str(long), "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir)])
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("no_model_load")
def test_a_model_card_naming_an_unknown_form_is_refused_before_any_image(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, copy_function=os.symlink)
    card(model, "bogus")
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,sex,age,race\nClear.,,,\nEffusion.,F,50,\n")  # row 2 was made, row 3 then failed
    with pytest.raises(UserError, match=r"README.md: synthcxr.demographics_template 'bogus' is not one of"):
        generate(cfg_for(tmp_path, model, prompts))
    assert not (tmp_path / "out").exists()
    (model / "README.md").write_text("---\nsynthcxr: [1, 2]\n---\n")  # was AttributeError
    with pytest.raises(UserError, match="no model card .* names a demographics template"):
        generate(cfg_for(tmp_path, model, prompts))


def _qc_json(folder, **change):
    meta = {"format": FORMAT, "task": "sex", "arch": "resnet18", "classes": ["F", "M"], "size": 32, **change}
    (folder / "sex.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
    (folder / "sex.safetensors").write_bytes(b"")


@needs_torchvision
@pytest.mark.parametrize("change, match", [
    ({"arch": None, "classes": None}, "arch None is not a torchvision classifier"),          # was KeyError
    ({"arch": "fasterrcnn_resnet50_fpn"}, "is not a torchvision classifier"),                 # was a detector
    ({"classes": "MF"}, r"classes 'MF' are not two or more distinct sex classes"),            # was ('M', 'F')
    ({"classes": ["M", "X"]}, "not two or more distinct sex classes of M, F"),
    ({"size": 0}, "size 0 is not a whole number of pixels"),
])
def test_a_qc_json_with_values_train_never_writes_is_refused_in_one_line(tmp_path, change, match):
    _qc_json(tmp_path, **change)
    with pytest.raises(feats.WeightsMismatchError, match=match) as err:
        load_models(tmp_path)
    assert "\n" not in str(err.value) and "sex.json" in str(err.value)


def test_a_state_dict_keyed_by_other_than_names_is_refused(tmp_path):
    torch.save({1: torch.zeros(1)}, tmp_path / "race-emory.pt")  # was AttributeError: 'int' ... 'startswith'
    with pytest.raises(feats.WeightsMismatchError, match="not a state dict of names to tensors"):
        load_models(tmp_path)


# ---------------------------------------------------------------- #22: evaluation


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return save_dino(tmp_path_factory.mktemp("w") / "rad-dino")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    return write_set(root / "real", blobs(0, 7)), write_set(root / "fake", blobs(1, 7, noise=0.2))


@pytest.mark.parametrize("broken", [b"", b"plain text, renamed", "truncated"])
def test_unreadable_safetensors_in_a_weights_folder_are_one_line(dino_dir, sets, tmp_path, broken):
    folder = shutil.copytree(dino_dir, tmp_path / "dino")
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[:4000] if broken == "truncated" else broken)  # was SafetensorError, traceback
    real, fake = sets
    out, cache = tmp_path / "out", tmp_path / "cache"
    with pytest.raises(SystemExit, match="its safetensors do not fit Dinov2Model") as err:
        fid.main([str(real), str(fake), "--features", "rad-dino", "--weights", str(folder), "--out", str(out),
                  "--cache-dir", str(cache)])
    assert "\n" not in str(err.value) and not out.exists() and not cache.exists()


@pytest.mark.parametrize("processor", [{"size": 224}, {"image_mean": "abc"}, {"image_std": [0, 0, 0]},
                                       {"crop_size": {"height": 0, "width": 0}}])
def test_a_preprocessor_config_with_impossible_values_is_refused(dino_dir, tmp_path, processor):
    folder = shutil.copytree(dino_dir, tmp_path / "dino")  # was AttributeError / TypeError, or inf features
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(feats.WeightsMismatchError, match="preprocessor_config.json: not an image processor's"):
        feats.load_backbone("rad-dino", weights=folder)


@needs_torchvision
def test_an_xrv_state_dict_keyed_by_other_than_names_is_refused(tmp_path):
    torch.save({1: torch.zeros(1)}, tmp_path / "xrv.pt")  # was TypeError in the misfit message
    with pytest.raises(feats.WeightsMismatchError, match="not a state dict of names to tensors"):
        feats.load_backbone("xrv", weights=tmp_path / "xrv.pt")


@pytest.mark.parametrize("command", ["fid", "report", "privacy"])
def test_an_out_folder_inside_an_input_set_is_refused(sets, tmp_path, command):
    real, fake = sets
    inside = (real if command != "privacy" else fake) / "eval_out"   # its PNG plots were read back as images
    common = ["--features", "tiny", "--cache-dir", str(tmp_path / "cache"), "--out", str(inside)]
    argv = {"fid": [str(real), str(fake)], "report": [str(real), str(fake), "--k", "3"],
            "privacy": ["--train", str(real), "--fake", str(fake), "--k", "3"]}[command]
    main = {"fid": fid.main, "report": report.main, "privacy": privacy.main}[command]
    with pytest.raises(SystemExit, match="overlaps the input folder"):
        main(argv + common)
    assert not inside.exists() and not (tmp_path / "cache").exists()


def test_a_report_whose_readable_images_are_fewer_than_k_plus_one_writes_nothing(sets, tmp_path):
    real = write_set(tmp_path / "real", blobs(0, 5))
    (real / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")     # listed: 7 >= k + 1 = 6; readable: 5
    (real / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"only 5 real and 7 synthetic image\(s\) could be read \(2 unreadable"):
        report.main([str(real), str(sets[1]), "--features", "tiny", "--cache-dir", str(tmp_path / "c"),
                     "--out", str(out)])     # was a report with PRDC left out
    assert not out.exists()

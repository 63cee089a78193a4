"""CheXGenBench's prompt CSV (prompt,img_savename): each image written under its own name, bad names refused."""
from __future__ import annotations

import dataclasses

import pytest

from cxrcommon.atomic import read_jsonl
from cxrcommon.imageio import read_png_text
from inference.config import GenerateConfig
from inference.generate import MANIFEST, generate, main
from inference.prompts import PromptFileError, read_prompts

CSV = ("prompt,img_savename\n"
       "Moderate left pleural effusion.,SyntheticImg_1.png\n"
       "No acute cardiopulmonary process.,sub/SyntheticImg_2.png\n"
       "\"Right lower lobe consolidation, small.\",./SyntheticImg_3.png\n")


@pytest.fixture()
def cfg(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompt_INFO.csv"
    prompts.write_text(CSV)
    return GenerateConfig(prompts=str(prompts), out=str(tmp_path / "out"), model=str(tiny_model_dir),
                          batch_size=4, steps=2, height=32, width=32, seed=3)


def test_images_are_written_under_their_names_and_resume(cfg):
    s = generate(cfg)
    names = {"SyntheticImg_1.png", "sub/SyntheticImg_2.png", "SyntheticImg_3.png"}
    assert s.generated == 3 and {p.relative_to(s.out).as_posix() for p in s.out.rglob("*.png")} == names
    rows = {r["key"]: r for r in read_jsonl(s.out / MANIFEST)}
    assert set(rows) == names and rows["sub/SyntheticImg_2.png"]["prompt"] == "No acute cardiopulmonary process."
    tags = read_png_text(s.out / "SyntheticImg_3.png")
    assert tags["synthetic"] == "true" and tags["prompt"] == "Right lower lobe consolidation, small."
    assert tags["prompt_source"] == "prompt_INFO.csv:4"
    again = generate(cfg)
    assert (again.generated, again.skipped) == (0, 3)


def test_an_edited_prompt_remakes_only_its_named_image(cfg):
    first = generate(cfg)
    before = {p.name: p.read_bytes() for p in first.out.rglob("*.png")}
    path = cfg.prompts
    open(path, "w").write(CSV.replace("No acute cardiopulmonary process.", "Small right apical pneumothorax."))
    second = generate(cfg)
    assert (second.generated, second.skipped) == (1, 2)
    after = {p.name: p.read_bytes() for p in second.out.rglob("*.png")}
    assert [n for n in after if after[n] != before[n]] == ["SyntheticImg_2.png"]
    rows = {r["key"]: r for r in read_jsonl(second.out / MANIFEST)}
    assert len(rows) == 3 and rows["sub/SyntheticImg_2.png"]["prompt"] == "Small right apical pneumothorax."


@pytest.mark.parametrize("name, why", [("/tmp/x.png", "absolute"), ("../x.png", "'..'"), ("a/../../x.png", "'..'"),
                                       ("C:/x.png", "absolute"), ("a\\x.png", "backslash"), (".hidden.png", "hidden")])
def test_names_outside_the_folder_are_refused_naming_the_row(tmp_path, name, why):
    path = tmp_path / "p.csv"
    path.write_text(f"prompt,img_savename\nfine,ok.png\nbad,{name}\n")
    with pytest.raises(PromptFileError, match=f"p.csv:3: .*{why}"):
        read_prompts(path)


def test_duplicates_missing_names_and_n_are_refused_and_nothing_written(cfg, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,img_savename\na,x.png\nb,\nc,X.PNG\nd,y.png\n")
    with pytest.raises(PromptFileError) as err:
        read_prompts(path)
    assert err.value.problems == [f"{path}:3: empty 'img_savename' — CheXGenBench's prompt CSV names every image; "
                                  "fill it in or delete that line",
                                  f"{path}:4: 'img_savename' 'X.PNG' is already used on line 2 — give each row its "
                                  "own name"]
    assert [r.savename for r in read_prompts(path, skip_bad=True)] == ["x.png", "y.png"]
    with pytest.raises(PromptFileError, match="names one image, but n is 2"):
        read_prompts(path.with_name("p.csv"), default_n=2)
    out = tmp_path / "never"
    with pytest.raises(SystemExit, match=r"p.csv:4: 'img_savename' 'X.PNG' is already used"):
        main(["--prompts", str(path), "--out", str(out), "--model", cfg.model])
    with pytest.raises(PromptFileError, match=r"prompt_INFO.csv:2: 'img_savename' 'SyntheticImg_1.png' does not "
                                              r"end in .dcm"):
        generate(dataclasses.replace(cfg, format="dcm", out=str(out)))
    assert not out.exists()


def test_the_form_can_be_demanded(cfg, tmp_path):
    plain = tmp_path / "plain.csv"
    plain.write_text("prompt,n\nLeft effusion.,1\n")
    assert read_prompts(plain)[0].savename is None                   # an ordinary prompt CSV stays ordinary
    with pytest.raises(PromptFileError, match=r"plain.csv:1: CheXGenBench's prompt CSV needs the header "
                                              r"prompt,img_savename \(got prompt,n\)"):
        read_prompts(plain, savenames=True)
    out = tmp_path / "never"
    with pytest.raises(SystemExit, match="needs the header prompt,img_savename"):
        main(["--prompts", str(plain), "--out", str(out), "--model", cfg.model, "--chexgenbench"])
    assert not out.exists()
    assert [r.savename for r in read_prompts(cfg.prompts, savenames=True)] == [
        "SyntheticImg_1.png", "sub/SyntheticImg_2.png", "SyntheticImg_3.png"]

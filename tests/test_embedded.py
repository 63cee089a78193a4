"""The shipped embedded model: what is on disk, that it follows prompts, and the LoRA proof.

The adherence and LoRA tests generate real images with the shipped weights and judge them with the
analytic phantom scorer, so they fail if the model (or the trainer that made it) stops learning."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrcommon.models import EMBEDDED_DIR, REPO_ROOT, resolve_model
from finetune.embedded import adherence, generate, load, model_card
from finetune.lora_proof import lora_proof, resolution_of
from phantoms.recipe import EmbeddedConfig, LoraProofConfig, presence

BASE_DIR = REPO_ROOT / "models" / "embedded-no-effusion"
CONFIGS = REPO_ROOT / "configs" / "embedded"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One thread is fastest when the 2 cores are shared; restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def embedded():
    if not (EMBEDDED_DIR / "model_index.json").is_file():
        pytest.fail(f"{EMBEDDED_DIR} is missing: train it with "
                    "python -m finetune.embedded --config configs/embedded.yaml")
    return load("embedded")


def test_shipped_weights_are_small_safetensors_with_an_honest_card():
    assert resolve_model("embedded") == str(EMBEDDED_DIR)
    files = [p for d in (EMBEDDED_DIR, BASE_DIR) for p in d.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")], "pickle weights shipped"
    mb = sum(p.stat().st_size for p in files if p.suffix == ".safetensors") / 1e6
    assert 1 < mb <= 40, f"{mb:.1f} MB of weights"
    for d in (EMBEDDED_DIR, BASE_DIR):
        card = (d / "README.md").read_text()
        assert "NOT a medical model" in card and "phantom" in card and "Measured prompt adherence" in card
        assert json.loads((d / "text_encoder" / "config.json").read_text())["vocab_size"] == 49408


@pytest.mark.numerics
def test_model_loads_as_fp32_and_makes_64px_images(embedded):
    assert {p.dtype for m in (embedded.unet, embedded.vae, embedded.text_encoder) for p in m.parameters()} == \
        {torch.float32}
    assert resolution_of(EMBEDDED_DIR) == 64
    a, b = generate(embedded, "Normal chest radiograph.", 2, steps=4)
    assert a.shape == (64, 64) and 0 <= a.min() and a.max() <= 1
    again = generate(embedded, "Normal chest radiograph.", 1, seed=1, steps=4)[0]
    np.testing.assert_allclose(again, b, atol=1e-5)  # image i depends only on seed + i


@pytest.mark.numerics
def test_embedded_follows_left_right_normal_prompts(embedded):
    """10 generations per prompt; chance is 1/3, an untrained model of this architecture scores 0.33."""
    scores = adherence(embedded, 10, steps=15)
    seen = scores["seen"]
    assert scores["accuracy"] >= 0.6, scores
    assert scores["per_class"]["none"] >= 0.8, scores  # "normal" draws no effusion
    for side, other in (("left", "right"), ("right", "left")):  # the side asked for wins over the other side
        assert seen[side].get(side, 0) >= 3 and seen[side].get(side, 0) > 2 * seen[side].get(other, 0), scores


@pytest.mark.numerics
def test_lora_teaches_a_finding_the_base_never_saw(tmp_path):
    """finetune.train --train lora on effusion phantoms, on a base trained without any effusion."""
    t0 = time.perf_counter()
    out = lora_proof(LoraProofConfig(base=str(BASE_DIR), work_dir=str(tmp_path), n_train=160, steps=120,
                                     batch_size=16, per_class=8, eval_steps=15))
    assert out["steps"] == 120
    # 16 effusion-prompt images each side of the LoRA; measured on the shipped base: 0/16 before, 8/16 after
    assert out["presence_before"] <= 1 / 16, out["before"]
    assert out["presence_after"] >= 4 / 16, out["after"]
    assert out["after"]["per_class"]["none"] >= 0.75, out["after"]  # "normal" still draws no effusion
    assert time.perf_counter() - t0 < 240, "LoRA proof took over 4 minutes"


def test_presence_counts_any_effusion_side():
    scores = {"seen": {"left": {"left": 3, "none": 1}, "right": {"bilateral": 1, "none": 3}, "none": {"left": 4}}}
    assert presence(scores) == pytest.approx(4 / 8)


@pytest.mark.numerics
def test_vae_trainer_learns_and_sets_the_latent_scale(tmp_path):
    from finetune.vae import train_vae
    from phantoms.dataset import item
    from phantoms.generator import render
    imgs = torch.from_numpy(np.stack([render(item(i, 5)[0], 64)[0] for i in range(8)]))[:, None]
    x = imgs.expand(-1, 3, -1, -1) * 2 - 1
    folder, l1 = train_vae(x, CONFIGS / "vae", tmp_path / "vae", steps=30, batch_size=4, learning_rate=2e-3)
    assert np.mean(l1[-5:]) < 0.7 * np.mean(l1[:5])
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["scaling_factor"] != 1.0 and (folder / "diffusion_pytorch_model.safetensors").is_file()


def test_model_card_states_what_it_is_and_the_numbers():
    cfg = EmbeddedConfig(out="/nonexistent", base_out="/nonexistent")
    scores = {"accuracy": 0.9, "per_class": {"left": 0.9, "right": 0.8, "none": 1.0}, "per_class_n": 30,
              "seen": {"left": {"left": 27, "none": 3}}}
    card = model_card(cfg, kind="main", stages={"minutes": 55.0, "n_no_effusion": 3000, "vae_l1": 0.1}, scores=scores)
    assert "NOT a medical model" in card and "0.90 overall" in card and "right 0.80" in card
    assert f"{cfg.main_steps} steps on all phantoms" in card and "55 min" in card
    base = model_card(cfg, kind="base", stages={}, scores=None)
    assert "WITHOUT pleural effusion" in base and "on all phantoms" not in base and "not measured" in base


def test_demographic_prompts_ask_for_their_class_with_or_without_a_report():
    import re

    from cxrcommon.demographics import age_band
    from cxrcommon.tokenizer import clip_tokenizer
    from phantoms.recipe import DEMOGRAPHIC_CLASSES, NORMAL_PROMPT, demographic_prompts
    tok = clip_tokenizer()
    for cls, attribute in DEMOGRAPHIC_CLASSES.items():
        short = demographic_prompts(cls, 30, seed=1)
        assert short == demographic_prompts(cls, 30, seed=1) != demographic_prompts(cls, 30, seed=2)
        heads = [re.match(r"^(\d+)(\+?) year old (female|male)\. (.*)$", p) for p in short]
        assert all(heads) and {h.group(4) for h in heads} == {NORMAL_PROMPT}  # no race: phantoms have no race cue
        ages, sexes = [int(h.group(1)) for h in heads], [h.group(3)[0].upper() for h in heads]
        if attribute == "sex":
            assert set(sexes) == {cls} and len(set(ages)) > 10
        else:
            assert {age_band(a) for a in ages} == {cls} and set(sexes) == {"F", "M"}
    long = demographic_prompts(">65", 5, tokenizer=tok)
    for p in long:
        assert re.match(r"^\d+\+? year old (female|male)\. ", p) and len(tok(p)["input_ids"]) > 80 + 10
        assert any(w in p.lower() for w in ("effusion", "cardiomegaly", "enlarged", "opacity", "consolidation",
                                            "nodul", "pneumothorax"))
    with pytest.raises(ValueError, match="unknown demographic class"):
        demographic_prompts("old", 1)


def test_model_card_records_the_demographics_form_and_its_adherence():
    from cxrcommon.demographics import card_template
    cfg = EmbeddedConfig(out="/nonexistent", base_out="/nonexistent", start_from="models/previous")
    res = {c: {"accuracy": 0.95, "seen": {c: 19, "x": 1}, "example": "71 year old female. Normal chest radiograph.",
               "tokens": 13} for c in ("F", "M", "<40", "40-65", ">65")}
    card = model_card(cfg, kind="main", stages={}, scores=None, demographics={"short": res, "report": res})
    assert "Measured demographics adherence" in card and "20 generations per class" in card
    assert ">65 0.95" in card and "starting from models/previous" in card and "race" in card
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "README.md").write_text(card)
        assert card_template(d) == "roentgen"  # generation puts the patient's fields first in this form


def test_a_finished_stage_is_reused_only_with_the_same_settings(tmp_path, monkeypatch):
    """Rerunning the recipe skips finished stages, but one trained with other settings (say fewer steps
    in an older config) stops the run instead of shipping old weights under the new model card."""
    import types

    import finetune.train
    from cxrcommon.config import save_config
    from finetune.embedded import train_stage
    runs = []

    def fake_train(tc):
        runs.append(tc.max_train_steps)
        (Path(tc.output_dir) / "pipeline").mkdir(parents=True)
        (Path(tc.output_dir) / "pipeline" / "model_index.json").write_text("{}")
        save_config(tc, Path(tc.output_dir) / "train_config.yaml")
        return types.SimpleNamespace(steps=tc.max_train_steps, losses=[0.1], images_per_s=1.0,
                                     outputs={"pipeline": Path(tc.output_dir) / "pipeline"})
    monkeypatch.setattr(finetune.train, "train", fake_train)
    cfg = EmbeddedConfig(work_dir=str(tmp_path))
    first = train_stage(cfg, tmp_path / "init", tmp_path / "data.jsonl", "lateral", 4200, 3e-4, 5.0)
    again = train_stage(cfg, tmp_path / "init", tmp_path / "data.jsonl", "lateral", 4200, 3e-4, 5.0)
    assert first == again == tmp_path / "lateral" / "pipeline" and runs == [4200]  # reused, not retrained
    with pytest.raises(SystemExit, match=r"other settings \(max_train_steps: 4200 -> 2400\).*--work-dir"):
        train_stage(cfg, tmp_path / "init", tmp_path / "data.jsonl", "lateral", 2400, 3e-4, 5.0)
    assert runs == [4200]

"""Trainer behaviour on the toy task: it learns, it resumes exactly, its LoRA loads in plain diffusers."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cxrcommon.errors import UserError
from finetune.checkpoint import list_checkpoints
from finetune.config import TrainConfig
from finetune.lora import LORA_FILE
from finetune.toy import CAPTIONS, pattern, save_toy_model, toy_data
from finetune.train import NonFiniteLossError, train

R = 16
STEPS = 120
BROAD = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "conv_in", "conv_out", "conv1", "conv2"]


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    return save_toy_model(tmp_path_factory.mktemp("toy") / "model", resolution=R)


def cfg_for(model, out, **kw) -> TrainConfig:
    base = dict(model=str(model), output_dir=str(out), resolution=R, train_batch_size=4, learning_rate=1e-2,
                lr_warmup_steps=0, checkpointing_steps=0, validation_steps=0, validation_seeds=[0],
                validation_inference_steps=2, report_to="none", device="cpu", val_fraction=0.0, lora_rank=8)
    base.update(kw)
    return TrainConfig(**base)


def _pipe(model):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, prompt: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return pipe([prompt] * 4, height=R, width=R, num_inference_steps=10, guidance_scale=3.0, generator=g,
                output_type="latent").images


@pytest.mark.numerics
def test_lora_learns_caption_specific_patterns_and_loads_in_plain_diffusers(toy_model, tmp_path):
    """Two captions -> two mirrored patterns: after training, each caption generates ITS pattern.

    Issue #19: at learning rate 1e-2 for 80 steps, training seeds 1 and 2 failed "moved toward its pattern"
    (d_own / d_base 0.66 and 0.56 > 0.5; the untrained model's latents can start near one pattern, and 1e-2
    overshoots). Now 3e-3 for 120 steps, and "moved" is measured as `sep` (see test_long_prompts: mean
    projection on the left-minus-right pattern direction, 1.0 = the two patterns, 0 = the caption ignored)
    and `worst` (least projection of one image on its own side, 0.5 = its pattern). Measured, training seeds
    0/1/2, full route (torch 2.14.1+cu130) and cpu route (2.13.0+cpu) identical: loss last/first 0.25 / 0.26 /
    0.28; sep 1.40 / 2.03 / 2.00 (untrained 0.001); worst 0.63 / 0.52 / 0.50; d_own / d_other at most 0.18 /
    0.33 / 0.33. Every bound below is at least twice the worst case measured."""
    out = tmp_path / "run"
    cfg = cfg_for(toy_model, out, train_batch_size=8, max_train_steps=STEPS, learning_rate=3e-3, lora_rank=16,
                  lora_alpha=32, lora_target_modules=BROAD, validation_steps=STEPS, validation_prompts=[CAPTIONS[0]],
                  report_to="tensorboard")
    result = train(cfg, toy_data(8, R))
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
    assert last < 0.6 * first, (first, last)  # measured at most 0.28
    assert (out / LORA_FILE).is_file() and (out / "validation" / f"step-{STEPS:07d}.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*"))
    card = (out / "README.md").read_text()
    assert str(toy_model) in card and "SYNTHETIC" in card and "8 image-report pairs" in card
    assert "v_prediction prediction" in card  # taken from the model's scheduler config
    assert "train: lora" in (out / "train_config.yaml").read_text()

    pipe = _pipe(toy_model)
    with torch.no_grad():
        x = {c: torch.from_numpy(pattern(c, R))[None, None].expand(1, 3, R, R) * 2 - 1 for c in CAPTIONS}
        target = {c: pipe.vae.encode(x[c]).latent_dist.mean * pipe.vae.config.scaling_factor for c in CAPTIONS}

    def dist(lat: torch.Tensor, c: str) -> float:  # mean squared latent distance over the 4 seeds
        return (lat - target[c]).pow(2).mean().item()

    base = {c: _latents(pipe, c) for c in CAPTIONS}
    pipe.load_lora_weights(out)  # plain diffusers, no synthcxr code
    tuned = {c: _latents(pipe, c) for c in CAPTIONS}
    left, right = (target[c] for c in CAPTIONS)
    direction, middle = left - right, (left + right) / 2

    def side(lat: torch.Tensor) -> torch.Tensor:  # per image: +0.5 = the left pattern, -0.5 = the right one
        return ((lat - middle) * direction).flatten(1).sum(1) / direction.pow(2).sum()

    on_left, on_right = side(tuned[CAPTIONS[0]]), side(tuned[CAPTIONS[1]])
    sep, worst = (on_left.mean() - on_right.mean()).item(), min(on_left.min().item(), -on_right.max().item())
    assert sep > 0.6 and worst > 0.2, (sep, on_left, on_right)  # each caption moved to ITS side, every image
    for own, other in (CAPTIONS, CAPTIONS[::-1]):
        d_own, d_other = dist(tuned[own], own), dist(tuned[own], other)
        assert d_own < 0.6 * d_other, (own, d_own, d_other)  # ... and near ITS pattern, not the other one
    pipe.unload_lora_weights()
    for c in CAPTIONS:
        assert torch.equal(_latents(pipe, c), base[c])  # unloading restores the base exactly


def _final_lora(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / LORA_FILE))


@pytest.mark.numerics
def test_resume_equals_uninterrupted_and_rotation(toy_model, tmp_path):
    kw = dict(max_train_steps=6, lr_scheduler="cosine", lr_warmup_steps=2, gradient_accumulation_steps=2,
              train_batch_size=2, caption_dropout=0.3, lora_dropout=0.1, checkpointing_steps=2,
              checkpoints_total_limit=2, snr_gamma=5.0, noise_offset=0.05)
    data = toy_data(6, R)
    full = train(cfg_for(toy_model, tmp_path / "a", **kw), data)
    stopped = train(cfg_for(toy_model, tmp_path / "b", **kw), data, should_stop=lambda s: s == 3)
    assert stopped.stopped_early and stopped.steps == 3 and not (tmp_path / "b" / LORA_FILE).exists()
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["checkpoint-2", "checkpoint-3"]
    with pytest.raises(UserError, match="--resume latest"):
        train(cfg_for(toy_model, tmp_path / "b", **kw), data)
    resumed = train(cfg_for(toy_model, tmp_path / "b", resume="latest", **kw), data)
    assert resumed.resumed_from.name == "checkpoint-3" and resumed.steps == 6
    assert np.allclose(stopped.losses + resumed.losses, full.losses, atol=1e-6)
    a, b = _final_lora(tmp_path / "a"), _final_lora(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # rotation kept the newest two (plus the final one written at the end of the run)
    assert [p.name for p in list_checkpoints(tmp_path / "a" / "checkpoints")] == ["checkpoint-4", "checkpoint-6"]


def test_nan_loss_stops_and_keeps_last_checkpoint(toy_model, tmp_path):
    out = tmp_path / "run"
    kw = dict(checkpointing_steps=2, train_batch_size=2)
    train(cfg_for(toy_model, out, max_train_steps=2, **kw), toy_data(4, R))
    ckpt = out / "checkpoints" / "checkpoint-2"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    bad = toy_data(4, R)
    bad = dataclasses.replace(bad, images=[np.full((R, R), np.nan, np.float32)] * 4)
    with pytest.raises(NonFiniteLossError, match=r"not finite.*step 3.*checkpoint-2 is intact"):
        train(cfg_for(toy_model, out, max_train_steps=4, resume="latest", **kw), bad)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_full_unet_mode_writes_a_loadable_pipeline(toy_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    from cxrcommon.models import load_pipeline
    out = tmp_path / "full"
    result = train(cfg_for(toy_model, out, train="unet", max_train_steps=2, learning_rate=1e-3), toy_data(4, R))
    assert "pipeline" in result.outputs and not (out / LORA_FILE).exists()
    pipe = load_pipeline(StableDiffusionPipeline, out / "pipeline")
    base = load_pipeline(StableDiffusionPipeline, toy_model)
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert changed  # the UNet itself was trained
    assert all(torch.equal(v, base.vae.state_dict()[k]) for k, v in pipe.vae.state_dict().items())


def test_flip_with_cached_latents_is_refused_at_start_up(tmp_path):
    cfg = cfg_for(tmp_path / "no-such-model", tmp_path / "run", random_flip=True, cache_latents=True)
    with pytest.raises(ValueError, match=r"--random-flip cannot be combined with --cache-latents.*one orientation"):
        train(cfg)  # refused before the (missing) model is even looked up
    assert not (tmp_path / "run").exists()
    cfg = cfg_for(tmp_path / "no-such-model", tmp_path / "run", train="lora+text_encoder", cache_text=True)
    with pytest.raises(ValueError, match="--cache-text cannot be used while the text encoder is trained"):
        train(cfg)


@pytest.mark.numerics
def test_cached_latents_and_text_train_exactly_like_uncached(toy_model, tmp_path):
    """The cache stores the VAE posterior's mean/std and the caption embeddings; sampling from it draws
    the same random numbers in the same order as encoding on the fly, so the runs coincide."""
    kw = dict(max_train_steps=3, train_batch_size=2, lora_rank=4, caption_dropout=0.3)
    data = toy_data(4, R)
    plain = train(cfg_for(toy_model, tmp_path / "plain", **kw), data)
    cached = train(cfg_for(toy_model, tmp_path / "lat", cache_latents=True, cache_dir=str(tmp_path / "c"), **kw), data)
    text = train(cfg_for(toy_model, tmp_path / "txt", cache_text=True, cache_dir=str(tmp_path / "c"), **kw), data)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "c").iterdir()) == ["latents", "text"]
    for run in (cached, text):
        assert np.allclose(run.losses, plain.losses, rtol=1e-5, atol=1e-6), (run.losses, plain.losses)
    # Weights: the VAE's conv output differs from the cached one by ~1e-7 (memory layout), and Adam turns
    # that into lr-sized steps on the few entries whose gradient is ~0, so compare the trained (lora_B,
    # zero-initialised) tensors by relative norm rather than elementwise to 1e-6.
    ref = _final_lora(tmp_path / "plain")
    trained = [k for k in ref if "lora_B" in k]
    norm = sum(ref[k].norm() ** 2 for k in trained) ** 0.5
    assert trained and norm > 1e-2  # the runs did train something
    for name in ("lat", "txt"):
        got = _final_lora(tmp_path / name)
        assert got.keys() == ref.keys()
        gap = sum((got[k] - ref[k]).norm() ** 2 for k in trained) ** 0.5
        assert gap < 1e-2 * norm, (name, gap, norm)
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()}
    again = train(cfg_for(toy_model, tmp_path / "lat2", cache_latents=True, cache_text=True,
                          cache_dir=str(tmp_path / "c"), **kw), data)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()} == stamp  # reused, not rebuilt
    assert np.allclose(again.losses, plain.losses, rtol=1e-5, atol=1e-6)


@pytest.mark.numerics
def test_text_encoder_lora_and_merged_pipeline_load_in_plain_diffusers(toy_model, tmp_path):
    from diffusers import StableDiffusionPipeline
    out = tmp_path / "run"
    result = train(cfg_for(toy_model, out, train="lora+text_encoder", max_train_steps=3, save_merged=True),
                   toy_data(4, R))
    assert set(result.outputs) == {"lora", "merged"}
    keys = _final_lora(out).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)

    pipe = _pipe(toy_model)
    ids = pipe.tokenizer(list(CAPTIONS), padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        base_text = pipe.text_encoder(ids)[0]
    base = _latents(pipe, CAPTIONS[0])
    pipe.load_lora_weights(out)  # plain diffusers loads the text-encoder LoRA too
    with torch.no_grad():
        assert (pipe.text_encoder(ids)[0] - base_text).abs().max() > 1e-3
    with_lora = _latents(pipe, CAPTIONS[0])
    merged = StableDiffusionPipeline.from_pretrained(out / "merged", safety_checker=None, local_files_only=True)
    merged.set_progress_bar_config(disable=True)
    from_merged = _latents(merged, CAPTIONS[0])
    gap = (with_lora - base).abs().max().item()
    assert gap > 1e-2  # the LoRA changes the output ...
    assert torch.allclose(from_merged, with_lora, atol=1e-4), \
        (from_merged - with_lora).abs().max()  # ... merged = loaded

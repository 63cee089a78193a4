"""Trainer behaviour on the toy task: it learns, it resumes exactly, its LoRA loads in plain diffusers."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.checkpoint import list_checkpoints
from finetune.config import TrainConfig
from finetune.lora import LORA_FILE
from finetune.toy import CAPTIONS, pattern, save_toy_model, toy_data
from finetune.train import NonFiniteLossError, train

R = 16
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


def test_lora_learns_toy_task_and_loads_in_plain_diffusers(toy_model, tmp_path):
    out = tmp_path / "run"
    cfg = cfg_for(toy_model, out, train_batch_size=8, max_train_steps=80, lora_rank=16, lora_alpha=32,
                  lora_target_modules=BROAD, validation_steps=80, validation_prompts=[CAPTIONS[0]],
                  report_to="tensorboard")
    result = train(cfg, toy_data(8, R))
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
    assert last < 0.5 * first, (first, last)
    assert (out / LORA_FILE).is_file() and (out / "validation" / "step-0000080.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*"))
    card = (out / "README.md").read_text()
    assert str(toy_model) in card and "SYNTHETIC" in card and "8 image-report pairs" in card
    assert "train: lora" in (out / "train_config.yaml").read_text()

    pipe = _pipe(toy_model)
    with torch.no_grad():
        x = {c: torch.from_numpy(pattern(c, R))[None, None].expand(1, 3, R, R) * 2 - 1 for c in CAPTIONS}
        target = {c: pipe.vae.encode(x[c]).latent_dist.mean * pipe.vae.config.scaling_factor for c in CAPTIONS}
    base = {c: _latents(pipe, c) for c in CAPTIONS}
    pipe.load_lora_weights(out)  # plain diffusers, no synthcxr code
    tuned = {c: _latents(pipe, c) for c in CAPTIONS}
    for own in CAPTIONS:
        d_base = (base[own] - target[own]).pow(2).mean().item()
        d_own = (tuned[own] - target[own]).pow(2).mean().item()
        assert d_own < 0.2 * d_base, (own, d_base, d_own)  # output moved toward the trained pattern
    # NOTE: caption-SPECIFIC separation (left prompt -> left pattern) is not reached in this 80-step
    # budget with the tiny random text encoder (caption embeddings differ by ~4%); see docs/FINETUNE.md.
    pipe.unload_lora_weights()
    for c in CAPTIONS:
        assert torch.equal(_latents(pipe, c), base[c])  # unloading restores the base exactly


def _final_lora(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / LORA_FILE))


def test_resume_equals_uninterrupted_and_rotation(toy_model, tmp_path):
    kw = dict(max_train_steps=6, lr_scheduler="cosine", lr_warmup_steps=2, gradient_accumulation_steps=2,
              train_batch_size=2, caption_dropout=0.3, lora_dropout=0.1, checkpointing_steps=2,
              checkpoints_total_limit=2, snr_gamma=5.0, noise_offset=0.05)
    data = toy_data(6, R)
    full = train(cfg_for(toy_model, tmp_path / "a", **kw), data)
    stopped = train(cfg_for(toy_model, tmp_path / "b", **kw), data, should_stop=lambda s: s == 3)
    assert stopped.stopped_early and stopped.steps == 3 and not (tmp_path / "b" / LORA_FILE).exists()
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["checkpoint-2", "checkpoint-3"]
    with pytest.raises(FileExistsError, match="--resume latest"):
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

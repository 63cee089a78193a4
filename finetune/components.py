"""Load the base model and make the requested parts trainable (LoRA or full), on the right device/dtype."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from cxrcommon.models import load_pipeline

from .config import TRAIN_MODES
from .lora import add_lora

log = logging.getLogger(__name__)


@dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPM with the model's betas: training noise
    inference_scheduler: Any  # the model's own scheduler: validation images and saved pipelines


def load_components(model: str, prediction_type: str | None = None) -> Components:
    """The base pipeline's parts (fp32, CPU), with the training scheduler built from its config."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = load_pipeline(StableDiffusionPipeline, model, torch_dtype=torch.float32)
    if prediction_type:
        pipe.scheduler.register_to_config(prediction_type=prediction_type)
    noise = DDPMScheduler.from_config(pipe.scheduler.config)
    return Components(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, noise, pipe.scheduler)


def prepare_training(comp: Components, cfg: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Freeze everything, attach LoRA or unfreeze per `cfg.train`, move/cast, and return the trained models.

    Frozen weights go to `dtype` (bf16/fp16 halves memory); trained parameters stay fp32 so fp16
    gradients can be unscaled (the stock script's 'Attempting to unscale FP16 gradients' error)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from diffusers.training_utils import cast_training_params

    if cfg.train not in TRAIN_MODES:
        raise ValueError(f"--train {cfg.train!r} is not one of {', '.join(TRAIN_MODES)}")
    for m in (comp.unet, comp.vae, comp.text_encoder):
        m.requires_grad_(False)
    comp.unet.set_attn_processor(AttnProcessor2_0() if cfg.sdpa else AttnProcessor())
    trained: dict[str, Any] = {"unet": comp.unet}
    if cfg.train.startswith("lora"):
        add_lora(comp.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    else:
        comp.unet.requires_grad_(True)
    if cfg.train.endswith("+text_encoder"):
        trained["text_encoder"] = comp.text_encoder
        if cfg.train.startswith("lora"):
            add_lora(comp.text_encoder, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                     cfg.text_encoder_target_modules)
        else:
            comp.text_encoder.requires_grad_(True)
    for m in (comp.unet, comp.vae, comp.text_encoder):
        m.to(device, dtype)
    cast_training_params(list(trained.values()), dtype=torch.float32)
    if cfg.gradient_checkpointing:
        comp.unet.enable_gradient_checkpointing()
        if "text_encoder" in trained:
            comp.text_encoder.gradient_checkpointing_enable()
    if cfg.channels_last:
        comp.unet.to(memory_format=torch.channels_last)
    comp.vae.eval()
    comp.text_encoder.train("text_encoder" in trained)
    comp.unet.train()
    n = sum(p.numel() for m in trained.values() for p in m.parameters() if p.requires_grad)
    log.info("training %s: %.2f M trainable parameters (%s frozen weights on %s)", cfg.train, n / 1e6, dtype, device)
    return trained

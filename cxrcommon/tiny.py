"""Tiny models of the real SD-2 classes (diffusers' own test sizes) so every code path runs on CPU.

Same classes, same pipeline wiring as SD 2.1-base; only the widths are small. Used by the tests and,
until a trained embedded model is shipped, as the offline fallback model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .tokenizer import clip_tokenizer

TINY_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_components(seed: int = 0, *, inpainting: bool = False,
                    prediction_type: str = "epsilon") -> dict[str, Any]:
    """UNet (1.4 M), VAE (0.7 M), CLIP text encoder (1.6 M), tokenizer and DDIM scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32,
        in_channels=9 if inpainting else 4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, sample_size=64)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5, vocab_size=49408,
        hidden_act="gelu", projection_dim=32, max_position_embeddings=77))
    scheduler = DDIMScheduler(prediction_type=prediction_type, **TINY_SCHEDULER)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(),
            "tokenizer": clip_tokenizer(), "scheduler": scheduler}


def tiny_pipeline(seed: int = 0, *, inpainting: bool = False) -> Any:
    """A real StableDiffusion(Inpaint)Pipeline around the tiny components."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = cls(**tiny_components(seed, inpainting=inpainting), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(path: str | os.PathLike, seed: int = 0, *, inpainting: bool = False) -> Path:
    """Save the tiny pipeline with `save_pretrained` (safetensors) so it loads like a hub model."""
    path = Path(path)
    tiny_pipeline(seed, inpainting=inpainting).save_pretrained(path, safe_serialization=True)
    return path


def tiny_pipeline_dir(inpainting: bool = False) -> Path:
    """A cached on-disk tiny pipeline (built once) for commands that need a model folder."""
    root = Path(os.environ.get("SYNTHCXR_CACHE", Path.home() / ".cache" / "synthcxr"))
    path = root / ("tiny-random-inpaint" if inpainting else "tiny-random")
    if not (path / "model_index.json").is_file():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_tiny_pipeline(tmp, inpainting=inpainting)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first; theirs is identical
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return path

"""Validation: a fixed prompts x seeds image grid (comparable across steps) and a held-out loss."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cxrcommon.prompt_windows import DEFAULT_MAX_WINDOWS, pipeline_embeds

log = logging.getLogger(__name__)


def pipeline_from(comp: Any, unet: Any, text_encoder: Any) -> Any:
    """A StableDiffusionPipeline around the (partly trained) modules, sharing their weights."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=comp.vae, text_encoder=text_encoder, tokenizer=comp.tokenizer, unet=unet,
                                   scheduler=comp.inference_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def validation_grid(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], *, resolution: int, steps: int,
                    guidance: float, max_windows: int = DEFAULT_MAX_WINDOWS) -> np.ndarray:
    """Rows = prompts, columns = seeds; grayscale float [0, 1]. CPU generators make the grid the same
    on any device for the same weights. Prompts are encoded whole, in up to `max_windows` windows, as in
    training and sampling (the stock pipeline would cut them at 77 tokens).

    Args:
        pipe: a diffusers StableDiffusionPipeline on the validation weights (its own scheduler samples).
        prompts: the P prompts (report texts), one grid row each.
        seeds: the S seeds, one grid column each (torch CPU generator seeds, >= 0).
        resolution: output side in pixels, a multiple of 8 (the model's training resolution).
        steps: denoising steps per image, >= 1.
        guidance: CFG scale (> 1 enables classifier-free guidance with the empty negative prompt).
        max_windows: int >= 1, the cap on 75-token windows each prompt is encoded in.
    Returns: (P * resolution, S * resolution) float32 grid in [0, 1], the RGB outputs averaged to gray."""
    rows = []
    for prompt in prompts:
        row = []
        embeds = pipeline_embeds(pipe, prompt, max_windows=max_windows)
        for seed in seeds:
            g = torch.Generator("cpu").manual_seed(int(seed))
            img = pipe(**embeds, height=resolution, width=resolution, num_inference_steps=steps,
                       guidance_scale=guidance, generator=g, output_type="np").images[0]
            row.append(img.mean(axis=-1))
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0).astype(np.float32)


def log_grid(trackers: Sequence[Any], grid: np.ndarray, prompts: Sequence[str], step: int) -> None:
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", grid, step, dataformats="HW")
            tracker.writer.add_text("validation_prompts", "\n\n".join(f"{i}: {p}" for i, p in enumerate(prompts)),
                                    step)
        elif tracker.name == "wandb":
            import wandb
            tracker.log({"validation": wandb.Image(grid, caption=" | ".join(prompts))}, step=step)


def save_grid(path: Path, grid: np.ndarray, model: str, prompts: Sequence[str], step: int) -> Path:
    """The grid as a PNG carrying the synthetic-image provenance tags."""
    from cxrcommon.imageio import write_png
    from cxrcommon.provenance import provenance
    return write_png(path, grid, text=provenance(model=model, step=step, prompts=" | ".join(prompts)))


def held_out_loss(loss_fn: Callable[..., torch.Tensor], batches: Sequence[tuple],
                  seed: int) -> float | None:
    """Mean denoising loss over fixed validation batches with a fixed seed (comparable across steps)."""
    if not batches:
        return None
    from accelerate.utils import set_seed
    set_seed(seed)
    with torch.no_grad():
        return float(np.mean([loss_fn(*b).item() for b in batches]))

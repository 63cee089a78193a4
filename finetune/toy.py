"""A learnable toy task for tests and benchmarks: two captions -> two image patterns.

The tiny random VAE has a posterior std near 1, which drowns any image in noise; `save_toy_model`
makes its encoder near-deterministic and its latents unit-scale (as a trained SD VAE is), so a
trainer that works measurably learns "bright left" vs "bright right" in seconds on a CPU."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .data import TrainData

CAPTIONS = ("bright left half", "bright right half")


def pattern(caption: str, resolution: int) -> np.ndarray:
    """The image a toy caption stands for: one half white, the other black."""
    a = np.zeros((resolution, resolution), np.float32)
    half = resolution // 2
    if caption == CAPTIONS[0]:
        a[:, :half] = 1.0
    else:
        a[:, half:] = 1.0
    return a


def toy_data(n: int = 8, resolution: int = 32, n_val: int = 2) -> TrainData:
    """n training pairs alternating the two captions (in memory), plus n_val held out."""
    caps = [CAPTIONS[i % 2] for i in range(n + n_val)]
    ims = [pattern(c, resolution) for c in caps]
    return TrainData(ims[:n], caps[:n], ims[n:], caps[n:])


def save_toy_model(path: str | os.PathLike, seed: int = 0, resolution: int = 32,
                   prediction_type: str = "v_prediction") -> Path:
    """The tiny SD-2 pipeline with a near-deterministic VAE encoder, unit-scale latents and (by default)
    a v-prediction scheduler."""
    from cxrcommon.tiny import tiny_pipeline
    pipe = tiny_pipeline(seed)
    pipe.scheduler.register_to_config(prediction_type=prediction_type)
    vae = pipe.vae
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[c:] = 0.0
        vae.quant_conv.bias[c:] = -12.0  # log-variance: posterior std ~ 0.0025
        x = torch.from_numpy(np.stack([pattern(k, resolution) for k in CAPTIONS]))[:, None].expand(-1, 3, -1, -1)
        std = vae.encode(x * 2 - 1).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path

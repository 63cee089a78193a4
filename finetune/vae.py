"""Train a small AutoencoderKL from a config on gray images (replicated to RGB): stage 1 of the embedded model.

Why: SD's VAE is not downloadable offline and a random VAE's latents are noise, so the embedded
demonstrator first learns its own compressor. Loss = L1 + MSE on pixels + a small KL term (SD used
1e-6 plus a perceptual/GAN loss; phantoms are smooth enough for pixel losses alone). The latent
`scaling_factor` is set to 1 / std of the latents, as SD did, so the UNet sees unit-variance inputs.
`python -m finetune.vae --train-data data/phantoms --out runs/vae`"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cxrcommon.config import field, parse_config
from cxrcommon.logs import setup_logging

from .data import load_pixels

log = logging.getLogger(__name__)


@dataclass
class VaeConfig:
    train_data: str = field("", "manifest (CSV/JSONL) or imagefolder with metadata.jsonl; only images are used")
    image_column: str = field("image", "manifest column holding the image path (imagefolder: file_name)")
    config_dir: str = field("configs/embedded/vae", "folder with the AutoencoderKL config.json")
    out: str = field("runs/embedded/vae", "where the trained VAE is saved (diffusers folder, safetensors)")
    resolution: int = field(64, "image size the VAE is trained at")
    steps: int = field(250, "optimizer steps")
    batch_size: int = field(16, "images per step")
    learning_rate: float = field(2e-3, "AdamW peak learning rate (cosine decay to a tenth)")
    kl_weight: float = field(1e-6, "weight of the KL term (keeps latents near a Gaussian without blurring)")
    max_images: int | None = field(None, "use only the first N images")
    seed: int = field(0, "seed for initialisation and batch order")
    verbose: bool = field(False, "debug logging")


def load_images(train_data: str, image_column: str, resolution: int, max_images: int | None = None) -> torch.Tensor:
    """All images of a manifest as one N x 3 x R x R tensor in [-1, 1] (small data sets fit in memory)."""
    from cxrcommon.manifest import Columns, read_manifest
    records = read_manifest(train_data, Columns(image=image_column), on_error="skip")
    if max_images:
        records = records[:max_images]
    if not records:
        raise ValueError(f"{train_data}: no usable images")
    return torch.stack([load_pixels(r.image, resolution, "pad", None) for r in
                        tqdm(records, desc="load images", unit="img")])


def vae_loss(vae: torch.nn.Module, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, float]:
    """(L1 + MSE + kl_weight * KL per pixel, reconstruction L1 for logging)."""
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample()).sample
    l1 = F.l1_loss(rec, x)
    kl = post.kl().mean() / x[0].numel()
    return l1 + F.mse_loss(rec, x) + kl_weight * kl, l1.item()


@torch.no_grad()
def latent_scale(vae: torch.nn.Module, images: torch.Tensor, n: int = 256) -> float:
    """1 / std of sampled latents over up to n images (SD's scaling_factor)."""
    z = torch.cat([vae.encode(b).latent_dist.sample() for b in images[:n].split(32)])
    return float(1.0 / z.std())


def train_vae(images: torch.Tensor, config_dir: str | Path, out: str | Path, *, steps: int, batch_size: int,
              learning_rate: float, kl_weight: float = 1e-6, seed: int = 0) -> tuple[Path, list[float]]:
    """Train an AutoencoderKL from `config_dir` on `images` (N x 3 x R x R, [-1, 1]); returns (folder, L1 per step).

    The folder is written whole (temp folder, then rename) so an interrupted run leaves nothing half-saved.

    Args:
        images: (N, 3, R, R) float training images in [-1, 1] (gray repeated to RGB); batches are drawn from
            them with replacement, and the first 256 set the latent scaling_factor.
        config_dir: folder holding the AutoencoderKL `config.json` (the architecture; weights start random).
        out: folder the trained VAE is saved to (safetensors, its config with the fitted scaling_factor).
        steps: optimizer steps, >= 1 (AdamW, 50-step linear warm-up, then cosine decay to 0.1 x the rate).
        batch_size: images per step, >= 1.
        learning_rate: AdamW peak learning rate, > 0 (gradients clipped to norm 1).
        kl_weight: weight of the per-pixel KL term added to L1 + MSE, >= 0.
        seed: seeds the weight init and the batch draws.
    Returns: (the saved folder `out`, reconstruction L1 per step, pixels in [-1, 1], `steps` floats)."""
    from diffusers import AutoencoderKL

    from cxrcommon.atomic import atomic_dir

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir))
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    g = torch.Generator().manual_seed(seed)
    l1s: list[float] = []
    bar = tqdm(range(steps), desc="vae", unit="step")
    t0 = time.perf_counter()
    for _ in bar:
        batch = images[torch.randint(len(images), (batch_size,), generator=g)]
        loss, l1 = vae_loss(vae, batch, kl_weight)
        if not torch.isfinite(loss):
            raise RuntimeError(f"VAE loss is not finite at step {len(l1s) + 1}; lower --learning-rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        l1s.append(l1)
        bar.set_postfix(l1=f"{l1:.4f}")
    vae.eval()
    scale = latent_scale(vae, images)
    vae.register_to_config(scaling_factor=scale)
    log.info("VAE: %d steps in %.0f s, final L1 %.4f (pixels in [-1, 1]), scaling_factor %.3f",
             steps, time.perf_counter() - t0, float(np.mean(l1s[-50:])), scale)
    return atomic_dir(Path(out), lambda tmp: vae.save_pretrained(tmp, safe_serialization=True)), l1s


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(VaeConfig, argv, description=__doc__.splitlines()[0])
    setup_logging(cfg.verbose)
    images = load_images(cfg.train_data, cfg.image_column, cfg.resolution, cfg.max_images)
    return train_vae(images, cfg.config_dir, cfg.out, steps=cfg.steps, batch_size=cfg.batch_size,
                     learning_rate=cfg.learning_rate, kl_weight=cfg.kl_weight, seed=cfg.seed)[0]


if __name__ == "__main__":
    main()

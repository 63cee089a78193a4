"""The denoising loss: noise (with optional offset), a random timestep, epsilon or v target, min-SNR."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_loss(unet: torch.nn.Module, scheduler: object, latents: torch.Tensor, hidden: torch.Tensor, *,
                   encoder_mask: torch.Tensor | None = None, snr_gamma: float | None = None,
                   noise_offset: float = 0.0) -> torch.Tensor:
    """Mean (optionally min-SNR-weighted) MSE between the UNet output and the scheduler's target.

    `encoder_mask` (B, L) bool marks the caption tokens each row may attend to (captions of different
    window counts padded into one batch; None: all).
    Random draws use the global RNG, which the trainer reseeds every step (exact resume).

    Args:
        unet: the diffusers UNet2DConditionModel being trained.
        scheduler: the training noise scheduler (DDPM-style: add_noise, get_velocity, config.num_train_timesteps
            and config.prediction_type "epsilon" or "v_prediction"; others raise ValueError).
        latents: (B, 4, h, w) clean VAE latents, already multiplied by the VAE's scaling_factor.
        hidden: (B, L, D) text-encoder hidden states of the captions (L = 77 per window, D = the UNet's
            cross-attention dim).
        encoder_mask: (B, L) bool, True on the keys each row may attend to, or None for all.
        snr_gamma: min-SNR-gamma weighting, > 0 (5 in the paper), or None for the plain mean MSE.
        noise_offset: scale of the per-(sample, channel) offset noise added to the noise, >= 0 (0 = off).
    Returns: scalar float32 loss tensor (with grad)."""
    from diffusers.training_utils import compute_snr

    # randn(shape), not randn_like: the draws must not depend on the latents' memory layout (the VAE
    # returns channels-last tensors on CPU, the latent cache contiguous ones), or cached and uncached
    # runs would see different noise
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                   device=latents.device, dtype=latents.dtype)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"prediction type {kind!r} is not supported; use epsilon or v_prediction")
    pred = unet(noisy, timesteps, hidden, encoder_attention_mask=encoder_mask, return_dict=False)[0]
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    # Min-SNR-gamma (arXiv:2303.09556, sec. 3.4/4.2), as in the current diffusers examples:
    # weight = min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction.
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma) / (snr + 1 if kind == "v_prediction" else snr)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()

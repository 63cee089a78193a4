"""On-disk caches of VAE latent moments and caption embeddings (safetensors), keyed by content.

The key hashes everything the cached tensors depend on (model weights' identity, image files,
resolution, resize mode, captions), so changing any of them makes a new cache instead of silently
training on stale latents."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cxrcommon.atomic import atomic_path
from cxrcommon.prompt_windows import WINDOW_LEN, encode_padded

log = logging.getLogger(__name__)


def model_identity(module: Any) -> str:
    """Where a sub-model's weights came from plus their files' sizes and mtimes (a hub snapshot path
    already contains the commit hash); a weight hash for in-memory models."""
    source = str(getattr(module.config, "_name_or_path", "") or "")
    path = Path(source)
    if source and path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return source + "|" + "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    h = hashlib.sha256(source.encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).numpy().tobytes())
    return "weights:" + h.hexdigest()


def cache_key(**parts: Any) -> str:
    """A short hex digest of the given parts (JSON-encoded, sorted keys)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


class LatentCache:
    """Lazy reader of a latent-moment cache, safe to use from dataloader workers."""

    def __init__(self, path: Path):
        self.path, self._fh = path, None

    def __call__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fh is None:
            self._fh = safe_open(str(self.path), framework="pt")
        return self._fh.get_slice("mean")[index], self._fh.get_slice("std")[index]

    def __getstate__(self) -> dict:
        return {"path": self.path, "_fh": None}


def build_latent_cache(path: Path, n: int, pixels: Callable[[int], torch.Tensor], vae: Any,
                       device: torch.device, dtype: torch.dtype, batch_size: int) -> LatentCache:
    """Encode every image once (mean and std of the VAE posterior, fp32) unless `path` exists.

    Args:
        path: the .safetensors cache file (tensors "mean" and "std", each (n, 4, h, w)); written atomically;
            if it exists it is reused as is, so its name must key the data, VAE and settings.
        n: number of images, >= 1 (indices 0 .. n-1).
        pixels: image index -> (3, R, R) float tensor in [-1, 1] (e.g. `finetune.data.load_pixels`).
        vae: the diffusers AutoencoderKL whose posterior is cached (not scaled by its scaling_factor).
        device: where the VAE runs.
        dtype: the dtype the pixels are cast to for the VAE (the moments are stored as float32).
        batch_size: images per VAE call, >= 1.
    Returns: a LatentCache over `path`: index -> ((4, h, w) mean, (4, h, w) std)."""
    if not path.is_file():
        means, stds = [], []
        for lo in tqdm(range(0, n, batch_size), desc="caching latents", unit="batch"):
            batch = torch.stack([pixels(i) for i in range(lo, min(n, lo + batch_size))])
            with torch.no_grad():
                dist = vae.encode(batch.to(device, dtype)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        with atomic_path(path) as tmp:
            save_file({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}, str(tmp))
        log.info("cached %d latents in %s", n, path)
    else:
        log.info("using cached latents %s", path)
    return LatentCache(path)


class TextCache:
    """Lazy reader of a caption-embedding cache: caption i's (W_i*77, D) hidden states, read from the
    memory-mapped file when a batch needs them, so neither RAM nor a GPU holds the whole table (100k
    MIMIC-length captions are tens of GB at SD 2.1's width)."""

    def __init__(self, path: Path, windows: torch.Tensor):
        self.path, self._fh = path, None
        self.bounds = torch.cat([torch.zeros(1, dtype=torch.long), windows.cumsum(0)]).mul(WINDOW_LEN).tolist()

    def __call__(self, index: int) -> torch.Tensor:
        if self._fh is None:
            self._fh = safe_open(str(self.path), framework="pt")
        return self._fh.get_slice("hidden")[self.bounds[index]:self.bounds[index + 1]]


def _stored_windows(path: Path) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor("windows")


def build_text_cache(path: Path, input_ids: torch.Tensor, windows: torch.Tensor, text_encoder: Any,
                     batch_size: int) -> TextCache:
    """Every caption's encoder hidden states over its own windows only, concatenated along the
    sequence axis ((sum of windows) x 77, D), fp32, plus each caption's window count; computed once.
    Storing no padding keeps the cache as small as the captions are long."""
    if path.is_file() and not torch.equal(_stored_windows(path), windows):
        log.warning("%s was built for other caption windows; rebuilding it", path)
        path.unlink()
    if not path.is_file():
        out = []
        for lo in tqdm(range(0, len(input_ids), batch_size), desc="caching captions", unit="batch"):
            with torch.no_grad():
                hidden, _ = encode_padded(text_encoder, input_ids[lo:lo + batch_size], windows[lo:lo + batch_size])
            out += [h[:w * WINDOW_LEN].float().cpu() for h, w in zip(hidden, windows[lo:lo + batch_size].tolist())]
        with atomic_path(path) as tmp:
            save_file({"hidden": torch.cat(out).contiguous(), "windows": windows.contiguous()}, str(tmp))
        log.info("cached %d caption embeddings in %s", len(input_ids), path)
    return TextCache(path, windows)


def cache_dir(cfg: Any) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "cache"


def latent_key(vae: Any, images: Sequence[str], cfg: Any) -> str:
    return cache_key(kind="latents", vae=model_identity(vae), images=list(images), resolution=cfg.resolution,
                     resize_mode=cfg.resize_mode, clip_percentile=cfg.clip_percentile)


def text_key(text_encoder: Any, captions: Sequence[str], windows: torch.Tensor) -> str:
    """Caption embeddings depend on the encoder, the texts and how many windows of each are encoded."""
    return cache_key(kind="text-windows", text_encoder=model_identity(text_encoder), captions=list(captions),
                     windows=windows.tolist())

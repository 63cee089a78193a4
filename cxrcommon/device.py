"""Device and precision policy, so no stage hard-codes "cuda"."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UserError

_ORDER = ("cuda", "xpu", "mps", "cpu")


class DeviceUnavailableError(UserError, RuntimeError):
    """An explicitly requested device is not present on this machine."""


_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION_NAMES = ("auto", *_PRECISIONS)


def _available(kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    if kind == "mps":
        return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    raise UserError(f"unknown device kind {kind!r}; use one of {', '.join(_ORDER)} or 'auto'")


def pick_device(preference: str | None = "auto") -> torch.device:
    """Best available device: cuda > xpu > mps > cpu, or the one asked for.

    An explicit request for an absent device is an error rather than a silent CPU fallback,
    because a job that quietly runs 100x slower is worse than one that stops."""
    if preference in (None, "", "auto"):
        return torch.device(next(k for k in _ORDER if _available(k)))
    kind = str(preference).split(":")[0]
    if not _available(kind):
        raise DeviceUnavailableError(f"device {preference!r} was requested but is not available; "
                                     f"use --device auto or one of: {', '.join(k for k in _ORDER if _available(k))}")
    return with_index(preference)


def with_index(device: torch.device | str) -> torch.device:
    """`cuda` -> `cuda:<current device>`: torch 2.11's `torch.cuda.set_device("cuda")` raises "Expected a
    torch.device with a specified index", and memory statistics want one device, not a kind."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def persistent_compile_cache() -> Path:
    """Point inductor's on-disk caches (FX graphs, autotuning, Triton kernels) at the user cache, unless
    TORCHINDUCTOR_CACHE_DIR is set, so a second run reuses the first run's compile instead of paying it
    again. Inductor's default folder lives in /tmp, which a reboot or a fresh container empties."""
    default = Path(os.environ.get("SYNTHCXR_CACHE", Path.home() / ".cache" / "synthcxr")) / "torchinductor"
    return Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default)))


def pick_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype:
    """Compute dtype: fp32 on CPU, bf16 where the device supports it, else fp16."""
    if precision != "auto":
        if precision not in _PRECISIONS:
            raise UserError(f"precision {precision!r} is not one of auto, {', '.join(_PRECISIONS)}")
        return _PRECISIONS[precision]
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "xpu":
        return torch.bfloat16
    if kind == "mps":
        return torch.float16
    return torch.float32


def mixed_precision_name(dtype: torch.dtype) -> str:
    """Accelerate's name for a compute dtype ("no" for fp32)."""
    return {torch.float32: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]

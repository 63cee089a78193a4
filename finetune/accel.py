"""Device, precision and optimizer choices, made through Accelerate only.

Accelerate decides the device (CUDA, Intel XPU, MPS, CPU; one process per device under
`accelerate launch`); nothing here names a device kind, so XPU works wherever Accelerate supports it."""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import torch

from cxrcommon.device import mixed_precision_name, pick_dtype

log = logging.getLogger(__name__)

PRECISIONS = ("no", "fp16", "bf16")


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """'auto' -> the launcher's choice if `accelerate launch --mixed_precision` set one, else
    bf16 where the device supports it, fp16 on older GPUs, no on CPU."""
    if requested == "auto":
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
        if launched in PRECISIONS:
            return launched
        return mixed_precision_name(pick_dtype(device))
    if requested not in PRECISIONS:
        raise ValueError(f"--mixed-precision {requested!r} is not one of auto, {', '.join(PRECISIONS)}")
    if requested == "fp16" and device.type == "cpu":
        raise ValueError("--mixed-precision fp16 is not supported on CPU; use bf16 or no")
    return requested


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """dtype for the frozen weights (trainable ones stay fp32 so fp16 grads can be unscaled)."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def build_accelerator(cfg: Any, logging_dir: str) -> Any:
    """An Accelerator on the device Accelerate picks (or CPU when --device cpu)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration

    if cfg.device not in ("auto", "cpu"):
        raise ValueError(f"--device {cfg.device!r}: use auto (Accelerate picks; choose GPUs with "
                         "CUDA_VISIBLE_DEVICES/ZE_AFFINITY_MASK or `accelerate config`) or cpu")
    state = PartialState(cpu=cfg.device == "cpu")
    precision = resolve_mixed_precision(cfg.mixed_precision, state.device)
    report_to = None if cfg.report_to in ("none", "", None) else cfg.report_to
    return Accelerator(mixed_precision=precision, cpu=cfg.device == "cpu", log_with=report_to,
                       project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=logging_dir))


def optimizer_class(choice: str, device: torch.device) -> type:
    """AdamW, or bitsandbytes' 8-bit AdamW (asked for, or 'auto' on an accelerator with bnb present)."""
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if choice == "adamw8bit" or (choice == "auto" and has_bnb and device.type != "cpu"):
        if not has_bnb:
            raise ImportError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes")
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit
    if choice not in ("auto", "adamw", "adamw8bit"):
        raise ValueError(f"--optimizer {choice!r} is not one of auto, adamw, adamw8bit")
    return torch.optim.AdamW

"""LoRA adapters (peft) on the UNet / text encoder, saved in the format diffusers loads.

Saving goes through `StableDiffusionPipeline.save_lora_weights` with the adapter metadata, so
`pipe.load_lora_weights(dir)` restores the right alpha/rank scale (the stock example dropped it,
so LoRAs trained with alpha != rank loaded at the wrong strength). Keys stay in peft format: the
stock `convert_state_dict_to_diffusers` renames attention keys to `lora.down/up` but leaves conv
keys as `lora_A/B`, and diffusers 0.42 then silently drops the attention LoRA on load when both
kinds of module are targeted (found by tests/test_finetune_train.py)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"


def lora_config(rank: int, alpha: float | None, dropout: float, targets: list[str]) -> Any:
    from peft import LoraConfig
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                      init_lora_weights="gaussian", target_modules=list(targets))


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None, dropout: float,
             targets: list[str]) -> None:
    """Freeze `model` and attach a trainable LoRA adapter to the `targets` modules."""
    model.requires_grad_(False)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()} | {n for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names and not any(n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"LoRA target module(s) {missing} do not exist in {type(model).__name__}; "
                         f"check --lora-target-modules / --text-encoder-target-modules")
    model.add_adapter(lora_config(rank, alpha, dropout, targets))


def lora_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(peft-format LoRA tensors, adapter metadata) of a peft-adapted model."""
    from peft.utils import get_peft_model_state_dict
    tensors = get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, \
        model.peft_config["default"].to_dict()


def save_lora(output_dir: str | os.PathLike, unet: torch.nn.Module,
              text_encoder: torch.nn.Module | None = None) -> Path:
    """Write <output_dir>/pytorch_lora_weights.safetensors atomically (temp folder, then rename)."""
    from diffusers import StableDiffusionPipeline
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    unet_layers, unet_meta = lora_state(unet)
    kwargs: dict[str, Any] = {"unet_lora_layers": unet_layers, "unet_lora_adapter_metadata": unet_meta}
    if text_encoder is not None:
        te_layers, te_meta = lora_state(text_encoder)
        kwargs.update(text_encoder_lora_layers=te_layers, text_encoder_lora_adapter_metadata=te_meta)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-lora-", dir=output_dir))
    try:
        StableDiffusionPipeline.save_lora_weights(save_directory=tmp, safe_serialization=True, **kwargs)
        with open(tmp / LORA_FILE, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp / LORA_FILE, output_dir / LORA_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir / LORA_FILE

"""Final outputs: the LoRA file, a full fine-tuned pipeline, or a merged pipeline — each written whole
(temp folder, then rename) so a crash never leaves a half-saved model."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from cxrcommon.atomic import atomic_dir
from cxrcommon.models import load_pipeline

from .lora import save_lora
from .validate import pipeline_from

log = logging.getLogger(__name__)


def save_outputs(cfg: Any, comp: Any, trained: dict[str, Any]) -> dict[str, Path]:
    """LoRA modes: <out>/pytorch_lora_weights.safetensors (+ <out>/merged with --save-merged).
    Full modes: <out>/pipeline, a complete diffusers pipeline with the trained UNet/text encoder."""
    from diffusers import StableDiffusionPipeline

    out = Path(cfg.output_dir)
    written: dict[str, Path] = {}
    if cfg.train.startswith("lora"):
        written["lora"] = save_lora(out, trained["unet"], trained.get("text_encoder"))
        log.info("LoRA weights: %s", written["lora"])
        if cfg.save_merged:
            def merged(tmp: Path) -> None:
                pipe = load_pipeline(StableDiffusionPipeline, cfg.model, torch_dtype=torch.float32)
                pipe.load_lora_weights(out)
                pipe.fuse_lora()
                pipe.unload_lora_weights()
                pipe.save_pretrained(tmp, safe_serialization=True)
            written["merged"] = atomic_dir(out / "merged", merged)
    else:
        for m in (comp.unet, comp.vae, comp.text_encoder):
            m.to(dtype=torch.float32)
        pipe = pipeline_from(comp, trained["unet"], trained.get("text_encoder", comp.text_encoder))
        written["pipeline"] = atomic_dir(out / "pipeline",
                                         lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
        log.info("fine-tuned pipeline: %s", written["pipeline"])
    return written

"""Final outputs: the LoRA file, a full fine-tuned pipeline, or a merged pipeline — each written whole
(temp folder, then rename) so a crash never leaves a half-saved model."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from cxrcommon.models import load_pipeline

from .lora import save_lora
from .validate import pipeline_from

log = logging.getLogger(__name__)


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Write into a temp folder beside `final`, then swap it in (replacing an older one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            final.rename(old)
            shutil.rmtree(old)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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
            written["merged"] = _atomic_dir(out / "merged", merged)
    else:
        for m in (comp.unet, comp.vae, comp.text_encoder):
            m.to(dtype=torch.float32)
        pipe = pipeline_from(comp, trained["unet"], trained.get("text_encoder", comp.text_encoder))
        written["pipeline"] = _atomic_dir(out / "pipeline", lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
        log.info("fine-tuned pipeline: %s", written["pipeline"])
    return written

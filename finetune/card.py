"""The model card (README.md) written next to the trained weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cxrcommon.atomic import atomic_write_text
from cxrcommon.config import to_dict
from cxrcommon.demographics import CARD_KEY, Demographics, caption_with
from cxrcommon.provenance import SOFTWARE, SYNTHETIC_WARNING

HYPER = ("train", "resolution", "resize_mode", "train_batch_size", "gradient_accumulation_steps", "learning_rate",
         "lr_scheduler", "lr_warmup_steps", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules",
         "snr_gamma", "noise_offset", "caption_dropout", "random_flip", "sections", "token_policy", "max_windows",
         "demographics_template", "demographics_dropout", "seed")


def write_model_card(output_dir: str | Path, cfg: Any, *, n_train: int, n_val: int, steps: int,
                     final_loss: float | None, mixed_precision: str, prediction_type: str) -> Path:
    """README.md: base model, data size, hyper-parameters, how to load, and the synthetic-data warning.

    Args:
        output_dir: the training output folder; README.md is written there (atomically, replacing one).
        cfg: the run's TrainConfig (model, train, train_data, val_fraction and the HYPER options are shown).
        n_train: training image-report pairs, >= 0.
        n_val: held-out pairs, >= 0.
        steps: optimizer steps taken, >= 0.
        final_loss: the last training loss, or None ("n/a") when no step ran.
        mixed_precision: accelerate's mixed-precision mode ("no", "fp16" or "bf16").
        prediction_type: the noise scheduler's prediction type ("epsilon" or "v_prediction").
    Returns: the path of the written README.md."""
    values = to_dict(cfg)
    front = {"base_model": str(cfg.model), "library_name": "diffusers",
             "tags": ["stable-diffusion", "text-to-image", "lora" if cfg.train.startswith("lora") else "fine-tune",
                      "chest-x-ray", "synthetic-data"],
             CARD_KEY: {"demographics_template": cfg.demographics_template,
                        "demographics_dropout": cfg.demographics_dropout}}
    table = "\n".join(f"| {k} | {values[k]} |" for k in HYPER)
    lora = cfg.train.startswith("lora")
    load = ("pipe.load_lora_weights(\"<this folder>\")" if lora
            else "# the fine-tuned pipeline is in <this folder>/pipeline")
    loss = "n/a" if final_loss is None else f"{final_loss:.4f}"
    example = "Moderate left pleural effusion."
    if cfg.demographics_template != "none":
        example = caption_with(example, Demographics("F", 71, "WHITE"), cfg.demographics_template)
    prompting = "" if cfg.demographics_template == "none" else (
        f"\n## Prompting with demographics\nCaptions began with the patient's demographics in the "
        f"`{cfg.demographics_template}` form (each field left out with probability {cfg.demographics_dropout}), "
        f"e.g. `{example}`. `inference.generate` builds this prefix itself from `sex`, `age` and `race` columns "
        f"of a prompt file, reading the form from this card. Ages over 89 are written 90+.\n")
    text = f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---
# Chest X-ray {'LoRA' if lora else 'fine-tune'} of {cfg.model}

> **Warning.** {SYNTHETIC_WARNING} Images made with these weights are synthetic research data. They
> can look plausible and still be anatomically or clinically wrong, and can reproduce biases of the
> training reports. Never use them for diagnosis or present them as patient images.

- Base model: `{cfg.model}` ({prediction_type} prediction)
- Training data: {n_train} image-report pairs from `{cfg.train_data or 'in-memory data'}`; {n_val} held out
  (patient-level split, fraction {cfg.val_fraction})
- Optimizer steps: {steps}; final training loss {loss}; mixed precision {mixed_precision}
- Trained with {SOFTWARE} (`python -m finetune.train`); the full config is `train_config.yaml`.

## Hyper-parameters
| option | value |
|---|---|
{table}

## Use
```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{cfg.model}")
{load}
image = pipe({example!r}).images[0]
```
{prompting}"""
    path = Path(output_dir) / "README.md"
    atomic_write_text(path, text)
    return path

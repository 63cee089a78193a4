"""LoRA proof: a finding the base model never saw appears after a short LoRA fine-tune, and not before.

Why: a test that the LoRA path of finetune.train really teaches a model something new. The base is
models/embedded-no-effusion (VAE, UNet and text encoder trained without any pleural effusion; see
finetune.embedded); the LoRA (UNet and text encoder) is trained with `finetune.train` on fresh in-memory
phantoms, most with a moderate or large left/right effusion; the analytic scorer (phantoms.score)
judges generations for "Large left/right pleural effusion." before and after. Pneumothorax would be the textbook choice
but the scorer cannot read it; effusion can be scored.
`python -m finetune.lora_proof --steps 300`
Its config, training phantoms and presence measure are phantoms.recipe; this module trains and samples."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cxrcommon.config import parse_config
from cxrcommon.logs import setup_logging
from phantoms.recipe import PROMPTS, LoraProofConfig, effusion_pairs, presence

from .data import TrainData
from .embedded import adherence, load

log = logging.getLogger(__name__)


def resolution_of(model: str | Path) -> int:
    """Image side a pipeline folder was trained at: UNet sample size x VAE downsampling."""
    unet = json.loads((Path(model) / "unet" / "config.json").read_text())
    vae = json.loads((Path(model) / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def lora_proof(cfg: LoraProofConfig) -> dict[str, Any]:
    """Score the base, train the LoRA, score base + LoRA; returns both scores and the run's facts."""
    from .config import TrainConfig
    from .train import train

    work = Path(cfg.work_dir)
    res = resolution_of(cfg.base)
    kw = {"steps": cfg.eval_steps, "guidance": cfg.guidance_scale, "seed": cfg.seed}
    before = adherence(load(cfg.base), cfg.per_class, **kw)
    data = TrainData(*effusion_pairs(cfg.n_train, res, cfg.data_seed, cfg.effusion_prob), [], [])
    tc = TrainConfig(model=cfg.base, output_dir=str(work / "lora"), seed=cfg.seed,
                     train="lora+text_encoder" if cfg.train_text_encoder else "lora", resolution=res,
                     cache_latents=True, cache_dir=str(work / "cache"), caption_dropout=0.1, lora_rank=cfg.rank,
                     lora_target_modules=list(cfg.targets), train_batch_size=cfg.batch_size,
                     max_train_steps=cfg.steps, learning_rate=cfg.learning_rate, lr_scheduler="constant_with_warmup",
                     lr_warmup_steps=min(20, cfg.steps // 5), mixed_precision="no", device="cpu",
                     checkpointing_steps=0, validation_steps=0, validation_seeds=[], report_to="none")
    t0 = time.perf_counter()
    result = train(tc, data)
    seconds = time.perf_counter() - t0
    pipe = load(cfg.base)
    pipe.load_lora_weights(str(work / "lora"))
    after = adherence(pipe, cfg.per_class, **kw)
    out = {"base": cfg.base, "steps": result.steps, "train_seconds": seconds, "n_train": cfg.n_train,
           "rank": cfg.rank, "before": before, "after": after,
           "presence_before": presence(before), "presence_after": presence(after), "prompts": PROMPTS}
    log.info("LoRA proof: effusion seen in %.0f%% of effusion-prompt images before, %.0f%% after (%d steps, %.0f s); "
             "accuracy %.2f -> %.2f", 100 * out["presence_before"], 100 * out["presence_after"], result.steps,
             seconds, before["accuracy"], after["accuracy"])
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(LoraProofConfig, argv, description=__doc__.splitlines()[0])
    setup_logging(cfg.verbose)
    torch.set_num_threads(cfg.threads)
    out = lora_proof(cfg)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()

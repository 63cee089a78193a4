"""Fine-tune SD 2.1-base on report-CXR pairs: `python -m finetune.train --config configs/finetune.yaml`.

The same code runs under `accelerate launch -m finetune.train ...` (one process per GPU, DDP).
Every random draw is derived from (seed, step), and checkpoints hold the full optimizer/scheduler
state plus the data position, so a resumed run reproduces an uninterrupted one."""
from __future__ import annotations

import contextlib
import importlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cxrcommon.cli import cli_entry
from cxrcommon.config import load_yaml, parse_config, save_config, to_dict
from cxrcommon.errors import UserError
from cxrcommon.prompt_windows import encode_padded, pad_batch
from cxrcommon.logs import setup_logging

from . import checkpoint as ckpt
from .accel import build_accelerator, optimizer_class, weight_dtype
from .cache import build_latent_cache, build_text_cache, cache_dir, latent_key, text_key
from .card import write_model_card
from .components import Components, load_components, prepare_training
from .config import TrainConfig, check_config
from .data import (StepSampler, TrainData, TrainDataset, caption_rows, describe_images, load_pixels,
                   load_train_data, make_loader, tokenize)
from .export import save_outputs
from .loss import diffusion_loss
from .steplog import PendingLosses, Throughput
from .validate import held_out_loss, log_grid, pipeline_from, save_grid, validation_grid

log = logging.getLogger("finetune")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stopped without writing anything after the last good step."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int  # optimizer steps completed in total
    losses: list[float] = field(default_factory=list)  # per optimizer step run in this call
    val_losses: dict[int, float] = field(default_factory=dict)
    images_per_s: float = 0.0  # over the whole call, warm-up included
    steady_images_per_s: float = 0.0  # after the first `warmup_steps` steps (0.0: the run was not longer)
    warmup_steps: int = 0
    warmup_s: float = 0.0  # wall time of the warm-up steps (compilation, cuDNN autotuning, memory growth)
    resumed_from: Path | None = None
    stopped_early: bool = False
    outputs: dict[str, Path] = field(default_factory=dict)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A distinct, reproducible seed for every micro-batch on every process."""
    return (seed * 1_000_003 + step * 1009 + micro * 31 + rank) % (2**32)


def _tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """TensorBoard hparams accept only scalars."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in to_dict(cfg).items()}


def _validation_prompts(cfg: TrainConfig, data: TrainData) -> list[str]:
    if cfg.validation_prompts:
        return list(cfg.validation_prompts)
    pool = data.val_captions or data.captions
    return [p for p in pool if p][:cfg.num_validation_prompts]


def train(cfg: TrainConfig, data: TrainData | None = None,
          should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Run (or resume) one fine-tuning job; returns the losses and the paths written.

    `data` replaces the manifest (in-memory images, for tests and the app); `should_stop(step)`
    lets a caller end the run early after a checkpoint (e.g. a Cancel button)."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    check_config(cfg)
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    accelerator = build_accelerator(cfg, str(out / cfg.logging_dir))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    wdtype = weight_dtype(accelerator.mixed_precision)
    if cfg.allow_tf32:  # only affects NVIDIA matmuls; harmless elsewhere
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(cfg.seed)

    resume_path = None
    if cfg.resume:
        ckpt.clean_partial(ckpt_root) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        resume_path = ckpt.find_checkpoint(ckpt_root, cfg.resume)
        if resume_path is None:
            log.info("no checkpoint in %s yet; starting from step 0", ckpt_root)
    elif ckpt.list_checkpoints(ckpt_root):
        raise UserError(f"{ckpt_root} already holds checkpoints (newest {ckpt.list_checkpoints(ckpt_root)[-1].name}); "
                              "pass --resume latest to continue that run, or choose a new --output-dir")

    comp = load_components(cfg.model, cfg.prediction_type)
    data = data if data is not None else load_train_data(cfg, comp.tokenizer)
    trained = prepare_training(comp, cfg, device, wdtype)
    if accelerator.is_main_process:
        save_config(cfg, out / "train_config.yaml")

    # --- captions: token ids in 75-token windows, or cached embeddings when the text encoder is frozen
    input_ids, windows = tokenize(comp.tokenizer, data.captions, cfg.max_windows)
    n_captions = len(data.captions)
    log.info("captions: %d of %d longer than one CLIP window (up to %d windows)",
             int((windows[:-1] > 1).sum()), n_captions, int(windows.max()))
    text_table = None
    if cfg.cache_text:  # check_config refused it with a trained text encoder
        path = cache_dir(cfg) / f"text-{text_key(comp.text_encoder, data.captions, windows)}.safetensors"
        with accelerator.main_process_first():
            text_table = build_text_cache(path, input_ids, windows, comp.text_encoder, cfg.train_batch_size)
        empty_text = text_table(n_captions).to(device, wdtype)

    # --- images: pixels, or cached VAE latent moments
    latents_reader = None
    if cfg.cache_latents:
        path = cache_dir(cfg) / f"latents-{latent_key(comp.vae, describe_images(data.images), cfg)}.safetensors"
        with accelerator.main_process_first():
            latents_reader = build_latent_cache(
                path, len(data), lambda i: load_pixels(data.images[i], cfg.resolution, cfg.resize_mode,
                                                        cfg.clip_percentile),
                comp.vae, device, wdtype, cfg.train_batch_size)
    dataset = TrainDataset(data.images, cfg.resolution, cfg.resize_mode, cfg.clip_percentile, cfg.random_flip,
                           cfg.caption_dropout, cfg.seed, latents=latents_reader)

    # --- optimizer, schedule, Accelerate
    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    lr = cfg.learning_rate * (cfg.train_batch_size * cfg.gradient_accumulation_steps * world if cfg.scale_lr else 1)
    optimizer = optimizer_class(cfg.optimizer, device)(
        params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon)
    accum = cfg.gradient_accumulation_steps
    batches_per_epoch = StepSampler(len(data), cfg.train_batch_size, cfg.seed, world=world).batches_per_epoch
    max_steps = cfg.max_train_steps or math.ceil(cfg.num_train_epochs * batches_per_epoch / accum)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps)
    names = list(trained)
    prepared = accelerator.prepare(*trained.values(), optimizer)
    models = dict(zip(names, prepared[:-1]))
    optimizer = prepared[-1]
    unwrapped = {k: accelerator.unwrap_model(m) for k, m in models.items()}

    step = 0
    if resume_path is not None:
        state = ckpt.load_checkpoint(resume_path, unwrapped, optimizer)
        expect = {"world": world, "train_batch_size": cfg.train_batch_size, "accum": accum, "seed": cfg.seed}
        if {k: state.get(k) for k in expect} != expect:
            raise UserError(f"{resume_path} was made with {({k: state.get(k) for k in expect})}, this run has "
                             f"{expect}; the data position would not match. Resume with the same values.")
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        step = state["step"]
        log.info("resumed from %s at step %d", resume_path, step)

    pending = PendingLosses(accum)

    def read_losses() -> None:
        """Read the pending losses back (one host sync): into the result, the tracker and the progress bar;
        a non-finite one raises before anything after the last good step is saved."""
        done = pending.flush(lambda losses, at, micro: NonFiniteLossError(_nan_message(losses, at, micro, ckpt_root)))
        if not done:
            return
        ips = clock.since_last()  # the flush has synced the device
        for d in done:
            result.losses.append(d.loss)
            accelerator.log({"loss": d.loss, "lr": d.lr}, step=d.step)
        accelerator.log({"images_per_s": ips}, step=done[-1].step)
        bar.set_postfix(loss=f"{done[-1].loss:.4f}", lr=f"{done[-1].lr:.2e}", img_s=f"{ips:.1f}")

    def save(at: int) -> None:
        read_losses()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"world": world, "train_batch_size": cfg.train_batch_size, "accum": accum, "seed": cfg.seed,
                     "lr_scheduler": lr_scheduler.state_dict(),
                     "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
            path = ckpt.save_checkpoint(ckpt_root, at, unwrapped, optimizer, state, cfg.checkpoints_total_limit)
            log.info("saved %s", path)
        accelerator.wait_for_everyone()

    def hidden_for(caption_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(encoder hidden states, key mask or None) of a batch's captions, padded to its longest."""
        rows = caption_rows(caption_idx, n_captions)
        if text_table is not None:  # each caption's rows read from the memory-mapped cache, copied once
            return pad_batch([text_table(r).to(device, wdtype, non_blocking=True) for r in rows.tolist()], empty_text)
        return encode_padded(models.get("text_encoder", comp.text_encoder), input_ids[rows], windows[rows])

    def latents_for(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(device, wdtype), batch["latent_std"].to(device, wdtype)
            # torch.randn(shape), not randn_like: the same draws as DiagonalGaussianDistribution.sample(),
            # so a cached run reproduces an uncached one exactly (tests/test_finetune_train.py)
            lat = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        else:
            with torch.no_grad():
                lat = comp.vae.encode(batch["pixels"].to(device, wdtype)).latent_dist.sample()
        lat = lat * comp.vae.config.scaling_factor
        return lat.contiguous(memory_format=torch.channels_last) if cfg.channels_last else lat

    def loss_of(lat: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        return diffusion_loss(models["unet"], comp.noise_scheduler, lat, text[0], encoder_mask=text[1],
                              snr_gamma=cfg.snr_gamma, noise_offset=cfg.noise_offset)

    val_batches = _val_batches(cfg, data, comp)
    prompts = _validation_prompts(cfg, data)

    def validate(at: int) -> None:
        read_losses()
        for m in models.values():
            m.eval()
        with accelerator.autocast():
            val = held_out_loss(lambda px, ids, win: loss_of(
                _encode(comp, px, device, wdtype), encode_padded(models.get("text_encoder", comp.text_encoder), ids, win)),
                val_batches, cfg.seed)
            if accelerator.is_main_process and prompts and cfg.validation_seeds:
                pipe = pipeline_from(comp, unwrapped["unet"], unwrapped.get("text_encoder", comp.text_encoder))
                grid = validation_grid(pipe, prompts, cfg.validation_seeds, resolution=cfg.resolution,
                                       steps=cfg.validation_inference_steps, guidance=cfg.validation_guidance_scale,
                                       max_windows=cfg.max_windows)
                log_grid(accelerator.trackers, grid, prompts, at)
                save_grid(out / "validation" / f"step-{at:07d}.png", grid, str(cfg.model), prompts, at)
        for m in models.values():
            m.train()
        if val is not None:
            result.val_losses[at] = val
            accelerator.log({"val_loss": val}, step=at)
            log.info("step %d: validation loss %.4f", at, val)

    result = TrainResult(out, step, resumed_from=resume_path)
    if accelerator.is_main_process:
        accelerator.init_trackers("synthcxr-finetune", config=_tracker_config(cfg))
    log.info("training: %d images, batch %d x %d processes x %d accumulation, %d steps (%d batches per epoch)",
             len(data), cfg.train_batch_size, world, accum, max_steps, batches_per_epoch)
    sampler = StepSampler(len(data), cfg.train_batch_size, cfg.seed, start=step * accum, rank=rank, world=world)
    batches = make_loader(dataset, sampler, cfg.dataloader_num_workers)
    bar = tqdm(total=max_steps, initial=step, desc="train", unit="step", disable=not accelerator.is_local_main_process)
    clock = Throughput(cfg.timing_warmup_steps, getattr(torch, device.type).synchronize)
    try:
        while step < max_steps:
            micro_losses = []
            for micro in range(accum):
                batch = next(batches)
                set_seed(step_seed(cfg.seed, step, micro, rank))
                sync = contextlib.ExitStack()
                if micro < accum - 1:
                    for m in models.values():
                        sync.enter_context(accelerator.no_sync(m))
                with sync:
                    loss = loss_of(latents_for(batch), hidden_for(batch["caption"]))
                    micro_losses.append(accelerator.gather(loss.detach().reshape(1)))
                    accelerator.backward(loss / accum)
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pending.add(step, micro_losses, lr_scheduler.get_last_lr()[0])
            clock.step(cfg.train_batch_size * accum * world)
            bar.update(1)
            if step % cfg.logging_steps == 0:
                read_losses()
            saved = bool(cfg.checkpointing_steps) and step % cfg.checkpointing_steps == 0
            if saved:
                save(step)
            if cfg.validation_steps and step % cfg.validation_steps == 0:
                validate(step)
            if should_stop is not None and should_stop(step) and step < max_steps:
                if not saved:
                    save(step)
                result.stopped_early = True
                break
        read_losses()
        bar.close()
        result.steps = step
        result.images_per_s, result.steady_images_per_s = clock.rates()
        result.warmup_steps, result.warmup_s = min(clock.steps, clock.warmup_steps), clock.warmup_s
        log.info("images/s: %.1f steady (after %d warm-up steps, which took %.1f s), %.1f over the whole run",
                 result.steady_images_per_s, result.warmup_steps, result.warmup_s, result.images_per_s)
        if not result.stopped_early:
            if cfg.checkpointing_steps and step % cfg.checkpointing_steps:
                save(step)  # a final checkpoint, so the run can be extended with a larger --max-train-steps
            if not cfg.validation_steps or step % cfg.validation_steps != 0:
                validate(step)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                result.outputs = save_outputs(cfg, comp, unwrapped)
                write_model_card(out, cfg, n_train=len(data), n_val=len(data.val_images), steps=step,
                                 final_loss=result.losses[-1] if result.losses else None,
                                 mixed_precision=accelerator.mixed_precision,
                                 prediction_type=comp.noise_scheduler.config.prediction_type)
    finally:
        accelerator.end_training()
    return result


def _encode(comp: Components, pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return comp.vae.encode(pixels.to(device, dtype)).latent_dist.mean * comp.vae.config.scaling_factor


def _val_batches(cfg: TrainConfig, data: TrainData, comp: Components, limit: int = 32) -> list[tuple]:
    """Up to `limit` held-out images with their token ids and window counts, in fixed batches."""
    if not data.val_images:
        return []
    n = min(limit, len(data.val_images))
    pixels = [load_pixels(im, cfg.resolution, cfg.resize_mode, cfg.clip_percentile) for im in data.val_images[:n]]
    ids, windows = (t[:n] for t in tokenize(comp.tokenizer, data.val_captions[:n], cfg.max_windows))
    bs = cfg.train_batch_size
    return [(torch.stack(pixels[i:i + bs]), ids[i:i + bs], windows[i:i + bs]) for i in range(0, n, bs)]


def _nan_message(losses: torch.Tensor, step: int, micro: int, ckpt_root: Path) -> str:
    found = ckpt.list_checkpoints(ckpt_root)
    last = f"the last good checkpoint {found[-1]} is intact" if found else "no checkpoint had been written yet"
    return (f"loss is not finite ({losses.tolist()}) at optimizer step {step + 1}, micro-batch {micro}; training "
            f"stopped and nothing was saved after that step ({last}). Fixes: lower --learning-rate, use "
            "--mixed-precision bf16 or no instead of fp16, keep --max-grad-norm > 0, check the data for blank or "
            "corrupt images; then run again with --resume latest.")


RECIPES = {"embedded": "finetune.embedded"}  # multi-stage recipes a YAML selects with `recipe: NAME`


def _recipe(argv: Sequence[str]) -> str | None:
    """The `recipe` key of the --config YAML, if any (e.g. configs/embedded.yaml)."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return None
    recipe = load_yaml(argv[argv.index("--config") + 1]).get("recipe")
    if recipe is not None and recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r} in the config; known: {', '.join(RECIPES)}")
    return recipe


@cli_entry
def main(argv: list[str]) -> Any:
    if recipe := _recipe(argv):
        return importlib.import_module(RECIPES[recipe]).main(argv)
    cfg = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0])
    setup_logging(cfg.verbose)
    return train(cfg)


if __name__ == "__main__":
    main()

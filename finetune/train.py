"""Fine-tune SD 2.1-base on report-CXR pairs: `python -m finetune.train --config configs/finetune.yaml`.

The same code runs under `accelerate launch -m finetune.train ...` (one process per GPU, DDP).
Every random draw is derived from (seed, step), and checkpoints hold the full optimizer/scheduler
state plus the data position, so a resumed run reproduces an uninterrupted one.

Shaped like nanoGPT's train.py: `_setup` builds a `TrainState`, a small `Trainer` keeps the result, the
clock and the progress bar (and reads losses back, saves and validates between steps), and `train` is
setup, loop, finish."""
from __future__ import annotations

import contextlib
import importlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from cxrcommon.cli import cli_entry
from cxrcommon.config import load_yaml, parse_config, save_config, to_dict
from cxrcommon.errors import UserError
from cxrcommon.logs import setup_logging
from cxrcommon.prompt_windows import encode_padded, pad_batch

from . import checkpoint as ckpt
from .accel import build_accelerator, optimizer_class, weight_dtype
from .cache import build_latent_cache, build_text_cache, cache_dir, latent_key, text_key
from .card import write_model_card
from .components import Components, load_components, prepare_training
from .config import TrainConfig, check_config
from .data import (
    StepSampler,
    TrainData,
    TrainDataset,
    caption_rows,
    describe_images,
    load_pixels,
    load_train_data,
    make_loader,
    tokenize,
)
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


def train(cfg: TrainConfig, data: TrainData | None = None,
          should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Run (or resume) one fine-tuning job; returns the losses and the paths written.

    Arguments:
      cfg (TrainConfig): every option of the run (see finetune/config.py); `cfg.resume` continues the
        run found in `cfg.output_dir`, which must otherwise hold no checkpoint.
      data (TrainData or None): in-memory images (arrays (H, W) float in [0, 1], or paths) with their
        captions, replacing the manifest `cfg.train_data` (for tests and the app).
      should_stop (callable or None): called with the 1-based optimizer step just completed; True ends
        the run early after a checkpoint of that step (e.g. a Cancel button), writing no final outputs.
        At the last step it is ignored: the run finishes normally.

    Returns:
      (TrainResult): per-step losses of this call, validation losses, throughput and the paths written."""
    st = _setup(cfg, data)
    trainer = Trainer(st)
    step = st.step
    try:
        while step < st.max_steps:
            micro_losses = _optimizer_step(st, step)
            step += 1
            trainer.record(step, micro_losses)
            if step % cfg.logging_steps == 0:
                trainer.read_losses()
            saved = bool(cfg.checkpointing_steps) and step % cfg.checkpointing_steps == 0
            if saved:
                trainer.save(step)
            if cfg.validation_steps and step % cfg.validation_steps == 0:
                trainer.validate(step)
            if should_stop is not None and should_stop(step) and step < st.max_steps:
                if not saved:
                    trainer.save(step)
                trainer.result.stopped_early = True
                break
        trainer.finish(step)
    finally:
        st.accelerator.end_training()
    return trainer.result


@dataclass
class TrainState:
    """Everything `_setup` builds for the loop. `models` are the trained modules as Accelerate prepared
    them (DDP-wrapped on several processes) and run forward/backward; `unwrapped` are the same modules,
    whose weights checkpoints and outputs hold."""
    cfg: TrainConfig
    accelerator: Any  # accelerate.Accelerator
    dtype: torch.dtype  # of the frozen weights (weight_dtype)
    comp: Components
    data: TrainData
    models: dict[str, torch.nn.Module]
    unwrapped: dict[str, torch.nn.Module]
    params: list[torch.nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any  # torch.optim.lr_scheduler.LambdaLR from diffusers' get_scheduler
    input_ids: torch.Tensor  # (N+1, W, 77) caption token ids in W windows; row N is the empty caption
    windows: torch.Tensor  # (N+1,) windows used per caption
    text_table: Callable[[int], torch.Tensor] | None  # caption row -> cached (L, D) embeddings (--cache-text)
    empty_text: torch.Tensor | None  # (L, D) the empty caption's cached embeddings, on the device
    batches: Iterator[dict[str, torch.Tensor]]  # training batches from the data position of `step` on
    val_batches: list[tuple]  # held-out (pixels (B, 3, R, R), ids (B, W, 77), windows (B,))
    prompts: list[str]  # validation-grid prompts
    step: int  # optimizer steps done before this call (0, or the resumed checkpoint's)
    max_steps: int
    resumed_from: Path | None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The prepared text encoder when it is trained, else the frozen one."""
        return self.models.get("text_encoder", self.comp.text_encoder)

    def hidden_for(self, caption_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(encoder hidden states, key mask or None) of a batch's captions, padded to its longest."""
        rows = caption_rows(caption_idx, len(self.data.captions))
        if self.text_table is not None:  # each caption's rows read from the memory-mapped cache, copied once
            return pad_batch([self.text_table(r).to(self.device, self.dtype, non_blocking=True)
                              for r in rows.tolist()], self.empty_text)
        return encode_padded(self.text_encoder, self.input_ids[rows], self.windows[rows])

    def latents_for(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scaled VAE latents of a batch: sampled from its cached moments, or encoded from its pixels."""
        vae = self.comp.vae
        if "latent_mean" in batch:
            mean = batch["latent_mean"].to(self.device, self.dtype)
            std = batch["latent_std"].to(self.device, self.dtype)
            # torch.randn(shape), not randn_like: the same draws as DiagonalGaussianDistribution.sample(),
            # so a cached run reproduces an uncached one exactly (tests/test_finetune_train.py)
            lat = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        else:
            with torch.no_grad():
                lat = vae.encode(batch["pixels"].to(self.device, self.dtype)).latent_dist.sample()
        lat = lat * vae.config.scaling_factor
        return lat.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else lat

    def loss_of(self, lat: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        cfg = self.cfg
        return diffusion_loss(self.models["unet"], self.comp.noise_scheduler, lat, text[0], encoder_mask=text[1],
                              snr_gamma=cfg.snr_gamma, noise_offset=cfg.noise_offset)

    def val_loss_of(self, pixels: torch.Tensor, ids: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """The loss of a held-out batch, on its posterior mean (no latent sampling)."""
        vae = self.comp.vae
        lat = vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mean * vae.config.scaling_factor
        return self.loss_of(lat, encode_padded(self.text_encoder, ids, windows))


def _run_identity(cfg: TrainConfig, world: int) -> dict[str, int]:
    """What fixes the data position of a step: a checkpoint records it, and a resume must match it."""
    return {"world": world, "train_batch_size": cfg.train_batch_size, "accum": cfg.gradient_accumulation_steps,
            "seed": cfg.seed}


def _setup(cfg: TrainConfig, data: TrainData | None) -> TrainState:
    """Check the config, then build models, data, optimizer and loader, resuming if asked. The order is the
    order of the random draws (LoRA initialisation right after `set_seed`), so it must not change."""
    from accelerate.utils import set_seed

    check_config(cfg)
    out = Path(cfg.output_dir)
    accelerator = build_accelerator(cfg, str(out / cfg.logging_dir))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    wdtype = weight_dtype(accelerator.mixed_precision)
    if cfg.allow_tf32:  # only affects NVIDIA matmuls; harmless elsewhere
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(cfg.seed)
    resume_path = _resume_path(cfg, accelerator, out / "checkpoints")

    comp = load_components(cfg.model, cfg.prediction_type)
    data = data if data is not None else load_train_data(cfg, comp.tokenizer)
    trained = prepare_training(comp, cfg, device, wdtype)
    if accelerator.is_main_process:
        save_config(cfg, out / "train_config.yaml")
    input_ids, windows, text_table, empty_text = _caption_inputs(cfg, accelerator, comp, data.captions, wdtype)
    dataset = TrainDataset(data.images, cfg.resolution, cfg.resize_mode, cfg.clip_percentile, cfg.random_flip,
                           cfg.caption_dropout, cfg.seed, latents=_latents_reader(cfg, accelerator, comp, data, wdtype))

    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    accum = cfg.gradient_accumulation_steps
    batches_per_epoch = StepSampler(len(data), cfg.train_batch_size, cfg.seed, world=world).batches_per_epoch
    max_steps = cfg.max_train_steps or math.ceil(cfg.num_train_epochs * batches_per_epoch / accum)
    optimizer, lr_scheduler = _optimizer(cfg, params, device, world, max_steps)
    prepared = accelerator.prepare(*trained.values(), optimizer)
    models = dict(zip(trained, prepared[:-1]))
    optimizer = prepared[-1]
    unwrapped = {k: accelerator.unwrap_model(m) for k, m in models.items()}
    step = 0
    if resume_path is not None:
        step = _restore(resume_path, cfg, accelerator, unwrapped, optimizer, lr_scheduler)

    log.info("training: %d images, batch %d x %d processes x %d accumulation, %d steps (%d batches per epoch)",
             len(data), cfg.train_batch_size, world, accum, max_steps, batches_per_epoch)
    sampler = StepSampler(len(data), cfg.train_batch_size, cfg.seed, start=step * accum, rank=rank, world=world)
    return TrainState(cfg=cfg, accelerator=accelerator, dtype=wdtype, comp=comp, data=data, models=models,
                      unwrapped=unwrapped, params=params, optimizer=optimizer, lr_scheduler=lr_scheduler,
                      input_ids=input_ids, windows=windows, text_table=text_table, empty_text=empty_text,
                      batches=make_loader(dataset, sampler, cfg.dataloader_num_workers),
                      val_batches=_val_batches(cfg, data, comp), prompts=_validation_prompts(cfg, data),
                      step=step, max_steps=max_steps, resumed_from=resume_path)


def _resume_path(cfg: TrainConfig, accelerator: Any, ckpt_root: Path) -> Path | None:
    """The checkpoint to resume from (None: start at step 0). Without --resume, existing checkpoints are an
    error: a second run into the same folder would silently mix two runs."""
    if not cfg.resume:
        found = ckpt.list_checkpoints(ckpt_root)
        if found:
            raise UserError(f"{ckpt_root} already holds checkpoints (newest {found[-1].name}); "
                            "pass --resume latest to continue that run, or choose a new --output-dir")
        return None
    if accelerator.is_main_process:
        ckpt.clean_partial(ckpt_root)
    accelerator.wait_for_everyone()
    path = ckpt.find_checkpoint(ckpt_root, cfg.resume)
    if path is None:
        log.info("no checkpoint in %s yet; starting from step 0", ckpt_root)
    return path


def _caption_inputs(cfg: TrainConfig, accelerator: Any, comp: Components, captions: list[str],
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor | None]:
    """(token ids in 75-token windows, window counts, and with --cache-text the cached-embedding table and
    the empty caption's row; both None when the text encoder runs every step). check_config allows the
    cache only with a frozen text encoder."""
    input_ids, windows = tokenize(comp.tokenizer, captions, cfg.max_windows)
    log.info("captions: %d of %d longer than one CLIP window (up to %d windows)",
             int((windows[:-1] > 1).sum()), len(captions), int(windows.max()))
    if not cfg.cache_text:
        return input_ids, windows, None, None
    path = cache_dir(cfg) / f"text-{text_key(comp.text_encoder, captions, windows)}.safetensors"
    with accelerator.main_process_first():
        table = build_text_cache(path, input_ids, windows, comp.text_encoder, cfg.train_batch_size)
    return input_ids, windows, table, table(len(captions)).to(accelerator.device, dtype)


def _latents_reader(cfg: TrainConfig, accelerator: Any, comp: Components, data: TrainData,
                    dtype: torch.dtype) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None:
    """Image index -> cached VAE latent moments (mean, std) with --cache-latents; None reads pixels."""
    if not cfg.cache_latents:
        return None
    path = cache_dir(cfg) / f"latents-{latent_key(comp.vae, describe_images(data.images), cfg)}.safetensors"
    with accelerator.main_process_first():
        return build_latent_cache(
            path, len(data),
            lambda i: load_pixels(data.images[i], cfg.resolution, cfg.resize_mode, cfg.clip_percentile),
            comp.vae, accelerator.device, dtype, cfg.train_batch_size)


def _optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], device: torch.device, world: int,
               max_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer over `params` and its learning-rate schedule over `max_steps` optimizer steps."""
    from diffusers.optimization import get_scheduler

    lr = cfg.learning_rate * (cfg.train_batch_size * cfg.gradient_accumulation_steps * world if cfg.scale_lr else 1)
    optimizer = optimizer_class(cfg.optimizer, device)(
        params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps)
    return optimizer, lr_scheduler


def _restore(path: Path, cfg: TrainConfig, accelerator: Any, unwrapped: dict[str, torch.nn.Module],
             optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> int:
    """Load a checkpoint into the models, optimizer, schedule and grad scaler; returns its step."""
    state = ckpt.load_checkpoint(path, unwrapped, optimizer)
    expect = _run_identity(cfg, accelerator.num_processes)
    found = {k: state.get(k) for k in expect}
    if found != expect:
        raise UserError(f"{path} was made with {found}, this run has {expect}; the data position would not "
                        "match. Resume with the same values.")
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    log.info("resumed from %s at step %d", path, state["step"])
    return state["step"]


def _optimizer_step(st: TrainState, step: int) -> list[torch.Tensor]:
    """Optimizer step `step` (0-based) over its accumulated micro-batches; returns each micro-batch's loss,
    gathered over processes and still on the device. Gradients are synchronised on the last one only."""
    from accelerate.utils import set_seed

    accelerator, accum = st.accelerator, st.cfg.gradient_accumulation_steps
    micro_losses = []
    for micro in range(accum):
        batch = next(st.batches)
        set_seed(step_seed(st.cfg.seed, step, micro, accelerator.process_index))
        sync = contextlib.ExitStack()
        if micro < accum - 1:
            for m in st.models.values():
                sync.enter_context(accelerator.no_sync(m))
        with sync:
            loss = st.loss_of(st.latents_for(batch), st.hidden_for(batch["caption"]))
            micro_losses.append(accelerator.gather(loss.detach().reshape(1)))
            accelerator.backward(loss / accum)
    if st.cfg.max_grad_norm > 0:
        accelerator.clip_grad_norm_(st.params, st.cfg.max_grad_norm)
    st.optimizer.step()
    if not accelerator.optimizer_step_was_skipped:
        st.lr_scheduler.step()
    st.optimizer.zero_grad(set_to_none=True)
    return micro_losses


class Trainer:
    """The loop's bookkeeping: the result, the throughput clock and the progress bar, and what happens
    between optimizer steps (reading losses back, checkpoints, validation, the final outputs)."""

    def __init__(self, st: TrainState):
        from tqdm.auto import tqdm

        self.st = st
        self.result = TrainResult(st.out, st.step, resumed_from=st.resumed_from)
        self.pending = PendingLosses(st.cfg.gradient_accumulation_steps)
        if st.accelerator.is_main_process:
            st.accelerator.init_trackers("synthcxr-finetune", config=_tracker_config(st.cfg))
        self.bar = tqdm(total=st.max_steps, initial=st.step, desc="train", unit="step",
                        disable=not st.accelerator.is_local_main_process)
        self.clock = Throughput(st.cfg.timing_warmup_steps, getattr(torch, st.device.type).synchronize)

    def record(self, step: int, micro_losses: list[torch.Tensor]) -> None:
        """Note optimizer step `step` (1-based) without waiting for the device."""
        cfg = self.st.cfg
        self.pending.add(step, micro_losses, self.st.lr_scheduler.get_last_lr()[0])
        self.clock.step(cfg.train_batch_size * cfg.gradient_accumulation_steps * self.st.accelerator.num_processes)
        self.bar.update(1)

    def read_losses(self) -> None:
        """Read the pending losses back (one host sync): into the result, the tracker and the progress bar;
        a non-finite one raises before anything after the last good step is saved."""
        ckpt_root = self.st.ckpt_root
        done = self.pending.flush(
            lambda losses, at, micro: NonFiniteLossError(_nan_message(losses, at, micro, ckpt_root)))
        if not done:
            return
        ips = self.clock.since_last()  # the flush has synced the device
        for d in done:
            self.result.losses.append(d.loss)
            self.st.accelerator.log({"loss": d.loss, "lr": d.lr}, step=d.step)
        self.st.accelerator.log({"images_per_s": ips}, step=done[-1].step)
        self.bar.set_postfix(loss=f"{done[-1].loss:.4f}", lr=f"{done[-1].lr:.2e}", img_s=f"{ips:.1f}")

    def save(self, at: int) -> None:
        """A resumable checkpoint of step `at`, after the losses up to it were found finite."""
        st, accelerator = self.st, self.st.accelerator
        self.read_losses()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {**_run_identity(st.cfg, accelerator.num_processes), "lr_scheduler": st.lr_scheduler.state_dict(),
                     "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
            path = ckpt.save_checkpoint(st.ckpt_root, at, st.unwrapped, st.optimizer, state,
                                        st.cfg.checkpoints_total_limit)
            log.info("saved %s", path)
        accelerator.wait_for_everyone()

    def validate(self, at: int) -> None:
        """The held-out loss and (on the main process) the validation grid at step `at`."""
        st, cfg, accelerator = self.st, self.st.cfg, self.st.accelerator
        self.read_losses()
        for m in st.models.values():
            m.eval()
        with accelerator.autocast():
            val = held_out_loss(st.val_loss_of, st.val_batches, cfg.seed)
            if accelerator.is_main_process and st.prompts and cfg.validation_seeds:
                text_encoder = st.unwrapped.get("text_encoder", st.comp.text_encoder)
                pipe = pipeline_from(st.comp, st.unwrapped["unet"], text_encoder)
                grid = validation_grid(pipe, st.prompts, cfg.validation_seeds, resolution=cfg.resolution,
                                       steps=cfg.validation_inference_steps, guidance=cfg.validation_guidance_scale,
                                       max_windows=cfg.max_windows)
                log_grid(accelerator.trackers, grid, st.prompts, at)
                save_grid(st.out / "validation" / f"step-{at:07d}.png", grid, str(cfg.model), st.prompts, at)
        for m in st.models.values():
            m.train()
        if val is not None:
            self.result.val_losses[at] = val
            accelerator.log({"val_loss": val}, step=at)
            log.info("step %d: validation loss %.4f", at, val)

    def finish(self, step: int) -> None:
        """Report throughput; unless stopped early, save and validate the last step if the schedule did not,
        then write the LoRA (or pipeline) and the model card."""
        st, cfg, result = self.st, self.st.cfg, self.result
        self.read_losses()
        self.bar.close()
        result.steps = step
        result.images_per_s, result.steady_images_per_s = self.clock.rates()
        result.warmup_steps = min(self.clock.steps, self.clock.warmup_steps)
        result.warmup_s = self.clock.warmup_s
        log.info("images/s: %.1f steady (after %d warm-up steps, which took %.1f s), %.1f over the whole run",
                 result.steady_images_per_s, result.warmup_steps, result.warmup_s, result.images_per_s)
        if result.stopped_early:
            return
        if cfg.checkpointing_steps and step % cfg.checkpointing_steps:
            self.save(step)  # a final checkpoint, so the run can be extended with a larger --max-train-steps
        if not cfg.validation_steps or step % cfg.validation_steps != 0:
            self.validate(step)
        st.accelerator.wait_for_everyone()
        if st.accelerator.is_main_process:
            result.outputs = save_outputs(cfg, st.comp, st.unwrapped)
            write_model_card(st.out, cfg, n_train=len(st.data), n_val=len(st.data.val_images), steps=step,
                             final_loss=result.losses[-1] if result.losses else None,
                             mixed_precision=st.accelerator.mixed_precision,
                             prediction_type=st.comp.noise_scheduler.config.prediction_type)


def _tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """TensorBoard hparams accept only scalars."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in to_dict(cfg).items()}


def _validation_prompts(cfg: TrainConfig, data: TrainData) -> list[str]:
    if cfg.validation_prompts:
        return list(cfg.validation_prompts)
    pool = data.val_captions or data.captions
    return [p for p in pool if p][:cfg.num_validation_prompts]


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

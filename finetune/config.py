"""TrainConfig: every fine-tuning option in one dataclass (YAML keys == fields == --flags).

Names follow diffusers' train_text_to_image_lora.py where an option exists there, so a user of the
stock script finds the same knobs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cxrcommon.config import field
from cxrcommon.errors import UserError
from cxrcommon.models import DEFAULT_MODEL

TRAIN_MODES = ("lora", "lora+text_encoder", "unet", "unet+text_encoder")


@dataclass
class TrainConfig:
    # --- model and output
    model: str = field(DEFAULT_MODEL, "base model: hub id, local diffusers folder, or 'embedded'")
    output_dir: str = field("outputs/finetune", "where the LoRA, model card, checkpoints, logs and cache go")
    train: str = field("lora", "what is trained: lora (UNet attention LoRA), lora+text_encoder (LoRA on both), "
                               "unet (full UNet fine-tune, for small models), unet+text_encoder (both in full)")
    seed: int = field(0, "seed for data order, noise and timesteps; the same seed gives the same run")
    # --- data
    train_data: str = field("", "manifest: a CSV, a JSONL, or an imagefolder with metadata.jsonl")
    image_column: str = field("image", "manifest column holding the image path (imagefolder: file_name)")
    caption_column: str = field("text", "manifest column holding the report text (a manifest without 'text' "
                                        "but with 'report', as finetune.prepare writes, uses 'report')")
    patient_column: str | None = field(None, "manifest column with the patient id, for the patient-level split "
                                             "(default: 'patient' when the manifest has it)")
    split_column: str | None = field("split", "manifest column with train / validate / test (finetune.prepare "
                                              "writes it): when the manifest has it, its 'train' rows train, its "
                                              "'validate' rows validate and 'test' rows are left out, instead of "
                                              "--val-fraction's patient split")
    on_error: str = field("fail", "bad manifest rows/images: fail (stop, listing every bad line) or skip (log them)")
    sections: list[str] = field(["findings", "impression"], "report sections kept as the caption (whole text "
                                "when a report has no headers)")
    token_policy: str = field("sentence", "reports longer than --max-windows CLIP windows: sentence (keep the "
                                          "IMPRESSION first, then FINDINGS, dropping whole trailing sentences), hard "
                                          "(same order, cut tokens), error (stop)")
    max_windows: int = field(3, "captions are encoded whole in windows of 75 CLIP tokens (3 = 225 tokens; 1 = the "
                                "stock 77-token limit); a batch's shorter captions are padded and masked out of "
                                "cross-attention")
    demographics_template: str = field("roentgen", "demographics put in front of each caption from the sex/age/"
                                                   "race columns: roentgen ('28 year old WHITE female. <report>', "
                                                   "RoentGen-v2), chexgen ('sex:Female, age:28.0, race:White. "
                                                   "<report>'), or none; ages over 89 are written 90+")
    sex_column: str = field("sex", "manifest column with the patient's sex (M/F), used when present")
    age_column: str = field("age", "manifest column with the age in years at the study, used when present")
    race_column: str = field("race", "manifest column with the race group, used when present")
    demographics_dropout: float = field(0.1, "each demographic field of a caption is left out with this "
                                             "probability (fixed per row from --seed), so prompts without "
                                             "demographics still work")
    val_fraction: float = field(0.05, "fraction of PATIENTS held out for validation (never in training)")
    max_train_samples: int | None = field(None, "use only the first N training rows (debugging)")
    resolution: int = field(512, "training image size (square); SD 2.1-base was trained at 512")
    resize_mode: str = field("pad", "make images square by: pad (keeps the whole chest, incl. costophrenic "
                                    "angles) or crop (centre-crop, loses apices/bases on tall films)")
    clip_percentile: float | None = field(None, "clip the brightest p%% of pixels before normalising (burnt-in "
                                                "labels); None keeps the full range")
    random_flip: bool = field(False, "randomly mirror images left-right. OFF by default: laterality matters in "
                                     "chest X-rays (heart on the left, 'left effusion' in the report) and a "
                                     "mirrored image contradicts its report")
    caption_dropout: float = field(0.0, "probability of training on an empty caption, so classifier-free "
                                        "guidance works better (0.05-0.1 is common)")
    dataloader_num_workers: int = field(0, "data-loading worker processes (0 = load in the main process)")
    cache_latents: bool = field(False, "encode every image with the VAE once and cache the latent "
                                       "distribution on disk (safetensors); faster epochs")
    cache_text: bool = field(False, "encode every caption once and cache the embeddings (not with a trained "
                                    "text encoder)")
    cache_dir: str | None = field(None, "cache folder (default: <output_dir>/cache); the key changes with "
                                        "data, resolution and model")
    # --- LoRA
    lora_rank: int = field(4, "LoRA rank (size of the update matrices)")
    lora_alpha: float | None = field(None, "LoRA alpha (scale = alpha / rank); None means alpha = rank")
    lora_dropout: float = field(0.0, "dropout on the LoRA branch")
    lora_target_modules: list[str] = field(["to_k", "to_q", "to_v", "to_out.0"],
                                           "UNet modules that get LoRA (attention projections)")
    text_encoder_target_modules: list[str] = field(["q_proj", "k_proj", "v_proj", "out_proj"],
                                                   "text-encoder modules that get LoRA (lora+text_encoder)")
    # --- optimisation
    train_batch_size: int = field(16, "images per device per micro-batch")
    gradient_accumulation_steps: int = field(1, "micro-batches per optimizer step")
    max_train_steps: int | None = field(None, "optimizer steps to run; overrides num_train_epochs")
    num_train_epochs: int = field(100, "epochs to run when max_train_steps is not set")
    learning_rate: float = field(1e-4, "peak learning rate (after warm-up)")
    scale_lr: bool = field(False, "multiply the learning rate by batch size x accumulation x processes")
    lr_scheduler: str = field("constant", "diffusers scheduler: linear, cosine, cosine_with_restarts, "
                                          "polynomial, constant, constant_with_warmup")
    lr_warmup_steps: int = field(500, "linear warm-up optimizer steps")
    optimizer: str = field("auto", "adamw, adamw8bit (bitsandbytes), or auto (8-bit when bitsandbytes is "
                                   "importable and training on a GPU)")
    adam_beta1: float = field(0.9, "Adam beta1")
    adam_beta2: float = field(0.999, "Adam beta2")
    adam_weight_decay: float = field(1e-2, "AdamW weight decay")
    adam_epsilon: float = field(1e-8, "Adam epsilon")
    max_grad_norm: float = field(1.0, "clip the gradient norm to this (0 disables)")
    snr_gamma: float | None = field(None, "min-SNR loss weighting gamma (5.0 is recommended; "
                                          "arXiv:2303.09556); None disables")
    noise_offset: float = field(0.0, "offset-noise scale (helps very dark/bright images; 0.05-0.1)")
    prediction_type: str | None = field(None, "epsilon or v_prediction; None takes it from the model's "
                                              "scheduler config (SD 2.1-base: epsilon)")
    # --- speed and precision
    mixed_precision: str = field("auto", "no, fp16, bf16, or auto (bf16 where supported, fp16 on older "
                                         "GPUs, no on CPU)")
    device: str = field("auto", "auto (Accelerate picks CUDA/XPU/MPS/CPU) or cpu (force CPU)")
    gradient_checkpointing: bool = field(False, "recompute activations in backward: less memory, slower")
    channels_last: bool = field(False, "channels-last memory format for the UNet (faster convs on GPUs)")
    sdpa: bool = field(True, "PyTorch scaled-dot-product attention (flash/memory-efficient kernels)")
    allow_tf32: bool = field(True, "allow TF32 matmuls on Ampere+ NVIDIA GPUs")
    logging_steps: int = field(10, "read the loss back and log loss, learning rate and images/s every N optimizer "
                                   "steps (also before every checkpoint and validation); each read waits for the "
                                   "GPU, so 1 (every step) slows training")
    timing_warmup_steps: int = field(3, "optimizer steps timed as warm-up (compilation, cuDNN autotuning, memory "
                                        "growth); images/s is reported for them and for the steady state apart")
    # --- checkpoints, validation, logging
    checkpointing_steps: int = field(500, "save a resumable checkpoint every N optimizer steps (0: never)")
    checkpoints_total_limit: int | None = field(3, "keep only the newest K checkpoints (None keeps all)")
    resume: str | None = field(None, "'latest' or a checkpoint folder to resume from; None starts fresh")
    validation_steps: int = field(500, "generate the validation grid every N steps (0: only at the end)")
    validation_prompts: list[str] = field([], "validation prompts; empty takes the first captions of the "
                                              "validation split")
    num_validation_prompts: int = field(4, "how many validation-split captions to use when no prompts are given")
    validation_seeds: list[int] = field([0, 1], "one image per prompt per seed (fixed, so grids compare "
                                                "across steps)")
    validation_inference_steps: int = field(25, "denoising steps for validation images")
    validation_guidance_scale: float = field(7.5, "classifier-free guidance for validation images")
    report_to: str = field("tensorboard", "tracker: tensorboard, wandb, all, or none")
    logging_dir: str = field("logs", "tracker folder, relative to output_dir")
    save_merged: bool = field(False, "also save a full pipeline with the LoRA merged in (<output_dir>/merged)")
    verbose: bool = field(False, "debug logging")


def check_config(cfg: TrainConfig) -> None:
    """Refuse option combinations that cannot work, before any model or data is loaded (minutes
    of latent caching must not be spent on a run that fails at its first step)."""
    problems = []
    if cfg.train not in TRAIN_MODES:
        problems.append(f"--train {cfg.train!r} is not one of {', '.join(TRAIN_MODES)}")
    if cfg.random_flip and cfg.cache_latents:
        problems.append("--random-flip cannot be combined with --cache-latents: the cache holds each image's "
                        "latent in one orientation only, so flipped samples would never be seen; turn one of "
                        "them off (for chest X-rays keep --random-flip off: it contradicts laterality)")
    if cfg.cache_text and cfg.train.endswith("+text_encoder"):
        problems.append(f"--cache-text cannot be used while the text encoder is trained (--train {cfg.train}): "
                        "its embeddings change every step; drop --cache-text")
    if cfg.demographics_template not in ("roentgen", "chexgen", "none"):
        problems.append(f"--demographics-template {cfg.demographics_template!r} is not roentgen, chexgen or none")
    if not 0.0 <= cfg.demographics_dropout <= 1.0:
        problems.append(f"--demographics-dropout {cfg.demographics_dropout} must lie in [0, 1]")
    if not 0.0 <= cfg.caption_dropout <= 1.0:
        problems.append(f"--caption-dropout {cfg.caption_dropout} must lie in [0, 1]")
    if cfg.logging_steps < 1 or cfg.timing_warmup_steps < 0:
        problems.append("--logging-steps must be >= 1 and --timing-warmup-steps >= 0")
    if cfg.max_windows < 1:
        problems.append(f"--max-windows {cfg.max_windows} must be >= 1 (1 = the stock 77-token limit)")
    if cfg.gradient_accumulation_steps < 1 or cfg.train_batch_size < 1:
        problems.append("--train-batch-size and --gradient-accumulation-steps must be >= 1")
    from .checkpoint import STATE
    if cfg.resume not in (None, "latest") and not (Path(cfg.resume) / STATE).is_file():
        problems.append(f"--resume {cfg.resume} is not a checkpoint (no {STATE}) — pass 'latest' or a "
                        f"checkpoint-<step> folder from {Path(cfg.output_dir) / 'checkpoints'}")
    if cfg.train_data and not Path(cfg.train_data).exists():
        problems.append(f"--train-data {cfg.train_data} does not exist — pass a CSV/JSONL manifest or an imagefolder")
    if problems:
        raise UserError("invalid fine-tuning config: " + "; ".join(problems))

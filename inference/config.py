"""Every option of `python -m inference.generate`, declared once (YAML keys = fields = flags)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from cxrcommon.config import field
from cxrcommon.errors import UserError
from cxrcommon.models import EMBEDDED

FORMATS = {"png": ".png", "png16": ".png", "dcm": ".dcm"}  # --format -> file suffix
CLIP_POLICIES = ("sentence", "hard", "error")


@dataclass
class GenerateConfig:
    prompts: str | None = field(None, "prompt file: .txt (one prompt a line), .csv or .jsonl with a 'prompt' column "
                                      "and optional n, seed, label, negative_prompt, and sex (M/F), age (years) "
                                      "and race (WHITE, BLACK, ASIAN, HISPANIC/LATINO, OTHER) of the patient asked "
                                      "for (written in front of the report as the model was trained)")
    out: str = field("out/generated", "output folder (images, manifest.jsonl, settings.json); rerunning resumes")
    model: str = field(EMBEDDED, "hub id or local folder of an SD 2.x pipeline; 'embedded' = the offline demonstrator")
    lora: str | None = field(None, "LoRA weights (.safetensors file or folder saved by save_lora_weights)")
    lora_scale: float = field(1.0, "strength of the LoRA (0 = base model)")
    n_per_prompt: int = field(1, "images per prompt where the prompt file gives no 'n'")
    batch_size: int = field(4, "images per UNet batch (rows of different prompts are packed together)")
    steps: int = field(75, "denoising steps")
    guidance: float = field(4.0, "classifier-free guidance scale (1 = no guidance)")
    guidance_rescale: float = field(0.0, "rescale guided noise toward the conditional std (arXiv 2305.08891); 0 = off")
    guidance_interval: list[float] = field([0.0, 1.0], "apply CFG only between these fractions of the steps "
                                                       "(0 = first, noisiest step); outside it the conditional "
                                                       "prediction alone is used, which saves UNet work")
    scheduler: str = field("ddim", "sampler: ddim, dpmpp, dpmpp-karras, euler, euler-a, pndm, lms, heun, unipc, ddpm")
    seed: int = field(0, "base seed; image k of prompt i gets a seed derived from (seed, i, k)")
    negative_prompt: str = field("", "negative prompt where the prompt file gives none")
    height: int | None = field(None, "image height in pixels (multiple of 8); default: the model's native size "
                                     "(512 for SD 2.1-base)")
    width: int | None = field(None, "image width in pixels (multiple of 8); default: the model's native size")
    format: str = field("png", "png (8-bit), png16 (16-bit) or dcm (DICOM Secondary Capture, marked synthetic)")
    label_folders: bool = field(False, "put each image in a sub-folder named after its prompt's label")
    init_image: str | None = field(None, "translation mode: start from this image (SDEdit img2img)")
    strength: float = field(0.6, "img2img: how much of the init image to re-noise (0 = unchanged, 1 = ignore it)")
    mask: str | None = field(None, "inpainting: white = region to regenerate (needs --init-image)")
    clean: bool = field(False, "remove burnt-in text from each image with textremoval.clean before saving")
    demographics_template: str = field("auto", "how sex/age/race are written in front of a report: auto = the "
                                               "form named in the model's (or LoRA's) card, refusing demographics "
                                               "when it names none (the model was not trained to follow them); "
                                               "roentgen ('71 year old WHITE female.'), chexgen ('sex:Female, "
                                               "age:71.0, race:White.'); none = leave them out")
    qc: str | None = field(None, "quality check: a folder of sex/age/race classifiers (trained with `python -m "
                                 "eval.demographic_models train`, or the anchors' weights: race-emory, age-riken, "
                                 "sex-chexpert); every image whose prompt asks for a patient is checked and, where "
                                 "it does not show that patient, made again with a new seed; manifest rows record "
                                 "predictions, qc_pass and qc_tries")
    qc_tries: int = field(3, "with --qc: tries per image in all (the first seed plus retries); an image failing "
                             "every try is kept with qc_pass false. Raising it on a rerun retries those images")
    balance: str | None = field(None, "real dataset manifest (CSV/JSONL): generate what evens out its classes "
                                      "(and, with --balance-target, its patients)")
    balance_target: str | None = field(None, "with --balance: also fill the gaps of sex x age band (<40, 40-65, "
                                             ">65) x race towards uniform, manifest (the manifest's own mix, given "
                                             "to every class), or a file: a CSV of sex,age_band,race,share (shares "
                                             "summing to 1) or another manifest whose mix to follow. Fields the "
                                             "manifest does not record are left out")
    balance_total: int | None = field(None, "with --balance: images per class (or in all, without classes) after "
                                            "balancing; default: the largest class, or with --balance-target the "
                                            "smallest total every cell reaches by additions alone")
    label_column: str = field("label", "with --balance: the manifest column holding the class ('labels' of a "
                                       "finetune.prepare manifest is found by itself); '' with --balance-target: "
                                       "balance patients only")
    image_column: str = field("image", "with --balance: the manifest column holding the image path")
    text_column: str = field("text", "with --balance and no --prompts: the manifest column of report text "
                                     "used as prompts")
    clip_policy: str = field("sentence", "prompts longer than --max-windows CLIP windows: sentence (keep the "
                                         "IMPRESSION first, then FINDINGS, then the rest, dropping whole trailing "
                                         "sentences), hard (same order, cut tokens) or error (stop, naming each)")
    max_windows: int = field(3, "long reports are encoded whole in windows of 75 CLIP tokens (3 = 225 tokens, "
                                "findings + impression of nearly every MIMIC report); 1 = the stock pipeline's "
                                "77-token limit. Each extra window costs a text-encoder pass per unique prompt and "
                                "lengthens cross-attention (docs/BENCHMARKS.md)")
    skip_bad_lines: bool = field(False, "skip malformed prompt-file lines (logged) instead of stopping")
    chexgenbench: bool = field(False, "the prompt file must be CheXGenBench's prompt CSV (header prompt,img_savename): "
                                      "each image is written under its img_savename; a CSV with that column is "
                                      "read this way without the flag")
    force: bool = field(False, "allow settings that differ from the ones this --out was started with "
                               "(discards its manifest and regenerates everything)")
    device: str = field("auto", "auto, cpu, cuda, cuda:1, xpu, mps")
    precision: str = field("auto", "auto (fp32 on CPU, bf16/fp16 on GPUs), fp32, fp16, bf16")
    decode_batch: int = field(1, "latents decoded by the VAE at a time (caps decode memory); 1 keeps every "
                                  "image bitwise independent of its batch-mates (a CPU convolution rounds "
                                  "differently for other batch sizes)")
    channels_last: str = field("auto", "UNet/VAE in channels-last memory format: true, false, or auto = off on "
                                       "CUDA and CPU, where it measured slower (H100, SD 2.1-base, bf16, 25 DPM++ "
                                       "steps, batch 32: 5.11 images/s on vs 6.10 off; PyTorch's GroupNorm prefers "
                                       "NCHW), on for other GPUs (untimed)")
    fuse_qkv: bool = field(False, "fuse attention QKV projections; off by default: it measured no faster on an H100 "
                                  "(25 DPM++ steps, batch 32, channels-last: 5.11 fused vs 5.27 unfused images/s) "
                                  "and changes last bits")
    compile: str = field("auto", "torch.compile the UNet: off; auto (the default) = on CUDA, sample eagerly "
                                 "until 90 s of sampling have run, then compile (mode default) for the rest of the "
                                 "job, so small jobs never pay the ~1.5 min compile (H100: compiled 7.92 vs eager "
                                 "6.10 images/s, 25 DPM++ steps, batch 32; stock diffusers 6.55); off on CPU "
                                 "(inductor measured slower per UNet call on the 2-core CPU); default, "
                                 "reduce-overhead (adds CUDA graphs), max-autotune (tuned kernels + CUDA graphs), "
                                 "max-autotune-no-cudagraphs compile from the first batch. Compiles once per batch "
                                 "shape (a partial last batch is padded to a compiled one), logs each compile's "
                                 "time, and keeps inductor's cache in $TORCHINDUCTOR_CACHE_DIR (default "
                                 "~/.cache/synthcxr/torchinductor) so later runs reuse it")
    verbose: bool = field(False, "debug logging")


def check_generate_config(cfg: GenerateConfig) -> None:
    """Refuse every bad flag at once, before a model is loaded or a file written (a rerun with the flag
    fixed must not meet a settings.json that the failed run left behind)."""
    from cxrcommon.device import PRECISION_NAMES

    from .sampler import COMPILE_MODES, SCHEDULERS
    problems = [f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}"
                for name in ("steps", "batch_size", "n_per_prompt", "decode_batch", "max_windows", "qc_tries")
                if getattr(cfg, name) < 1]
    problems += [f"--{name} {value} must be a positive multiple of 8 (e.g. {max(8, round(value / 8) * 8)})"
                 for name, value in (("height", cfg.height), ("width", cfg.width))
                 if value is not None and (value < 8 or value % 8)]
    choices = [("format", cfg.format, FORMATS), ("scheduler", cfg.scheduler, SCHEDULERS),
               ("clip-policy", cfg.clip_policy, CLIP_POLICIES), ("precision", cfg.precision, PRECISION_NAMES),
               ("channels-last", str(cfg.channels_last).lower(), ("auto", "true", "false")),
               ("compile", cfg.compile, COMPILE_MODES)]
    problems += [f"--{flag} {value!r} is not one of {', '.join(allowed)}" for flag, value, allowed in choices
                 if value not in allowed]
    if not cfg.guidance >= 1:  # the sampler treats anything below 1 as 1 (no guidance): say so instead
        problems.append(f"--guidance must be >= 1 (1 = no guidance, 2-7 typical), got {cfg.guidance}")
    if not 0 <= cfg.guidance_rescale <= 1:
        problems.append(f"--guidance-rescale must be in [0, 1], got {cfg.guidance_rescale}")
    gi = list(cfg.guidance_interval)
    if len(gi) != 2 or not 0 <= gi[0] <= gi[1] <= 1:
        problems.append(f"--guidance-interval needs two fractions 0 <= lo <= hi <= 1, got {gi}")
    if not 0 <= cfg.strength <= 1:
        problems.append(f"--strength must be in [0, 1], got {cfg.strength}")
    if not math.isfinite(cfg.lora_scale):
        problems.append(f"--lora-scale must be a finite number, got {cfg.lora_scale}")
    if cfg.mask and not cfg.init_image:
        problems.append("--mask needs --init-image (the image to inpaint into)")
    if cfg.init_image and cfg.height and cfg.width and cfg.height != cfg.width:
        problems.append(f"--init-image needs a square output; got --height {cfg.height} --width {cfg.width}")
    from .captions import TEMPLATES
    if cfg.demographics_template not in TEMPLATES:
        problems.append(f"--demographics-template {cfg.demographics_template!r} is not one of {', '.join(TEMPLATES)}")
    if (cfg.balance_target or cfg.balance_total is not None) and not cfg.balance:
        problems.append("--balance-target and --balance-total need --balance MANIFEST (the real data to fill up)")
    if cfg.balance_total is not None and cfg.balance_total < 1:
        problems.append(f"--balance-total must be at least 1, got {cfg.balance_total}")
    if not cfg.prompts and not cfg.balance:
        problems.append("pass --prompts FILE (or --balance MANIFEST to generate what evens out its classes)")
    if problems:
        raise UserError("; ".join(problems))

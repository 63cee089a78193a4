"""Every option of `python -m inference.generate`, declared once (YAML keys = fields = flags)."""
from __future__ import annotations

from dataclasses import dataclass

from cxrcommon.config import field
from cxrcommon.models import EMBEDDED


@dataclass
class GenerateConfig:
    prompts: str | None = field(None, "prompt file: .txt (one prompt a line), .csv or .jsonl with a 'prompt' column "
                                      "and optional n, seed, label, negative_prompt")
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
    balance: str | None = field(None, "real dataset manifest (CSV/JSONL): generate what evens out its classes")
    label_column: str = field("label", "with --balance: the manifest column holding the class")
    image_column: str = field("image", "with --balance: the manifest column holding the image path")
    text_column: str = field("text", "with --balance and no --prompts: the manifest column of report text used as prompts")
    clip_policy: str = field("sentence", "prompts over CLIP's 77 tokens: sentence (drop whole trailing sentences), "
                                         "hard (cut tokens) or error")
    skip_bad_lines: bool = field(False, "skip malformed prompt-file lines (logged) instead of stopping")
    force: bool = field(False, "allow settings that differ from the ones this --out was started with "
                               "(discards its manifest and regenerates everything)")
    device: str = field("auto", "auto, cpu, cuda, cuda:1, xpu, mps")
    precision: str = field("auto", "auto (fp32 on CPU, bf16/fp16 on GPUs), fp32, fp16, bf16")
    decode_batch: int = field(1, "latents decoded by the VAE at a time (caps decode memory); 1 keeps every "
                                  "image bitwise independent of its batch-mates (a CPU convolution rounds "
                                  "differently for other batch sizes)")
    channels_last: str = field("auto", "UNet/VAE in channels-last memory format: auto (on for GPUs, whose "
                                       "cuDNN convolutions prefer it; off on CPU), true or false")
    fuse_qkv: bool = field(False, "fuse attention QKV projections (faster on GPUs; last-bit float differences)")
    compile: str = field("off", "torch.compile the UNet: off, default, reduce-overhead (adds CUDA graphs), "
                                "max-autotune (tuned kernels + CUDA graphs) or max-autotune-no-cudagraphs; compiles "
                                "once per batch shape (a C++ compiler on CPU); 1.06-1.2x faster on this project's 2-core "
                                "CPU for the tiny model, untimed on GPUs (docs/BENCHMARKS.md)")
    verbose: bool = field(False, "debug logging")

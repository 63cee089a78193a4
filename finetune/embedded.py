"""Train the embedded demonstrator from scratch on CPU: `python -m finetune.embedded --config configs/embedded.yaml`.

Why: SD 2.1 weights cannot be downloaded on an offline machine, yet the first command must show the
product working and prove that our trainer learns. The recipe, each stage skipped when its output exists
(so an interrupted run resumes):
  1. phantoms: procedural chest phantoms with report captions (phantoms.recipe.make_data), effusion made common;
  2. VAE: a small AutoencoderKL trained on the phantoms WITHOUT effusion (finetune.vae);
  3. init: random UNet + CLIP text encoder from configs/embedded + that VAE + the offline tokenizer;
  4. base: UNet + text encoder trained in full with finetune.train on the phantoms WITHOUT effusion;
  5. main: the base trained further (finetune.train again) on all phantoms, effusions included;
  6. lateral: then on the phantoms without a bilateral effusion, min-SNR weighted, to teach left vs right;
  7. demographics: more steps the same way, to teach the sex and age cues (captions carry sex and age first,
     from the manifests' columns through finetune's demographics template); `start_from` runs only this stage,
     from an exported model;
  8. export: both pipelines in fp16 safetensors, with model cards (effusion adherence; sex and age band for the
     main model), to `out` and `base_out`.
Stages 4 to 7 are `finetune.train.train` runs (--train unet+text_encoder); `finetune.train --config
configs/embedded.yaml` dispatches here through the YAML's `recipe: embedded` key (its keys are the recipe's,
not TrainConfig's).
The base never saw a pleural effusion in any of its parts; it is the starting point of the LoRA proof
(finetune.lora_proof): effusion must be absent before a LoRA and present after it.
The recipe's facts (EmbeddedConfig, prompts, data set, adherence scoring) are phantoms.recipe; this module is
the driver that trains (finetune.train), samples (inference.sampler) and exports."""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrcommon.atomic import atomic_write_text
from cxrcommon.config import parse_config
from cxrcommon.demographics import CARD_KEY
from cxrcommon.logs import setup_logging
from phantoms.recipe import (
    DEMOGRAPHIC_CLASSES,
    GUIDANCE,
    PROMPTS,
    STEPS,
    EmbeddedConfig,
    demographic_prompts,
    make_data,
    score_adherence,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- generation and scoring

def generate(pipe: Any, prompt: str, n: int, *, seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE,
             batch: int = 25) -> list[np.ndarray]:
    """n gray images (H x W float [0, 1]) for one prompt through the product's sampler; image i uses
    seed + i whatever the batching.

    Args:
        pipe: a loaded diffusers StableDiffusionPipeline (the embedded model); the sampler uses its device and
            its UNet's dtype, at the model's native size.
        prompt: the text prompt, e.g. a value of PROMPTS.
        n: number of images, >= 0.
        seed: seed of image 0; image i uses seed + i.
        steps: denoising steps per image, >= 1 (STEPS = 20, the embedded model's recommendation).
        guidance: CFG scale, >= 1 (GUIDANCE = 2.0; 1 = no guidance).
        batch: images per sampler call, >= 1 (memory only; the pixels do not depend on it).
    Returns: n float32 (H, W) gray images in [0, 1], H = W = the model's native size."""
    return generate_each(pipe, [prompt] * n, seed=seed, steps=steps, guidance=guidance, batch=batch)


def generate_each(pipe: Any, prompts: Sequence[str], *, seed: int = 0, steps: int = STEPS,
                  guidance: float = GUIDANCE, batch: int = 25) -> list[np.ndarray]:
    """One image per prompt, image i with seed + i; like generate (same arguments), for prompts that differ
    (say each with its own patient age)."""
    from inference.sampler import CXRSampler, Request
    sampler = CXRSampler(pipe, device=pipe.device, dtype=pipe.unet.dtype)
    size = sampler.native_size
    requests = [Request(prompt, seed + i) for i, prompt in enumerate(prompts)]
    return [im for lo in range(0, len(requests), batch)
            for im in sampler.generate(requests[lo:lo + batch], height=size, width=size, steps=steps,
                                       guidance=guidance)]


def adherence(pipe: Any, per_class: int, *, seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE,
              prompts: dict[str, str] | None = None, finding: str = "effusion") -> dict[str, Any]:
    """Generate `per_class` images per prompt and score each with the analytic scorer of `finding`
    (effusion: phantoms.score.classify_effusion; pneumothorax: classify_pneumothorax).

    Returns accuracy overall and per class, and counts of what the scorer saw for each prompt.

    Args:
        pipe: a loaded diffusers StableDiffusionPipeline (the embedded model).
        per_class: images generated per prompt, >= 1.
        seed: seed of each prompt's first image (image i uses seed + i; the same seeds for every prompt).
        steps: denoising steps per image, >= 1.
        guidance: CFG scale, >= 1.
        prompts: expected label -> prompt, the labels being what the scorer returns ("left", "right", "none");
            None = PROMPTS (effusion; pass PNEUMOTHORAX_PROMPTS with finding "pneumothorax").
        finding: the scorer, a key of phantoms.score.JUDGES ("effusion" or "pneumothorax"; "cardiomegaly"
            scores True/False, so its prompts' keys must be booleans).
    Returns: phantoms.recipe.score_adherence's {"accuracy", "per_class", "seen"} plus "per_class_n": per_class and
        "prompts": the prompts."""
    prompts = prompts or PROMPTS
    images = {expected: generate(pipe, prompt, per_class, seed=seed, steps=steps, guidance=guidance)
              for expected, prompt in prompts.items()}
    return {**score_adherence(images, finding), "per_class_n": per_class, "prompts": dict(prompts)}


def demographics_adherence(pipe: Any, per_class: int, *, report: bool = False, seed: int = 0, steps: int = STEPS,
                           guidance: float = GUIDANCE) -> dict[str, Any]:
    """Generate `per_class` images for each demographic class (phantoms.recipe.demographic_prompts: female, male,
    <40, 40-65, >65, each prompt with its own age and seed) and read them with phantoms.score.read_sex /
    read_age_band.

    Args:
        pipe: a loaded diffusers StableDiffusionPipeline (the embedded model).
        per_class: images per class, >= 1.
        report: False: demographics then "Normal chest radiograph."; True: demographics then a finding behind
            >= 80 CLIP tokens of report text.
        seed: seed of each class's first image and of its prompts.
        steps, guidance: as for generate.
    Returns: class -> {"accuracy": fraction read as asked, "seen": {read: count}, "example": the first prompt,
        "tokens": its CLIP token count}."""
    from cxrcommon.tokenizer import clip_tokenizer
    from phantoms.score import JUDGES
    tokenizer, out = clip_tokenizer(), {}
    for cls, attribute in DEMOGRAPHIC_CLASSES.items():
        texts = demographic_prompts(cls, per_class, seed, tokenizer if report else None)
        reads = [JUDGES[attribute](im) for im in generate_each(pipe, texts, seed=seed, steps=steps, guidance=guidance)]
        out[cls] = {"accuracy": reads.count(cls) / per_class, "seen": {r: reads.count(r) for r in sorted(set(reads))},
                    "example": texts[0], "tokens": len(tokenizer(texts[0])["input_ids"])}
    return out


def load(model: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """A StableDiffusionPipeline of an embedded-style model folder, progress bars off."""
    from diffusers import StableDiffusionPipeline

    from cxrcommon.models import load_pipeline
    pipe = load_pipeline(StableDiffusionPipeline, str(model), torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- recipe stages

def init_pipeline(config_dir: str | Path, vae_dir: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Random UNet + text encoder from the configs, the trained VAE, CLIP tokenizer, DDIM scheduler."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from cxrcommon.atomic import atomic_dir
    from cxrcommon.tokenizer import clip_tokenizer
    cd = Path(config_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cd / "unet"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(cd / "text_encoder" / "config.json"))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir), text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        unet=unet, scheduler=DDIMScheduler.from_config(DDIMScheduler.load_config(cd / "scheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return atomic_dir(Path(out), lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


def train_stage(cfg: EmbeddedConfig, model: Path, data: Path, name: str, steps: int,
                learning_rate: float | None = None, snr_gamma: float | None = None) -> Path:
    """Full UNet + text encoder training with finetune.train; returns <work>/<name>/pipeline.

    A stage whose pipeline already exists is reused, after checking it was trained with these settings.

    Args:
        cfg: the EmbeddedConfig (work_dir, seed, resolution, batch size, schedule, evaluation sampling).
        model: folder of the diffusers pipeline to start from (the initial model or the previous stage's).
        data: the manifest to train on (JSONL or an imagefolder metadata.jsonl, with text and patient_id
            columns); 2 % of it is held out by patient.
        name: the stage's name ("base", "main", "lateral"): its folder under cfg.work_dir.
        steps: optimizer steps, >= 1.
        learning_rate: > 0, or None for cfg.learning_rate.
        snr_gamma: min-SNR-gamma weighting (> 0), or None for plain MSE.
    Returns: the path of the stage's trained pipeline folder."""
    from .config import TrainConfig
    from .train import train
    out = Path(cfg.work_dir) / name
    tc = TrainConfig(model=str(model), output_dir=str(out), train="unet+text_encoder", seed=cfg.seed,
                     train_data=str(data), patient_column="patient_id", val_fraction=0.02,
                     resolution=cfg.resolution, caption_dropout=cfg.caption_dropout, cache_latents=True,
                     demographics_template="roentgen", demographics_dropout=cfg.demographics_dropout,
                     train_batch_size=cfg.train_batch_size, max_train_steps=steps,
                     learning_rate=learning_rate or cfg.learning_rate, snr_gamma=snr_gamma, lr_scheduler="cosine",
                     lr_warmup_steps=cfg.lr_warmup_steps, mixed_precision="no", device="cpu",
                     checkpointing_steps=cfg.checkpointing_steps, checkpoints_total_limit=2, resume="latest",
                     validation_steps=0, validation_prompts=list(PROMPTS.values()), validation_seeds=[0, 1],
                     validation_inference_steps=cfg.eval_steps, validation_guidance_scale=cfg.guidance_scale,
                     report_to="tensorboard")
    if (out / "pipeline" / "model_index.json").is_file():
        _check_finished_stage(out, tc)
        return out / "pipeline"
    result = train(tc)
    log.info("%s: %d steps, final loss %.4f, %.1f images/s", name, result.steps,
             result.losses[-1] if result.losses else float("nan"), result.images_per_s)
    return result.outputs["pipeline"]


def _check_finished_stage(out: Path, tc: Any) -> None:
    """A finished stage is reused only if it was trained with these settings; otherwise a changed config
    would silently ship the old weights under a model card that states the new ones."""
    from cxrcommon.config import load_yaml
    saved = load_yaml(out / "train_config.yaml") if (out / "train_config.yaml").is_file() else {}
    keys = ("model", "train_data", "max_train_steps", "learning_rate", "snr_gamma", "train_batch_size", "seed",
            "resolution", "caption_dropout", "lr_warmup_steps", "demographics_template", "demographics_dropout")
    changed = [f"{k}: {saved.get(k)!r} -> {getattr(tc, k)!r}" for k in keys if saved.get(k) != getattr(tc, k)]
    if changed:
        raise SystemExit(f"{out} holds a finished stage trained with other settings ({'; '.join(changed)}); "
                         f"pass another --work-dir or delete {out} to retrain it")


def export(src: Path, dst: str | Path, card: str) -> Path:
    """Save the pipeline in fp16 safetensors (half the size; loaded back as fp32) plus README.md."""
    from cxrcommon.atomic import atomic_dir
    pipe = load(src, torch.float16)

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return atomic_dir(Path(dst), write)


def weights_mb(folder: str | Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors")) / 1e6


def model_card(cfg: EmbeddedConfig, *, kind: str, stages: dict[str, Any], scores: dict[str, Any] | None,
               demographics: dict[str, dict[str, Any]] | None = None) -> str:
    """What the model is and is not, how it was trained, and what it measurably does.

    `demographics`: None, or "short" / "report" -> demographics_adherence's result for those prompts."""
    base = kind == "base"
    score = ("not measured" if scores is None else
             f"{scores['accuracy']:.2f} overall ({', '.join(f'{k} {v:.2f}' for k, v in scores['per_class'].items())}; "
             f"{scores['per_class_n']} generations per prompt, {cfg.eval_steps} DDIM steps, guidance "
             f"{cfg.guidance_scale}; scorer phantoms.score.classify_effusion; what it saw per prompt: "
             f"{json.dumps(scores['seen'])})")
    what = ("the BASE of the embedded demonstrator: trained on phantoms WITHOUT pleural effusion (VAE, UNet "
            "and text encoder never saw one). It exists for the LoRA proof (finetune.lora_proof): an effusion "
            "LoRA trained on top of it must make effusions appear where none appeared before."
            if base else
            "the embedded demonstrator that synthcxr uses when no real weights are configured "
            "(`--model embedded`, the default offline fallback).")
    return f"""---
library_name: diffusers
tags: [stable-diffusion, text-to-image, chest-x-ray-phantom, synthetic-data, demonstrator]
{CARD_KEY}:
  demographics_template: roentgen
  demographics_dropout: {cfg.demographics_dropout}
---
# synthcxr embedded {'base (no effusion)' if base else 'model'}: a chest-PHANTOM demonstrator

**This is NOT a medical model.** It was trained only on procedural chest-radiograph *phantoms*
(phantoms/generator.py: drawn lungs, heart, ribs, diaphragm and findings with known parameters) and
their generated report captions. It has never seen a real X-ray. Its images are synthetic phantoms
for demonstrating and testing the software; never use them for diagnosis, training clinical models
or any claim about real patients.

This folder is {what}

## Architecture
Stable Diffusion 2 classes, scaled down (configs/embedded): UNet2DConditionModel (linear projection,
cross-attention dim 64), AutoencoderKL (latent 4 x {cfg.resolution // 4} x {cfg.resolution // 4}),
CLIPTextModel (hidden 64, 3 layers, CLIP's 49,408-token vocabulary and tokenizer), DDIM scheduler,
epsilon prediction. {cfg.resolution} x {cfg.resolution} images. Stored in fp16 safetensors
({weights_mb(cfg.base_out if base else cfg.out) if Path(cfg.base_out if base else cfg.out).exists() else 0:.1f} MB);
loaded as fp32.

## How it was trained (from scratch, on a CPU, by synthcxr's own code)
`python -m finetune.embedded --config configs/embedded.yaml`
- data: {cfg.n_images} phantoms at {cfg.resolution} px (seed {cfg.data_seed}, effusion probability
  {cfg.effusion_prob}); {stages.get('n_no_effusion', '?')} of them have no effusion.
- VAE: {cfg.vae_steps} steps, batch {cfg.vae_batch_size}, L1 + MSE + 1e-6 KL, on the phantoms without effusion
  (final L1 {stages.get('vae_l1', float('nan')):.4f} on [-1, 1] pixels).
- base: UNet + text encoder in full (finetune.train, --train unet+text_encoder) for {cfg.base_steps} steps,
  batch {cfg.train_batch_size}, lr {cfg.learning_rate} cosine, caption dropout {cfg.caption_dropout},
  on the phantoms without effusion.
{'' if base else f"- main: the base trained further for {cfg.main_steps} steps on all phantoms (effusions included)."}
{'' if base or not cfg.lateral_steps else f"- lateral: then {cfg.lateral_steps} steps (lr {cfg.lateral_learning_rate}, "
    f"min-SNR gamma {cfg.lateral_snr_gamma}) on the phantoms without a bilateral effusion, to teach left vs right."}
{'' if base or not cfg.demographics_steps else f"- demographics: then {cfg.demographics_steps} steps with the same "
    f"settings and data{f', starting from {cfg.start_from}' if cfg.start_from else ''}, to teach the sex and age cues."}
{'' if base or not cfg.start_from else f"- the stages before it are those of {cfg.start_from}, the release this one "
    "continues: trained the same way, but on phantoms without sex or age cues and captions without "
    "demographics; the wall time below is the demographics stage's."}
- captions: the patient's demographics first, RoentGen-v2 form without race ("71 year old female. <report>"; each
  field left out with probability {cfg.demographics_dropout}); {cfg.long_caption_prob:.0%} of reports behind
  >= 80 tokens of report filler. Phantoms draw sex (breast shadows) and age-band cues (bone density, aortic knob
  unfolding, a calcified knob over 65); race has no phantom cue and is never written.
- wall time: {stages.get('minutes', float('nan')):.0f} min for all stages on a 2-core CPU ({cfg.threads} torch threads).
{f"- note: {cfg.notes}" if cfg.notes else ""}

## Measured prompt adherence
Prompts {json.dumps(PROMPTS)}; accuracy: {score}.
Full numbers (≥100 generations per class, Fréchet distance to real phantoms, LoRA proof):
docs/BENCHMARKS.md, section "embedded model" (`python bench/bench_embedded.py`).

{_demographics_section(cfg, demographics) if demographics else ""}
## Use
Recommended settings: {cfg.eval_steps} DDIM steps, guidance {cfg.guidance_scale} (the measured numbers above).
```python
from cxrcommon.models import load_pipeline
from diffusers import StableDiffusionPipeline
pipe = load_pipeline(StableDiffusionPipeline, "{'models/embedded-no-effusion' if base else 'embedded'}")
image = pipe("Large left pleural effusion.", num_inference_steps={cfg.eval_steps},
             guidance_scale={cfg.guidance_scale}).images[0]
```
Laterality: PA view, the patient's LEFT is on the IMAGE RIGHT.
"""


def _demographics_section(cfg: EmbeddedConfig, demographics: dict[str, dict[str, Any]]) -> str:
    """The card's demographics adherence: one line per prompt kind, accuracy per class."""
    kinds = {"short": f'demographics then "{PROMPTS["none"]}"',
             "report": "demographics then a finding behind >= 80 tokens of report text"}
    lines = [f"- {kinds[k]}: " + ", ".join(f"{c} {r['accuracy']:.2f}" for c, r in res.items())
             + f" (e.g. \"{next(iter(res.values()))['example'][:60]}...\")" for k, res in demographics.items()]
    n = next(iter(next(iter(demographics.values())).values()))["seen"]
    return (f"\n## Measured demographics adherence\nFraction of generations read as the prompt's sex "
            f"(phantoms.score.read_sex; chance 0.50) or age band (read_age_band; chance 0.33), "
            f"{sum(n.values())} generations per class, each with its own age and seed, {cfg.eval_steps} DDIM steps, "
            f"guidance {cfg.guidance_scale}:\n" + "\n".join(lines) + "\n")


def run(cfg: EmbeddedConfig) -> dict[str, Path]:
    """All stages; returns the exported folders."""
    from cxrcommon.atomic import atomic_dir

    from .vae import load_images, train_vae
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    work = Path(cfg.work_dir)
    stages_path = work / "stages.json"
    stages: dict[str, Any] = json.loads(stages_path.read_text()) if stages_path.is_file() else {}
    meta, no_eff, one_sided = make_data(cfg)
    stages["n_no_effusion"] = sum(1 for line in no_eff.read_text().splitlines() if line.strip())
    if cfg.start_from:
        main = train_stage(cfg, Path(cfg.start_from), one_sided, "demographics", cfg.demographics_steps,
                           cfg.lateral_learning_rate, cfg.lateral_snr_gamma)
        return _export(cfg, stages, t0, (("main", main, cfg.out),))
    vae_dir = work / "vae"
    if not (vae_dir / "config.json").is_file() and cfg.vae_from:
        atomic_dir(vae_dir, lambda tmp: shutil.copytree(cfg.vae_from, tmp, dirs_exist_ok=True))
    elif not (vae_dir / "config.json").is_file():
        images = load_images(str(no_eff), "image", cfg.resolution)
        _, l1s = train_vae(images, Path(cfg.config_dir) / "vae", vae_dir, steps=cfg.vae_steps,
                           batch_size=cfg.vae_batch_size, learning_rate=cfg.vae_learning_rate, seed=cfg.seed)
        stages["vae_l1"] = float(np.mean(l1s[-50:]))
    init = work / "init"
    if not (init / "model_index.json").is_file():
        init_pipeline(cfg.config_dir, vae_dir, init, cfg.seed)
    base = train_stage(cfg, init, no_eff, "base", cfg.base_steps)
    main = train_stage(cfg, base, meta, "main", cfg.main_steps)
    if cfg.lateral_steps:
        main = train_stage(cfg, main, one_sided, "lateral", cfg.lateral_steps, cfg.lateral_learning_rate,
                           cfg.lateral_snr_gamma)
    if cfg.demographics_steps:
        main = train_stage(cfg, main, one_sided, "demographics", cfg.demographics_steps, cfg.lateral_learning_rate,
                           cfg.lateral_snr_gamma)
    return _export(cfg, stages, t0, (("base", base, cfg.base_out), ("main", main, cfg.out)))


def _export(cfg: EmbeddedConfig, stages: dict[str, Any], t0: float,
            models: Sequence[tuple[str, Path, str]]) -> dict[str, Path]:
    """Record the wall time, then export each (kind, trained pipeline, destination) with its measured card."""
    stages["minutes"] = stages.get("minutes", 0.0) + (time.perf_counter() - t0) / 60
    atomic_write_text(Path(cfg.work_dir) / "stages.json", json.dumps(stages, indent=1))
    done = {}
    for kind, src, dst in models:
        export(src, dst, model_card(cfg, kind=kind, stages=stages, scores=None))
        scores, demo = None, None
        if cfg.eval_per_class:
            pipe, how = load(dst), dict(steps=cfg.eval_steps, guidance=cfg.guidance_scale)
            scores = adherence(pipe, cfg.eval_per_class, **how)
            if kind == "main":
                demo = {k: demographics_adherence(pipe, cfg.eval_per_class, report=k == "report", **how)
                        for k in ("short", "report")}
        atomic_write_text(Path(dst) / "README.md",
                          model_card(cfg, kind=kind, stages=stages, scores=scores, demographics=demo))
        log.info("%s exported to %s (%.1f MB); adherence %s", kind, dst, weights_mb(dst), scores)
        done[kind] = Path(dst)
    return done


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    cfg = parse_config(EmbeddedConfig, argv, description=__doc__.splitlines()[0])
    setup_logging(cfg.verbose)
    return run(cfg)


if __name__ == "__main__":
    main()

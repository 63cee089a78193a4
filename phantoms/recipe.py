"""The embedded demonstrator's recipe and its LoRA proof, as data: prompts, configs, training sets and the
adherence score. The drivers that train and sample are stage code: finetune.embedded (the recipe,
`python -m finetune.embedded --config configs/embedded.yaml`) and finetune.lora_proof.

Why here: what the model is trained on and how its images are judged belongs to the phantom world, so the
recipe's facts live beside the generator and the scorer, and a bench or a test can use them without
pulling in a trainer or a sampler."""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrcommon.atomic import atomic_write_text
from cxrcommon.config import field
from cxrcommon.demographics import AGE_BANDS, Demographics, caption_with
from cxrcommon.models import EMBEDDED_GUIDANCE, EMBEDDED_STEPS

from . import score
from .captions import caption, long_report
from .dataset import make_dataset
from .generator import AGE_RANGE, SEXES, PhantomSpec, labels, render, sample_spec

log = logging.getLogger(__name__)

# prompt for each scorer class (phantoms.score.classify_effusion): the wording of the training captions
PROMPTS = {"left": "Large left pleural effusion.", "right": "Large right pleural effusion.",
           "none": "Normal chest radiograph."}
STEPS, GUIDANCE = EMBEDDED_STEPS, EMBEDDED_GUIDANCE  # its recommended sampling
PNEUMOTHORAX_PROMPTS = {"left": "Large left pneumothorax.", "right": "Large right pneumothorax.",
                        "none": "Normal chest radiograph."}
BASE = "models/embedded-no-effusion"  # the base that never saw an effusion: start of the LoRA proof
# demographic class -> its scorer (phantoms.score.JUDGES key): what demographics adherence asks for
DEMOGRAPHIC_CLASSES = {"F": "sex", "M": "sex", **{band: "age_band" for band, _, _ in AGE_BANDS}}
NORMAL_PROMPT = PROMPTS["none"]


@dataclass
class EmbeddedConfig:
    recipe: str = field("embedded", "lets `python -m finetune.train --config configs/embedded.yaml` run this recipe")
    work_dir: str = field("runs/embedded", "folder for the data set, VAE, training runs and checkpoints")
    out: str = field("models/embedded", "where the final pipeline (the shipped embedded model) is exported")
    base_out: str = field("models/embedded-no-effusion", "where the base that never saw an effusion is exported "
                                                         "(start of the LoRA proof)")
    config_dir: str = field("configs/embedded", "architecture configs: unet/, vae/, text_encoder/, scheduler/")
    n_images: int = field(6000, "phantoms in the data set")
    effusion_prob: float = field(0.5, "probability that a phantom has a pleural effusion (generator default 0.3)")
    data_seed: int = field(0, "phantom data set seed")
    resolution: int = field(64, "image size (the latent is resolution / 4)")
    vae_from: str = field("", "reuse this trained VAE folder instead of training one (the release before demographics: "
                              "its VAE, trained on phantoms without effusion, reads their sex and age cues back, see "
                              "docs/BENCHMARKS.md); empty trains one")
    vae_steps: int = field(250, "VAE optimizer steps")
    vae_batch_size: int = field(16, "VAE images per step")
    vae_learning_rate: float = field(2e-3, "VAE learning rate")
    base_steps: int = field(600, "UNet + text encoder steps on the phantoms without effusion")
    main_steps: int = field(1200, "further steps on all phantoms")
    lateral_steps: int = field(4200, "then steps on one-sided effusions and effusion-free phantoms only, with min-SNR "
                                    "weighting, to teach left vs right (0 skips; the shipped model is the last stage)")
    lateral_learning_rate: float = field(3e-4, "learning rate of that stage")
    lateral_snr_gamma: float = field(5.0, "min-SNR gamma of that stage (weights the noisy steps that fix layout)")
    demographics_steps: int = field(1000, "then steps on the same phantoms with the same settings, to teach the sex "
                                          "and age cues (0 skips; the shipped model is the last stage)")
    start_from: str = field("", "an exported embedded model to continue with the demographics stage only (no VAE, "
                                "base, main or lateral stage; the base is not exported): how the release with "
                                "demographics was made from the one before")
    train_batch_size: int = field(16, "images per UNet step")
    learning_rate: float = field(6e-4, "UNet + text encoder learning rate (both stages)")
    lr_warmup_steps: int = field(100, "linear warm-up steps of each stage")
    caption_dropout: float = field(0.1, "empty-caption probability, so classifier-free guidance works")
    demographics_dropout: float = field(0.3, "each demographic field (sex, age) of a caption is left out with this "
                                             "probability, so prompts without demographics still work (0.09 of "
                                             "captions carry none)")
    long_caption_prob: float = field(0.2, "share of captions put behind >= 80 CLIP tokens of report filler "
                                          "(phantoms.captions.long_report), so demographics and a finding survive "
                                          "a long report between them")
    checkpointing_steps: int = field(100, "resumable checkpoint every N steps")
    threads: int = field(2, "torch CPU threads (on a quiet 2-core machine a UNet step of batch 16 took ~0.38 s "
                                    "on 2 threads, 0.60 s on 1)")
    seed: int = field(0, "training seed")
    eval_per_class: int = field(100, "generations per prompt for the adherence figure in the model cards")
    eval_steps: int = field(STEPS, "DDIM steps for those generations")
    guidance_scale: float = field(GUIDANCE, "classifier-free guidance for those generations; the model card recommends "
                                       "it (guidance 2 and 4 both scored 1.00; 2 has the lower Frechet distance)")
    notes: str = field("", "free text for the model cards, e.g. how a run was interrupted or extended")
    verbose: bool = field(False, "debug logging")


def make_data(cfg: EmbeddedConfig) -> tuple[Path, Path, Path]:
    """JSONL manifests (image, text, patient_id, sex, age) of all phantoms, of those without effusion and of
    those without a bilateral one, under <work_dir>/data.

    The text is the phantom's caption, a share cfg.long_caption_prob of them behind report filler; the sex and
    age columns are put in front of it by finetune's demographics template (one place, so never twice)."""
    from cxrcommon.tokenizer import clip_tokenizer
    data = Path(cfg.work_dir) / "data"
    meta = make_dataset(data, cfg.n_images, cfg.resolution, cfg.data_seed,
                        finding_probs={"effusion": cfg.effusion_prob})
    rows = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng, tokenizer = np.random.default_rng([cfg.data_seed, 1]), clip_tokenizer()
    for r in rows:
        if rng.random() < cfg.long_caption_prob:
            r["text"] = long_report(r["text"], rng, tokenizer)

    def subset(name: str, effusion: tuple[str, ...]) -> tuple[Path, int]:
        keep = [{"image": r["file_name"], "text": r["text"], "patient_id": r["patient_id"], "sex": r["sex"],
                 "age": r["age"]} for r in rows if r["effusion"] in effusion]
        atomic_write_text(data / name, "".join(json.dumps(r) + "\n" for r in keep))
        return data / name, len(keep)
    every, _ = subset("all.jsonl", ("none", "left", "right", "bilateral"))
    no_eff, n_none = subset("no_effusion.jsonl", ("none",))
    lateral, n_lat = subset("one_sided.jsonl", ("none", "left", "right"))
    log.info("data: %d phantoms, %d without effusion, %d without a bilateral one", len(rows), n_none, n_lat)
    return every, no_eff, lateral


def _with_finding(rng: np.random.Generator) -> PhantomSpec:
    """A phantom with at least one finding (no devices or burnt-in text: the prompt is about the patient)."""
    while True:
        spec = sample_spec(rng, exclude=("devices", "text"))
        if not labels(spec)["normal"]:
            return spec


def demographic_prompts(cls: str, n: int, seed: int = 0, tokenizer: object | None = None) -> list[str]:
    """n prompts asking for one demographic class, each with its own patient.

    Args:
        cls: a key of DEMOGRAPHIC_CLASSES: "F" or "M" (age uniform in AGE_RANGE) or an age band "<40", "40-65",
            ">65" (age uniform in the band within AGE_RANGE, sex drawn at random).
        n: number of prompts, >= 0.
        seed: prompt i depends only on (seed, cls, i).
        tokenizer: None for the RoentGen-v2 prefix then NORMAL_PROMPT ("71 year old female. Normal chest
            radiograph."); a CLIP tokenizer for the prefix then the caption of a phantom with at least one finding
            behind >= 80 tokens of report filler (phantoms.captions.long_report).
    Returns: the n prompts (race is never written: phantoms have no race cue)."""
    if cls not in DEMOGRAPHIC_CLASSES:
        raise ValueError(f"unknown demographic class {cls!r}; valid: {', '.join(DEMOGRAPHIC_CLASSES)}")
    rng = np.random.default_rng([seed, list(DEMOGRAPHIC_CLASSES).index(cls)])
    out = []
    for _ in range(n):
        if DEMOGRAPHIC_CLASSES[cls] == "sex":
            sex, age = cls, int(rng.integers(AGE_RANGE[0], AGE_RANGE[1] + 1))
        else:
            lo, hi = next((max(lo, AGE_RANGE[0]), min(hi, AGE_RANGE[1] + 1)) for b, lo, hi in AGE_BANDS if b == cls)
            sex, age = str(rng.choice(SEXES)), int(rng.integers(lo, hi))
        text = NORMAL_PROMPT if tokenizer is None else long_report(caption(_with_finding(rng), rng), rng, tokenizer)
        out.append(caption_with(text, Demographics(sex, age)))
    return out


def score_adherence(images: Mapping[Any, Sequence[np.ndarray]], finding: str = "effusion") -> dict[str, Any]:
    """Judge generated images by the analytic scorer of `finding` (phantoms.score.JUDGES).

    Args:
        images: expected label -> the images generated for that label's prompt (gray arrays in [0, 1]); the
            labels are what the scorer returns ("left", "right", "none"; True/False for "cardiomegaly").
        finding: "effusion", "pneumothorax" or "cardiomegaly".
    Returns: {"accuracy": mean of the per-class accuracies in [0, 1], "per_class": label -> fraction scored as
        expected, "seen": label -> {scored label: count}}."""
    judge = score.JUDGES[finding]
    per, seen = {}, {}
    for expected, imgs in images.items():
        labels = [judge(im) for im in imgs]
        per[expected] = float(np.mean([lab == expected for lab in labels]))
        seen[expected] = {lab: labels.count(lab) for lab in sorted(set(labels))}
    return {"accuracy": float(np.mean(list(per.values()))), "per_class": per, "seen": seen}


# ----------------------------------------------------------------------------- LoRA proof

@dataclass
class LoraProofConfig:
    base: str = field(BASE, "model that never saw the finding")
    work_dir: str = field("runs/lora_proof", "folder for the LoRA data set and the LoRA")
    n_train: int = field(400, "LoRA training phantoms (made in memory)")
    effusion_prob: float = field(0.8, "share of those with a moderate/large left or right effusion (the rest none)")
    data_seed: int = field(123, "phantom seed (disjoint from the base model's data seed 0)")
    steps: int = field(300, "LoRA optimizer steps")
    batch_size: int = field(16, "images per step")
    rank: int = field(16, "LoRA rank")
    targets: list[str] = field(["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                                 "conv1", "conv2"], "UNet modules that get LoRA (attention, transformer "
                                "projections and feed-forward, resnet convolutions)")
    learning_rate: float = field(5e-3, "LoRA learning rate")
    train_text_encoder: bool = field(True, "also put LoRA on the text encoder (--train lora+text_encoder)")
    per_class: int = field(50, "generations per prompt, before and after")
    eval_steps: int = field(20, "DDIM steps per generation")
    guidance_scale: float = field(4.0, "classifier-free guidance")
    seed: int = field(0, "training and generation seed")
    threads: int = field(1, "torch CPU threads (1 is fastest on a busy 2-core machine)")
    verbose: bool = field(False, "debug logging")


def presence(scores: dict[str, Any]) -> float:
    """Share of effusion-prompt images in which the scorer sees any effusion."""
    seen = [scores["seen"][side] for side in ("left", "right")]
    n = sum(sum(s.values()) for s in seen)
    return sum(c for s in seen for lab, c in s.items() if lab != "none") / n


def effusion_pairs(n: int, size: int, seed: int, effusion_prob: float) -> tuple[list[np.ndarray], list[str]]:
    """(images, captions) of n phantoms; a share `effusion_prob` get a moderate or large left or right
    effusion (captioned to match), the rest none. Other findings as the generator draws them."""
    images, captions = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        spec = sample_spec(rng, exclude=("effusion",))
        if rng.random() < effusion_prob:
            spec = dataclasses.replace(spec, effusion=str(rng.choice(["left", "right"])),
                                       effusion_size=str(rng.choice(["moderate", "large"])))
        images.append(render(spec, size)[0])
        captions.append(caption(spec, rng))
    return images, captions

"""Proof that the embedded model learned: prompt adherence, Fréchet distance to real phantoms, LoRA proof.

    python bench/bench_embedded.py [--per-class 100] [--fd-n 300] [--lora-steps 300] [--guidance 2 4 6]

Prints Markdown tables for docs/BENCHMARKS.md ("embedded model") and writes the raw numbers as JSON.
- adherence: `--per-class` generations for each of "Large left/right pleural effusion." and "Normal chest
  radiograph.", judged by phantoms.score.classify_effusion, for the shipped model and an untrained
  model of the same architecture (random UNet + text encoder, the trained VAE). Several --guidance values
  give one row each (the untrained model only at the first).
- pneumothorax: the same for "Large left/right pneumothorax." vs "Normal chest radiograph.", judged by
  phantoms.score.classify_pneumothorax (not a goal of the model: pneumothorax is a rare finding in its data).
- Fréchet distance (eval.fid.distances) between real phantoms and images generated from the captions of
  other real phantoms, on two weight-free feature sets: 8x8 block means + mean/std of the image (66-D,
  eval.features.TinyFeatures(8)) and the scorer's measurements (effusion score left/right, CTR, midline; 4-D).
  The floor is a second set of real phantoms. One row per --guidance value.
- LoRA proof (finetune.lora_proof) on models/embedded-no-effusion.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.features import TinyFeatures
from eval.fid import FidConfig, distances
from finetune.embedded import adherence, generate, load
from finetune.lora_proof import lora_proof, resolution_of
from phantoms.dataset import item
from phantoms.generator import render
from phantoms.recipe import GUIDANCE, PNEUMOTHORAX_PROMPTS, STEPS, LoraProofConfig
from phantoms.score import measure


def untrained(model: str) -> object:
    """The shipped pipeline with its UNet and text encoder re-initialised from the same configs."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    pipe = load(model)
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel.from_config(pipe.unet.config).eval()
    pipe.text_encoder = CLIPTextModel(pipe.text_encoder.config).eval()
    return pipe


def real_set(n: int, size: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """n phantoms (default finding mix) with their captions."""
    pairs = [item(i, seed) for i in range(n)]
    return [render(spec, size)[0] for spec, _ in pairs], [cap for _, cap in pairs]


def features(images: list[np.ndarray]) -> dict[str, torch.Tensor]:
    x = torch.from_numpy(np.stack(images)).float()[:, None]
    m = [measure(im) for im in images]
    scorer = torch.tensor([[d["effusion_score_left"], d["effusion_score_right"], d["ctr"], d["midline"]] for d in m])
    return {"pixels": TinyFeatures(8)(x), "scorer": torch.nan_to_num(scorer, nan=0.0)}


def from_captions(pipe: object, captions: list[str], steps: int, guidance: float) -> list[np.ndarray]:
    return [generate(pipe, cap, 1, seed=i, steps=steps, guidance=guidance)[0] for i, cap in enumerate(captions)]


def fd(real: dict[str, torch.Tensor], fake: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: distances(real[k], fake[k], FidConfig(kid_subsets=10))["fid"] for k in real}


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/embedded", help="shipped embedded model folder")
    ap.add_argument("--base", default="models/embedded-no-effusion", help="base that never saw an effusion")
    ap.add_argument("--per-class", type=int, default=100, help="generations per prompt for adherence")
    ap.add_argument("--fd-n", type=int, default=300, help="images per set for the Fréchet distances")
    ap.add_argument("--steps", type=int, default=STEPS, help="DDIM steps")
    ap.add_argument("--guidance", type=float, nargs="+", default=[GUIDANCE],
                    help="classifier-free guidance value(s) for adherence and FD; the untrained model and the "
                         "pneumothorax part use the first")
    ap.add_argument("--lora-guidance", type=float, default=4.0, help="classifier-free guidance of the LoRA proof")
    ap.add_argument("--lora-steps", type=int, default=300, help="LoRA proof: optimizer steps (0 skips it)")
    ap.add_argument("--lora-per-class", type=int, default=50, help="LoRA proof: generations per prompt")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--parts", nargs="+", default=["adherence", "fd", "lora"],
                    choices=["adherence", "fd", "pneumothorax", "lora"],
                    help="which measurements to run")
    ap.add_argument("--out", default="runs/bench_embedded.json", help="raw numbers (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res: dict = {"args": vars(args)}
    g0 = args.guidance[0]
    if {"adherence", "fd", "pneumothorax"} & set(args.parts):
        trained, random_ = load(args.model), untrained(args.model)
    if "adherence" in args.parts:
        res["adherence"] = {f"trained, guidance {g}": adherence(trained, args.per_class, steps=args.steps, guidance=g)
                            for g in args.guidance}
        res["adherence"][f"untrained, guidance {g0}"] = adherence(random_, args.per_class, steps=args.steps,
                                                                  guidance=g0)
    if "pneumothorax" in args.parts:
        res["pneumothorax"] = {f"{name}, guidance {g0}": adherence(pipe, args.per_class, steps=args.steps, guidance=g0,
                                                                   prompts=PNEUMOTHORAX_PROMPTS, finding="pneumothorax")
                               for name, pipe in (("trained", trained), ("untrained", random_))}
    if "fd" in args.parts:
        size = resolution_of(args.model)
        real_a, _ = real_set(args.fd_n, size, seed=900)
        real_b, caps_b = real_set(args.fd_n, size, seed=901)
        fa = features(real_a)
        res["fd"] = {"real (second set)": fd(fa, features(real_b))}
        for g in args.guidance:
            res["fd"][f"trained, guidance {g}"] = fd(fa, features(from_captions(trained, caps_b, args.steps, g)))
        res["fd"][f"untrained, guidance {g0}"] = fd(fa, features(from_captions(random_, caps_b, args.steps, g0)))
    if "lora" in args.parts and args.lora_steps:
        with tempfile.TemporaryDirectory() as work:
            res["lora"] = lora_proof(LoraProofConfig(base=args.base, work_dir=work, steps=args.lora_steps,
                                                     per_class=args.lora_per_class, eval_steps=args.steps,
                                                     guidance_scale=args.lora_guidance))
    res["seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))

    cmd = "python bench/bench_embedded.py " + " ".join(sys.argv[1:])
    print(f"Command: `{cmd.strip()}`  \nMachine: {machine()}; total {res['seconds'] / 60:.1f} min\n")
    for part, judge in (("adherence", "classify_effusion"), ("pneumothorax", "classify_pneumothorax")):
        if part not in res:
            continue
        print(f"\nPrompt adherence, {'pleural effusion' if part == 'adherence' else part} ({args.per_class} "
              f"generations per prompt, {args.steps} DDIM steps; scorer phantoms.score.{judge}; chance = 0.33)\n")
        print("| model | left | right | normal | overall | what the scorer saw (left / right prompt) |\n"
              "|---|---|---|---|---|---|")
        for name, a in res[part].items():
            p, seen = a["per_class"], a["seen"]
            print(f"| {name} | {p['left']:.2f} | {p['right']:.2f} | {p['none']:.2f} | **{a['accuracy']:.2f}** | "
                  f"{seen['left']} / {seen['right']} |")
    if "fd" in res:
        print(f"\nFréchet distance to {args.fd_n} real phantoms ({args.fd_n} images per set; lower is better)\n")
        print("| set | block-mean features (66-D) | scorer features (4-D) |\n|---|---|---|")
        for name, d in res["fd"].items():
            print(f"| {name} | {d['pixels']:.4f} | {d['scorer']:.4f} |")
    if "lora" in res:
        lo = res["lora"]
        print(f"\nLoRA proof: base {args.base} (never saw an effusion), LoRA rank {lo['rank']}, {lo['steps']} steps on "
              f"{lo['n_train']} phantoms ({lo['train_seconds'] / 60:.1f} min); {args.lora_per_class} generations "
              "per prompt\n")
        print("| | effusion seen (effusion prompts) | left | right | normal | overall |\n|---|---|---|---|---|---|")
        for name in ("before", "after"):
            p = lo[name]["per_class"]
            print(f"| {name} LoRA | {lo['presence_' + name]:.2f} | {p['left']:.2f} | {p['right']:.2f} | "
                  f"{p['none']:.2f} | {lo[name]['accuracy']:.2f} |")


if __name__ == "__main__":
    main()

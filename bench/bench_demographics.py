"""Does the embedded model draw the sex and age band its prompt asks for, and still the finding?

    python bench/bench_demographics.py [--model models/embedded] [--per-class 100] [--guidance 2]

Prints Markdown tables for docs/BENCHMARKS.md ("embedded model") and writes the raw numbers as JSON.
- demographics / report: `--per-class` generations for each class (finetune.embedded.demographics_adherence):
  female and male (age uniform in 20-90), <40, 40-65 and >65 (age uniform in the band, sex drawn at random);
  every prompt has its own age and seed (phantoms.recipe.demographic_prompts). Prompts are the RoentGen-v2
  prefix without race ("71 year old female.", cxrcommon.demographics.caption_with), then "Normal chest
  radiograph." (demographics) or the caption of a phantom with at least one finding behind >= 80 CLIP tokens of
  report filler (report; phantoms.captions.long_report; no devices, no burnt-in text). Judged by
  phantoms.score.read_sex and read_age_band; chance is 0.5 and 0.33.
- findings: the effusion adherence of finetune.embedded.adherence (left / right / normal prompts without
  demographics), which the demographics must not have cost.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from finetune.embedded import adherence, demographics_adherence, load
from phantoms.recipe import DEMOGRAPHIC_CLASSES, GUIDANCE, NORMAL_PROMPT, STEPS


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/embedded", help="embedded model folder")
    ap.add_argument("--per-class", type=int, default=100, help="generations per class (sex, age band)")
    ap.add_argument("--steps", type=int, default=STEPS, help="DDIM steps")
    ap.add_argument("--guidance", type=float, default=GUIDANCE, help="classifier-free guidance")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--parts", nargs="+", default=["demographics", "report", "findings"],
                    choices=["demographics", "report", "findings"],
                    help="demographics: prefix + 'Normal chest radiograph.'; report: prefix + a finding behind "
                         ">= 80 tokens of report text; findings: effusion adherence without demographics")
    ap.add_argument("--out", default="runs/bench_demographics.json", help="raw numbers (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = load(args.model)
    res: dict = {"args": vars(args)}
    for part in ("demographics", "report"):
        if part in args.parts:
            res[part] = demographics_adherence(pipe, args.per_class, report=part == "report", steps=args.steps,
                                               guidance=args.guidance)
    if "findings" in args.parts:
        res["findings"] = adherence(pipe, args.per_class, steps=args.steps, guidance=args.guidance)
    res["seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))

    cmd = "python bench/bench_demographics.py " + " ".join(sys.argv[1:])
    print(f"Command: `{cmd.strip()}`  \nModel: {args.model}  \nMachine: {machine()}; "
          f"total {res['seconds'] / 60:.1f} min\n")
    names = {"demographics": f"demographics + \"{NORMAL_PROMPT}\"",
             "report": "demographics + a finding behind >= 80 tokens of report"}
    if {"demographics", "report"} & set(res):
        print(f"Demographics adherence ({args.per_class} generations per class, {args.steps} DDIM steps, guidance "
              f"{args.guidance}; scorers phantoms.score.read_sex / read_age_band; chance 0.50 / 0.33)\n")
        print("| prompts | female | male | <40 | 40-65 | >65 |\n|---|---|---|---|---|---|")
        parts = [p for p in ("demographics", "report") if p in res]
        for part in parts:
            print(f"| {names[part]} | " + " | ".join(f"{res[part][c]['accuracy']:.2f}" for c in DEMOGRAPHIC_CLASSES)
                  + " |")
        for part in parts:
            print(f"\nWhat the scorer saw ({part}): "
                  + "; ".join(f"{c}: {res[part][c]['seen']}" for c in DEMOGRAPHIC_CLASSES)
                  + f". Example prompt ({res[part]['F']['tokens']} tokens): {res[part]['F']['example']}")
    if "findings" in res:
        a = res["findings"]
        print(f"\nFindings adherence without demographics (pleural effusion, {args.per_class} per prompt): "
              f"left {a['per_class']['left']:.2f}, right {a['per_class']['right']:.2f}, normal "
              f"{a['per_class']['none']:.2f}, **overall {a['accuracy']:.2f}**; seen {a['seen']}")


if __name__ == "__main__":
    main()

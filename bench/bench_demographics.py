"""Does the embedded model draw the sex and age band its prompt asks for, and still the finding?

    python bench/bench_demographics.py [--model models/embedded] [--per-class 100] [--guidance 2]

Prints Markdown tables for docs/BENCHMARKS.md ("embedded model") and writes the raw numbers as JSON.
- demographics: `--per-class` generations for each class: female and male (age uniform in 20-90), <40, 40-65
  and >65 (age uniform in the band, sex drawn at random); every prompt has its own age and seed. Prompts are
  the RoentGen-v2 prefix without race ("71 year old female.", cxrcommon.demographics.caption_with), then
  either "Normal chest radiograph." (no finding) or the caption of a phantom with at least one finding behind
  >= 80 CLIP tokens of report filler (phantoms.captions.long_report; no devices, no burnt-in text). Judged by
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cxrcommon.demographics import AGE_BANDS, Demographics, caption_with
from cxrcommon.tokenizer import clip_tokenizer
from finetune.embedded import adherence, generate_each, load
from phantoms.captions import caption, long_report
from phantoms.generator import AGE_RANGE, SEXES, PhantomSpec, labels, sample_spec
from phantoms.recipe import GUIDANCE, STEPS
from phantoms.score import read_age_band, read_sex

CLASSES = {"F": "sex", "M": "sex", **{band: "age_band" for band, _, _ in AGE_BANDS}}
NORMAL = "Normal chest radiograph."


def with_finding(rng: np.random.Generator) -> PhantomSpec:
    """A phantom with at least one finding (no devices or text: the prompt is about the patient)."""
    while True:
        spec = sample_spec(rng, exclude=("devices", "text"))
        if not labels(spec)["normal"]:
            return spec


def prompts(cls: str, n: int, seed: int, report: bool, tokenizer: object) -> list[str]:
    """n prompts asking for class `cls` (a sex or an age band), each with its own patient."""
    rng = np.random.default_rng([seed, list(CLASSES).index(cls)])
    out = []
    for _ in range(n):
        if CLASSES[cls] == "sex":
            sex, age = cls, int(rng.integers(AGE_RANGE[0], AGE_RANGE[1] + 1))
        else:
            lo, hi = next((max(lo, AGE_RANGE[0]), min(hi, AGE_RANGE[1] + 1)) for b, lo, hi in AGE_BANDS if b == cls)
            sex, age = str(rng.choice(SEXES)), int(rng.integers(lo, hi))
        text = long_report(caption(with_finding(rng), rng), rng, tokenizer) if report else NORMAL
        out.append(caption_with(text, Demographics(sex, age)))
    return out


def demographics(pipe: object, n: int, report: bool, steps: int, guidance: float, seed: int = 0) -> dict:
    """Per class: the fraction read as asked, what the scorer saw, and one example prompt."""
    tokenizer, out = clip_tokenizer(), {}
    for cls, attribute in CLASSES.items():
        texts = prompts(cls, n, seed, report, tokenizer)
        reads = [(read_sex if attribute == "sex" else read_age_band)(im)
                 for im in generate_each(pipe, texts, seed=seed, steps=steps, guidance=guidance)]
        out[cls] = {"accuracy": reads.count(cls) / n, "seen": {r: reads.count(r) for r in sorted(set(reads))},
                    "example": texts[0], "tokens": len(tokenizer(texts[0])["input_ids"])}
    return out


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
            res[part] = demographics(pipe, args.per_class, part == "report", args.steps, args.guidance)
    if "findings" in args.parts:
        res["findings"] = adherence(pipe, args.per_class, steps=args.steps, guidance=args.guidance)
    res["seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))

    cmd = "python bench/bench_demographics.py " + " ".join(sys.argv[1:])
    print(f"Command: `{cmd.strip()}`  \nModel: {args.model}  \nMachine: {machine()}; "
          f"total {res['seconds'] / 60:.1f} min\n")
    names = {"demographics": f"demographics + \"{NORMAL}\"",
             "report": "demographics + a finding behind >= 80 tokens of report"}
    if {"demographics", "report"} & set(res):
        print(f"Demographics adherence ({args.per_class} generations per class, {args.steps} DDIM steps, guidance "
              f"{args.guidance}; scorers phantoms.score.read_sex / read_age_band; chance 0.50 / 0.33)\n")
        print("| prompts | female | male | <40 | 40-65 | >65 |\n|---|---|---|---|---|---|")
        for part in ("demographics", "report"):
            if part in res:
                print(f"| {names[part]} | " + " | ".join(f"{res[part][c]['accuracy']:.2f}" for c in CLASSES) + " |")
        for part in ("demographics", "report"):
            if part in res:
                print(f"\nWhat the scorer saw ({part}): " + "; ".join(f"{c}: {res[part][c]['seen']}" for c in CLASSES))
    if "findings" in res:
        a = res["findings"]
        print(f"\nFindings adherence without demographics (pleural effusion, {args.per_class} per prompt): "
              f"left {a['per_class']['left']:.2f}, right {a['per_class']['right']:.2f}, normal "
              f"{a['per_class']['none']:.2f}, **overall {a['accuracy']:.2f}**; seen {a['seen']}")


if __name__ == "__main__":
    main()

"""Proof that whole reports condition the image: effusion adherence when the finding sits past token 77.

    python bench/bench_long_prompts.py [--per-class 100] [--train-steps 400] [--parts shipped trained]

Prompts are phantom reports whose effusion sentence follows ~80-100 tokens of filler (history, technique,
normal anatomy: phantoms.captions.long_report), judged by phantoms.score.classify_effusion.
- shipped: the embedded default (models/embedded) read whole (3 windows, the product default) and cut to
  77 tokens as the stock pipeline does (--max-windows 1: here the cut drops the finding).
- trained: the shipped model fine-tuned further (UNet + text encoder, finetune.train) on phantoms whose
  captions are half long, half short, once with long-prompt encoding and once cut to one window; each is
  judged the way it was trained (whole / cut), and the long-prompt one also on the short prompts.
Prints a Markdown table for docs/BENCHMARKS.md ("long prompts") and writes the raw numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cxrcommon.prompt_windows import count_tokens
from cxrcommon.reports import fit_windows
from cxrcommon.tokenizer import clip_tokenizer
from finetune.data import TrainData
from finetune.embedded import adherence, load
from phantoms.captions import long_report
from phantoms.dataset import item
from phantoms.generator import render
from phantoms.recipe import PROMPTS


def long_prompts(tok, seed: int = 123) -> dict[str, str]:
    """The scorer's three prompts behind one filler (the same for all three: only the finding differs)."""
    filler = long_report("", np.random.default_rng(seed), tok).strip()
    return {k: f"{filler} {v}" for k, v in PROMPTS.items()}


def cut(prompts: dict[str, str], tok) -> dict[str, str]:
    """What the product sends the text encoder with --max-windows 1 (no impression header: leading sentences)."""
    return {k: fit_windows(v, tok, max_windows=1).text for k, v in prompts.items()}


def phantom_data(n: int, size: int, seed: int, tok) -> TrainData:
    """n one-sided-or-no-effusion phantoms (effusion in half), every other caption made long."""
    rng = np.random.default_rng(seed)
    images, captions, i = [], [], 0
    while len(images) < n:
        spec, text = item(i, seed, finding_probs={"effusion": 0.5})
        i += 1
        if spec.effusion == "bilateral":
            continue
        images.append(render(spec, size)[0])
        captions.append(long_report(text, rng, tok) if len(images) % 2 else text)
    return TrainData(images, captions, [], [])


def fine_tune(model: str, data: TrainData, out: Path, steps: int, max_windows: int, seed: int) -> Path:
    from finetune.config import TrainConfig
    from finetune.train import train
    cfg = TrainConfig(model=model, output_dir=str(out), train="unet+text_encoder", seed=seed, resolution=64,
                      caption_dropout=0.1, cache_latents=True, train_batch_size=16, max_train_steps=steps,
                      learning_rate=3e-4, snr_gamma=5.0, lr_scheduler="cosine", lr_warmup_steps=50,
                      mixed_precision="no", device="cpu", checkpointing_steps=0, validation_steps=0,
                      validation_seeds=[], report_to="none", val_fraction=0.0, max_windows=max_windows)
    result = train(cfg, data)
    print(f"  fine-tuned ({max_windows} window(s)): {steps} steps, loss {np.mean(result.losses[:20]):.4f} -> "
          f"{np.mean(result.losses[-20:]):.4f}, {result.images_per_s:.1f} images/s", flush=True)
    return result.outputs["pipeline"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/embedded", help="the shipped embedded model")
    ap.add_argument("--per-class", type=int, default=100, help="generations per prompt (3 prompts)")
    ap.add_argument("--train-steps", type=int, default=400, help="fine-tuning steps of each trained variant")
    ap.add_argument("--n-images", type=int, default=2000, help="phantoms in the fine-tuning set")
    ap.add_argument("--parts", nargs="+", default=["shipped", "trained"], choices=["shipped", "trained"])
    ap.add_argument("--work", default="runs/long_prompts", help="folder for the fine-tuned variants")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data, the training and the first generation")
    ap.add_argument("--json", default="runs/long_prompts/results.json", help="raw numbers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = clip_tokenizer()
    prompts = long_prompts(tok)
    counts = {k: count_tokens(tok, [v.removesuffix(PROMPTS[k])])[0].tokens for k, v in prompts.items()}
    print(f"long prompts: the finding starts after {counts['left']} CLIP tokens of filler, e.g. {prompts['left']!r}")
    rows, t0 = [], time.perf_counter()

    def judge(name: str, pipe, which: dict[str, str], how: str) -> None:
        t = time.perf_counter()
        s = adherence(pipe, args.per_class, seed=args.seed, prompts=which)
        rows.append({"model": name, "read as": how, **s, "seconds": round(time.perf_counter() - t, 1)})
        print(f"| {name} | {how} | {s['accuracy']:.2f} | " + " | ".join(f"{s['per_class'][k]:.2f}" for k in PROMPTS)
              + f" | {json.dumps(s['seen'])} |", flush=True)

    print("| model | prompts read as | adherence | left | right | none | scorer saw |\n|---|---|---|---|---|---|---|")
    if "shipped" in args.parts:
        shipped = load(args.model)
        judge("shipped embedded", shipped, prompts, "whole (3 windows, default)")
        judge("shipped embedded", shipped, cut(prompts, tok), "cut to 77 tokens (stock)")
    if "trained" in args.parts:
        data = phantom_data(args.n_images, 64, args.seed, tok)
        work = Path(args.work)
        whole = fine_tune(args.model, data, work / "windows", args.train_steps, 3, args.seed)
        trunc = fine_tune(args.model, data, work / "truncated", args.train_steps, 1, args.seed)
        judge("fine-tuned, long-prompt encoding", load(whole), prompts, "whole (3 windows)")
        judge("fine-tuned, long-prompt encoding", load(whole), PROMPTS, "short prompts")
        judge("fine-tuned, truncated at 77 tokens", load(trunc), cut(prompts, tok), "cut to 77 tokens")
    out = {"rows": rows, "per_class": args.per_class, "train_steps": args.train_steps, "n_images": args.n_images,
           "threads": args.threads, "machine": f"{platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} threads", "minutes": round((time.perf_counter() - t0) / 60, 1),
           "command": " ".join(sys.argv)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"{out['minutes']} min; raw numbers in {args.json}")


if __name__ == "__main__":
    main()

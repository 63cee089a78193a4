"""What each extra 75-token CLIP window costs: text encoding and cross-attention, timed and counted.

    python bench/bench_windows.py [--windows 1 2 3 4] [--batch 8] [--reps 5] [--threads 2]

- FLOPs at SD 2.1-base size (configs/sd21base, counted on the meta device, so no weights and no compute):
  one UNet pass at 512 px with a text of W windows, one text-encoder pass over W windows, and a whole
  guided image (75 steps, CFG: 150 UNet rows) with its text encoded once.
- Time on this CPU for the embedded model (64 px, the README's default) through the product's sampler:
  encoding a W-window report (best of --reps, cache cleared), and one guided 20-step batch of --batch rows
  whose prompts all have W windows.
Prints Markdown for docs/BENCHMARKS.md ("long prompts").
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_fullsize import SD21_CONFIG_DIR, flops_per_image  # noqa: E402

from cxrcommon.prompt_windows import WINDOW  # noqa: E402
from inference.sampler import CXRSampler, Request  # noqa: E402

SENTENCE = "The cardiomediastinal silhouette is within normal limits and there is no focal consolidation. "


def report(tok, windows: int) -> str:
    """A report that fills exactly `windows` windows (repeated findings sentences, trimmed by tokens)."""
    ids = tok(SENTENCE * (windows * 8), add_special_tokens=False)["input_ids"][:windows * WINDOW - 3]
    return tok.decode(ids)


def text_encoder_flops(windows: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        te = CLIPTextModel(CLIPTextConfig.from_json_file(SD21_CONFIG_DIR / "text_encoder" / "config.json"))
        with FlopCounterMode(display=False) as count:
            te(torch.zeros(windows, 77, dtype=torch.long))
    return float(count.get_total_flops())


def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 2, 3, 4], help="window counts to measure")
    ap.add_argument("--model", default="embedded", help="model timed on this CPU")
    ap.add_argument("--batch", type=int, default=8, help="images per sampler batch")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps of the timed batch")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (best is reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    print("### FLOPs at SD 2.1-base size (512 px, 75 DDIM steps, CFG 4)\n")
    print("| windows | text tokens | text encoder | UNet pass | UNet pass vs 1 window | image (150 UNet rows + text) |")
    print("|---|---|---|---|---|---|")
    base = None
    for w in args.windows:
        f = flops_per_image(512, 75, windows=w)
        te = text_encoder_flops(w)
        base = base or f["unet_pass"]
        print(f"| {w} | {w * 77} | {te / 1e9:.1f} GFLOP | {f['unet_pass'] / 1e9:.1f} GFLOP | "
              f"+{100 * (f['unet_pass'] / base - 1):.2f} % | {(f['image'] + te) / 1e12:.2f} TFLOP |", flush=True)

    sampler = CXRSampler.load(args.model, device="cpu")
    size = sampler.native_size
    print(f"\n### Time on this CPU ({platform.processor() or platform.machine()}, {args.threads} threads): "
          f"{args.model} model, {size} px, batch {args.batch}, {args.steps} DDIM steps, CFG 4\n")
    print("| windows | encode one report | guided batch | per image | vs 1 window |")
    print("|---|---|---|---|---|")
    first = None
    for w in args.windows:
        text = report(sampler.tokenizer, w)
        assert sampler.encode_prompts([text])[0].shape[0] == w * 77, "report does not fill the windows"

        def encode() -> None:
            sampler._cache.clear()
            sampler.encode_prompts([text])
        t_enc = best(encode, args.reps)
        reqs = [Request(text, i) for i in range(args.batch)]
        sampler.generate(reqs[:1], height=size, width=size, steps=2, guidance=4.0)  # warm-up
        t_batch = best(lambda: sampler.generate(reqs, height=size, width=size, steps=args.steps, guidance=4.0),
                       max(1, args.reps // 2))
        first = first or t_batch
        print(f"| {w} | {1e3 * t_enc:.1f} ms | {t_batch:.2f} s | {t_batch / args.batch * 1e3:.0f} ms | "
              f"{t_batch / first:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

"""Full-size SD 2.1-base sampling speed: ours (`CXRSampler`) against the stock `StableDiffusionPipeline`.

    python bench/bench_fullsize.py --batches 1 8 16 32 --steps 75 --dtype bf16            # one GPU
    python bench/bench_fullsize.py --batches 1 8 16 32 --steps 25 --scheduler dpmpp --dtype bf16
    python bench/bench_fullsize.py --device cpu --dtype fp32 --size 64 --steps 2 --batches 1 2 --reps 1  # smoke

Random weights built from the real configs (configs/sd21base via `cxrcommon.models.build_sd21_components`):
the real architecture's speed and memory without downloading it; the images are noise, only time counts.
Both sides get the same components, prompts, steps, guidance 4 and scheduler, and produce numpy images
(VAE decode included). The stock pipeline runs first, before ours wraps the UNet (fused QKV, channels-last,
torch.compile), so it is measured as shipped. The FLOP floor is the UNet's FLOPs per pass (counted by
`torch.utils.flop_counter` on the meta device, so it costs no compute) x 2 (CFG) x steps + one VAE decode,
divided into the accelerator's peak dense throughput (`--peak-tflops`)."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cxrcommon.models import SD21_CONFIG_DIR, build_sd21_components  # noqa: E402
from inference.sampler import COMPILE_MODES, CXRSampler, Request, make_scheduler  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROMPT = "Moderate left pleural effusion. Heart size is enlarged. Case {}."
CALLS = itertools.count()  # new prompts on every call, so neither side reuses text embeddings across calls


def flops_per_image(size: int, steps: int, config_dir: Path = SD21_CONFIG_DIR) -> dict[str, float]:
    """FLOPs of one UNet pass (one row), of one VAE decode, and of one guided image at `size` px."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        latent = torch.empty(1, 4, size // 8, size // 8)
        text = torch.empty(1, 77, unet.config.cross_attention_dim)
        with FlopCounterMode(display=False) as unet_count:
            unet(latent, torch.tensor(500), encoder_hidden_states=text)
        with FlopCounterMode(display=False) as vae_count:
            vae.decode(latent)
    unet_pass, decode = float(unet_count.get_total_flops()), float(vae_count.get_total_flops())
    return {"unet_pass": unet_pass, "vae_decode": decode, "image": unet_pass * 2 * steps + decode}


def build_pipeline(dtype: torch.dtype, device: str, scheduler: str):
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(**build_sd21_components(dtype=dtype), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def timed(fn, device: str, reps: int) -> tuple[float, float]:
    """(seconds per call after one warm-up call, peak accelerator memory in GiB; 0 on CPU)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()  # warm-up: cuDNN autotuning, torch.compile, allocator growth
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    seconds = (time.perf_counter() - start) / reps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    return seconds, peak


def prompts(batch: int) -> list[str]:
    call = next(CALLS)
    return [PROMPT.format(f"{call}.{i}") for i in range(batch)]


def stock_call(pipe, batch: int, args) -> None:
    pipe(prompts(batch), height=args.size, width=args.size,
         num_inference_steps=args.steps, guidance_scale=4.0, output_type="np",
         generator=[torch.Generator().manual_seed(i) for i in range(batch)])


def ours_call(sampler, batch: int, args) -> None:
    sampler.generate([Request(p, i) for i, p in enumerate(prompts(batch))], height=args.size, width=args.size,
                     steps=args.steps, guidance=4.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32], help="images per call")
    ap.add_argument("--steps", type=int, default=75, help="denoising steps")
    ap.add_argument("--scheduler", default="ddim", help="inference.sampler.SCHEDULERS name, for both sides")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weights and activations, both sides")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu (cpu: a smoke run, not a benchmark)")
    ap.add_argument("--reps", type=int, default=2, help="timed calls per batch size, after one warm-up call")
    ap.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=True,
                    help="ours: fused attention QKV projections")
    ap.add_argument("--compile", default="off", choices=COMPILE_MODES,
                    help="ours: torch.compile mode of the UNet; compiles once per batch size, in the warm-up "
                         "(max-autotune: minutes per size, so time one batch size per command)")
    ap.add_argument("--decode-batch", type=int, default=8, help="ours: latents per VAE decode call")
    ap.add_argument("--skip-stock", action="store_true", help="time ours only")
    ap.add_argument("--peak-tflops", type=float, default=790.0,
                    help="dense bf16 peak of the accelerator for the floor (790: the H100/H200 figure the issue uses)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()

    if args.device.startswith("cuda"):
        torch.cuda.set_device(args.device)  # memory stats and syncs below read the current device
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    flops = flops_per_image(args.size, args.steps)
    pipe = build_pipeline(DTYPES[args.dtype], args.device, args.scheduler)
    rows = {b: {} for b in args.batches}
    if not args.skip_stock:
        for b in args.batches:
            rows[b]["stock"] = timed(lambda b=b: stock_call(pipe, b, args), args.device, args.reps)
            print(f"stock batch {b}: {b / rows[b]['stock'][0]:.2f} images/s", flush=True)
    sampler = CXRSampler(pipe, device=args.device, dtype=DTYPES[args.dtype], scheduler=args.scheduler,
                         fuse_qkv=args.fuse_qkv, compile=args.compile, decode_batch=args.decode_batch)
    for b in args.batches:
        rows[b]["ours"] = timed(lambda b=b: ours_call(sampler, b, args), args.device, args.reps)
        print(f"ours batch {b}: {b / rows[b]['ours'][0]:.2f} images/s", flush=True)

    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    floor = args.peak_tflops * 1e12 / flops["image"]
    print(f"\n### SD 2.1-base architecture (random weights), {args.size}x{args.size}, {args.steps} {args.scheduler} "
          f"steps, CFG 4, {args.dtype}, {name}\n")
    print("| batch | ours images/s | ours peak GiB | stock images/s | stock peak GiB | ours / stock |")
    print("|---|---|---|---|---|---|")
    for b, r in rows.items():
        o = b / r["ours"][0]
        s = b / r["stock"][0] if "stock" in r else float("nan")
        print(f"| {b} | {o:.2f} | {r['ours'][1]:.1f} | {s:.2f} | {r['stock'][1] if 'stock' in r else 0:.1f} "
              f"| {o / s:.2f}x |")
    best_o = max(b / r["ours"][0] for b, r in rows.items())
    best_s = max((b / r["stock"][0] for b, r in rows.items() if "stock" in r), default=float("nan"))
    print("\nPeak memory is one process's peak so far: ours also holds the unfused q/k/v weights beside the fused "
          "ones (fuse_qkv keeps them) and, when compiled, the CUDA-graph pools of earlier batch sizes.")
    print(f"\nbest: ours {best_o:.2f} images/s, stock {best_s:.2f} images/s ({best_o / best_s:.2f}x)")
    print(f"FLOP floor: UNet {flops['unet_pass'] / 1e9:.1f} GFLOP per pass x 2 x {args.steps} + VAE decode "
          f"{flops['vae_decode'] / 1e9:.0f} GFLOP = {flops['image'] / 1e12:.1f} TFLOP per image; at "
          f"{args.peak_tflops:.0f} TFLOP/s: {floor:.2f} images/s (ours reaches {best_o / floor:.0%})")
    print(f"ours: fuse_qkv={args.fuse_qkv}, compile={args.compile}, decode_batch={args.decode_batch}, channels-last "
          f"{'on' if args.device != 'cpu' else 'off'}, SDPA")
    print(f"command: `python bench/bench_fullsize.py {' '.join(sys.argv[1:])}`")
    print(f"machine: {name}, {os.cpu_count()} CPU cores, torch {torch.__version__}, Python {platform.python_version()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "flops": flops, "device": name, "rows": {
            b: {k: {"seconds": v[0], "peak_gib": v[1], "images_per_s": b / v[0]} for k, v in r.items()}
            for b, r in rows.items()}}, indent=1))


if __name__ == "__main__":
    main()

"""Full-size SD 2.1-base sampling speed: ours (`CXRSampler`) against the stock `StableDiffusionPipeline`.

    python bench/bench_fullsize.py --batches 1 8 16 32 --steps 75 --dtype bf16            # one GPU
    python bench/bench_fullsize.py --batches 1 8 16 32 --steps 25 --scheduler dpmpp --dtype bf16
    python bench/bench_fullsize.py --batches 32 --steps 75 25 --scheduler ddim dpmpp   # two runs, one compile
    python bench/bench_fullsize.py --device cpu --dtype fp32 --size 64 --steps 2 --batches 1 2 --reps 1  # smoke
    python bench/bench_fullsize.py --config-dir configs/embedded --device cpu --dtype fp32 --size 64 --steps 2 \
        --batches 2 --reps 1                                                               # seconds: wiring only

Random weights built from the real configs (configs/sd21base via `cxrcommon.models.build_sd21_components`):
the real architecture's speed and memory without downloading it; the images are noise, only time counts.
Both sides get the same components, prompts, steps, guidance 4 and scheduler, and produce numpy images
(VAE decode included). The stock pipeline runs first, before ours wraps the UNet (fused QKV, channels-last,
torch.compile), so it is measured as shipped. The FLOP floor is the UNet's FLOPs per pass (counted by
`torch.utils.flop_counter` on the meta device, so it costs no compute) x 2 (CFG) x steps + one VAE decode,
divided into the accelerator's peak dense throughput (`--peak-tflops`). Ours runs with the sampler's defaults
(`inference.config.GenerateConfig`) unless a flag says otherwise; `--compile auto` is timed as the steady state
of a large job under auto, i.e. compiled (mode default) on CUDA, eager on CPU. On CUDA the host syncs of ours'
`sample_latents` are counted (`torch.cuda.set_sync_debug_mode`) at two step counts: any growth is a sync per step."""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cxrcommon.device import with_index  # noqa: E402
from cxrcommon.models import SD21_CONFIG_DIR, build_sd21_components  # noqa: E402
from inference.sampler import COMPILE_MODES, CXRSampler, Request, make_scheduler  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROMPT = "Moderate left pleural effusion. Heart size is enlarged. Case {}."
CALLS = itertools.count()  # new prompts on every call, so neither side reuses text embeddings across calls


def flops_per_image(size: int, steps: int, config_dir: Path = SD21_CONFIG_DIR, windows: int = 1) -> dict[str, float]:
    """FLOPs of one UNet pass (one row, a text of `windows` CLIP windows), of one VAE decode, and of one
    guided image at `size` px."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        latent = torch.empty(1, 4, size // 8, size // 8)
        text = torch.empty(1, 77 * windows, unet.config.cross_attention_dim)
        with FlopCounterMode(display=False) as unet_count:
            unet(latent, torch.tensor(500), encoder_hidden_states=text)
        with FlopCounterMode(display=False) as vae_count:
            vae.decode(latent)
    unet_pass, decode = float(unet_count.get_total_flops()), float(vae_count.get_total_flops())
    return {"unet_pass": unet_pass, "vae_decode": decode, "image": unet_pass * 2 * steps + decode}


def build_pipeline(dtype: torch.dtype, device: torch.device, scheduler: str, config_dir: Path = SD21_CONFIG_DIR):
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(**build_sd21_components(config_dir, dtype=dtype), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def timed(fn, device: torch.device, reps: int) -> dict[str, float]:
    """Seconds of the warm-up call (cuDNN autotuning, torch.compile, allocator growth), seconds per call after
    it, and peak accelerator memory in GiB over the timed calls (0 on CPU)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    warmup = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    seconds = (time.perf_counter() - start) / reps
    return {"warmup_s": warmup, "seconds": seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}


def count_syncs(sampler, batch: int, args, steps: int = 10) -> dict[str, int]:
    """Host syncs in one `sample_latents` call of ours (prompt encoding, initial noise, the denoising loop)
    at `steps` and at 2 x `steps`: a count that grows with the steps is a sync inside the loop."""
    counts = {}
    for n in (steps, 2 * steps):
        reqs = [Request(p, i) for i, p in enumerate(prompts(batch))]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sampler.sample_latents(reqs, height=args.size, width=args.size, steps=n, guidance=4.0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[f"{n}_steps"] = sum("synchroniz" in str(w.message) for w in caught)
    return counts


def prompts(batch: int) -> list[str]:
    call = next(CALLS)
    return [PROMPT.format(f"{call}.{i}") for i in range(batch)]


def stock_call(pipe, batch: int, steps: int, args) -> None:
    pipe(prompts(batch), height=args.size, width=args.size,
         num_inference_steps=steps, guidance_scale=4.0, output_type="np",
         generator=[torch.Generator().manual_seed(i) for i in range(batch)])


def resolve_compile(mode: str, device: torch.device) -> str:
    """`auto` -> what a large job runs in its steady state: compiled (mode default) on CUDA, eager elsewhere."""
    return ("default" if device.type == "cuda" else "off") if mode == "auto" else mode


def ours_call(sampler, batch: int, steps: int, args) -> None:
    sampler.generate([Request(p, i) for i, p in enumerate(prompts(batch))], height=args.size, width=args.size,
                     steps=steps, guidance=4.0)


def report(table: dict[int, dict[str, dict[str, float]]], steps: int, sched: str, name: str, args) -> dict:
    """Print one run's Markdown table and floor line; return it as JSON-ready data."""
    flops = flops_per_image(args.size, steps, args.config_dir)
    floor = args.peak_tflops * 1e12 / flops["image"]
    print(f"\n### SD 2.1-base architecture (random weights), {args.size}x{args.size}, {steps} {sched} "
          f"steps, CFG 4, {args.dtype}, {name}\n")
    print("| batch | ours images/s | ours peak GiB | ours warm-up s | stock images/s | stock peak GiB | ours / stock |")
    print("|---|---|---|---|---|---|---|")
    nan = {"seconds": float("nan"), "peak_gib": float("nan")}
    for b, r in table.items():
        o, st = b / r["ours"]["seconds"], r.get("stock", nan)
        print(f"| {b} | {o:.2f} | {r['ours']['peak_gib']:.1f} | {r['ours']['warmup_s']:.1f} | "
              f"{b / st['seconds']:.2f} | {st['peak_gib']:.1f} | {o * st['seconds'] / b:.2f}x |")
    best_o = max(b / r["ours"]["seconds"] for b, r in table.items())
    best_s = max((b / r["stock"]["seconds"] for b, r in table.items() if "stock" in r), default=float("nan"))
    print(f"\nbest: ours {best_o:.2f} images/s, stock {best_s:.2f} images/s ({best_o / best_s:.2f}x)")
    print(f"FLOP floor: UNet {flops['unet_pass'] / 1e9:.1f} GFLOP per pass x 2 x {steps} + VAE decode "
          f"{flops['vae_decode'] / 1e9:.0f} GFLOP = {flops['image'] / 1e12:.1f} TFLOP per image; at "
          f"{args.peak_tflops:.0f} TFLOP/s: {floor:.2f} images/s (ours reaches {best_o / floor:.0%})")
    return {"flops": flops, "floor_images_per_s": floor, "best": {"ours": best_o, "stock": best_s},
            "rows": {b: {k: {**v, "images_per_s": b / v["seconds"]} for k, v in r.items()} for b, r in table.items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32], help="images per call")
    ap.add_argument("--steps", type=int, nargs="+", default=[75],
                    help="denoising steps; several = several runs in one process (built and compiled once)")
    ap.add_argument("--scheduler", nargs="+", default=["ddim"],
                    help="inference.sampler.SCHEDULERS name, for both sides; one per --steps value, or one for all")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weights and activations, both sides")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu (cpu: a smoke run, not a benchmark)")
    ap.add_argument("--config-dir", type=Path, default=SD21_CONFIG_DIR,
                    help="model configs (configs/embedded: a 7.9 M-parameter model for a seconds-long smoke run)")
    ap.add_argument("--reps", type=int, default=2, help="timed calls per batch size, after one warm-up call")
    ap.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=False,
                    help="ours: fused attention QKV projections (the sampler's default: off)")
    ap.add_argument("--channels-last", choices=["auto", "true", "false"], default="auto",
                    help="ours: channels-last UNet/VAE (the sampler's default auto: off on CUDA and CPU)")
    ap.add_argument("--compile", default="auto", choices=COMPILE_MODES,
                    help="ours: torch.compile mode of the UNet (auto: compiled with mode default on CUDA, the "
                         "steady state of a large job; off on CPU); compiles once per batch size, in the warm-up "
                         "(max-autotune: minutes per size, so time one batch size per command)")
    ap.add_argument("--decode-batch", type=int, default=1, help="ours: latents per VAE decode call (default 1, "
                                                                "the sampler's)")
    ap.add_argument("--skip-stock", action="store_true", help="time ours only")
    ap.add_argument("--peak-tflops", type=float, default=790.0,
                    help="dense bf16 peak of the accelerator for the floor (790: the H100/H200 figure the issue uses)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # compile times

    if len(args.scheduler) not in (1, len(args.steps)):
        ap.error("give one --scheduler, or one per --steps value")
    runs = list(zip(args.steps, args.scheduler * len(args.steps) if len(args.scheduler) == 1 else args.scheduler))
    device = with_index(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)  # memory stats and syncs below read the current device
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    compile_mode = resolve_compile(args.compile, device)
    pipe = build_pipeline(DTYPES[args.dtype], device, runs[0][1], args.config_dir)
    rows: dict[tuple[int, str], dict[int, dict[str, dict[str, float]]]] = {
        r: {b: {} for b in args.batches} for r in runs}
    for steps, sched in runs if not args.skip_stock else []:
        pipe.scheduler = make_scheduler(sched, pipe.scheduler.config)
        for b in args.batches:
            rows[steps, sched][b]["stock"] = timed(lambda: stock_call(pipe, b, steps, args), device, args.reps)
            print(f"stock {steps} {sched} batch {b}: {b / rows[steps, sched][b]['stock']['seconds']:.2f} images/s",
                  flush=True)
    sampler = CXRSampler(pipe, device=device, dtype=DTYPES[args.dtype], scheduler=runs[0][1],
                         channels_last=args.channels_last, fuse_qkv=args.fuse_qkv, compile=compile_mode,
                         decode_batch=args.decode_batch)
    for steps, sched in runs:
        sampler.use_scheduler(sched)
        for b in args.batches:
            r = rows[steps, sched][b]["ours"] = timed(lambda: ours_call(sampler, b, steps, args), device, args.reps)
            print(f"ours {steps} {sched} batch {b}: {b / r['seconds']:.2f} images/s (warm-up call "
                  f"{r['warmup_s']:.1f} s)", flush=True)
    syncs = count_syncs(sampler, max(args.batches), args) if cuda else {}

    name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "compile_timed": compile_mode, "device": name,
              "host_syncs": syncs, "runs": {}}
    for (steps, sched), table in rows.items():
        result["runs"][f"{steps}-{sched}"] = report(table, steps, sched, name, args)
    print(f"\nours: fuse_qkv={args.fuse_qkv}, channels_last={args.channels_last}, compile={args.compile} "
          f"(timed as {compile_mode}), decode_batch={args.decode_batch}, SDPA")
    if syncs:
        print(f"host syncs in one sample_latents call of ours at batch {max(args.batches)} ({runs[-1][1]}): "
              + ", ".join(f"{v} at {k.replace('_', ' ')}" for k, v in syncs.items()))
    print("Peak memory is one process's peak over the timed calls; when compiled, it includes the CUDA-graph "
          "pools of earlier batch sizes. The warm-up call includes torch.compile for its batch shape.")
    print(f"command: `python bench/bench_fullsize.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    print(f"machine: {name}, {os.cpu_count()} CPU cores, torch {torch.__version__}, Python {platform.python_version()}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

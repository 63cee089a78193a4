"""Training throughput and peak memory: our trainer with cached latents vs without, vs the same steps written
the stock diffusers-example way (VAE + text encoder every step, peft LoRA r4 on to_q/k/v/out, AdamW).

    python bench/bench_train.py [--steps 40 --batch 8 --resolution 64]                  # tiny model, CPU
    python bench/bench_train.py --config-dir configs/sd21base --device cuda --resolution 512 --batch 16 \
        --steps 25 --warmup 5                                                           # SD 2.1-base, one GPU

Each variant runs in its own process (peak memory is per process). Images/s is the steady state: the first
`--warmup` steps (cuDNN autotuning, allocator growth) are timed apart, for every variant alike. With
`--config-dir` the model is that architecture with random weights (saved once as an fp16 pipeline), trained
in bf16 on a GPU; the stock loop casts the frozen weights to the same dtype as the stock script does.
Prints a Markdown table; `--json` also writes the rows."""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("stock", "uncached", "cached")


def _peak_mb(device: str) -> float:
    """Peak accelerator memory on a GPU, else the process's peak RSS."""
    import torch
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stock(model: Path, a: argparse.Namespace) -> dict[str, float]:
    """The stock example's inner loop: encode images and captions every step, peft LoRA, AdamW."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.training_utils import cast_training_params

    from cxrcommon.device import pick_device, pick_dtype
    from finetune.lora import add_lora
    from finetune.toy import toy_data
    device = pick_device(a.device)
    dtype = pick_dtype(device)
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    te.requires_grad_(False)
    add_lora(unet, 4, None, 0.0, ["to_k", "to_q", "to_v", "to_out.0"])
    for m in (unet, vae, te):
        m.to(device, dtype)
    cast_training_params(unet, dtype=torch.float32)  # trained LoRA weights in fp32, as the stock script
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    data = toy_data(32, a.resolution)
    px = torch.stack([torch.from_numpy(x)[None].expand(3, -1, -1) * 2 - 1 for x in data.images])
    ids = tok(data.captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    sync = getattr(torch, device.type).synchronize
    t0 = warm = time.perf_counter()
    for s in range(a.warmup + a.steps):
        if s == a.warmup:
            sync()
            t0 = time.perf_counter()
            warm = t0 - warm
        idx = torch.randint(0, len(px), (a.batch,))
        lat = vae.encode(px[idx].to(device, dtype)).latent_dist.sample() * vae.config.scaling_factor
        hid = te(ids[idx].to(device))[0]
        noise = torch.randn_like(lat)
        t = torch.randint(0, sched.config.num_train_timesteps, (a.batch,), device=device)
        pred = unet(sched.add_noise(lat, noise, t), t, hid).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    sync()
    return {"ips": a.steps * a.batch / (time.perf_counter() - t0), "warmup_s": warm}


def _ours(model: Path, a: argparse.Namespace, cached: bool) -> dict[str, float]:
    from finetune.config import TrainConfig
    from finetune.toy import toy_data
    from finetune.train import train
    out = Path(tempfile.mkdtemp())
    cfg = TrainConfig(model=str(model), output_dir=str(out), resolution=a.resolution, train_batch_size=a.batch,
                      max_train_steps=a.warmup + a.steps, timing_warmup_steps=a.warmup, lr_warmup_steps=0,
                      checkpointing_steps=0, validation_steps=0, validation_seeds=[], report_to="none",
                      device="cpu" if a.device == "cpu" else "auto", val_fraction=0.0,
                      cache_latents=cached, cache_text=cached)
    if cached:  # build the cache first, as a re-run of the same job would find it
        train(TrainConfig(**{**cfg.__dict__, "max_train_steps": 1, "output_dir": str(out / "warm"),
                             "cache_dir": str(out / "cache")}), toy_data(32, a.resolution))
        cfg.cache_dir = str(out / "cache")
    r = train(cfg, toy_data(32, a.resolution))
    return {"ips": r.steady_images_per_s, "warmup_s": r.warmup_s, "overall_ips": r.images_per_s}


def _model(a: argparse.Namespace, folder: Path) -> Path:
    """The tiny toy model, or `--config-dir`'s architecture with random weights, saved as a pipeline folder."""
    if a.config_dir is None:
        from finetune.toy import save_toy_model
        return save_toy_model(folder / "toy", resolution=a.resolution, prediction_type="epsilon")
    import torch
    from diffusers import StableDiffusionPipeline

    from cxrcommon.models import build_sd21_components
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(**build_sd21_components(a.config_dir, dtype=torch.float16), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "random", safe_serialization=True)
    return folder / "random"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="timed optimizer steps, after the warm-up")
    ap.add_argument("--warmup", type=int, default=3, help="optimizer steps timed apart, before the timed ones")
    ap.add_argument("--batch", type=int, default=8, help="images per step")
    ap.add_argument("--resolution", type=int, default=64, help="image size in pixels")
    ap.add_argument("--device", default="cpu", help="cpu (1 torch thread per variant) or cuda")
    ap.add_argument("--config-dir", type=Path, default=None,
                    help="model configs (configs/sd21base: SD 2.1-base with random weights); default: the tiny "
                         "toy model")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="what to time")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.variant:
        import torch
        if a.device == "cpu":
            torch.set_num_threads(1)
        model = Path(a.model)
        row = _stock(model, a) if a.variant == "stock" else _ours(model, a, a.variant == "cached")
        print(json.dumps({**row, "peak_mb": _peak_mb(a.device)}))
        return row
    model = _model(a, Path(tempfile.mkdtemp()))
    common = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch),
              "--resolution", str(a.resolution), "--device", a.device]
    rows = {}
    for v in a.variants:
        res = subprocess.run([sys.executable, __file__, "--variant", v, "--model", str(model), *common],
                             capture_output=True, text=True, cwd=ROOT)
        if res.returncode:
            raise SystemExit(f"variant {v} failed:\n{res.stderr[-4000:]}")
        rows[v] = json.loads(res.stdout.strip().splitlines()[-1])
    gpu = a.device.startswith("cuda")
    import torch
    name = torch.cuda.get_device_name(0) if gpu else (platform.processor() or platform.machine())
    print(f"command: python bench/bench_train.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"machine: {name}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
          f"{'' if gpu else ', 1 torch thread per variant'}\n")
    ref = rows.get("stock", {}).get("ips", float("nan"))
    mem = "peak GPU memory (GiB)" if gpu else "peak RSS (MB)"
    print(f"| variant | steady images/s (batch {a.batch}) | warm-up ({a.warmup} steps) s | {mem} | vs stock |")
    print("|---|---|---|---|---|")
    for v, r in rows.items():
        m = r["peak_mb"] / 1024 if gpu else r["peak_mb"]
        print(f"| {v} | {r['ips']:.1f} | {r['warmup_s']:.1f} | {m:.1f} | {r['ips'] / ref:.2f}x |")
    if {"cached", "uncached"} <= rows.keys():
        print(f"\ncached / uncached: {rows['cached']['ips'] / rows['uncached']['ips']:.2f}x")
    result = {"args": {k: str(v) for k, v in vars(a).items()}, "device": name, "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

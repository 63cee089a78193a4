"""Training throughput and peak memory on the tiny model (CPU): our trainer with cached latents vs
without, vs the same steps written the stock diffusers-example way (VAE + text encoder every step).

    python bench/bench_train.py [--steps 40 --batch 8 --resolution 64]

Each variant runs in its own process (peak RSS is per process); prints a Markdown table."""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _stock(model: Path, steps: int, batch: int, res: int) -> float:
    """The stock example's inner loop: encode images and captions every step, peft LoRA, AdamW."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from finetune.lora import add_lora
    from finetune.toy import toy_data
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    vae.requires_grad_(False)
    te.requires_grad_(False)
    add_lora(unet, 4, None, 0.0, ["to_k", "to_q", "to_v", "to_out.0"])
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    data = toy_data(32, res)
    px = torch.stack([torch.from_numpy(a)[None].expand(3, -1, -1) * 2 - 1 for a in data.images])
    ids = tok(data.captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    for s in range(steps):
        idx = torch.randint(0, len(px), (batch,))
        lat = vae.encode(px[idx]).latent_dist.sample() * vae.config.scaling_factor
        hid = te(ids[idx])[0]
        noise = torch.randn_like(lat)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        pred = unet(sched.add_noise(lat, noise, t), t, hid).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in unet.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
    return steps * batch / (time.perf_counter() - t0)


def _ours(model: Path, steps: int, batch: int, res: int, cached: bool) -> float:
    from finetune.config import TrainConfig
    from finetune.toy import toy_data
    from finetune.train import train
    out = Path(tempfile.mkdtemp())
    cfg = TrainConfig(model=str(model), output_dir=str(out), resolution=res, train_batch_size=batch,
                      max_train_steps=steps, lr_warmup_steps=0, checkpointing_steps=0, validation_steps=0,
                      validation_seeds=[], report_to="none", device="cpu", val_fraction=0.0,
                      cache_latents=cached, cache_text=cached)
    if cached:  # build the cache first, as a re-run of the same job would find it
        train(TrainConfig(**{**cfg.__dict__, "max_train_steps": 1, "output_dir": str(out / "warm"),
                             "cache_dir": str(out / "cache")}), toy_data(32, res))
        cfg.cache_dir = str(out / "cache")
    return train(cfg, toy_data(32, res)).images_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        import torch
        torch.set_num_threads(1)
        model = Path(a.model)
        ips = _stock(model, a.steps, a.batch, a.resolution) if a.variant == "stock" else \
            _ours(model, a.steps, a.batch, a.resolution, a.variant == "cached")
        print(json.dumps({"ips": ips, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    from finetune.toy import save_toy_model
    model = save_toy_model(Path(tempfile.mkdtemp()) / "toy", resolution=a.resolution, prediction_type="epsilon")
    rows = {}
    for v in ("stock", "uncached", "cached"):
        cmd = [sys.executable, __file__, "--variant", v, "--model", str(model), "--steps", str(a.steps),
               "--batch", str(a.batch), "--resolution", str(a.resolution)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        rows[v] = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"command: python bench/bench_train.py --steps {a.steps} --batch {a.batch} --resolution {a.resolution}")
    print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPU cores, "
          "1 torch thread, no GPU\n")
    print("| variant | images/s | peak RSS (MB) | vs stock |\n|---|---|---|---|")
    for v, r in rows.items():
        print(f"| {v} | {r['ips']:.1f} | {r['rss_mb']:.0f} | {r['ips'] / rows['stock']['ips']:.2f}x |")
    print(f"\ncached / uncached: {rows['cached']['ips'] / rows['uncached']['ips']:.2f}x")


if __name__ == "__main__":
    main()

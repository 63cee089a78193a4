"""Phantom generator speed and analytic-scorer accuracy (effusion, pneumothorax, CTR, sex, age band); prints a \
Markdown table for docs/BENCHMARKS.md.

    python bench/bench_phantoms.py [--n 300] [--vae models/embedded]

The "through the VAE" row scores real phantoms after an encode/decode by the embedded model's VAE: the
best a generator with that decoder can show, so the scorer is validated on decoded images too.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from phantoms import calibrate as cal
from phantoms import dataset
from phantoms import generator as ph
from phantoms import score as ps


def speed(n: int, size: int) -> float:
    specs = [ph.sample_spec(np.random.default_rng(i)) for i in range(n)]
    t = time.perf_counter()
    for s in specs:
        ph.render(s, size)
    return n / (time.perf_counter() - t)


def writer_speed(n: int, size: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        dataset.make_dataset(d, n, size, seed=0, progress=False)
        return n / (time.perf_counter() - t)


def vae_roundtrip(model: str) -> Callable[[np.ndarray], np.ndarray]:
    """image -> the model VAE's decoded mean latent, as the generator's images are made."""
    import torch

    from finetune.embedded import load
    vae = load(model).vae

    @torch.inference_mode()
    def run(img: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(img)[None, None].repeat(1, 3, 1, 1) * 2 - 1
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        return ((y.mean(1)[0] + 1) / 2).clamp(0, 1).numpy()
    return run


def accuracy(n: int, size: int, sizes: tuple[str, ...], through: Callable | None = None) -> dict[str, float]:
    return _hits(cal.effusion_set(n, size, seed=0, sizes=sizes), ps.classify_effusion, through)


def _hits(images, judge: Callable, through: Callable | None = None) -> dict[str, float]:
    """Per-class accuracy of a judge on (image, class) pairs; held out: calibration uses seeds 1e6+."""
    hits: dict[str, list[bool]] = {}
    for img, side in images:
        hits.setdefault(side, []).append(judge(through(img) if through else img) == side)
    return {k: float(np.mean(v)) for k, v in hits.items()}


def demographics_accuracy(n: int, size: int, through: Callable | None = None) -> dict[str, float]:
    """Per-class accuracy of read_sex and read_age_band on n // 3 phantoms x 2 sexes x 3 age bands."""
    hits: dict[str, list[bool]] = {}
    for img, sex, band in cal.demographics_set(max(n // 3, 1), size, seed=0):
        img = through(img) if through else img
        hits.setdefault(sex, []).append(ps.read_sex(img) == sex)
        hits.setdefault(band, []).append(ps.read_age_band(img) == band)
    return {k: float(np.mean(v)) for k, v in hits.items()}


def ctr_corr(n: int) -> tuple[float, float]:
    meas, true, clean_m, clean_t = [], [], [], []
    for i in range(n):
        s = ph.sample_spec(np.random.default_rng(50_000 + i))
        m = ps.measure(ph.render(s, 128)[0])["ctr"]
        meas.append(m)
        true.append(s.ctr)
        if s.effusion == "none" and s.consolidation == "none":
            clean_m.append(m)
            clean_t.append(s.ctr)
    return float(np.corrcoef(meas, true)[0, 1]), float(np.corrcoef(clean_m, clean_t)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="phantoms per class / per timing run")
    ap.add_argument("--vae", default="models/embedded", help="model whose VAE the round-trip row uses ('' skips)")
    args = ap.parse_args()
    n = args.n
    print(f"command: python bench/bench_phantoms.py --n {n} --vae '{args.vae}'")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"Python {platform.python_version()}\n")
    print("| measure | value |\n|---|---|")
    for size in (64, 128, 256):
        print(f"| render speed {size}² | {speed(n, size):.0f} images/s |")
    print(f"| make_dataset 128² (render + atomic fsynced PNG) | {writer_speed(n, 128):.0f} images/s |")
    runs = [(128, None, ""), (64, None, "")]
    if args.vae:
        runs.append((64, vae_roundtrip(args.vae), f"through the VAE of {args.vae}, "))
    for size, through, how in runs:
        acc = accuracy(n, size, ("moderate", "large"), through)
        print(f"| effusion accuracy {size}², moderate/large, {how}n={n}/class | "
              + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + " |")
    for size, through, how in runs:
        acc = _hits(cal.pneumothorax_set(n, size, seed=0), ps.classify_pneumothorax, through)
        print(f"| pneumothorax accuracy {size}², {how}n={n}/class | "
              + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + " |")
    for size, through, how in runs:
        acc = demographics_accuracy(n, size, through)
        print(f"| sex / age-band accuracy {size}², {how}n={n}/sex, {2 * (n // 3)}/band | "
              + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + " |")
    eff = [ps.classify_pneumothorax(img) for img, side in cal.effusion_set(n, 128, seed=0) if side != "none"]
    print(f"| pneumothorax false alarms on effusion phantoms 128², n={len(eff)} | "
          f"{1 - eff.count('none') / len(eff):.3f} |")
    acc = accuracy(n, 128, ("small",))
    print(f"| effusion accuracy 128², small only, n={n}/class | "
          + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + " |")
    r_all, r_clean = ctr_corr(n)
    print(f"| CTR measured vs true, Pearson r (all / no effusion+consolidation), n={n} | "
          f"{r_all:.2f} / {r_clean:.2f} |")


if __name__ == "__main__":
    main()

"""Feature-extraction throughput for eval (images/s), feature cache cold vs warm, on real CXRs read in place.

Cold = hash + decode + resize + forward + cache write; warm = hash + cache read. Backbones: the weight-free
`tiny` extractor, TorchScript resnet18 and inception_v3 with random weights (same cost as trained ones;
the latter stands in for the FID InceptionV3), and the real FID InceptionV3 when its weights are already
on disk (they are never downloaded here).

    python bench/bench_eval.py [--n 200] [--images DIR] [--batch-size 32] [--device auto] [--threads 0]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cxrcommon.device import pick_device  # noqa: E402
from cxrcommon.optional import require  # noqa: E402
from eval.features import WeightsMissingError, embed_paths, load_backbone  # noqa: E402
from eval.sources import list_images  # noqa: E402

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "realcxr" / "images"


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())


def script(folder: str, arch: str) -> str:
    """A TorchScript feature extractor (classifier head removed) with random weights: same cost as trained."""
    require("bench_eval's TorchScript backbones", "torchvision")
    import torchvision
    kw = {"aux_logits": False, "init_weights": False} if arch == "inception_v3" else {}
    net = torchvision.models.get_model(arch, weights=None, **kw)
    net.fc = torch.nn.Identity()
    path = Path(folder) / f"{arch}.pt"
    torch.jit.script(net.eval()).save(str(path))
    return str(path)


def timed(paths, backbone, cache_dir, batch_size) -> float:
    t0 = time.perf_counter()
    emb = embed_paths(paths, backbone, cache_dir=cache_dir, batch_size=batch_size, desc=backbone.name[:20])
    assert len(emb.paths) == len(paths), emb.skipped
    return len(paths) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of real images (read in place)")
    ap.add_argument("--n", type=int, default=200, help="images to embed")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    paths = list_images(args.images)[:args.n]
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        specs = [("tiny", "tiny", 0), ("torchscript resnet18 (random weights)", script(tmp, "resnet18"), 224),
                 ("torchscript inception_v3 (random weights, cost proxy)", script(tmp, "inception_v3"), 299),
                 ("inception-v3 FID weights", "inception", 0)]
        rows = []
        for label, spec, size in specs:
            try:
                bb = load_backbone(spec, device=args.device, input_size=size or 224)
            except WeightsMissingError:
                rows.append((label, "weights not on disk", "-", "-"))
                continue
            cache = Path(tmp) / f"cache-{len(rows)}"
            cold, warm = timed(paths, bb, cache, args.batch_size), timed(paths, bb, cache, args.batch_size)
            rows.append((f"{label} @{bb.size}", f"{cold:.1f}", f"{warm:.1f}", f"{warm / cold:.0f}x"))
    print(f"\nCommand: python bench/bench_eval.py --n {args.n} --batch-size {args.batch_size} --device {args.device} "
          f"--threads {args.threads}")
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, device "
          f"{pick_device(args.device)}, torch {torch.__version__}; {len(paths)} images from {args.images}\n")
    print("| backbone | cold img/s | warm img/s | speed-up |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()

"""Feature backbones behind one interface, and cached extraction, so every metric sees the same features.

Grayscale X-rays are handled the standard way: resized (bilinear, antialiased, aspect not kept) to the
side the backbone expects and replicated to 3 channels where it wants RGB."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cxrcommon.device import pick_device
from cxrcommon.optional import require
from cxrcommon.provenance import file_sha256

from . import cache

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
SAVE_EVERY = 512  # images between cache checkpoints, so an interrupted run resumes


class WeightsMissingError(FileNotFoundError):
    """A backbone's weights are not on disk and we will not download them."""


@dataclasses.dataclass
class Backbone:
    """A feature extractor plus the preprocessing it expects."""
    name: str                                   # shown in reports
    key: str                                    # identifies weights + preprocessing, for the cache
    module: nn.Module                           # prepared batch -> (N, D)
    size: int                                   # input side in pixels
    prepare: Callable[[torch.Tensor], torch.Tensor]  # (N, 1, S, S) float [0, 1] -> module input
    input_note: str = "gray replicated to 3 channels, float [0, 1]"
    device: torch.device = torch.device("cpu")

    @property
    def resize(self) -> str:
        return f"{self.size}x{self.size} bilinear (antialiased, aspect not kept); {self.input_note}"

    @torch.inference_mode()
    def embed(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, D) float32 features of gray [0, 1] images of any size."""
        batch = torch.cat([to_square_tensor(img, self.size) for img in images])
        out = self.module(self.prepare(batch).to(self.device))
        if isinstance(out, (tuple, list)):  # e.g. a scripted torchvision model's named-tuple outputs
            out = out[0]
        if out.dim() == 4:  # a conv trunk without pooling
            out = out.mean(dim=(2, 3))
        return out.reshape(len(images), -1).float().cpu()


def to_square_tensor(img: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1)


class TinyFeatures(nn.Module):
    """Weight-free features (block means on a grid + global mean/std) for tests and smoke runs.

    Not comparable with any published FID; it exists so the metric code can be checked anywhere."""

    def __init__(self, grid: int = 4) -> None:
        super().__init__()
        self.grid = grid
        self.num_features = grid * grid + 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.mean(dim=1, keepdim=True)
        blocks = F.adaptive_avg_pool2d(g, self.grid).flatten(1)
        return torch.cat([blocks, g.flatten(1).mean(1, keepdim=True), g.flatten(1).std(1, keepdim=True)], 1)


def inception_weights_path(explicit: str | Path | None = None) -> Path:
    """The InceptionV3 FID weights torchmetrics/torch-fidelity use, or a clear error saying where to put them."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise WeightsMissingError(f"--inception-weights {path} does not exist; give the path of "
                                      f"{INCEPTION_FILE} (download: {INCEPTION_URL})")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        raise WeightsMissingError(
            f"InceptionV3 FID weights not found. torchmetrics/torch-fidelity need the file {INCEPTION_FILE} "
            f"and this machine is offline (we never download during evaluation). Download it from {INCEPTION_URL} "
            f"and put it at {path} (that is $TORCH_HOME/hub/checkpoints/, where torch-fidelity looks), or pass "
            f"--inception-weights PATH. Other backbones: --features <torchscript file> or --features xrv.")
    return path


def _inception(weights: str | Path | None, device: torch.device) -> Backbone:
    require("the Inception FID backbone (--features inception)", "torchvision", "torch_fidelity")
    path = inception_weights_path(weights)
    from torchmetrics.image.fid import NoTrainInceptionV3  # a heavy import: only once the weights exist
    # torch-fidelity re-loads the file with weights_only=False; refuse anything that is not plain tensors first.
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a plain InceptionV3 state dict ({exc}); re-download {INCEPTION_URL}") from exc
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(path)).to(device)
    key = f"inception-v3-compat-2048-{file_sha256(path)[:16]}"
    return Backbone("inception-v3 (torch-fidelity, 2048-d pool3)", key, net, 299,
                    lambda x: (rgb(x) * 255).round().to(torch.uint8), "gray replicated to 3 channels, uint8", device)


def _torchscript(path: Path, size: int, device: torch.device) -> Backbone:
    try:
        net = torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:
        raise ValueError(f"{path}: not a TorchScript file torch.jit.load can read ({exc}); export one with "
                         "torch.jit.script(model).save(path) taking (N, 3, H, W) float in [0, 1]") from exc
    key = f"torchscript-{file_sha256(path)[:16]}-{size}"
    return Backbone(f"torchscript {path.name}", key, net, size, rgb, device=device)


def _xrv(device: torch.device) -> Backbone:
    require("--features xrv (torchxrayvision needs torchvision)",
            "torchvision")  # its pip install would pull CUDA torch
    try:
        import torchxrayvision as xrv
    except ImportError as exc:
        raise WeightsMissingError(
            "--features xrv needs torchxrayvision: `pip install torchxrayvision`; its DenseNet weights "
            "(densenet121-res224-all) must then be downloaded once (torchxrayvision fetches them into "
            "~/.torchxrayvision/models_data/ on first use, so run it once online).") from exc
    try:
        net = xrv.models.DenseNet(weights="densenet121-res224-all").eval().to(device)
    except Exception as exc:
        raise WeightsMissingError(f"torchxrayvision could not load densenet121-res224-all ({exc}); run it once "
                                  "online so its weights land in ~/.torchxrayvision/models_data/") from exc

    class _Pooled(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m.features2(x)

    return Backbone("torchxrayvision densenet121-res224-all (1024-d)", "xrv-densenet121-res224-all", _Pooled(net),
                    224, lambda x: x * 2048 - 1024, "1 channel scaled to [-1024, 1024] (torchxrayvision)", device)


def load_backbone(spec: str | Backbone = "inception", *, inception_weights: str | Path | None = None,
                  input_size: int = 224, device: str = "auto") -> Backbone:
    """`inception`, `xrv`, `tiny`, or the path of a TorchScript file (input (N,3,S,S) in [0,1], S=input_size)."""
    if isinstance(spec, Backbone):
        return spec
    dev = pick_device(device)
    if spec == "inception":
        return _inception(inception_weights, dev)
    if spec == "xrv":
        return _xrv(dev)
    if spec == "tiny":
        return Backbone("tiny (test features, not comparable to published FID)", "tiny-v1-32", TinyFeatures(), 32, rgb)
    path = Path(spec)
    if path.is_file():
        return _torchscript(path, input_size, dev)
    raise ValueError(f"--features {spec!r}: use inception, xrv, tiny, or the path of an existing TorchScript file")


@dataclasses.dataclass
class Embedding:
    """Features of the images that could be read, plus what happened on the way."""
    features: torch.Tensor
    paths: list[Path]
    skipped: list[str]
    cache_hits: int
    extracted: int


def embed_paths(paths: Sequence[Path], backbone: Backbone, *, cache_dir: str | Path | None = None,
                batch_size: int = 32, desc: str = "features") -> Embedding:
    """Features for each readable file; unreadable ones are skipped and logged, cached rows reused."""
    from cxrcommon.imageio import ImageReadError, read_image
    cfile = cache.cache_file(cache_dir, backbone.key) if cache_dir else None
    table = cache.load(cfile) if cfile else {}
    hashes = [file_sha256(p) for p in paths]
    todo = [i for i, h in enumerate(hashes) if h not in table]
    hits = len(paths) - len(todo)
    skipped: list[str] = []
    done_since_save = 0

    def checkpoint() -> None:
        try:
            cache.save(cfile, table, backbone.key)
        except OSError as exc:  # a read-only data folder must not stop the evaluation
            log.warning("feature cache %s not written (%s); pass --cache-dir to a writable folder", cfile, exc)

    for start in tqdm(range(0, len(todo), batch_size), desc=desc, disable=not todo, leave=False):
        idx, imgs = [], []
        for i in todo[start:start + batch_size]:
            try:
                imgs.append(read_image(paths[i]))
                idx.append(i)
            except (ImageReadError, OSError) as exc:
                log.warning("skipping %s: %s", paths[i], exc)
                skipped.append(f"{paths[i]}: {exc}")
        if imgs:
            for i, row in zip(idx, backbone.embed(imgs)):
                table[hashes[i]] = row
        done_since_save += len(idx)
        if cfile and done_since_save >= SAVE_EVERY:
            checkpoint()
            done_since_save = 0
    if cfile and done_since_save:
        checkpoint()
    kept = [i for i, h in enumerate(hashes) if h in table]
    feats = torch.stack([table[hashes[i]] for i in kept]) if kept else torch.zeros(0, 0)
    return Embedding(feats, [paths[i] for i in kept], skipped, hits, len(todo) - len(skipped))

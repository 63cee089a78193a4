"""Feature backbones behind one interface, and cached extraction, so every metric sees the same features.

Grayscale X-rays are resized (antialiased; bilinear and aspect not kept unless the backbone says otherwise)
to the side the backbone expects and replicated to 3 channels where it wants RGB. The published backbones
(rad-dino, clip, xrv: local weights, each with its anchor's preprocessing) live in `eval.backbones`."""
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
from cxrcommon.errors import UserError
from cxrcommon.optional import require
from cxrcommon.provenance import file_sha256

from . import cache

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
SAVE_EVERY = 512  # images between cache checkpoints, so an interrupted run resumes
SPECS = ("inception", "rad-dino", "clip", "xrv", "tiny")


class WeightsMissingError(UserError, FileNotFoundError):
    """A backbone's weights are not on disk and we will not download them; the message says how to get them."""


class WeightsMismatchError(UserError):
    """The weights given are of another architecture than the backbone asked for; nothing is computed."""


def state_misfit(net: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Why `state` does not load strictly into `net` (the first wrongly shaped weight, else how many are
    missing and unexpected, with examples), or None when every name and shape fits."""
    expected = net.state_dict()
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if wrong:
        return f"{wrong[0]} is {list(state[wrong[0]].shape)}, expected {list(expected[wrong[0]].shape)}"
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        return (f"{len(missing)} weight(s) missing (e.g. {', '.join(missing[:2]) or '-'}), {len(extra)} unexpected "
                f"(e.g. {', '.join(extra[:2]) or '-'})")
    return None


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
    family: str = ""                            # the --features name (inception, rad-dino, ...); "" for others
    weights_sha256: str | None = None           # of the weights file or folder, where there is one
    resample: str = "bilinear"                  # first resize: "bilinear" or "bicubic" (antialiased)
    crop: bool = False                          # first resize: shorter side to `size`, centre crop (else squash)

    @property
    def resize(self) -> str:
        how = "shorter side, centre crop" if self.crop else "aspect not kept"
        return f"{self.size}x{self.size} {self.resample} (antialiased, {how}); {self.input_note}"

    @torch.inference_mode()
    def embed(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, D) float32 features of gray [0, 1] images of any size."""
        batch = torch.cat([to_square_tensor(img, self.size, self.resample, self.crop) for img in images])
        out = self.module(self.prepare(batch).to(self.device))
        if isinstance(out, (tuple, list)):  # e.g. a scripted torchvision model's named-tuple outputs
            out = out[0]
        if out.dim() == 4:  # a conv trunk without pooling
            out = out.mean(dim=(2, 3))
        return out.reshape(len(images), -1).float().cpu()


def to_square_tensor(img: np.ndarray, size: int, resample: str = "bilinear", crop: bool = False) -> torch.Tensor:
    """(1, 1, size, size) float [0, 1]: `img` resized (antialiased) to size x size, or with `crop` its shorter
    side to `size` (aspect kept, torchvision `Resize(size)`) and then centre-cropped."""
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    h, w = t.shape[-2:]
    out = (size, size)
    if crop:
        out = (size, max(size, int(size * w / h))) if h <= w else (max(size, int(size * h / w)), size)
    t = F.interpolate(t, size=out, mode=resample, antialias=True, align_corners=False).clamp(0, 1)
    top, left = round((out[0] - size) / 2), round((out[1] - size) / 2)
    return t[..., top:top + size, left:left + size]


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
            raise WeightsMissingError(f"--weights/--inception-weights {path} does not exist; give the path of "
                                      f"{INCEPTION_FILE} (download: {INCEPTION_URL})")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        raise WeightsMissingError(
            f"InceptionV3 FID weights not found. torchmetrics/torch-fidelity need the file {INCEPTION_FILE} "
            f"and this machine is offline (we never download during evaluation). Download it from {INCEPTION_URL} "
            f"and put it at {path} (that is $TORCH_HOME/hub/checkpoints/, where torch-fidelity looks), or pass "
            f"--weights PATH (or --inception-weights PATH). Other backbones: --features rad-dino, clip or xrv "
            f"with --weights, or a TorchScript file.")
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
                    lambda x: (rgb(x) * 255).round().to(torch.uint8), "gray replicated to 3 channels, uint8", device,
                    family="inception", weights_sha256=file_sha256(path))


def _torchscript(path: Path, size: int, device: torch.device) -> Backbone:
    try:
        net = torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:
        raise ValueError(f"{path}: not a TorchScript file torch.jit.load can read ({exc}); export one with "
                         "torch.jit.script(model).save(path) taking (N, 3, H, W) float in [0, 1]") from exc
    key = f"torchscript-{file_sha256(path)[:16]}-{size}"
    return Backbone(f"torchscript {path.name}", key, net, size, rgb, device=device)


def load_backbone(spec: str | Backbone = "inception", *, weights: str | Path | None = None,
                  inception_weights: str | Path | None = None, input_size: int = 224,
                  device: str = "auto") -> Backbone:
    """A feature extractor by name, from local weights only (nothing is downloaded).

    Args:
        spec: "inception" (torch-fidelity's FID InceptionV3), "rad-dino" (a Dinov2 folder such as microsoft/rad-dino),
            "clip" (a CLIP ViT-B/32 folder), "xrv" (torchxrayvision's DenseNet-121 "all" state dict), "tiny" (tests),
            the path of a TorchScript file (input (N, 3, S, S) in [0, 1], S = input_size), or a Backbone (returned).
        weights: the weights of rad-dino / clip (folder) or xrv / inception (file); for inception, None looks in
            $TORCH_HOME/hub/checkpoints/.
        inception_weights: the older name of `weights` for inception (either may be given).
        input_size: input side in pixels of a TorchScript backbone, > 0.
        device: "auto" or a torch device name.
    Raises: WeightsMissingError (weights absent: says how to get them), WeightsMismatchError (weights of another
        architecture), MissingPackageError (a package this install left out)."""
    if isinstance(spec, Backbone):
        return spec
    from . import backbones
    dev = pick_device(device)
    if spec == "inception":
        return _inception(weights or inception_weights, dev)
    if spec in ("rad-dino", "clip", "xrv"):
        return getattr(backbones, spec.replace("-", "_"))(weights, dev)
    if spec == "tiny":
        return Backbone("tiny (test features, not comparable to published FID)", "tiny-v1-32", TinyFeatures(), 32, rgb,
                        family="tiny")
    path = Path(spec)
    if path.is_file():
        return _torchscript(path, input_size, dev)
    raise ValueError(f"--features {spec!r}: use {', '.join(SPECS)}, or the path of an existing TorchScript file")


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

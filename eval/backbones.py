"""Published feature backbones from local weights, each with the preprocessing of the code it is compared with.

Nothing is downloaded at run time (whatever HF_HUB_OFFLINE says): the weights are a folder or file the user
names with --weights, read with `local_files_only=True` and safetensors only. Weights of another
architecture are refused before any feature is computed, because transformers would otherwise load them
with random layers and a warning, and every number after that would be meaningless.

Every image first goes through `read_image` (gray float [0, 1]) and `features.to_square_tensor`; then:

rad-dino -- anchor: CheXGenBench metrics/fid.py, `RadDinoFeatureExtractor` ("FID (RadDino)", PRDC).
  resize   299x299 bilinear, aspect not kept           their `transforms.Resize((299, 299))` on the PIL image
  values   rounded to uint8                             their `(batch * 255).to(torch.uint8)` (they truncate)
  resize   shortest edge 518 bicubic, uint8, crop 518   the folder's preprocessor_config.json (BitImageProcessor)
  values   /255, mean 0.5307, std 0.2583, 3 channels    same file; gray replicated as `Image.convert("RGB")`
  output   `pooler_output`: CLS after final layer norm   their `outputs.pooler_output`, 768-d
clip -- anchor: RoentGen eval/calculate_fid.py via clean-fid `CLIP_fx("ViT-B/32")`, `img_preprocess_clip`.
  resize   shorter side 224 bicubic, centre crop 224    their `Resize(224, BICUBIC)` + `CenterCrop(224)`
  values   rounded to uint8, /255, CLIP mean/std         their uint8 return, `img_t / 255`, `T_norm`
  output   projected image embedding, 512-d              `encode_image` = transformers `get_image_features`
xrv -- anchor: RoentGen eval/calculate_fid.py, `xrv.models.DenseNet(weights="densenet121-res224-all")`.
  resize   299x299 bicubic, aspect not kept, float      clean-fid mode "clean" (PIL bicubic on float32)
  values   1 channel, 2048 * x - 1024                    their `2048 * (x / 255) - 1024` after `rgb_to_grayscale`
  resize   224x224 bilinear, antialiased                 their `transforms.Resize(224)` on the tensor
  output   relu, global average pool of `.features`      torchxrayvision `features2`, 1024-d

Resizes run in torch (`F.interpolate`, antialiased); torch's antialiased bicubic uses PIL's kernel (a = -0.5),
so it stands in for their PIL resizes up to rounding."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from cxrcommon.optional import require

from .cache import digest, weights_sha256
from .features import Backbone, WeightsMismatchError, WeightsMissingError, state_misfit

log = logging.getLogger(__name__)

RAD_DINO_REPO = "microsoft/rad-dino"
CLIP_REPO = "openai/clip-vit-base-patch32"
XRV_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
XRV_URL = f"https://github.com/mlmed/torchxrayvision/releases/download/v1/{XRV_FILE}"
XRV_SAFETENSORS = "xrv-densenet121-res224-all.safetensors"
XRV_CONVERT = ("python -c \"import torchxrayvision as xrv; from safetensors.torch import save_file; "
               "m = xrv.models.DenseNet(weights='densenet121-res224-all'); "
               f"save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, '{XRV_SAFETENSORS}')\"")
XRV_CLASSES = 18          # the "all" model's pathologies; the classifier is loaded (strictly) but not used
XRV_IGNORED = {"op_threshs"}  # an operating-point table some torchxrayvision versions keep beside the weights
# microsoft/rad-dino's preprocessor_config.json, used where a folder lacks one
RAD_DINO_PROCESSOR = {"do_resize": True, "size": {"shortest_edge": 518}, "resample": 3, "do_center_crop": True,
                      "crop_size": {"height": 518, "width": 518}, "do_rescale": True,
                      "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5307] * 3,
                      "image_std": [0.2583] * 3}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # clean-fid CLIP_fx / openai clip
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


# ---------------------------------------------------------------- preprocessing pieces

def quantise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> whole numbers 0..255 (as float): the uint8 image the anchors pass on after a resize."""
    return (x * 255).round().clamp(0, 255)


def resize(x: torch.Tensor, size: int | tuple[int, int], mode: str) -> torch.Tensor:
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)


def shortest_edge(x: torch.Tensor, side: int, mode: str) -> torch.Tensor:
    """Resize so the shorter side is `side`, keeping the aspect (torchvision `Resize(int)`, transformers
    `size={"shortest_edge": side}`)."""
    h, w = x.shape[-2:]
    size = (side, max(1, int(side * w / h))) if h <= w else (max(1, int(side * h / w)), side)
    return x if (h, w) == size else resize(x, size, mode)


def centre_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = max(0, round((h - height) / 2)), max(0, round((w - width) / 2))
    return x[..., top:top + height, left:left + width]


class ProcessorSteps(nn.Module):
    """A transformers image processor's steps (resize, centre crop, rescale, normalise) on a (N, 1, H, W)
    batch of 0..255 values, on the model's device; the result has 3 channels (gray replicated, as
    `Image.convert("RGB")`). Between resize and rescale the image is rounded to uint8, as the processor does."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        size = cfg.get("size") or {}
        self.side = size.get("shortest_edge") if cfg.get("do_resize", True) else None
        self.fixed = (size["height"], size["width"]) if "height" in size and self.side is None else None
        self.mode = PIL_RESAMPLE.get(cfg.get("resample", 3), "bicubic")
        crop = cfg.get("crop_size") or {}
        self.crop = (crop["height"], crop["width"]) if cfg.get("do_center_crop") and crop else None
        self.scale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        normalise = cfg.get("do_normalize", True)
        self.register_buffer("mean", torch.tensor(cfg["image_mean"] if normalise else [0.0] * 3).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg["image_std"] if normalise else [1.0] * 3).view(1, 3, 1, 1))
        sides = [*([self.side] if self.side else self.fixed or ()), *(self.crop or ())]
        if not all(isinstance(n, int) and n > 0 for n in sides) or not bool((self.std > 0).all()):
            raise ValueError(f"sizes must be whole numbers > 0 (got {sides}) and image_std > 0 (got "
                             f"{self.std.flatten().tolist()})")

    def describe(self) -> str:
        size = f"shortest edge {self.side}" if self.side else f"{self.fixed}" if self.fixed else "no resize"
        return (f"then {size} {self.mode}, uint8, centre crop {self.crop}, x{self.scale:.6g}, "
                f"mean {self.mean.flatten().tolist()}, std {self.std.flatten().tolist()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.side:
            x = shortest_edge(x, self.side, self.mode).round().clamp(0, 255)
        elif self.fixed:
            x = resize(x, self.fixed, self.mode).round().clamp(0, 255)
        if self.crop:
            x = centre_crop(x, *self.crop)
        return (x.expand(-1, 3, -1, -1) * self.scale - self.mean) / self.std


# ---------------------------------------------------------------- checking weights

def _hf_folder(weights: str | Path | None, spec: str, repo: str, fix: str) -> Path:
    """The local transformers folder for `spec`, or an error naming what is missing and how to get it."""
    get = f"on a machine with internet: `hf download {repo} --local-dir DIR`{fix}, then pass --weights DIR"
    if not weights:
        raise WeightsMissingError(f"--features {spec} needs --weights DIR, a local copy of {repo} (config.json + "
                                  f"model.safetensors); nothing is downloaded at run time. Get it {get}")
    folder = Path(weights).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.is_file() else "does not exist"
        raise WeightsMissingError(f"--weights {folder} {what}: --features {spec} needs the folder of {repo} "
                                  f"(config.json + model.safetensors). Get it {get}")
    missing = [n for n in ("config.json",) if not (folder / n).is_file()]
    if not list(folder.glob("*.safetensors")):
        missing.append("model.safetensors")
    if missing:
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        raise WeightsMissingError(f"--weights {folder}: no {' or '.join(missing)} there (found: {found}); "
                                  f"--features {spec} needs {repo} saved with safetensors. Get it {get}")
    return folder


def _config(folder: Path, name: str = "config.json") -> dict[str, Any]:
    try:
        data = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsMismatchError(f"{folder / name}: not a readable JSON config ({exc})") from exc
    if not isinstance(data, dict):
        raise WeightsMismatchError(f"{folder / name}: not a model config (a JSON object)")
    return data


def _expect_type(folder: Path, config: dict[str, Any], spec: str, types: tuple[str, ...], repo: str) -> str:
    found = config.get("model_type")
    if found not in types:
        arch = ", ".join(config.get("architectures") or []) or "no architectures"
        raise WeightsMismatchError(f"{folder / 'config.json'}: model_type {found!r} ({arch}), but --features {spec} "
                                   f"expects {' or '.join(map(repr, types))} ({repo}); pass that model's folder")
    return found


def _from_pretrained(cls: Any, folder: Path, spec: str) -> nn.Module:
    """Load strictly: a weight the checkpoint lacks or has in another shape is an error, not a random layer."""
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its per-key report; our error below names the problem in one line
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                          output_loading_info=True)
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:  # SafetensorError: truncated, empty, text
        why = ("weights of other shapes than its config.json describes" if "mismatched_sizes" in str(exc)
               else str(exc).splitlines()[0])
        raise WeightsMismatchError(f"--weights {folder}: its safetensors do not fit {cls.__name__} "
                                   f"(--features {spec}): {why}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    bad = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if bad:
        raise WeightsMismatchError(f"--weights {folder}: its safetensors do not fit {cls.__name__} "
                                   f"(--features {spec}): {len(bad)} weight(s) missing or of another shape, "
                                   f"e.g. {', '.join(bad[:3])}")
    return model.eval()


def _key(family: str, sha: str, preprocessing: str) -> str:
    """Cache key: weights and preprocessing, so changed weights or resizes never reuse stale features."""
    return f"{family}-{sha[:16]}-{digest(preprocessing)[:8]}"


# ---------------------------------------------------------------- the backbones

class _RadDino(nn.Module):
    def __init__(self, model: nn.Module, steps: ProcessorSteps) -> None:
        super().__init__()
        self.model, self.steps = model, steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=self.steps(x)).pooler_output


def rad_dino(weights: str | Path | None, device: torch.device) -> Backbone:
    """RAD-DINO (a Dinov2Model folder such as microsoft/rad-dino) as CheXGenBench uses it for "FID (RadDino)",
    "KID (RadDino)" and precision/recall/density/coverage: see the module table."""
    folder = _hf_folder(weights, "rad-dino", RAD_DINO_REPO, "")
    _expect_type(folder, _config(folder), "rad-dino", ("dinov2",), RAD_DINO_REPO)
    processor = RAD_DINO_PROCESSOR
    if (folder / "preprocessor_config.json").is_file():
        processor = {**RAD_DINO_PROCESSOR, **_config(folder, "preprocessor_config.json")}
    else:
        log.warning("%s has no preprocessor_config.json; using microsoft/rad-dino's (518 px bicubic, mean 0.5307, "
                    "std 0.2583)", folder)
    from transformers import Dinov2Model
    try:
        steps = ProcessorSteps(processor)
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError) as exc:  # a hand-edited file's values
        raise WeightsMismatchError(f"{folder / 'preprocessor_config.json'}: not an image processor's settings "
                                   f"({type(exc).__name__}: {exc}) — restore the file from {RAD_DINO_REPO}") from None
    module = _RadDino(_from_pretrained(Dinov2Model, folder, "rad-dino"), steps).to(device)
    note = f"rounded to uint8, {steps.describe()}; gray on 3 channels; CLS pooler output"
    sha = weights_sha256(folder)
    return Backbone(f"rad-dino {folder.name} (CheXGenBench, 768-d CLS)", _key("rad-dino", sha, note + "299"),
                    module, 299, quantise, note, device, family="rad-dino", weights_sha256=sha)


class _ClipImage(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = (x.expand(-1, 3, -1, -1) / 255 - self.mean) / self.std
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=pixels)
            return getattr(out, "pooler_output", out)  # transformers 5 wraps it; older versions return the tensor
        return self.model(pixel_values=pixels).image_embeds


def clip(weights: str | Path | None, device: torch.device) -> Backbone:
    """CLIP ViT-B/32's projected image embedding as RoentGen's CLIP-FID computes it: a CLIPModel folder
    (openai/clip-vit-base-patch32) or a CLIPVisionModelWithProjection folder."""
    folder = _hf_folder(weights, "clip", CLIP_REPO, " (or, where it has no model.safetensors: "
                        f"`python -c \"from transformers import CLIPModel; CLIPModel.from_pretrained('{CLIP_REPO}')"
                        ".save_pretrained('DIR')\"`)")
    config = _config(folder)
    kind = _expect_type(folder, config, "clip", ("clip", "clip_vision_model"), CLIP_REPO)
    from transformers import CLIPModel, CLIPVisionModelWithProjection
    if kind == "clip_vision_model" and "CLIPVisionModelWithProjection" not in (config.get("architectures") or []):
        raise WeightsMismatchError(f"{folder / 'config.json'}: a CLIP vision tower without its projection "
                                   f"({', '.join(config.get('architectures') or []) or 'no architectures'}); "
                                   f"RoentGen's CLIP-FID uses the projected 512-d embedding: pass a CLIPModel "
                                   f"folder ({CLIP_REPO})")
    model = _from_pretrained(CLIPModel if kind == "clip" else CLIPVisionModelWithProjection, folder, "clip")
    if kind == "clip":
        model.text_model = None  # only the image side is used; frees the text tower's memory
    note = "rounded to uint8; /255, CLIP mean/std; gray on 3 channels; projected image embedding"
    sha = weights_sha256(folder)
    return Backbone(f"clip {folder.name} (RoentGen CLIP-FID, projected image embedding)",
                    _key("clip", sha, note + "224 bicubic crop"), _ClipImage(model).to(device), 224, quantise, note,
                    device, family="clip", weights_sha256=sha, resample="bicubic", crop=True)


class _XrvPooled(nn.Module):
    """torchxrayvision's `features2`: relu, then global average pool of the DenseNet trunk (1024-d)."""

    def __init__(self, net: nn.Module, side: int = 224) -> None:
        super().__init__()
        self.net, self.side = net, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = resize(x, (self.side, self.side), "bilinear")
        return F.adaptive_avg_pool2d(F.relu(self.net.features(x)), 1).flatten(1)


def densenet121_xrv() -> nn.Module:
    """torchxrayvision's DenseNet-121 layout (its models.DenseNet: torchvision's with 1 input channel and
    18 outputs; the parameter names are the same), with no weights."""
    from torchvision.models import densenet121
    net = densenet121(weights=None, num_classes=XRV_CLASSES)
    net.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a .pt/.pth that holds only tensors (torch.load with weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:
            raise WeightsMismatchError(f"--weights {path}: not a readable safetensors file ({exc})") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsMismatchError(
            f"--weights {path}: not a plain state dict (torchxrayvision's release file is a pickled model, which "
            f"we do not unpickle); convert it once on a trusted machine with torchxrayvision installed: "
            f"{XRV_CONVERT}, and pass {XRV_SAFETENSORS}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise WeightsMismatchError(f"--weights {path}: holds {type(state).__name__}, not a state dict of names to "
                                   f"tensors")
    return state


def xrv(weights: str | Path | None, device: torch.device) -> Backbone:
    """torchxrayvision's DenseNet-121 "all" (densenet121-res224-all) as RoentGen's XRV-FID uses it, built
    here without torchxrayvision and loaded strictly from a state dict (see XRV_CONVERT)."""
    require("--features xrv (its DenseNet-121 is torchvision's)", "torchvision")
    if not weights:
        raise WeightsMissingError(f"--features xrv needs --weights FILE: torchxrayvision's DenseNet-121 'all' "
                                  f"as {XRV_SAFETENSORS} (nothing is downloaded at run time). Make it on a machine "
                                  f"with internet and torchxrayvision: {XRV_CONVERT}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsMissingError(f"--weights {path} {'is a folder' if path.is_dir() else 'does not exist'}: "
                                  f"--features xrv needs the file {XRV_SAFETENSORS}, made with: {XRV_CONVERT}")
    state = {k: v for k, v in read_state_dict(path).items() if k not in XRV_IGNORED}
    net = densenet121_xrv()
    if detail := state_misfit(net, state):
        raise WeightsMismatchError(f"--weights {path}: not torchxrayvision's DenseNet-121 (1 input channel, "
                                   f"{XRV_CLASSES} outputs): {detail}. Pass {XRV_SAFETENSORS} (made with: "
                                   f"{XRV_CONVERT})")
    net.load_state_dict(state, strict=True)
    note = "1 channel, 2048 * x - 1024; then 224x224 bilinear (antialiased); relu + global average pool"
    sha = weights_sha256(path)
    return Backbone("xrv densenet121-res224-all (RoentGen XRV-FID, 1024-d)", _key("xrv", sha, note + "299 bicubic"),
                    _XrvPooled(net.eval()).to(device), 299, lambda x: x * 2048 - 1024, note, device, family="xrv",
                    weights_sha256=sha, resample="bicubic")

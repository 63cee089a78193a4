"""Patient re-identification: a Siamese ResNet scoring whether two chest X-rays show the same person.

Architecture and state-dict layout are Packhäuser et al.'s (Sci Rep 12:14851, 2022) as CheXGenBench ships them
(huggingface raman07/Patient_ReIdentification_MIMIC, `ResNet-50_epoch11_data_handling_RPN.pth`): a torchvision
ResNet under `model.` whose `fc` gives 128 features, a sigmoid on each branch, |a - b|, and `fc_end`
(Linear 128 -> 1) giving a logit; the score is its sigmoid, "same patient" at >= 0.5. Input as CheXGenBench
feeds it: gray replicated to 3 channels, resized to 224x224, values in [0, 1], no normalisation.

A scorer can also be trained here on the user's own manifest (same-patient pairs from its patient column,
balanced with pairs of different patients, BCE + Adam as in the paper), with its verification AUC measured on
pairs of held-out patients. It is saved as safetensors with its input size in the metadata."""
from __future__ import annotations

import dataclasses
import logging
import random
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cxrcommon.device import pick_device
from cxrcommon.optional import require

from .features import to_square_tensor

log = logging.getLogger(__name__)

SIZE = 224          # CheXGenBench: transforms.Resize((224, 224)) + ToTensor()
N_FEATURES = 128    # Packhäuser et al.: 128-d branch features
THRESHOLD = 0.5     # the paper's verification decision threshold on the sigmoid score
FEATURE = "the re-identification scorer (eval.privacy --reid-weights / --reid-train)"
FORMAT = "synthcxr-reid-v1"
LAYOUT = ("a Siamese ResNet state dict in CheXGenBench's Patient_ReIdentification_MIMIC layout (keys model.conv1."
          "weight ... model.fc.weight [128, 2048], fc_end.weight [1, 128]), e.g. ResNet-50_epoch11_data_handling_RPN"
          ".pth, or a scorer saved by eval.privacy --reid-train")
# (bottleneck blocks?, blocks in layer3) -> torchvision name: what the state dict itself says it is
_ARCHS = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101",
          (True, 36): "resnet152"}


class SiameseNetwork(nn.Module):
    """Packhäuser et al.'s verification network; parameter names match CheXGenBench's class exactly."""

    def __init__(self, arch: str = "resnet50", in_channels: int = 3, n_features: int = N_FEATURES) -> None:
        super().__init__()
        require(FEATURE, "torchvision")
        import torchvision
        self.model = torchvision.models.get_model(arch, weights=None)
        if in_channels == 1:
            self.model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.model.fc = nn.Linear(self.model.fc.in_features, n_features)
        self.fc_end = nn.Linear(n_features, 1)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) images -> (N, n_features) in (0, 1)."""
        return torch.sigmoid(self.model(x))

    def head(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        """Same-patient logits of branch features paired row by row (broadcasting): (...,)."""
        return self.fc_end((fa - fb).abs()).squeeze(-1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(self.branch(a), self.branch(b))


@dataclasses.dataclass
class ReidScorer:
    """A Siamese network plus the input it expects; `source` names it in reports."""
    net: SiameseNetwork
    size: int
    in_channels: int
    source: str
    arch: str = "resnet50"

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def prepare(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Gray [0, 1] images of any size -> (N, C, S, S) network input on the CPU."""
        x = torch.cat([to_square_tensor(img, self.size) for img in images])
        return x.expand(-1, self.in_channels, -1, -1)

    @torch.inference_mode()
    def embed(self, images: Sequence[np.ndarray], batch_size: int = 32) -> torch.Tensor:
        """(N, n_features) branch outputs, so every pair is scored without running the ResNet again."""
        self.net.eval()
        out = [self.net.branch(self.prepare(images[i:i + batch_size]).to(self.device)).float().cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.net.fc_end.in_features)

    @torch.inference_mode()
    def score(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        """(len(fa), len(fb)) same-patient probabilities of every pair of branch features."""
        dev, fb = self.device, fb.to(self.device)
        rows = max(1, (1 << 24) // max(1, len(fb) * fa.shape[1]))  # ~64 MB of |a - b| at a time
        out = [torch.sigmoid(self.net.head(fa[i:i + rows, None].to(dev), fb[None])).float().cpu()
               for i in range(0, len(fa), rows)]
        return torch.cat(out) if out else torch.zeros(0, len(fb))


def _state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file or a plain PyTorch state dict (loaded weights_only)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc}); expected {LAYOUT}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a plain PyTorch state dict ({type(exc).__name__}: {str(exc)[:200]}); "
                         f"expected {LAYOUT}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Packhäuser's training checkpoints
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors; expected {LAYOUT}")
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}, {}


def load_reid(path: str | Path, device: str = "auto") -> ReidScorer:
    """A scorer from local weights; anything but a Siamese ResNet of this layout is refused with the reason."""
    require(FEATURE, "torchvision")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--reid-weights {path} does not exist; download ResNet-50_epoch11_data_handling_"
                                "RPN.pth from huggingface.co/raman07/Patient_ReIdentification_MIMIC or train one "
                                "with --reid-train MANIFEST")
    sd, meta = _state_dict(path)
    conv1, fc, fc_end = sd.get("model.conv1.weight"), sd.get("model.fc.weight"), sd.get("fc_end.weight")
    blocks = {m.group(1) for k in sd if (m := re.match(r"model\.layer3\.(\d+)\.", k))}
    arch = _ARCHS.get(("model.layer1.0.conv3.weight" in sd, len(blocks)))
    if conv1 is None or fc is None or fc_end is None or arch is None or conv1.dim() != 4 or fc_end.dim() != 2:
        found = ", ".join(list(sd)[:4]) + (" ..." if len(sd) > 4 else "")
        raise ValueError(f"{path}: not a Siamese ResNet (keys {found}); expected {LAYOUT}")
    net = SiameseNetwork(arch, in_channels=conv1.shape[1], n_features=fc_end.shape[1])
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ValueError(f"{path}: a {arch} Siamese state dict that does not fit the architecture ({detail}); "
                         f"expected {LAYOUT}") from exc
    size = int(meta.get("size", SIZE))
    return ReidScorer(net.eval().to(pick_device(device)), size, conv1.shape[1], f"{path.name} ({arch})", arch)


def save_reid(scorer: ReidScorer, path: str | Path, **metadata: Any) -> Path:
    """Safetensors in the CheXGenBench key layout, with the input size (and e.g. the AUC) in its metadata."""
    from safetensors.torch import save_file

    from cxrcommon.atomic import atomic_path
    meta = {"format": FORMAT, "arch": scorer.arch, "size": str(scorer.size), **{k: str(v) for k, v in metadata.items()}}
    tensors = {k: v.detach().cpu().contiguous() for k, v in scorer.net.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def _pairs(groups: Sequence[Sequence[int]], n: int, rng: random.Random) -> list[tuple[int, int, float]]:
    """n pairs, half of two images of one patient (label 1), half of two patients (label 0)."""
    multi = [g for g in groups if len(g) >= 2]
    out = []
    for i in range(n):
        if i % 2 == 0:
            a, b = rng.sample(list(rng.choice(multi)), 2)
            out.append((a, b, 1.0))
        else:
            ga, gb = rng.sample(range(len(groups)), 2)
            out.append((rng.choice(groups[ga]), rng.choice(groups[gb]), 0.0))
    return out


def _load_groups(records: Sequence[Any], size: int) -> tuple[torch.Tensor, list[list[int]]]:
    """(N, 1, S, S) images and, per patient, their row indices; unreadable images are skipped."""
    from cxrcommon.imageio import ImageReadError, read_image
    imgs, groups = [], {}
    for r in tqdm(records, desc="re-id images", leave=False):
        try:
            imgs.append(to_square_tensor(read_image(r.image), size))
        except (ImageReadError, OSError) as exc:
            log.warning("skipping %s: %s", r.image, exc)
            continue
        groups.setdefault(r.patient_id, []).append(len(imgs) - 1)
    return (torch.cat(imgs) if imgs else torch.zeros(0, 1, size, size)), list(groups.values())


def train_reid(manifest: str | Path, *, patient_column: str = "patient", image_column: str = "image",
               arch: str = "resnet50", size: int = SIZE, epochs: int = 5, pairs: int = 2000, batch_size: int = 32,
               lr: float = 1e-4, val_fraction: float = 0.2, seed: int = 0,
               device: str = "auto") -> tuple[ReidScorer, dict[str, Any]]:
    """Train a Siamese scorer on a manifest's same-patient pairs; its verification AUC on held-out patients.

    Args:
        manifest: CSV/JSONL with image paths and a patient id column (the same id for every film of a person).
        patient_column: the patient id column; rows without an id are left out.
        image_column: the image-path column.
        arch: torchvision ResNet of both branches (resnet50 is the paper's and CheXGenBench's).
        size: input side in pixels, > 0.
        epochs: passes, each over `pairs` freshly drawn balanced pairs (the paper's "randomized" handling).
        pairs: pairs per epoch, >= 2; also the most held-out pairs scored.
        batch_size: pairs per step, >= 2 (BatchNorm).
        lr: Adam learning rate (the paper: 1e-4).
        val_fraction: share of images whose patients are held out (cxrcommon.manifest.patient_split), in (0, 1).
        seed: seeds the weights, the split and the pairs.
        device: "auto" or a torch device name.
    Returns: the trained scorer (eval mode) and verification_auc (sklearn ROC AUC on held-out pairs, in [0, 1]),
        n_val_pairs, n_train_patients, n_val_patients, arch, size, epochs."""
    from sklearn.metrics import roc_auc_score

    from cxrcommon.manifest import Columns, patient_split, read_manifest
    require(FEATURE, "torchvision")
    records = read_manifest(manifest, Columns(image=image_column, text=None), on_error="skip")
    records = [dataclasses.replace(r, patient_id=str(r.extra[patient_column]).strip())
               for r in records if str(r.extra.get(patient_column) or "").strip()]
    if not records:
        raise ValueError(f"{manifest}: no patient ids in column {patient_column!r}, so there are no same-patient "
                         "pairs to learn from; add that column (one id per person) or set --patient-column, or pass "
                         "--reid-weights instead of --reid-train")
    train_recs, val_recs = patient_split(records, val_fraction, seed)
    x_tr, g_tr = _load_groups(train_recs, size)
    x_va, g_va = _load_groups(val_recs, size)
    for name, groups in (("training", g_tr), ("held-out", g_va)):
        if len(groups) < 2 or not any(len(g) >= 2 for g in groups):
            raise ValueError(f"{manifest}: the {name} patients ({len(groups)}) need at least two patients and one "
                             "with two or more readable images for same-patient pairs; add patients with several "
                             "films or change --reid-val-fraction")
    torch.manual_seed(seed)
    dev = pick_device(device)
    net = SiameseNetwork(arch).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    rng = random.Random(seed)
    net.train()
    for _ in tqdm(range(epochs), desc="re-id training", leave=False):
        batch = _pairs(g_tr, pairs, rng)
        rng.shuffle(batch)
        for i in range(0, len(batch) - 1, batch_size):
            a, b, y = (torch.tensor(c) for c in zip(*batch[i:i + batch_size]))
            if len(a) < 2:
                continue
            loss = F.binary_cross_entropy_with_logits(net(x_tr[a].expand(-1, 3, -1, -1).to(dev),
                                                          x_tr[b].expand(-1, 3, -1, -1).to(dev)), y.float().to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
    scorer = ReidScorer(net.eval(), size, 3, f"trained on {Path(manifest).name} ({arch}, {size} px)", arch)
    val = _pairs(g_va, pairs, random.Random(seed + 1))
    feats = scorer.embed([x[0].numpy() for x in x_va])
    a, b, y = (list(c) for c in zip(*val))
    with torch.inference_mode():
        probs = torch.sigmoid(net.head(feats[a].to(dev), feats[b].to(dev))).cpu().numpy()
    metrics = {"verification_auc": float(roc_auc_score(y, probs)), "n_val_pairs": len(val),
               "n_train_patients": len(g_tr), "n_val_patients": len(g_va), "arch": arch, "size": size,
               "epochs": epochs}
    return scorer, metrics

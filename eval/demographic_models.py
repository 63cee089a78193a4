"""Sex, age and race read back from a chest X-ray: the classifiers behind `inference.generate --qc` (issue #21).

A QC folder holds at most one model per task (sex, age, race), from either of two places:

trained here on the user's own real manifest (`python -m eval.demographic_models train --manifest real.csv
--out qc_models/`): `<task>.safetensors` + `<task>.json` (classes, input size, architecture, held-out accuracy).
  input   gray [0, 1] resized to `size` x `size` (bilinear, antialiased, aspect not kept), 3 channels
  model   torchvision resnet18 from scratch, as eval.augment trains; age is learned as its band (<40, 40-65, >65)

the anchors' published weights (file names fixed, so the folder says what each file is):
  race-emory.safetensors|.pt   torchxrayvision emory_hiti RaceModel (Gichoya 2022): ResNet-34, fc = Linear(512, 3)
                               + LogSoftmax, classes Asian, Black, White; the .pt xrv downloads
                               (resnet_race_detection_val-loss_0.157_mimic_public.pt) is a plain state dict
  age-riken.pt                 torchxrayvision riken AgeModel (Ieki 2022): the TorchScript file xrv downloads
                               (baseline_models_riken_xray_age_every_model_age_senet154_v2_tl_26_ft_7_fp32.pt),
                               SENet-154 -> age in years
  sex-chexpert.safetensors|.pt the CheXpert sex classifier RoentGen-v2 checks with (biomedia-mira chexploration,
                               Glocker 2023): ResNet-34 (fc) or DenseNet-121 (classifier), 2 outputs, 1 = female;
                               a Lightning .ckpt must be converted first (`SEX_CONVERT`)
  Anchor preprocessing, RoentGen-v2 run_inference_w_quality_check.py: every image resized to 224 x 224, then
  race/age: min-max to [-1024, 1024] and xrv's own steps (bilinear to 320, (x + 1024) / 2048, ImageNet mean/std,
  3 channels) = min-max to [0, 1], 320 bilinear, ImageNet normalisation; sex: min-max to [0, 255], 3 channels.

Weights that do not fit the architecture their name promises are refused in one line before anything is written."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrcommon.cli import cli_entry
from cxrcommon.config import field
from cxrcommon.demographics import AGE_BANDS, RACES, age_band, age_years, race_group, sex_code
from cxrcommon.errors import UserError
from cxrcommon.logs import setup_logging
from cxrcommon.optional import require
from cxrcommon.provenance import file_sha256

from .cli import parse, user_errors
from .features import WeightsMismatchError, WeightsMissingError, state_misfit, to_square_tensor

log = logging.getLogger(__name__)

TASKS = ("sex", "age", "race")
FORMAT = "synthcxr-demographic-classifier/1"  # the "format" of a <task>.json written here
ANCHOR_FILES = {"race": ("race-emory.safetensors", "race-emory.pt"), "age": ("age-riken.pt",),
                "sex": ("sex-chexpert.safetensors", "sex-chexpert.pt")}
EMORY_CLASSES = ("ASIAN", "BLACK", "WHITE")     # xrv RaceModel.targets Asian, Black, White, in our vocabulary
CHEXPERT_SEX_CLASSES = ("M", "F")               # RoentGen-v2: `"F" if x == 1 else "M"`
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ANCHOR_SIZE = 224                               # RoentGen-v2's QCDataset: monai Resize((224, 224))
XRV_SIDE = 320                                  # xrv RaceModel / AgeModel: nn.Upsample(size=(320, 320))
SEX_CONVERT = ("python -c \"import torch; from safetensors.torch import save_file; "
               "s = torch.load('sex_model_chexpert_resnet_all.ckpt', map_location='cpu', weights_only=False)"
               "['state_dict']; save_file({k: v.contiguous() for k, v in s.items()}, 'sex-chexpert.safetensors')\" "
               "(on a machine you trust the checkpoint on)")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What the classifiers read from one image; None where no model covers the field."""
    sex: str | None = None          # M / F
    age: float | None = None        # years, from a model that predicts years (riken)
    age_band: str | None = None     # <40, 40-65, >65: the band model's class, or the band of `age`
    race: str | None = None         # one of cxrcommon.demographics.RACES

    def row(self) -> dict[str, Any]:
        """Manifest columns: qc_sex, qc_age (whole years), qc_age_band, qc_race."""
        return {"qc_sex": self.sex, "qc_age": None if self.age is None else round(self.age),
                "qc_age_band": self.age_band, "qc_race": self.race}


@dataclasses.dataclass
class Classifier:
    """One task's model: `prepare` turns (N, 1, size, size) gray [0, 1] into the module's input; the module gives
    (N, len(classes)) scores, or (N, 1) years where `classes` is None."""
    task: str
    source: str                     # the file, as logs and settings name it
    sha256: str
    size: int
    classes: tuple[str, ...] | None
    prepare: Callable[[torch.Tensor], torch.Tensor]
    module: nn.Module

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray], batch_size: int = 32) -> list[str | float]:
        """A class name (or years) per gray [0, 1] image of any size."""
        device = next(iter(self.module.parameters()), torch.empty(0)).device
        out: list[str | float] = []
        for start in range(0, len(images), batch_size):
            x = torch.cat([to_square_tensor(img, self.size) for img in images[start:start + batch_size]])
            y = self.module(self.prepare(x).to(device)).float().cpu()
            out += (y.reshape(len(x), -1)[:, 0].tolist() if self.classes is None
                    else [self.classes[i] for i in y.argmax(1).tolist()])
        return out


@dataclasses.dataclass
class DemographicModels:
    """The QC folder's classifiers, by task."""
    folder: Path
    models: dict[str, Classifier]

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        by_task = {task: m.predict(images) for task, m in self.models.items()}
        preds = []
        for i in range(len(images)):
            got = {task: values[i] for task, values in by_task.items()}
            age = got.get("age")
            years = float(age) if isinstance(age, float) else None
            band = age_band(round(years)) if years is not None else age
            preds.append(Prediction(sex=got.get("sex"), age=years, age_band=band, race=got.get("race")))
        return preds

    def race_classes(self) -> tuple[str, ...]:
        """The race groups the race model can tell apart (RoentGen-v2 checks only those): () without one."""
        model = self.models.get("race")
        return (model.classes or ()) if model else ()

    def identity(self) -> dict[str, str]:
        """task -> "file sha256[:16]": what settings.json records (names and hashes, never a path)."""
        return {task: f"{m.source} {m.sha256[:16]}" for task, m in sorted(self.models.items())}

    def describe(self) -> str:
        return "; ".join(f"{task}: {m.source} ({', '.join(m.classes) if m.classes else 'years'})"
                         for task, m in self.models.items())


# ---------------------------------------------------------------- loading

def _strict(net: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> nn.Module:
    """Load `state` into `net` only if every name and shape fits; otherwise one line naming the first misfit."""
    if detail := state_misfit(net, state):
        raise WeightsMismatchError(f"--qc {path}: not {what}: {detail} — see `python -m eval.demographic_models "
                                   f"--help` for the formats a QC folder takes")
    net.load_state_dict(state, strict=True)
    return net.eval()


def _state_dict(path: Path, prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A .safetensors file or a .pt holding only tensors (weights_only=True), with wrapper prefixes (DataParallel's
    module., Lightning's model.) taken off."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except Exception as exc:
            raise WeightsMismatchError(f"--qc {path}: not a readable safetensors file ({exc})") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            hint = f"; convert it with {SEX_CONVERT}" if path.name.startswith("sex") else ""
            raise WeightsMismatchError(f"--qc {path}: not a plain state dict of tensors (pickled objects are not "
                                       f"loaded){hint}") from exc
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise WeightsMismatchError(f"--qc {path}: holds {type(state).__name__}, not a state dict of names to tensors")
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Each image scaled to [0, 1] by its own min and max (monai ScaleIntensity, as RoentGen-v2 applies it)."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def _xrv_input(x: torch.Tensor) -> torch.Tensor:
    """RoentGen-v2's race/age input: min-max, xrv's 320 px bilinear upsample, ImageNet mean/std, 3 channels."""
    x = F.interpolate(_minmax(x), size=(XRV_SIDE, XRV_SIDE), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def _chexpert_sex_input(x: torch.Tensor) -> torch.Tensor:
    """RoentGen-v2's sex input: min-max to [0, 255], 3 channels, no normalisation."""
    return _minmax(x).expand(-1, 3, -1, -1) * 255


def _race_emory(path: Path) -> Classifier:
    state = _state_dict(path, ("module.",))
    require("the emory_hiti race model (a torchvision ResNet-34)", "torchvision")
    from torchvision.models import resnet34
    net = resnet34(weights=None)
    net.fc = nn.Sequential(nn.Linear(512, len(EMORY_CLASSES)), nn.LogSoftmax(dim=1))
    net = _strict(net, state, path, "torchxrayvision's emory_hiti RaceModel (ResNet-34, "
                  "fc.0 = Linear(512, 3))")
    return Classifier("race", path.name, file_sha256(path), ANCHOR_SIZE, EMORY_CLASSES, _xrv_input, net)


def _sex_chexpert(path: Path) -> Classifier:
    state = _state_dict(path, ("model.",))
    require("the CheXpert sex model (a torchvision ResNet-34 or DenseNet-121)", "torchvision")
    from torchvision.models import densenet121, resnet34
    net = densenet121(weights=None, num_classes=2) if "features.conv0.weight" in state else resnet34(weights=None,
                                                                                                     num_classes=2)
    net = _strict(net, state, path, f"a CheXpert sex classifier ({type(net).__name__}, 2 outputs)")
    return Classifier("sex", path.name, file_sha256(path), ANCHOR_SIZE, CHEXPERT_SEX_CLASSES, _chexpert_sex_input, net)


def _age_riken(path: Path) -> Classifier:
    """The riken model is only published as TorchScript (as eval.features takes a TorchScript backbone)."""
    try:
        net = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise WeightsMismatchError(f"--qc {path}: not a TorchScript file torch.jit.load can read ({exc}); "
                                   f"age-riken.pt is torchxrayvision's riken age model file as downloaded") from exc
    return Classifier("age", path.name, file_sha256(path), ANCHOR_SIZE, None, _xrv_input, net)


def _trained(folder: Path, task: str) -> Classifier:
    """A model `train_models` wrote: <task>.json says the architecture, classes and size."""
    meta_path, weights = folder / f"{task}.json", folder / f"{task}.safetensors"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        ok = isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("task") == task
    except (OSError, ValueError) as exc:
        raise WeightsMismatchError(f"--qc {meta_path}: not readable JSON ({exc})") from exc
    if not ok:
        raise WeightsMismatchError(f"--qc {meta_path}: not a {task} classifier written by `python -m "
                                   f"eval.demographic_models train` (format {FORMAT})")
    if not weights.is_file():
        raise WeightsMissingError(f"--qc {folder}: {meta_path.name} without {weights.name} — retrain or copy both")
    require("the QC classifiers trained by eval.demographic_models (torchvision models)", "torchvision")
    import torchvision
    if problem := _meta_problem(meta, task, torchvision.models.list_models(module=torchvision.models)):
        raise WeightsMismatchError(f"--qc {meta_path}: {problem} — retrain with `python -m eval.demographic_models "
                                   f"train`, or restore the file it wrote")
    classes = tuple(meta["classes"])
    net = torchvision.models.get_model(meta["arch"], weights=None, num_classes=len(classes))
    net = _strict(net, _state_dict(weights), weights, f"{meta['arch']} with {len(classes)} classes as {meta_path.name} "
                  "says")
    return Classifier(task, weights.name, file_sha256(weights), int(meta["size"]), classes,
                      lambda x: x.expand(-1, 3, -1, -1), net)


def _meta_problem(meta: dict[str, Any], task: str, archs: Sequence[str]) -> str:
    """What is wrong with a <task>.json's arch, classes and size ("" if nothing): the file is read back as data,
    so a hand-edited one must not reach get_model or the QC rules with a value `train` never writes."""
    vocabulary = {"sex": ("M", "F"), "age": tuple(name for name, _, _ in AGE_BANDS), "race": RACES}[task]
    classes, size = meta.get("classes"), meta.get("size")
    if meta.get("arch") not in archs:
        return f"arch {meta.get('arch')!r} is not a torchvision classifier"
    if not (isinstance(classes, list) and len(set(classes)) == len(classes) >= 2
            and all(isinstance(c, str) and c in vocabulary for c in classes)):
        return f"classes {classes!r} are not two or more distinct {task} classes of {', '.join(vocabulary)}"
    if not (isinstance(size, int) and not isinstance(size, bool) and 8 <= size <= 4096):
        return f"size {size!r} is not a whole number of pixels from 8 to 4096"
    return ""


_ANCHOR_LOADERS: dict[str, Callable[[Path], Classifier]] = {"race": _race_emory, "age": _age_riken,
                                                            "sex": _sex_chexpert}


def load_models(folder: str | Path, device: str | torch.device = "cpu") -> DemographicModels:
    """Every classifier in a QC folder (see the module docstring); tasks without a model are not checked.

    Raises WeightsMissingError for a missing or empty folder, WeightsMismatchError for weights that do not fit
    the architecture their name promises (one line each), UserError for two models of one task."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise WeightsMissingError(f"--qc {folder} {'is a file' if folder.is_file() else 'does not exist'}: pass the "
                                  f"folder written by `python -m eval.demographic_models train`, or one holding "
                                  f"{', '.join(f[0] for f in ANCHOR_FILES.values())}")
    models: dict[str, Classifier] = {}
    for task in TASKS:
        found = [folder / name for name in ANCHOR_FILES[task] if (folder / name).is_file()]
        if (folder / f"{task}.json").is_file():
            found.append(folder / f"{task}.json")
        if len(found) > 1:
            raise UserError(f"--qc {folder}: {len(found)} {task} models ({', '.join(p.name for p in found)}) — "
                            f"keep one")
        if found:
            model = _trained(folder, task) if found[0].suffix == ".json" else _ANCHOR_LOADERS[task](found[0])
            model.module.to(device)
            models[task] = model
    if not models:
        names = ", ".join([f"{t}.json" for t in TASKS] + [n for names in ANCHOR_FILES.values() for n in names])
        raise WeightsMissingError(f"--qc {folder}: no classifier there (looked for {names}) — train some with "
                                  f"`python -m eval.demographic_models train --manifest REAL.csv --out {folder}`")
    return DemographicModels(folder, models)


# ---------------------------------------------------------------- training on the user's manifest

@dataclasses.dataclass
class TrainConfig:
    command: str = field("train", "what to do: train (the only command)")
    manifest: str = field("", "real manifest (.csv/.jsonl) with an image column and sex / age / race columns")
    out: str = field("qc_models", "folder for <task>.safetensors + <task>.json (replaced whole when done)")
    tasks: list[str] = field(list(TASKS), "which classifiers to train: sex, age (as its band <40/40-65/>65), race")
    image_column: str = field("image", "manifest column holding image paths")
    sex_column: str = field("sex", "manifest column holding sex (M/F, male/female)")
    age_column: str = field("age", "manifest column holding age in years")
    race_column: str = field("race", "manifest column holding race (mapped onto cxrcommon.demographics.RACES)")
    patient_column: str = field("patient", "manifest column of patient ids (for a split by patient; ignored if "
                                           "absent)")
    arch: str = field("resnet18", "torchvision classifier, trained from scratch (weights=None)")
    size: int = field(224, "square input side in pixels")
    epochs: int = field(10, "training epochs")
    batch_size: int = field(32, "batch size")
    lr: float = field(1e-3, "AdamW learning rate")
    val_fraction: float = field(0.2, "share of patients held out to measure each classifier's accuracy")
    seed: int = field(0, "seed for the split, initialisation and shuffling")
    device: str = field("auto", "cpu, cuda, mps, xpu or auto")
    verbose: bool = field(False, "debug logging")


LABELERS: dict[str, Callable[[Any], str]] = {"sex": sex_code, "age": lambda v: age_band(age_years(v)),
                                             "race": race_group}


def _labels(records: Sequence[Any], task: str, column: str) -> list[str]:
    """Each record's class for `task` ("" when unknown, so the row is left out of that task)."""
    out = [LABELERS[task](r.extra.get(column)) if r.extra.get(column) not in (None, "") else "" for r in records]
    return ["" if v == "unknown" else v for v in out]


def train_models(cfg: TrainConfig) -> dict[str, Any]:
    """Train one classifier per task in `cfg.tasks` on the manifest's real images and write them to `cfg.out`.

    Each task uses the rows whose column it reads is known, split by patient (`patient_split`); the held-out
    accuracy is logged and written to <task>.json, since a QC verdict is only as good as the classifier behind
    it. Returns {task: {"classes", "n_train", "n_val", "val_accuracy"}}."""
    from safetensors.torch import save_file

    from cxrcommon.atomic import atomic_dir
    from cxrcommon.imageio import read_image
    from cxrcommon.manifest import Columns, manifest_columns, patient_split, read_manifest

    from .augment import predict, train_classifier
    unknown = sorted(set(cfg.tasks) - set(TASKS))
    if unknown or not cfg.tasks:
        raise UserError(f"--tasks {' '.join(cfg.tasks)}: choose from {', '.join(TASKS)}")
    columns = {"sex": cfg.sex_column, "age": cfg.age_column, "race": cfg.race_column}
    have = manifest_columns(cfg.manifest)
    absent = [f"--{t}-column {columns[t]!r}" for t in cfg.tasks if columns[t] not in have]
    if absent:
        raise UserError(f"{cfg.manifest}: no column for {', '.join(absent)} (columns: {', '.join(sorted(have))}) — "
                        f"name the right column or leave the task out with --tasks")
    require("training QC classifiers (torchvision models)", "torchvision")
    patient = cfg.patient_column if cfg.patient_column in have else None
    records = read_manifest(cfg.manifest, Columns(image=cfg.image_column, text=None, patient=patient),
                            on_error="skip")
    train_rows, val_rows = patient_split(records, cfg.val_fraction, cfg.seed)
    images = {id(r): to_square_tensor(read_image(r.image), cfg.size) for r in records}
    results: dict[str, Any] = {}
    files: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
    for task in cfg.tasks:
        labelled = [(r, y) for rows in (train_rows, val_rows) for r, y in zip(rows, _labels(rows, task, columns[task]))]
        classes = sorted({y for _, y in labelled if y})
        if len(classes) < 2:
            raise UserError(f"{cfg.manifest}: column {columns[task]!r} gives {len(classes)} {task} class(es) "
                            f"({', '.join(classes) or 'none'}); a classifier needs two — leave {task} out with --tasks")
        index = {c: i for i, c in enumerate(classes)}
        sets = {}
        for name, rows in (("train", train_rows), ("val", val_rows)):
            pairs = [(images[id(r)], index[y]) for r, y in zip(rows, _labels(rows, task, columns[task])) if y]
            sets[name] = (torch.cat([x for x, _ in pairs]) if pairs else torch.empty(0, 1, cfg.size, cfg.size),
                          torch.tensor([y for _, y in pairs], dtype=torch.long))
        model = train_classifier(*sets["train"], len(classes), arch=cfg.arch, epochs=cfg.epochs,
                                 batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, device=cfg.device, desc=task)
        x_val, y_val = sets["val"]
        acc = float((predict(model, x_val).argmax(1) == y_val.numpy()).mean()) if len(y_val) else None
        results[task] = {"classes": classes, "n_train": len(sets["train"][1]), "n_val": len(y_val),
                         "val_accuracy": acc}
        log.info("%s: %d classes (%s), %d train / %d held-out image(s), held-out accuracy %s", task, len(classes),
                 ", ".join(classes), len(sets["train"][1]), len(y_val), "n/a" if acc is None else f"{acc:.3f}")
        meta = {"format": FORMAT, "task": task, "arch": cfg.arch, "size": cfg.size, "classes": classes,
                "input": f"gray [0, 1] resized to {cfg.size}x{cfg.size} (bilinear, antialiased), 3 channels",
                "trained_on": Path(cfg.manifest).name, "trained_on_sha256": file_sha256(cfg.manifest),
                "column": columns[task], **{k: v for k, v in results[task].items() if k != "classes"}}
        files[task] = ({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, meta)

    def write(tmp: Path) -> None:
        for task, (state, meta) in files.items():
            save_file(state, str(tmp / f"{task}.safetensors"))
            (tmp / f"{task}.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    atomic_dir(cfg.out, write)
    return results


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse(TrainConfig, argv, "train: fit the sex / age-band / race classifiers that `inference.generate --qc "
                "FOLDER` checks generated images with, on your own real manifest. A QC folder may instead hold the "
                "anchors' weights: " + ", ".join(n for names in ANCHOR_FILES.values() for n in names)
                + " (module docstring: formats and preprocessing).", positional=("command",))
    setup_logging(cfg.verbose)
    if cfg.command != "train":
        raise UserError(f"unknown command {cfg.command!r} — use: python -m eval.demographic_models train "
                        f"--manifest REAL.csv --out qc_models")
    if not cfg.manifest:
        raise UserError("give --manifest REAL.csv (a manifest with image and sex/age/race columns)")
    with user_errors():
        results = train_models(cfg)
    for task, r in results.items():
        acc = "n/a" if r["val_accuracy"] is None else f"{r['val_accuracy']:.3f}"
        print(f"{task}: held-out accuracy {acc} ({r['n_val']} image(s)); classes {', '.join(r['classes'])}")
    print(f"-> {cfg.out}")
    return results


if __name__ == "__main__":
    main()

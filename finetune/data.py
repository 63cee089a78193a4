"""Training data: manifest rows -> (image tensor or cached latent, caption index) in a resumable order.

Every random choice (data order, caption dropout, flip) is a pure function of (seed, epoch, index),
so the batch at any step can be reproduced after a restart without saving a sampler state, and the
result does not depend on the number of dataloader workers."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from cxrcommon.errors import UserError

log = logging.getLogger(__name__)

EMPTY = -1  # caption index meaning "dropped caption" (the empty prompt)
# Images under cxrcommon.manifest.MIN_IMAGE_SIDE (8 px: a 1x1 image is a flat grey square) are bad rows:
# listed, or skipped and counted with on_error=skip. Larger ones whose shorter side is under
# resolution / MAX_UPSCALE (64 px at 512) are stretched more than 8x into a blur: kept, with one warning
# that counts them and names a few.
MAX_UPSCALE = 8


@dataclass
class TrainData:
    """Images (paths, or arrays for in-memory use) with their prepared captions."""
    images: list[Any]
    captions: list[str]
    val_images: list[Any]
    val_captions: list[str]

    def __len__(self) -> int:
        return len(self.images)


def load_train_data(cfg: Any, tokenizer: Any) -> TrainData:
    """Read the manifest, split by patient, and turn reports into captions of at most `max_windows` CLIP windows."""
    from cxrcommon.manifest import read_manifest
    from cxrcommon.reports import prepare_reports

    if not cfg.train_data:
        raise UserError("no training data: pass --train-data <manifest.csv|.jsonl|imagefolder>")
    columns, split_column = _columns(cfg)
    records = read_manifest(cfg.train_data, columns, on_error=cfg.on_error)
    if not records:
        raise UserError(f"{cfg.train_data}: no usable rows — fix the manifest or point --train-data at another")
    train, val = _split(records, split_column, cfg)
    if cfg.max_train_samples:
        train = train[:cfg.max_train_samples]
    small = [r for r in train + val if r.size and min(r.size) * MAX_UPSCALE < cfg.resolution]
    if small:
        log.warning("%d of %d images are smaller than %d px (--resolution %d / %d) on a side, e.g. %s: they are "
                    "stretched more than %dx and teach blur — use full-size images, or a lower --resolution",
                    len(small), len(train) + len(val), cfg.resolution // MAX_UPSCALE, cfg.resolution, MAX_UPSCALE,
                    ", ".join(f"{r.image.name} ({r.size[0]}x{r.size[1]})" for r in small[:3]), MAX_UPSCALE)
    def captions(rows: list) -> list[str]:
        return prepare_reports([r.text for r in rows], tokenizer, sections=tuple(cfg.sections),
                               policy=cfg.token_policy, max_windows=cfg.max_windows,
                               names=[f"{cfg.train_data}:{r.line}" for r in rows],
                               prefixes=demographic_prefixes(rows, cfg))[0]
    texts, val_texts = captions(train), captions(val) if val else []
    log.info("data: %d training / %d validation images from %s (%s)", len(train), len(val), cfg.train_data,
             f"its {split_column!r} column" if split_column else "patient-level split")
    return TrainData([r.image for r in train], texts, [r.image for r in val], val_texts)


def demographic_prefixes(rows: list, cfg: Any) -> list[str] | None:
    """Each row's demographics prefix (the manifest's sex/age/race columns through the configured template,
    fields dropped per row by --demographics-dropout); None when the template is off or no column is there.
    A value the template cannot read is a UserError naming the manifest line."""
    from cxrcommon.demographics import caption_with, drop_fields, parse_demographics
    cols = (cfg.sex_column, cfg.age_column, cfg.race_column)
    if cfg.demographics_template == "none" or not rows or not any(c in rows[0].extra for c in cols):
        return None
    out = []
    for r in rows:
        d = parse_demographics(*(r.extra.get(c, "") for c in cols), where=f"{cfg.train_data}:{r.line}")
        d = drop_fields(d, cfg.demographics_dropout, cfg.seed, f"{r.image}")
        out.append(caption_with("", d, cfg.demographics_template))
    return out


def _columns(cfg: Any) -> tuple[Any, str | None]:
    """The manifest columns to read, and the split column if the manifest has one: a finetune.prepare
    manifest (report, patient, split) trains as it is, without renaming flags."""
    from cxrcommon.manifest import Columns, manifest_columns
    header = manifest_columns(cfg.train_data)
    text = cfg.caption_column
    if text == "text" and "text" not in header and "report" in header:
        text = "report"
    patient = cfg.patient_column or ("patient" if "patient" in header else None)
    split = cfg.split_column if cfg.split_column and cfg.split_column in header else None
    return Columns(image=cfg.image_column, text=text, patient=patient), split


def _split(records: list, split_column: str | None, cfg: Any) -> tuple[list, list]:
    """(train, validation) rows: the manifest's own split when it has one, else the seeded patient split."""
    from cxrcommon.manifest import patient_split
    if split_column is None:
        return patient_split(records, cfg.val_fraction, seed=cfg.seed) if cfg.val_fraction > 0 else (records, [])
    values = [str(r.extra.get(split_column, "")).strip().lower() for r in records]
    bad = [(r.line, v) for r, v in zip(records, values) if v not in ("train", "validate", "test")]
    if bad:
        raise UserError(f"{cfg.train_data}:{bad[0][0]}: {split_column!r} is {bad[0][1]!r} ({len(bad)} such row(s)) — "
                        f"use train, validate or test, or pass --split-column none to split by patient")
    train = [r for r, v in zip(records, values) if v == "train"]
    if not train:
        raise UserError(f"{cfg.train_data}: no row has {split_column} = train — nothing to train on")
    return train, [r for r, v in zip(records, values) if v == "validate"]


def load_pixels(image: Any, resolution: int, resize_mode: str, clip_percentile: float | None) -> torch.Tensor:
    """A path or a float [0,1] array -> 3xRxR float tensor in [-1, 1] (gray repeated to RGB)."""
    from cxrcommon.imageio import normalize, read_image, to_square
    if isinstance(image, np.ndarray):
        arr = normalize(image, clip_percentile) if clip_percentile else image.astype(np.float32)
    else:
        arr = read_image(image, clip_percentile=clip_percentile)
    arr = to_square(arr, resolution, mode=resize_mode)
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)) * 2.0 - 1.0
    return t.unsqueeze(0).expand(3, -1, -1).contiguous()


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


class TrainDataset(torch.utils.data.Dataset):
    """Items are keyed by (epoch, index); returns pixels or cached latent moments plus a caption index."""

    def __init__(self, images: Sequence[Any], resolution: int, resize_mode: str = "pad",
                 clip_percentile: float | None = None, random_flip: bool = False, caption_dropout: float = 0.0,
                 seed: int = 0, latents: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.images, self.resolution, self.resize_mode = list(images), resolution, resize_mode
        self.clip_percentile, self.random_flip, self.caption_dropout = clip_percentile, random_flip, caption_dropout
        self.seed, self.latents = seed, latents
        if latents is not None and random_flip:
            raise UserError("random_flip cannot be combined with cache_latents (the cache holds one "
                             "orientation); turn one of them off")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        rng = sample_rng(self.seed, epoch, index)
        dropped, flip = rng.random() < self.caption_dropout, rng.random() < 0.5
        item: dict[str, Any] = {"caption": EMPTY if dropped else index}
        if self.latents is not None:
            item["latent_mean"], item["latent_std"] = self.latents(index)
        else:
            pixels = load_pixels(self.images[index], self.resolution, self.resize_mode, self.clip_percentile)
            item["pixels"] = pixels.flip(-1) if self.random_flip and flip else pixels
        return item


class StepSampler:
    """An endless stream of batches of (epoch, index) for one process, starting at micro-batch `start`.

    Epoch e is a seeded permutation; each process takes its own slice of each global batch (DDP),
    and the incomplete tail of an epoch is dropped so every step has full batches."""

    def __init__(self, n: int, batch_size: int, seed: int, *, start: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.start, self.rank, self.world = n, batch_size, seed, start, rank, world
        self.batches_per_epoch = n // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise UserError(f"the training set has {n} images, fewer than one global batch "
                             f"({batch_size} per device x {world} processes); lower --train-batch-size")

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm, perm_epoch = None, -1
        for k in count(self.start):
            epoch, b = divmod(k, self.batches_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = self._perm(epoch), epoch
            lo = (b * self.world + self.rank) * self.batch_size
            yield [(epoch, i) for i in perm[lo:lo + self.batch_size]]


def make_loader(dataset: TrainDataset, sampler: StepSampler, num_workers: int) -> Iterator:
    """The batch iterator (workers prefetch; order is fixed by the sampler)."""
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)
    return iter(loader)


def tokenize(tokenizer: Any, captions: Sequence[str],
             max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N+1, W, 77) token ids in 75-token windows with the empty prompt as the last row (for EMPTY), and
    each row's window count (cxrcommon.prompt_windows)."""
    from cxrcommon.prompt_windows import tokenize_padded
    return tokenize_padded(tokenizer, list(captions) + [""], max_windows)


def caption_rows(caption_idx: torch.Tensor, n_captions: int) -> torch.Tensor:
    """Map caption indices (EMPTY for dropped) to rows of the table built by `tokenize`/the text cache."""
    return torch.where(caption_idx == EMPTY, torch.full_like(caption_idx, n_captions), caption_idx)


def describe_images(images: Sequence[Any]) -> list[str]:
    """A stable per-image identity for cache keys: path + size + mtime, or an array's content hash."""
    import hashlib
    out = []
    for im in images:
        if isinstance(im, np.ndarray):
            out.append("array:" + hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest())
        else:
            st = Path(im).stat()
            out.append(f"{Path(im).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return out

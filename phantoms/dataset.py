"""A phantom data set on disk: `python -m phantoms.dataset --out data/phantoms --n 5000`.

Why: training reads images and captions from a folder (imagefolder layout: images/, masks/ for burnt-in
text, metadata.jsonl with the caption and label columns); image i depends only on (seed, i), so a run
resumes and a data set can be regrown."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from cxrcommon.atomic import atomic_write_text
from cxrcommon.config import field, parse_config
from cxrcommon.imageio import write_png
from cxrcommon.logs import setup_logging
from cxrcommon.provenance import provenance

from .captions import caption
from .generator import FINDINGS, PhantomSpec, labels, render, sample_spec

log = logging.getLogger(__name__)


def item(i: int, seed: int, exclude: Iterable[str] = (),
         finding_probs: Mapping[str, float] | None = None) -> tuple[PhantomSpec, str]:
    """Spec and caption of image `i` of a data set: independent of every other index, so runs resume."""
    rng = np.random.default_rng([seed, i])
    spec = sample_spec(rng, exclude=exclude, finding_probs=finding_probs)
    return spec, caption(spec, rng)


def make_dataset(out_dir: str | Path, n: int, size: int = 128, seed: int = 0, exclude: Iterable[str] = (),
                 finding_probs: Mapping[str, float] | None = None, progress: bool = True) -> Path:
    """Write n phantom PNGs (+ text masks) and an imagefolder `metadata.jsonl`; returns its path.

    Existing images are kept, so an interrupted run resumes; `dataset.json` records the settings and a
    rerun with other settings into the same folder is refused. metadata.jsonl is written last, atomically.

    Args:
        out_dir: the data set folder (created; images/ and masks/ go under it).
        n: number of phantoms, >= 0; raising it on a rerun keeps the first ones (image i depends only on
            (seed, i)).
        size: image side in pixels, >= 16.
        seed: data set seed.
        exclude: findings that never occur, names from FINDINGS (others raise ValueError).
        finding_probs: finding -> probability in [0, 1] that overrides DEFAULT_PROBS, or None for the defaults.
        progress: show a tqdm progress bar.
    Returns: the path of metadata.jsonl (file_name, text, patient_id, text_mask and the label columns)."""
    out = Path(out_dir)
    exclude = tuple(sorted(exclude))
    settings = {"n": n, "size": size, "seed": seed, "exclude": list(exclude), "finding_probs": finding_probs or {}}
    meta_path = out / "dataset.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        if {k: v for k, v in old.items() if k != "n"} != {k: v for k, v in settings.items() if k != "n"}:
            raise ValueError(f"{meta_path} was written with {old}, not {settings}; use another --out folder "
                             "or delete that one")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta_path, json.dumps(settings, indent=1))
    rows, made = [], 0
    for i in tqdm(range(n), desc="phantoms", unit="img", disable=not progress):
        spec, text = item(i, seed, exclude, finding_probs)
        name, mask_name = f"images/{i:06d}.png", f"masks/{i:06d}.png"
        if not (out / name).exists() or (spec.text and not (out / mask_name).exists()):
            img, mask = render(spec, size)
            if mask is not None:
                write_png(out / mask_name, mask.astype(np.float32))
            write_png(out / name, img, text=provenance(kind="procedural phantom", caption=text,
                                                        spec=json.dumps(spec.to_json())))
            made += 1
        rows.append({"file_name": name, "text": text, "patient_id": f"phantom-{seed}-{i:06d}",
                     "text_mask": mask_name if spec.text else "", **labels(spec)})
    path = out / "metadata.jsonl"
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    log.info("%d phantoms in %s (%d drawn now, %d kept)", n, out, made, n - made)
    return path


@dataclass
class PhantomConfig:
    out: str = field("data/phantoms", "output folder (images/, masks/, metadata.jsonl, dataset.json)")
    n: int = field(5000, "number of images")
    size: int = field(128, "image side in pixels")
    seed: int = field(0, "data set seed; image i depends only on (seed, i)")
    exclude: list[str] = field([], f"findings never drawn, e.g. pneumothorax; any of {', '.join(FINDINGS)}")
    verbose: bool = field(False, "debug logging")


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(PhantomConfig, argv, "Write a procedural chest-phantom data set with report captions "
                                            "(imagefolder layout for finetune.train).")
    setup_logging(cfg.verbose)
    make_dataset(cfg.out, cfg.n, cfg.size, cfg.seed, exclude=cfg.exclude)


if __name__ == "__main__":
    main()

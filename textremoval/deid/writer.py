"""One file through `--deidentify`: header profile, pixel pass, review verdict and audit entry, written
together under a keyed name."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..files import NOTE, output_paths, read_for_cleaning
from ..remover import TextRemover
from . import audit, files as deid_files
from .pixels import clean_verified, pixel_review
from .profile import deidentify_dataset, settings_fingerprint
from .pseudonyms import Pseudonymizer


def write_deidentified(path: Path, out_dir: Path, rel: Path, remover: TextRemover,
                       pseudo: Pseudonymizer) -> dict[str, Any]:
    """clean_file under --deidentify: outputs named by a keyed hash of `rel` (input->output only in the
    mapping), under needs_review/ when a person must look, mask as boxes, region texts blanked but for
    side markers, BurnedInAnnotation=NO only when the verify pass read nothing; all files written together."""
    cfg = remover.config
    pseudo.mapping.clear()
    name = pseudo.file_name(rel)
    arr, view, ds = read_for_cleaning(path)
    # before any write: a header that fails leaves nothing behind
    header = deidentify_dataset(ds, cfg, pseudo, source=name.name) if ds is not None else None
    idents = header.identifiers if header else []
    res, left = clean_verified(remover, arr, view, idents)
    review = pixel_review(remover, res, left, idents)
    pixels_clean = cfg.deid_verify and not review
    folder = out_dir / deid_files.REVIEW_DIR if review else out_dir
    paths = output_paths(folder, name)
    regions = res.regions_json()
    deid_files.blank_texts(regions, cfg.marker_pattern)
    record = {"input": name.name, "output": str(paths["image"]), "mask": str(paths["mask"]),
              "shape": list(arr.shape), "dtype": str(arr.dtype), "masked_pixels": int(res.mask.sum()),
              "seconds": res.seconds, "regions": regions, "settings": settings_fingerprint(cfg, pseudo),
              "deidentify": audit.file_entry(header, res.regions, review, pixels_clean)}
    image = deid_files.dicom_bytes(res.image, header, pixels_clean, NOTE) if header else \
        deid_files.image_bytes(res.image, name.suffix)
    mask = deid_files.image_bytes(deid_files.box_mask(res.mask, res.regions).astype(np.uint8) * 255, ".png")
    deid_files.write_together([(paths["image"], image), (paths["mask"], mask),
                               (paths["json"], json.dumps(record, indent=1).encode("utf-8"))])
    other = out_dir if review else out_dir / deid_files.REVIEW_DIR  # an earlier run's verdict, now stale
    for p in output_paths(other, name).values():
        p.unlink(missing_ok=True)
    return {**record, "mapping": dict(pseudo.mapping)}

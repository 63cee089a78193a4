"""A toy dataset module for the finetune.prepare runner tests: toy.csv (image, patient, view, findings, sex, age)
beside the images. `TOY_SLOW` (seconds per image) slows decoding so a test can kill a run midway."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from cxrcommon.errors import UserError
from finetune.prepare.images import decode
from finetune.prepare.rows import Excluded, SourceRow, age_years, read_csv, sex_code

NAME = "toy"
HAS_REPORTS = False
LABELS = {"Effusion": "Pleural Effusion", "Mass": "Lung Lesion", "Hernia": None}


def find_root(root: Path, cfg) -> Path:
    if not (root / "toy.csv").is_file():
        raise UserError(f"{root} does not look like toy: toy.csv not found")
    return root


def rows(root: Path, cfg) -> Iterator[SourceRow | Excluded]:
    for line, r in read_csv(root / "toy.csv", ("image", "patient", "view", "findings")):
        if isinstance(r, Excluded):
            yield r
            continue
        if r.get("sex") is None:
            yield Excluded("malformed row", f"toy.csv:{line}", "too few cells")
            continue
        labels = {name: 1.0 for name in filter(None, r["findings"].split("|"))}
        yield SourceRow(image=root / r["image"], patient=r["patient"], study=r["patient"], view=r["view"],
                        labels=labels, sex=sex_code(r["sex"]), age=age_years(r["age"]), where=f"toy.csv:{line}")


def read_image(path: Path) -> np.ndarray:
    time.sleep(float(os.environ.get("TOY_SLOW", "0")))
    return decode(path, 64)


def make_tree(root: Path, n: int = 6, side: tuple[int, int] = (400, 320)) -> list[str]:
    """n good JPEGs (smooth gradients + a blob, different per image), plus a lateral view, a missing file,
    a corrupt JPEG and a malformed row; returns the good image names."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["image,patient,view,findings,sex,age"]
    good = []
    yy, xx = np.mgrid[0:side[1], 0:side[0]]
    for i in range(n):
        img = (60 + 100 * xx / side[0] + 40 * np.exp(-((xx - 40 * i - 80) ** 2 + (yy - 150) ** 2) / 800.0))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / f"img{i}.jpg", quality=92)
        findings = ["Effusion", "Mass|Hernia", ""][i % 3]
        lines.append(f"img{i}.jpg,p{i // 2},PA,{findings},{'MF'[i % 2]},{30 + 20 * i}")
        good.append(f"img{i}.jpg")
    Image.fromarray(np.full((320, 400), 90, np.uint8)).save(root / "lat.jpg")
    lines.append("lat.jpg,p9,LL,,M,50")
    lines.append("gone.jpg,p10,PA,Effusion,F,40")
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    lines.append("bad.jpg,p11,AP,,F,41")
    lines.append("short.jpg,p12,PA")
    (root / "toy.csv").write_text("\n".join(lines) + "\n")
    return good

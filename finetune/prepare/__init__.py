"""`python -m finetune.prepare DATASET --root DOWNLOAD --out DIR`: a public CXR dataset -> one training manifest.

Dataset modules (`datasets/`) read each download as its own documentation lays it out; `runner` does the
rest once for all of them: view filter, reports or label captions, labels on CheXpert's vocabulary,
demographics, the split, images at the training size, manifest.csv, summary.md/json and excluded.csv."""
from .config import PrepareConfig
from .runner import prepare

__all__ = ["PrepareConfig", "prepare"]

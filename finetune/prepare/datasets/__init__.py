"""One module per public dataset; each turns a download folder into `SourceRow`s.

A dataset module defines, and nothing else is needed to add one (this package finds it by NAME):

    NAME: str                     # the CLI name, e.g. "chestx-ray14"
    HAS_REPORTS: bool             # True: `report` holds findings + impression; False: a caption is built
    LABELS: dict[str, str | None] # source finding name -> CheXpert class it maps onto, or None (kept by name)
    def find_root(root: Path, cfg: PrepareConfig) -> Path
        # the folder the dataset's files hang off (e.g. CheXpert's --root may be the parent of
        # CheXpert-v1.0-small/); raises UserError naming the file it expected when `root` does not hold
        # this dataset (one line, before anything is written)
    def rows(root: Path, cfg: PrepareConfig) -> Iterator[SourceRow | Excluded]
        # streamed (a 377k-row CSV is never held whole); a malformed row is an `Excluded`, not an exception

Views, missing files, reports, labels, splits and images are then handled once, in `finetune.prepare.runner`."""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from cxrcommon.errors import UserError


def registry() -> dict[str, ModuleType]:
    """NAME -> module, for every dataset module in this package."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME"):
            found[module.NAME] = module
    return dict(sorted(found.items()))


def get(name: str) -> ModuleType:
    datasets = registry()
    if name not in datasets:
        raise UserError(f"unknown dataset {name!r} — choose one of: {', '.join(datasets)}")
    return datasets[name]

"""Packages that only the full torch route installs.

PyPI has no CPU build of torchvision, so the lean CPU install (torch 2.13.0 alone, README "Install") leaves
out torchvision and torch-fidelity. The features built on them say so, with the fix, instead of failing
deep inside an import."""

from __future__ import annotations

import importlib

from .errors import UserError

FULL_ROUTE_FIX = ("reinstall with the full torch route: `rm -rf .venv && TORCH_ROUTE=full bash scripts/setup.sh` "
                  "(PyPI's torch 2.14.1 + torchvision 0.29.1, about 7 GB; runs on CPU and CUDA)")


class MissingPackageError(UserError, ImportError):
    """A feature's package is not installed; the message names the feature, the packages and the fix."""


def available(module: str) -> bool:
    """Whether `module` imports: installed is not enough (a CUDA-only torchvision beside a CPU torch is
    installed and fails on import)."""
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def require(feature: str, *packages: str) -> None:
    """Raise MissingPackageError unless every module in `packages` imports."""
    missing = [p for p in packages if not available(p)]
    if missing:
        raise MissingPackageError(
            f"{feature} needs {', '.join(missing)}, which this install left out; {FULL_ROUTE_FIX}")

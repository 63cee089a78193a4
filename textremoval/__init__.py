"""Burnt-in text removal for X-rays: OCR detection -> glyph/SAM mask -> OpenCV/SD inpainting.

Public API: `clean_image(image, config) -> CleanResult`, `clean_file(path, out_dir, config)`, the batch
`textremoval.clean.clean(inputs, out_dir, config)`,
`TextRemover.from_config(config)`, `TextRemovalConfig` (`deidentify=True`: PS3.15 header profile, textremoval/deid/).
Names are imported lazily so `python -m textremoval.clean` does not import its own module twice."""
from __future__ import annotations

from typing import Any

_EXPORTS = {"CleanResult": "remover", "TextRemover": "remover", "clean_file": "clean",
            "clean_image": "remover", "TextRemovalConfig": "config", "TextRegion": "detect"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'textremoval' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)

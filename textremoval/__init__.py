"""Burnt-in text removal for X-rays: OCR detection -> glyph/SAM mask -> OpenCV/SD inpainting.

Public API: `clean_image(image, config) -> CleanResult`, `clean_file(path, out_dir, config)`,
`TextRemover.from_config(config)`, `TextRemovalConfig`."""
from .clean import CleanResult, TextRemover, clean, clean_file, clean_image
from .config import TextRemovalConfig
from .detect import TextRegion

__all__ = ["CleanResult", "TextRemover", "TextRemovalConfig", "TextRegion", "clean", "clean_file", "clean_image"]

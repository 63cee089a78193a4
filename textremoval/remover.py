"""The text remover as a library: `TextRemover` composes a detector, a segmenter and an inpainter (models
loaded once) and cleans one array; `clean_image` is the one-call form the app and the generator use."""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from cxrcommon.config import to_dict

from .config import TextRemovalConfig, check_config
from .deid.scrubber import normalize, reads_as_identifier
from .detect import TextRegion, build_detector, equalised_view, to_uint8_view
from .inpaint import build_inpainter, paste
from .segment import build_segmenter, polygon_mask


@dataclass
class CleanResult:
    image: np.ndarray                 # cleaned, same shape and dtype as the input
    mask: np.ndarray                  # bool, True where pixels were replaced
    regions: list[TextRegion]         # every detected box, with action "erased" or "kept"
    seconds: dict[str, float] = field(default_factory=dict)  # time per stage

    def regions_json(self) -> list[dict]:
        return [r.to_json() for r in self.regions]


class TextRemover:
    """Detector, segmenter and inpainter composed once (models loaded once), applied per image."""

    def __init__(self, detector: Any, segmenter: Any, inpainter: Any, config: TextRemovalConfig):
        self.detector, self.segmenter, self.inpainter, self.config = detector, segmenter, inpainter, config

    @classmethod
    def from_config(cls, config: TextRemovalConfig | None = None) -> "TextRemover":
        cfg = config or TextRemovalConfig()
        check_config(cfg)
        return cls(build_detector(cfg), build_segmenter(cfg), build_inpainter(cfg), cfg)

    def __call__(self, image: np.ndarray, *, view: np.ndarray | None = None,
                 regions: list[TextRegion] | None = None, identifiers: Sequence[str] = ()) -> CleanResult:
        """Clean one image. `view`: an 8-bit display version for detection (e.g. a windowed DICOM);
        `regions`: skip detection and use these (e.g. boxes edited by a user); `identifiers`: strings
        from the DICOM header (patient name, ID, ...): a box that reads as one is erased, marker or not."""
        if image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
            raise ValueError(f"expected a 2-D grayscale or H×W×C image, got shape {image.shape}")
        t = {"detect": time.perf_counter()}
        plain = to_uint8_view(image if view is None else view)
        regions = self.detector(plain) if regions is None else regions
        gray = self.detection_view(plain)  # what the segmenter thresholds: equalised, like the detector's view
        for r in regions:
            if identifiers and r.text and reads_as_identifier(r.text, identifiers):
                r.identifier, r.action = True, "erased"
        t["segment"] = time.perf_counter()
        erased = [r for r in regions if r.action == "erased"]
        mask = self.segmenter(gray, erased)
        for r in regions:  # a neighbour's dilated mask must not eat a marker the user keeps
            if r.action == "kept":
                mask &= ~polygon_mask(mask.shape, r)
        t["inpaint"] = time.perf_counter()
        cleaned = paste(image, self.inpainter(image, mask), mask) if mask.any() else image.copy()
        t["end"] = time.perf_counter()
        seconds = {k: round(t[n] - t[k], 4) for k, n in (("detect", "segment"), ("segment", "inpaint"),
                                                          ("inpaint", "end"))}
        return CleanResult(cleaned, mask, regions, seconds)

    def detection_view(self, image: np.ndarray) -> np.ndarray:
        """The 8-bit view segmentation sees: contrast-equalised under de-identification, so faint glyphs are
        masked as bold ones are (the detector equalises its own view the same way)."""
        return equalised_view(to_uint8_view(image), self.config)

    def residual_text(self, cleaned: np.ndarray, kept: Sequence[TextRegion], found: list[TextRegion] | None = None,
                      view: np.ndarray | None = None) -> list[TextRegion]:
        """Every box the detector still finds in a cleaned image, outside the boxes kept on purpose and other
        than a side marker kept by policy, whatever its recognition score (a remnant reads badly). `found`:
        boxes already detected on this very image (nothing was erased), so it is not read a second time;
        `view`: its 8-bit display, as the first pass saw it."""
        regions = self.detector(to_uint8_view(cleaned if view is None else view)) if found is None else found
        keep = np.zeros(cleaned.shape[:2], bool)
        for r in kept:
            keep[r.box[1]:r.box[3], r.box[0]:r.box[2]] = True
        marker = re.compile(self.config.marker_pattern, re.IGNORECASE)
        return [r for r in regions if not (r.action == "kept" and marker.fullmatch(normalize(r.text)))
                and keep[r.box[1]:r.box[3], r.box[0]:r.box[2]].mean() < 0.5]


_REMOVERS: dict[str, TextRemover] = {}


def get_remover(config: TextRemovalConfig | None = None) -> TextRemover:
    """A TextRemover per distinct config, built on first use and reused (models stay loaded). The
    de-identification key is no part of it (it goes to clean_file as a Pseudonymizer), so a run with a
    fresh random key reuses the loaded models."""
    cfg = dataclasses.replace(config or TextRemovalConfig(), deid_secret=None)
    key = json.dumps(to_dict(cfg), sort_keys=True)
    if key not in _REMOVERS:
        _REMOVERS[key] = TextRemover.from_config(cfg)
    return _REMOVERS[key]


def clean_image(image: np.ndarray, config: TextRemovalConfig | None = None) -> CleanResult:
    """Remove burnt-in text from one array (any dtype; 2-D or H×W×C). Used by the app and the generator."""
    return get_remover(config)(image)

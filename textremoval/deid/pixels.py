"""The pixel pass of de-identification: clean, look again, and say why a person must still check a file.
Reasons never quote the text itself: it may be PHI."""
from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

import numpy as np

from ..detect import TextRegion
from ..remover import CleanResult, TextRemover
from .scrubber import normalize, reads_as_identifier

VERIFY_ROUNDS = 2  # --deid-verify: erase-and-look-again rounds before a file is sent to review


def clean_verified(remover: TextRemover, arr: np.ndarray, view: np.ndarray | None, idents: Iterable[str],
                   view_of: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[CleanResult, list[TextRegion]]:
    """Clean, then (with deid_verify) look at the result again and erase any box still found there (remnants
    of half-masked glyphs, text the first pass missed), up to VERIFY_ROUNDS times. Returns the result and
    the boxes still found after that, which send the file to review. `view_of`: how a cleaned `arr` is
    displayed (as `view` shows `arr`), so every pass looks at the same kind of picture."""
    look = view_of or (lambda image: None)
    res = remover(arr, view=view, identifiers=idents)
    if not (remover.config.deidentify and remover.config.deid_verify):
        return res, []
    kept = [r for r in res.regions if r.action == "kept"]
    # nothing erased: the image is the one just read, at the same contrast; its boxes are the answer
    left = remover.residual_text(res.image, kept, found=None if res.mask.any() else res.regions,
                                 view=look(res.image))
    for _ in range(VERIFY_ROUNDS):
        if not left:
            break
        again = remover(res.image, view=look(res.image), regions=left, identifiers=idents)
        seconds = {k: round(v + again.seconds[k], 4) for k, v in res.seconds.items()}
        res = CleanResult(again.image, res.mask | again.mask, res.regions + again.regions, seconds)
        left = remover.residual_text(res.image, kept, view=look(res.image))
    return res, left


def pixel_review(remover: TextRemover, res: CleanResult, left: Sequence[TextRegion],
                 idents: Sequence[str]) -> list[str]:
    """Why a de-identified image still needs a human look (empty: the pixel pass left nothing behind).
    Reasons never quote the text itself: it may be PHI."""
    marker = re.compile(remover.config.marker_pattern, re.IGNORECASE)
    reasons = [f"kept text at {r.box} that is not a side marker" for r in res.regions
               if r.action == "kept" and not marker.match(normalize(r.text))]
    if any(reads_as_identifier(r.text, idents) for r in left):
        reasons.append("a header identifier is still readable after cleaning")
    if left:
        reasons.append(f"{len(left)} text region(s) still read after cleaning, at "
                       + ", ".join(str(r.box) for r in left))
    return reasons

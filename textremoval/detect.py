"""Stage 1: find burnt-in text boxes (and read them) with the PP-OCR ONNX models in the rapidocr wheel.

Detection runs on a downscaled copy (longest side `det_max_side`), which is cheaper than full size and
finds as much: CXR annotations are large. PP-OCR is trained on text lines, and its response to an isolated
letter (a side marker) flips on and off with scale, so one or more cheap extra passes at other scales
(`det_extra_sides`) add the boxes the first pass missed, and the glyph detector (glyphs.py) adds lone
marker letters that no pass sees. Boxes are returned in full-size coordinates."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .config import TextRemovalConfig
from .glyphs import confirm, find_candidates


@dataclass
class TextRegion:
    """One detected text box in full-image pixel coordinates."""
    box: tuple[int, int, int, int]          # x0, y0, x1, y1 (exclusive), clipped to the image
    polygon: list[tuple[int, int]]          # the detector's quadrilateral
    score: float                            # detection score
    text: str = ""                          # recognised text ("" when not read)
    text_score: float = 0.0                 # recognition confidence
    action: str = "erased"                  # "erased" or "kept"
    source: str = "line"                    # "line" (PP-OCR text-line detector) or "glyph" (glyphs.py)
    identifier: bool = False                # reads as a header identifier (--deidentify): always erased

    def to_json(self) -> dict:
        return asdict(self)


def to_uint8_view(image: np.ndarray) -> np.ndarray:
    """An 8-bit grayscale view of any 2-D (or RGB) array, min-max scaled, for the detector's eyes only."""
    gray = image if image.ndim == 2 else image[..., :3].mean(axis=2)
    if gray.dtype == np.uint8:
        return gray
    g = gray.astype(np.float32)
    lo, hi = float(g.min()), float(g.max())
    return np.zeros(g.shape, np.uint8) if hi <= lo else ((g - lo) * (255.0 / (hi - lo)) + 0.5).astype(np.uint8)


def contrast_view(gray: np.ndarray, clip: float = 3.0, tiles: int = 8) -> np.ndarray:
    """`gray` with local contrast equalised (CLAHE), so faint burnt-in text (25 grey levels over its
    background) stands out as bold text does: what de-identification detects and re-reads on."""
    return cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(gray)


def equalised_view(gray: np.ndarray, cfg: TextRemovalConfig) -> np.ndarray:
    """`gray` as de-identification detects, segments and re-reads it (contrast-equalised with deid_contrast),
    else as it is: one decision for the detector and the segmenter."""
    return contrast_view(gray) if cfg.deidentify and cfg.deid_contrast else gray


def decide_action(text: str, cfg: TextRemovalConfig) -> str:
    """'kept' for markers under --keep-markers and for non-matching text under --erase-pattern."""
    stripped = re.sub(r"[^0-9A-Za-z]", "", text)
    if cfg.keep_markers and stripped and re.match(cfg.marker_pattern, stripped, re.IGNORECASE):
        return "kept"
    if cfg.erase_pattern and not re.search(cfg.erase_pattern, text, re.IGNORECASE):
        return "kept"
    return "erased"


class RapidOCRDetector:
    """PP-OCR DBNet detector + CRNN recogniser; the ONNX sessions are created once and reused."""

    def __init__(self, cfg: TextRemovalConfig):
        from rapidocr import RapidOCR

        params = {"Global.log_level": "error", "Det.thresh": cfg.det_thresh, "Det.box_thresh": cfg.det_box_thresh,
                  "Det.unclip_ratio": cfg.det_unclip_ratio}
        if cfg.ocr_threads > 0:
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = cfg.ocr_threads
            params["EngineConfig.onnxruntime.inter_op_num_threads"] = 1
        self.cfg = cfg
        engine = RapidOCR(params=params)
        self.det = engine._load_det_model()  # the engine's own lazy loaders; we call the stages directly
        self.rec = engine._load_rec_model() if cfg.recognize or cfg.glyph_detector else None

    def detect_at(self, gray: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, list[float]]:
        """DBNet on `gray` resized to `size` (h, w; multiples of 32); quads in full-size pixels."""
        h, w = gray.shape
        small = cv2.resize(gray, size[::-1], interpolation=cv2.INTER_AREA if size[0] < h else cv2.INTER_LINEAR)
        x = small.astype(np.float32) * np.float32(2 / 255) - np.float32(1)  # PP-OCR's (x/255 - 0.5) / 0.5
        boxes, scores = self.det.postprocess_op(self.det.session(np.ascontiguousarray(np.broadcast_to(
            x, (1, 3, *size)))), (h, w))
        return boxes, scores

    def pass_sizes(self, h: int, w: int) -> list[tuple[int, int]]:
        """Network input sizes (h, w) of the first and extra passes, duplicates dropped."""
        sizes = []
        for side in [self.cfg.det_max_side, *self.cfg.det_extra_sides]:
            scale = min(1.0, side / max(h, w)) if side else 1.0
            size = (max(32, round(h * scale / 32) * 32), max(32, round(w * scale / 32) * 32))
            if size not in sizes:
                sizes.append(size)
        return sizes

    def __call__(self, image: np.ndarray) -> list[TextRegion]:
        """Text regions of `image`. Under de-identification (deid_contrast) lines are detected and read on a
        contrast-equalised view, so faint print is found; lone glyphs are looked for on the plain view (the
        glyph contrast threshold is for plain films: equalised anatomy is full of glyph-like blobs, each a
        recogniser call, and a lone side marker is no faint PHI)."""
        plain = to_uint8_view(image)
        gray = equalised_view(plain, self.cfg)
        h, w = gray.shape
        found = np.zeros((h, w), bool)  # pixels inside boxes of earlier passes
        regions: list[TextRegion] = []
        for i, size in enumerate(self.pass_sizes(h, w)):
            new = []
            for quad, score in zip(*self.detect_at(gray, size)):
                x0, y0 = np.floor(quad.min(axis=0)).astype(int)
                x1, y1 = np.ceil(quad.max(axis=0)).astype(int) + 1
                box = (max(0, x0), max(0, y0), min(w, x1), min(h, y1))
                bw, bh = box[2] - box[0], box[3] - box[1]
                if bw <= 0 or bh <= 0 or min(bw / w, bh / h) > self.cfg.max_box_fraction:
                    continue
                if i and found[box[1]:box[3], box[0]:box[2]].mean() >= 0.5:
                    continue  # an earlier pass already has this text
                new.append(TextRegion(box=tuple(int(v) for v in box),
                                      polygon=[(int(x), int(y)) for x, y in quad], score=round(float(score), 4)))
            for r in new:
                found[r.box[1]:r.box[3], r.box[0]:r.box[2]] = True
            regions += new
        if self.cfg.recognize and regions:
            self._read(gray, regions)
        if self.cfg.glyph_detector:
            regions += self.glyphs(plain, found)
        for r in regions:
            r.action = decide_action(r.text, self.cfg)
        return regions

    def glyphs(self, gray: np.ndarray, found: np.ndarray) -> list[TextRegion]:
        """Lone marker glyphs outside the line detector's boxes, as regions with a margin of 30 % of their
        height (like DBNet's unclipped boxes, so the glyph segmenter sees background on every side)."""
        h, w = gray.shape
        cands = [c for c in find_candidates(gray, min_contrast=self.cfg.glyph_contrast)
                 if found[c.box[1]:c.box[3], c.box[0]:c.box[2]].mean() < 0.5]
        regions = []
        # A lone bar reads as "1" or "I" (confirm scores both as one verdict); a lone glyph is a marker, so "I".
        reads = confirm(self.rec, gray, cands, self.cfg.glyph_accept, self.cfg.glyph_min_score)
        for c, text, score in sorted(reads, key=lambda read: -read[2]):  # best reading of a glyph first
            x0, y0, x1, y1 = c.box
            if found[y0:y1, x0:x1].mean() >= 0.5:
                continue  # the same glyph seen in the other polarity (e.g. the inside of a "D")
            m = max(2, round(0.3 * (y1 - y0)))
            x0, y0, x1, y1 = max(0, x0 - m), max(0, y0 - m), min(w, x1 + m), min(h, y1 + m)
            found[y0:y1, x0:x1] = True
            regions.append(TextRegion(box=(x0, y0, x1, y1), polygon=[(x0, y0), (x1 - 1, y0), (x1 - 1, y1 - 1),
                                                                     (x0, y1 - 1)],
                                      score=round(score, 4), text="I" if text == "1" else text,  # a lone bar
                                      text_score=round(score, 4), source="glyph"))
        return regions

    def _read(self, gray: np.ndarray, regions: list[TextRegion]) -> None:
        """Recognise each box on a full-resolution, deskewed crop (small glyphs read better there)."""
        from rapidocr.ch_ppocr_rec import TextRecInput
        from rapidocr.utils.process_img import get_rotate_crop_image

        bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
        crops = [get_rotate_crop_image(bgr, np.float32(r.polygon)) for r in regions]
        res = self.rec(TextRecInput(img=crops))
        for r, txt, sc in zip(regions, res.txts or (), res.scores or ()):
            r.text, r.text_score = str(txt).strip(), round(float(sc), 4)


DETECTORS = {"rapidocr": RapidOCRDetector}


def build_detector(cfg: TextRemovalConfig) -> RapidOCRDetector:
    if cfg.detector not in DETECTORS:
        raise ValueError(f"unknown detector {cfg.detector!r}; choose one of {', '.join(DETECTORS)}")
    return DETECTORS[cfg.detector](cfg)

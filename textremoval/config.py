"""Options of the text-removal pipeline: one dataclass, mirrored 1:1 by configs/textremoval.yaml."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cxrcommon.config import field
from cxrcommon.errors import MissingFileError, UserError
from cxrcommon.models import DEFAULT_INPAINT_MODEL

# Single-letter (and short) laterality markers: English L/R, Spanish D/I (derecha/izquierda), Italian Sx/Dx.
MARKER_PATTERN = r"^(L|R|D|I|SX|DX|LT|RT)$"
# What an isolated glyph found by the glyph detector must read as: a marker letter, or "1" (how a lone I reads).
GLYPH_ACCEPT = ["L", "R", "D", "I", "1", "S", "X", "SX", "DX", "LT", "RT"]
DETECTOR_NAMES = ("rapidocr",)
SEGMENTERS = ("auto", "glyph", "box", "sam")
INPAINTERS = ("telea", "ns", "sd")
SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")


@dataclass
class TextRemovalConfig:
    # detect
    detector: str = field("rapidocr", "text detector; 'rapidocr' = PP-OCR ONNX models shipped in the rapidocr wheel")
    det_max_side: int = field(720, "first detection pass on a copy whose longest side is at most this (px); "
                                   "0 = full size. Smaller is faster (docs/BENCHMARKS.md)")
    det_extra_sides: list[int] = field([400], "extra detection passes at these longest sides (px); their boxes "
                                              "are added where the first pass found nothing. PP-OCR's response "
                                              "to isolated letters (L, R, D, I) changes erratically with scale, "
                                              "so a second scale catches markers the first misses. [] = off")
    det_thresh: float = field(0.2, "DBNet pixel probability above which a pixel is text")
    det_box_thresh: float = field(0.2, "DBNet box score (mean probability) below which a detection is dropped")
    det_unclip_ratio: float = field(1.6, "how far DBNet grows each text kernel into a box")
    glyph_detector: bool = field(True, "also look for isolated marker glyphs (L, R, D, I, Sx) that the line "
                                       "detector misses: compact high-contrast top-hat blobs, each confirmed by "
                                       "the recogniser (textremoval/glyphs.py)")
    glyph_contrast: float = field(40.0, "glyph detector: minimum grey-level difference (0-255) between a "
                                        "candidate glyph and its surrounding")
    glyph_min_score: float = field(0.95, "glyph detector: minimum recogniser probability (0-1) that a candidate "
                                        "is a marker glyph")
    glyph_accept: list[str] = field(GLYPH_ACCEPT, "glyph detector: what a candidate must read as "
                                                  "(case-insensitive); its score is the recogniser's probability "
                                                  "on these strings' characters")
    max_box_fraction: float = field(0.25, "drop boxes larger than this fraction of the image in both width and "
                                          "height (DBNet sometimes boxes the whole film)")
    recognize: bool = field(True, "read the text in each box (needed for --keep-markers / --erase-pattern)")
    ocr_threads: int = field(0, "onnxruntime threads per process; 0 = library default (all cores)")
    keep_markers: bool = field(False, "keep laterality markers (L/R, D/I, Sx/Dx) and erase everything else")
    marker_pattern: str = field(MARKER_PATTERN, "regex (case-insensitive, on the stripped text) that counts as a "
                                                "marker for --keep-markers")
    erase_pattern: str | None = field(None, "if set, erase only boxes whose recognised text matches this regex "
                                            "(case-insensitive search); others are kept")
    # de-identify (textremoval/deid/)
    deidentify: bool = field(False, "DICOM only: also de-identify the header with the PS3.15 Basic Application Level "
                                    "Confidentiality Profile (dicom-anonymizer), private tags removed and UIDs "
                                    "remapped consistently within the run; the patient's name, ID and other header "
                                    "identifiers are always erased from the pixels (even under --keep-markers); "
                                    "BurnedInAnnotation=NO only when the verify pass read nothing left; outputs named "
                                    "by a keyed hash (input names can hold PHI; input->output only in --mapping-out); "
                                    "files that need a human look go to OUT/needs_review/ and the CLI exits 3; masks "
                                    "are filled boxes; per-run audit in deid_audit.csv/.json beside the outputs (tag "
                                    "names, never old values)")
    deid_retain_dates: bool = field(True, "de-identify: Retain Longitudinal Temporal Information, Modified Dates "
                                          "Option: dates move back by one per-patient number of days (1-3650), "
                                          "times are kept; false = dates removed as the Basic Profile says")
    deid_retain_patient_characteristics: bool = field(True, "de-identify: Retain Patient Characteristics Option "
                                                            "(sex, age, size, weight, ... kept)")
    deid_clean_descriptors: bool = field(False, "de-identify: Clean Descriptors Option (opt-in, a risk): study/series "
                                                "descriptions, comments and the SR/ContentSequence text are kept, with "
                                                "header names, IDs, addresses and every date cut out "
                                                "(deid/scrubber.py). A scrubber is never perfect; false = the Basic "
                                                "Profile removes them",
                                         aliases=("--clean-descriptors",))
    deid_contrast: bool = field(True, "de-identify: detect, segment and re-read on a contrast-equalised (CLAHE) view, "
                                      "so faint text (25 grey levels over its background) is erased or flagged "
                                      "like bold text; false = the plain min-max view")
    deid_verify: bool = field(True, "de-identify: OCR the cleaned image again; any box still found there (other "
                                    "than kept markers, whatever its OCR score) flags the file for review; false = "
                                    "no check, so BurnedInAnnotation stays YES")
    deid_secret: str | None = field(None, "de-identify: key for the new UIDs, pseudonymous patient IDs, output "
                                          "names and date shifts; the same key gives the same values across runs "
                                          "(keep it as private as the originals). 'file:PATH' reads it from a file; "
                                          "unset = the SYNTHCXR_DEID_SECRET environment variable, else a random "
                                          "key per run (which cannot be resumed into the same --out)")
    # segment
    segmenter: str = field("auto", "auto (sam if --sam-checkpoint else glyph) | glyph (threshold inside box) | "
                                   "box (whole box) | sam (Segment Anything box prompts)")
    sam_checkpoint: str | None = field(None, "SAM weights (.pth loaded with weights_only=True, or .safetensors)")
    sam_model_type: str = field("vit_b", "SAM size matching the checkpoint: vit_b | vit_l | vit_h")
    label_plates: bool = field(True, "glyph segmenter: when text sits on a uniform plate (a white or black box, "
                                     "maybe outlined) that contrasts with its surroundings, mask the whole plate "
                                     "and outline too, so no blank box is left (textremoval/plates.py)")
    plate_tolerance: float = field(20.0, "label plates: grey levels (0-255) a plate pixel may differ from the "
                                         "plate's fill level")
    plate_contrast: float = field(40.0, "label plates: minimum grey-level difference between the fill and what "
                                        "lies outside the plate")
    plate_max_growth: float = field(0.5, "label plates: how far (fraction of the box's width/height, per side) "
                                         "a plate may reach beyond the text box; larger plates are left alone")
    dilate: int = field(3, "grow the mask by this many pixels so glyph edges and halos are covered")
    # inpaint
    inpainter: str = field("telea", "telea | ns (OpenCV, fast, offline) | sd (Stable Diffusion inpainting)")
    inpaint_radius: int = field(5, "OpenCV inpainting neighbourhood radius (px)")
    sd_model: str = field(DEFAULT_INPAINT_MODEL, "diffusers inpainting model: hub id or local folder")
    sd_lora: str | None = field(None, "optional CXR LoRA folder (safetensors) loaded into the inpainting model")
    sd_prompt: str = field("chest x-ray, no text", "prompt for SD inpainting")
    sd_steps: int = field(25, "SD inpainting denoising steps")
    sd_guidance: float = field(7.5, "SD classifier-free guidance scale")
    sd_resolution: int = field(0, "SD crop size (px); 0 = the model's native resolution")
    seed: int = field(0, "random seed for SD inpainting")
    device: str = field("auto", "torch device for SAM/SD: auto | cpu | cuda | mps | xpu")
    precision: str = field("auto", "torch dtype for SAM/SD: auto | fp32 | fp16 | bf16")


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{flag} {value!r} is not one of {', '.join(choices)} — pick one of those")


def check_config(cfg: TextRemovalConfig) -> None:
    """Raise UserError for a setting that would otherwise fail per image or inside a worker (an unknown
    inpainter, a regex that does not compile, a missing SAM checkpoint), before any model loads or file is written."""
    _choice("--detector", cfg.detector, DETECTOR_NAMES)
    _choice("--segmenter", cfg.segmenter, SEGMENTERS)
    _choice("--inpainter", cfg.inpainter, INPAINTERS)
    _choice("--sam-model-type", cfg.sam_model_type, SAM_MODEL_TYPES)
    for flag, pattern in (("--erase-pattern", cfg.erase_pattern), ("--marker-pattern", cfg.marker_pattern)):
        try:
            re.compile(pattern or "", re.IGNORECASE)
        except re.error as exc:
            raise UserError(f"{flag} {pattern!r} is not a valid regular expression ({exc}) — fix it, "
                            f"e.g. escape special characters with a backslash") from None
    if cfg.segmenter == "sam" and not cfg.sam_checkpoint:
        raise UserError("--segmenter sam needs --sam-checkpoint PATH (or use --segmenter glyph)")
    if cfg.sam_checkpoint and not Path(cfg.sam_checkpoint).is_file():
        raise MissingFileError(f"--sam-checkpoint {cfg.sam_checkpoint} not found — download sam_{cfg.sam_model_type}"
                               f"_*.pth from the segment-anything release page and pass its path")
    if cfg.deidentify and not cfg.recognize:
        raise UserError("--deidentify needs --recognize true: identifiers are found by reading the text")

"""Remove burnt-in text from X-rays: `TextRemover` (detect -> segment -> inpaint), `clean_image`,
`clean_file`, and the batch CLI `python -m textremoval.clean INPUT... --out DIR`.

Per image the CLI writes the cleaned image (same format as the input; DICOM keeps its tags and gets
BurnedInAnnotation=NO), `<name>.mask.png` and `<name>.regions.json`. The JSON is written last, so its
presence marks an image as done and a rerun resumes where the last one stopped. With `--deidentify` the
DICOM header goes through `deidentify.py` as well, header identifiers are always erased from the pixels,
and the run writes `deid_audit.csv/.json` (`audit.py`)."""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import glob
import json
import logging
import multiprocessing as mp
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from cxrcommon.atomic import atomic_path, atomic_write_text
from cxrcommon.config import build_parser, from_dict, load_yaml, to_dict
from cxrcommon.optional import MissingPackageError

from . import audit
from .config import TextRemovalConfig
from .deidentify import (PROFILE_TABLE, HeaderResult, Pseudonymizer, deidentify_dataset, finish_dataset,
                         new_secret, normalize, reads_as_identifier)
from .detect import TextRegion, build_detector, to_uint8_view
from .inpaint import build_inpainter, paste
from .segment import build_segmenter, polygon_mask

log = logging.getLogger(__name__)
RASTER = {".png", ".jpg", ".jpeg"}
VERIFY_MIN_SCORE = 0.5  # recogniser confidence from which text read in a cleaned image counts as left behind
NOTE = "burnt-in text removed by synthcxr textremoval (OCR + inpainting)"
DICOM = {".dcm", ".dicom"}
SUFFIXES = RASTER | DICOM


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
        return cls(build_detector(cfg), build_segmenter(cfg), build_inpainter(cfg), cfg)

    def __call__(self, image: np.ndarray, *, view: np.ndarray | None = None,
                 regions: list[TextRegion] | None = None, identifiers: Sequence[str] = ()) -> CleanResult:
        """Clean one image. `view`: an 8-bit display version for detection (e.g. a windowed DICOM);
        `regions`: skip detection and use these (e.g. boxes edited by a user); `identifiers`: strings
        from the DICOM header (patient name, ID, ...): a box that reads as one is erased, marker or not."""
        if image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
            raise ValueError(f"expected a 2-D grayscale or H×W×C image, got shape {image.shape}")
        t = {"detect": time.perf_counter()}
        gray = to_uint8_view(image if view is None else view)
        regions = self.detector(gray) if regions is None else regions
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

    def residual_text(self, cleaned: np.ndarray, kept: Sequence[TextRegion]) -> list[TextRegion]:
        """Text the detector still reads in a cleaned image, outside the boxes kept on purpose."""
        gray = to_uint8_view(cleaned)
        keep = np.zeros(gray.shape, bool)
        for r in kept:
            keep[r.box[1]:r.box[3], r.box[0]:r.box[2]] = True
        return [r for r in self.detector(gray) if r.action == "erased" and len(normalize(r.text)) >= 2
                and r.text_score >= VERIFY_MIN_SCORE and keep[r.box[1]:r.box[3], r.box[0]:r.box[2]].mean() < 0.5]


_REMOVERS: dict[str, TextRemover] = {}


def get_remover(config: TextRemovalConfig | None = None) -> TextRemover:
    """A TextRemover per distinct config, built on first use and reused (models stay loaded)."""
    cfg = config or TextRemovalConfig()
    key = json.dumps(to_dict(cfg), sort_keys=True)
    if key not in _REMOVERS:
        _REMOVERS[key] = TextRemover.from_config(cfg)
    return _REMOVERS[key]


def clean_image(image: np.ndarray, config: TextRemovalConfig | None = None) -> CleanResult:
    """Remove burnt-in text from one array (any dtype; 2-D or H×W×C). Used by the app and the generator."""
    return get_remover(config)(image)


# ---------------------------------------------------------------- files

def read_for_cleaning(path: Path) -> tuple[np.ndarray, np.ndarray | None, Any]:
    """(pixels to clean in their stored dtype, 8-bit view for detection or None, DICOM dataset or None)."""
    from cxrcommon.imageio import ImageReadError, read_dicom

    suffix = path.suffix.lower()
    if suffix in DICOM:
        arr, ds = read_dicom(path)
        frames, samples = int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("SamplesPerPixel", 1) or 1)
        if frames > 1 or samples != 1:
            what = f"{frames} frames" if frames > 1 else f"colour ({samples} samples per pixel)"
            raise ImageReadError(f"{path}: {what} DICOM is not supported; split it into single-frame grayscale "
                                 "files first (e.g. with highdicom or dcmtk) and clean those")
        return arr, to_uint8_view(arr), ds
    if suffix not in RASTER:
        raise ImageReadError(f"{path}: unsupported file type {suffix!r}; give PNG, JPEG or DICOM (.dcm) files")
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        raise ImageReadError(f"{path}: not a readable image (truncated or corrupt?); re-export it or remove it")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]  # alpha carries no anatomy
    return arr, None, None


def write_like(path: Path, arr: np.ndarray, ds: Any) -> None:
    """Write in the input's format: DICOM with its own tags, else PNG/JPEG by suffix (atomically)."""
    if ds is not None:
        from cxrcommon.imageio import write_dicom_like
        write_dicom_like(path, ds, arr, note=NOTE)
        return
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), arr):
            raise OSError(f"could not write {path}")


def output_paths(out_dir: Path, rel: Path) -> dict[str, Path]:
    stem = out_dir / rel.with_suffix("")
    return {"image": out_dir / rel, "mask": Path(f"{stem}.mask.png"), "json": Path(f"{stem}.regions.json")}


def write_deidentified(path: Path, arr: np.ndarray, header: HeaderResult, pixels_clean: bool) -> None:
    """The cleaned pixels in the de-identified header, with the method tags and a fresh file meta."""
    import pydicom
    from cxrcommon.imageio import write_dicom_like

    with atomic_path(path) as tmp:
        write_dicom_like(tmp, header.dataset, arr, note=NOTE)
        ds = pydicom.dcmread(tmp)
        finish_dataset(ds, header, pixels_clean)
        ds.save_as(tmp, enforce_file_format=True)


def clean_verified(remover: TextRemover, arr: np.ndarray, view: np.ndarray | None,
                   idents: Sequence[str]) -> tuple[CleanResult, list[TextRegion]]:
    """Clean, then (with deid_verify) OCR the result and erase what is still read there (remnants of
    half-masked glyphs, text the first pass missed) in one more pass. Returns the result and the text
    still read after that, which sends the file to review."""
    res = remover(arr, view=view, identifiers=idents)
    if not (remover.config.deidentify and remover.config.deid_verify):
        return res, []
    kept = [r for r in res.regions if r.action == "kept"]
    left = remover.residual_text(res.image, kept)
    if left:
        again = remover(res.image, regions=left, identifiers=idents)
        seconds = {k: round(v + again.seconds[k], 4) for k, v in res.seconds.items()}
        res = CleanResult(again.image, res.mask | again.mask, res.regions + again.regions, seconds)
        left = remover.residual_text(res.image, kept)
    return res, left


def pixel_review(remover: TextRemover, res: CleanResult, left: Sequence[TextRegion], idents: Sequence[str],
                 rel: Path) -> list[str]:
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
    if idents and reads_as_identifier(str(rel), idents):
        reasons.append("the file name holds a header identifier; rename the output before sharing")
    return reasons


def _process_pseudonymizer(cfg: TextRemovalConfig) -> Pseudonymizer:
    """One Pseudonymizer per key in this process (a random key when none is configured)."""
    key = cfg.deid_secret or _WORKER.setdefault("secret", new_secret())
    if _WORKER.get("pseudo_key") != key:
        _WORKER["pseudo"], _WORKER["pseudo_key"] = Pseudonymizer(key), key
    return _WORKER["pseudo"]


def clean_file(path: str | Path, out_dir: str | Path, config: TextRemovalConfig | None = None, *,
               rel: str | Path | None = None, remover: TextRemover | None = None) -> dict[str, Any]:
    """Clean one file into `out_dir` (cleaned image, mask PNG, regions JSON). Returns the JSON record;
    with `deidentify`, also under "mapping" the old->new identifiers it used (PHI: not in the JSON)."""
    path, out_dir = Path(path), Path(out_dir)
    rel = Path(rel or path.name)
    paths = output_paths(out_dir, rel)
    remover = remover or get_remover(config)
    cfg = remover.config
    arr, view, ds = read_for_cleaning(path)
    header = None
    if cfg.deidentify and ds is not None:  # before any write: a header that fails leaves nothing behind
        pseudo = _process_pseudonymizer(cfg)
        pseudo.mapping.clear()
        header = deidentify_dataset(ds, cfg, pseudo, source=str(path))
    idents = header.identifiers if header else []
    res, left = clean_verified(remover, arr, view, idents)
    review = pixel_review(remover, res, left, idents, rel) if cfg.deidentify else []
    if header is not None:
        write_deidentified(paths["image"], res.image, header, pixels_clean=not review)
    else:
        write_like(paths["image"], res.image, ds)
    with atomic_path(paths["mask"]) as tmp:
        cv2.imwrite(str(tmp), res.mask.astype(np.uint8) * 255)
    regions = res.regions_json()
    record = {"input": str(path), "output": str(paths["image"]), "mask": str(paths["mask"]),
              "shape": list(arr.shape), "dtype": str(arr.dtype), "masked_pixels": int(res.mask.sum()),
              "seconds": res.seconds, "regions": regions}
    if cfg.deidentify:
        for r in regions:  # erased text may be PHI (names, dates): keep only that it was there
            if r["action"] == "erased":
                r["text"] = ""
        record["deidentify"] = audit.file_entry(header, res.regions, review)
    atomic_write_text(paths["json"], json.dumps(record, indent=1))  # last: marks the image as done
    return {**record, "mapping": header.mapping} if header else record


def expand_inputs(inputs: Sequence[str]) -> list[tuple[Path, Path]]:
    """(file, name relative to the output folder) for files, folders (recursive) and glob patterns."""
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += [(f, f.relative_to(p)) for f in sorted(p.rglob("*")) if f.suffix.lower() in SUFFIXES]
        elif p.is_file():
            found.append((p, Path(p.name)))
        else:
            hits = sorted(Path(h) for h in glob.glob(item, recursive=True) if Path(h).is_file())
            if not hits:
                log.warning("input %s matched no file or folder; check the path or quote the glob", item)
            found += [(h, Path(h.name)) for h in hits]
    seen: dict[Path, Path] = {}
    for f, rel in found:
        if rel in seen and seen[rel] != f:
            raise ValueError(f"{f} and {seen[rel]} would both be written as {rel}; clean them into separate --out folders")
        seen[rel] = f
    return list(dict.fromkeys(found))


_WORKER: dict[str, Any] = {}


def _init_worker(cfg: TextRemovalConfig) -> None:
    _WORKER["remover"] = TextRemover.from_config(cfg)


def _run_one(job: tuple[Path, Path, Path]) -> tuple[str, str, dict]:
    path, rel, out_dir = job
    try:
        rec = clean_file(path, out_dir, rel=rel, remover=_WORKER["remover"])
        status = "review" if rec.get("deidentify", {}).get("review") else "ok"
        return str(path), f"{status} {sum(r['action'] == 'erased' for r in rec['regions'])} erased", \
            rec.get("mapping", {})
    except Exception as exc:  # one bad file must not stop the batch
        return str(path), f"error {type(exc).__name__}: {exc}", {}


def clean(inputs: Sequence[str], out_dir: str | Path, config: TextRemovalConfig | None = None,
          *, workers: int = 1, overwrite: bool = False, mapping_out: str | Path | None = None) -> dict[str, list[str]]:
    """Clean many files; skip those already done (unless `overwrite`) and log bad ones. With
    `config.deidentify`, also write the run's audit and, only if `mapping_out` is given, the old->new
    identifier mapping there.

    Returns {"done": [...], "skipped": [...], "failed": ["file: reason", ...], "review": [...]}."""
    cfg = config or TextRemovalConfig()
    if cfg.deidentify and not cfg.recognize:
        raise ValueError("--deidentify needs --recognize true: identifiers are found by reading the text")
    if mapping_out is not None and not cfg.deidentify:
        raise ValueError("--mapping-out only applies with --deidentify")
    if cfg.deidentify and not cfg.deid_secret:  # one key for every worker of the run, so UIDs link up
        cfg = dataclasses.replace(cfg, deid_secret=new_secret())
    out_dir = Path(out_dir)
    files = expand_inputs(inputs)
    summary: dict[str, list[str]] = {"done": [], "skipped": [], "failed": [], "review": []}
    mapping: dict[tuple[str, str], str] = {}
    todo = []
    for f, rel in files:
        if not overwrite and output_paths(out_dir, rel)["json"].is_file():
            summary["skipped"].append(str(f))
        else:
            todo.append((f, rel, out_dir))
    if summary["skipped"]:
        log.info("resuming: %d of %d image(s) already done in %s", len(summary["skipped"]), len(files), out_dir)
        if cfg.deidentify and config is not None and not config.deid_secret:
            log.warning("--deidentify without --deid-secret: this run's new UIDs and date shifts will not match "
                        "those of the files already done")
    if not todo:
        return summary
    if workers > 1:  # one single-threaded ONNX session per process: half the CPU of oversubscribed threads
        worker_cfg = dataclasses.replace(cfg, ocr_threads=cfg.ocr_threads or 1)
        pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                      initializer=_init_worker, initargs=(worker_cfg,))
        results = pool.map(_run_one, todo)
    else:
        pool = None
        if _WORKER.get("remover") is None or _WORKER["remover"].config != cfg:
            _WORKER["remover"] = get_remover(cfg)
        results = map(_run_one, todo)
    try:
        for path, status, used in tqdm(results, total=len(todo), desc="textremoval", unit="img"):
            mapping.update(used)
            if not status.startswith("error"):
                summary["done"].append(path)
                if status.startswith("review"):
                    summary["review"].append(path)
            else:
                log.error("skipping %s: %s", path, status[len("error "):])
                summary["failed"].append(f"{path}: {status[len('error '):]}")
    finally:
        if pool is not None:
            pool.shutdown()
    if cfg.deidentify:
        settings = {k: v for k, v in to_dict(cfg).items() if k.startswith("deid") and k != "deid_secret"}
        audit.write_audit(out_dir, summary["failed"], {**settings, "profile": f"dicom-anonymizer {PROFILE_TABLE}"})
        if mapping_out is not None:
            audit.write_mapping(mapping_out, mapping)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    from cxrcommon.logs import setup_logging

    parser = build_parser(TextRemovalConfig, "Remove burnt-in text (markers, PORTABLE, dates, kV/mAs) from "
                                              "X-ray images: OCR detection, glyph/SAM masks, inpainting.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or globs; "
                        "PNG, JPEG or DICOM")
    parser.add_argument("--out", type=Path, required=True, help="output folder (cleaned images, masks, JSON)")
    parser.add_argument("--workers", type=int, default=1, help="processes; 2 uses both cores of a 2-core CPU "
                        "(each loads its own models and, unless --ocr-threads is set, runs OCR on 1 thread)")
    parser.add_argument("--overwrite", action="store_true", help="redo images that already have output")
    parser.add_argument("--mapping-out", type=Path, default=None, help="with --deidentify: write the old->new "
                        "identifier mapping (UIDs, patient IDs, date shifts) to this CSV. It is PHI itself: keep it "
                        "away from the cleaned files; without this flag it is never written")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = vars(parser.parse_args(argv))
    setup_logging(args.pop("verbose"))
    cli = {k: args.pop(k) for k in ("inputs", "out", "workers", "overwrite", "mapping_out")}
    cfg_path = args.pop("config")
    data = load_yaml(cfg_path) if cfg_path else {}
    data.update(args)
    cfg = from_dict(TextRemovalConfig, data, source=str(cfg_path or "command line"))
    try:
        summary = clean(cli["inputs"], cli["out"], cfg, workers=cli["workers"], overwrite=cli["overwrite"],
                        mapping_out=cli["mapping_out"])
    except (FileNotFoundError, MissingPackageError, ValueError) as exc:  # a user mistake: one line, the fix
        raise SystemExit(f"error: {exc}") from exc
    log.info("done %d, skipped (already done) %d, failed %d; outputs in %s", len(summary["done"]),
             len(summary["skipped"]), len(summary["failed"]), cli["out"])
    for line in summary["failed"]:
        log.error("failed: %s", line)
    for path in summary["review"]:
        log.warning("needs review (BurnedInAnnotation=YES, reasons in %s): %s", audit.AUDIT_CSV, path)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

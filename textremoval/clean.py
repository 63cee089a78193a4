"""Remove burnt-in text from X-rays: `TextRemover` (detect -> segment -> inpaint), `clean_image`,
`clean_file`, and the batch CLI `python -m textremoval.clean INPUT... --out DIR`.

Per image the CLI writes the cleaned image (same format as the input; DICOM keeps its tags and gets
BurnedInAnnotation=NO), `<name>.mask.png` and `<name>.regions.json`. The JSON is written last, so its
presence marks an image as done and a rerun resumes where the last one stopped. With `--deidentify` the
DICOM header goes through `deidentify.py` as well, header identifiers are always erased from the pixels,
outputs are named and written as `deid_files.py` says (keyed names, needs_review/, box masks), and the run
writes `deid_audit.csv/.json` (`audit.py`)."""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from cxrcommon.atomic import atomic_path, atomic_write_text, remove_stale_temps
from cxrcommon.cli import cli_entry
from cxrcommon.config import build_parser, from_dict, load_yaml, to_dict
from cxrcommon.errors import ImageReadError, MissingFileError, UserError
from cxrcommon.limits import check_image_file
from cxrcommon.paths import check_out_dir

from . import audit, deid_files
from .config import TextRemovalConfig, check_config
from .deidentify import (PROFILE_TABLE, Pseudonymizer, deidentify_dataset, new_secret, normalize,
                         reads_as_identifier, resolve_secret, settings_fingerprint)
from .detect import TextRegion, build_detector, to_uint8_view
from .inpaint import build_inpainter, paste
from .pool import orphan_safe_pool
from .segment import build_segmenter, polygon_mask

log = logging.getLogger(__name__)
RASTER = {".png", ".jpg", ".jpeg"}
VERIFY_ROUNDS = 2  # --deid-verify: erase-and-look-again rounds before a file is sent to review
NOTE = "burnt-in text removed by synthcxr textremoval (OCR + inpainting)"
DICOM = {".dcm", ".dicom"}
SUFFIXES = RASTER | DICOM
EXIT_REVIEW = 3  # --deidentify: some file needs a human look (it is under OUT/needs_review/)
OUTPUT_SUFFIXES = (".mask.png", ".regions.json")  # what a run writes beside each image: never an input


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
        """Every box the detector still finds in a cleaned image, outside the boxes kept on purpose and other
        than a side marker kept by policy, whatever its recognition score (a remnant reads badly)."""
        gray = to_uint8_view(cleaned)
        keep = np.zeros(gray.shape, bool)
        for r in kept:
            keep[r.box[1]:r.box[3], r.box[0]:r.box[2]] = True
        marker = re.compile(self.config.marker_pattern, re.IGNORECASE)
        return [r for r in self.detector(gray) if not (r.action == "kept" and marker.fullmatch(normalize(r.text)))
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


# ---------------------------------------------------------------- files

def read_for_cleaning(path: Path) -> tuple[np.ndarray, np.ndarray | None, Any]:
    """(pixels to clean in their stored dtype, 8-bit view for detection or None, DICOM dataset or None)."""
    from cxrcommon.imageio import read_dicom

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
    arr = cv2.imread(str(check_image_file(path)), cv2.IMREAD_UNCHANGED)
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


def clean_verified(remover: TextRemover, arr: np.ndarray, view: np.ndarray | None,
                   idents: Sequence[str]) -> tuple[CleanResult, list[TextRegion]]:
    """Clean, then (with deid_verify) look at the result again and erase any box still found there (remnants
    of half-masked glyphs, text the first pass missed), up to VERIFY_ROUNDS times. Returns the result and
    the boxes still found after that, which send the file to review."""
    res = remover(arr, view=view, identifiers=idents)
    if not (remover.config.deidentify and remover.config.deid_verify):
        return res, []
    kept = [r for r in res.regions if r.action == "kept"]
    left = remover.residual_text(res.image, kept)
    for _ in range(VERIFY_ROUNDS):
        if not left:
            break
        again = remover(res.image, regions=left, identifiers=idents)
        seconds = {k: round(v + again.seconds[k], 4) for k, v in res.seconds.items()}
        res = CleanResult(again.image, res.mask | again.mask, res.regions + again.regions, seconds)
        left = remover.residual_text(res.image, kept)
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


def _process_pseudonymizer(secret: str | None) -> Pseudonymizer:
    """One Pseudonymizer per key in this process (a random key when none is given)."""
    key = secret or _WORKER.setdefault("secret", new_secret())
    if _WORKER.get("pseudo_key") != key:
        _WORKER["pseudo"], _WORKER["pseudo_key"] = Pseudonymizer(key), key
    return _WORKER["pseudo"]


def clean_file(path: str | Path, out_dir: str | Path, config: TextRemovalConfig | None = None, *,
               rel: str | Path | None = None, remover: TextRemover | None = None,
               pseudo: Pseudonymizer | None = None) -> dict[str, Any]:
    """Clean one file into `out_dir` (cleaned image, mask PNG, regions JSON). Returns the JSON record.
    With `deidentify`, `write_deidentified` writes instead, and the record also carries under "mapping"
    the old->new identifiers it used (PHI: not in the JSON); `pseudo` holds the run's key (default: the
    config's --deid-secret, else a random key per process)."""
    path, out_dir = Path(path), Path(out_dir)
    rel = Path(rel or path.name)
    remover = remover or get_remover(config)
    cfg = remover.config
    if cfg.deidentify:
        pseudo = pseudo or _process_pseudonymizer(resolve_secret((config or cfg).deid_secret))
        return write_deidentified(path, out_dir, rel, remover, pseudo)
    paths = output_paths(out_dir, rel)
    arr, view, ds = read_for_cleaning(path)
    res, _ = clean_verified(remover, arr, view, [])
    write_like(paths["image"], res.image, ds)
    with atomic_path(paths["mask"]) as tmp:
        if not cv2.imwrite(str(tmp), res.mask.astype(np.uint8) * 255):
            raise OSError(f"could not write {paths['mask']}")
    record = {"input": str(path), "output": str(paths["image"]), "mask": str(paths["mask"]),
              "shape": list(arr.shape), "dtype": str(arr.dtype), "masked_pixels": int(res.mask.sum()),
              "seconds": res.seconds, "regions": res.regions_json(), "settings": settings_fingerprint(cfg, None)}
    atomic_write_text(paths["json"], json.dumps(record, indent=1))  # last: marks the image as done
    return record


def write_deidentified(path: Path, out_dir: Path, rel: Path, remover: TextRemover,
                       pseudo: Pseudonymizer) -> dict[str, Any]:
    """clean_file under --deidentify: outputs named by a keyed hash of `rel` (input->output only in the
    mapping), under needs_review/ when a person must look, mask as boxes, region texts blanked but for
    side markers, BurnedInAnnotation=NO only when the verify pass read nothing; all files written together."""
    cfg = remover.config
    pseudo.mapping.clear()
    name = pseudo.file_name(rel)
    arr, view, ds = read_for_cleaning(path)
    # before any write: a header that fails leaves nothing behind
    header = deidentify_dataset(ds, cfg, pseudo, source=name.name) if ds is not None else None
    idents = header.identifiers if header else []
    res, left = clean_verified(remover, arr, view, idents)
    review = pixel_review(remover, res, left, idents)
    pixels_clean = cfg.deid_verify and not review
    folder = out_dir / deid_files.REVIEW_DIR if review else out_dir
    paths = output_paths(folder, name)
    regions = res.regions_json()
    deid_files.blank_texts(regions, cfg.marker_pattern)
    record = {"input": name.name, "output": str(paths["image"]), "mask": str(paths["mask"]),
              "shape": list(arr.shape), "dtype": str(arr.dtype), "masked_pixels": int(res.mask.sum()),
              "seconds": res.seconds, "regions": regions, "settings": settings_fingerprint(cfg, pseudo),
              "deidentify": audit.file_entry(header, res.regions, review, pixels_clean)}
    image = deid_files.dicom_bytes(res.image, header, pixels_clean, NOTE) if header else \
        deid_files.image_bytes(res.image, name.suffix)
    mask = deid_files.image_bytes(deid_files.box_mask(res.mask, res.regions).astype(np.uint8) * 255, ".png")
    deid_files.write_together([(paths["image"], image), (paths["mask"], mask),
                               (paths["json"], json.dumps(record, indent=1).encode("utf-8"))])
    other = out_dir if review else out_dir / deid_files.REVIEW_DIR  # an earlier run's verdict, now stale
    for p in output_paths(other, name).values():
        p.unlink(missing_ok=True)
    return {**record, "mapping": dict(pseudo.mapping)}


def is_input_image(path: Path) -> bool:
    """A file a folder or glob contributes: an image suffix, not a hidden (e.g. temp) file, and not one of
    the masks or JSON a run writes, so a rerun never cleans its own outputs (`a.mask.mask.png`)."""
    name = path.name.lower()
    return path.suffix.lower() in SUFFIXES and not name.startswith(".") and not name.endswith(OUTPUT_SUFFIXES)


def expand_inputs(inputs: Sequence[str]) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """((file, name relative to the output folder), the folders/files/glob hits they came from) for files,
    folders (recursive) and glob patterns. A path that matches nothing, or inputs holding no image at
    all, is a UserError naming it."""
    found: list[tuple[Path, Path]] = []
    roots: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            roots.append(p)
            found += [(f, f.relative_to(p)) for f in sorted(p.rglob("*")) if f.is_file() and is_input_image(f)]
        elif p.is_file():
            roots.append(p)
            found.append((p, Path(p.name)))
        else:
            hits = sorted(Path(h) for h in glob.glob(item, recursive=True) if Path(h).is_file())
            if not hits:
                raise MissingFileError(f"input {item} does not exist and matches no file — check the path "
                                       f"(or quote a glob pattern so the shell does not expand it)")
            roots += hits
            found += [(h, Path(h.name)) for h in hits if is_input_image(h)]
    if not found:
        raise UserError(f"no PNG, JPEG or DICOM images in {', '.join(inputs)} (outputs *.mask.png / "
                        f"*.regions.json are not inputs) — pass image files or a folder holding them")
    seen: dict[Path, Path] = {}
    for f, rel in found:
        if rel in seen and seen[rel] != f:
            raise UserError(f"{f} and {seen[rel]} would both be written as {rel} — clean them into separate "
                            f"--out folders")
        seen[rel] = f
    return list(dict.fromkeys(found)), roots


_WORKER: dict[str, Any] = {}


def _init_worker(cfg: TextRemovalConfig) -> None:
    _WORKER["remover"] = TextRemover.from_config(cfg)


def _run_one(job: tuple[Path, Path, Path, str | None, str]) -> tuple[str, str, dict]:
    """(label, status, mapping) of one file; `label` names it in logs and the summary (under --deidentify
    its output name, never the input's, which may hold the patient's name)."""
    path, rel, out_dir, secret, label = job
    try:
        pseudo = _process_pseudonymizer(secret) if secret else None
        rec = clean_file(path, out_dir, rel=rel, remover=_WORKER["remover"], pseudo=pseudo)
        status = "review" if rec.get("deidentify", {}).get("review") else "ok"
        return label, f"{status} {sum(r['action'] == 'erased' for r in rec['regions'])} erased", \
            rec.get("mapping", {})
    except Exception as exc:  # one bad file must not stop the batch
        return label, f"error {type(exc).__name__}: {str(exc).replace(str(path), label)}", {}


def clean(inputs: Sequence[str], out_dir: str | Path, config: TextRemovalConfig | None = None,
          *, workers: int = 1, overwrite: bool = False, mapping_out: str | Path | None = None) -> dict[str, list[str]]:
    """Clean many files; skip those already done (unless `overwrite`) and log bad ones. With
    `config.deidentify`, also write the run's audit and, only if `mapping_out` is given, the old->new
    identifier mapping there.

    Returns {"done": [...], "skipped": [...], "failed": ["file: reason", ...], "review": [...]}, files named
    by their input path, or under `deidentify` by their output name (input names may hold PHI)."""
    cfg = config or TextRemovalConfig()
    check_config(cfg)  # every argument is checked before anything loads or is written
    if mapping_out is not None and not cfg.deidentify:
        raise UserError("--mapping-out only applies with --deidentify — add --deidentify or drop --mapping-out")
    if workers < 1:
        raise UserError(f"--workers {workers}: give 1 or more")
    files, roots = expand_inputs(inputs)
    out_dir = check_out_dir(out_dir, roots, flag="--out")
    if mapping_out is not None:
        check_out_dir(Path(mapping_out).parent, flag="--mapping-out")
        if Path(mapping_out).resolve().is_relative_to(out_dir.resolve()):
            raise UserError(f"--mapping-out {mapping_out} is inside --out {out_dir}: the mapping is PHI — write it "
                            "outside the folder you share")
    # one key for every worker of the run, so UIDs link up; the remover's config never holds it
    secret = (resolve_secret(cfg.deid_secret) or new_secret()) if cfg.deidentify else None
    pseudo = Pseudonymizer(secret) if secret else None
    cfg = dataclasses.replace(cfg, deid_secret=None)
    deid_files.check_resume(out_dir, settings_fingerprint(cfg, pseudo))
    if out_dir.is_dir() and (removed := remove_stale_temps(out_dir)):
        log.info("removed %d temp file(s) left in %s by an interrupted run", removed, out_dir)
    summary: dict[str, list[str]] = {"done": [], "skipped": [], "failed": [], "review": []}
    mapping: dict[tuple[str, str], str] = {}
    todo = []
    for f, rel in files:
        name = pseudo.file_name(rel) if pseudo else rel
        label = name.name if pseudo else str(f)
        review_json = output_paths(out_dir / deid_files.REVIEW_DIR, name)["json"]
        if not overwrite and (output_paths(out_dir, name)["json"].is_file() or review_json.is_file()):
            summary["skipped"].append(label)
            if review_json.is_file():
                summary["review"].append(label)
        else:
            todo.append((f, rel, out_dir, secret, label))
    if pseudo:
        mapping.update(pseudo.mapping)
    if summary["skipped"]:
        log.info("resuming: %d of %d image(s) already done in %s", len(summary["skipped"]), len(files), out_dir)
    pool, results = None, iter(())  # nothing to do still writes the audit (resumed files included)
    if todo and workers > 1:  # one single-threaded ONNX session per process: half the CPU of oversubscribed threads
        worker_cfg = dataclasses.replace(cfg, ocr_threads=cfg.ocr_threads or 1)
        pool = orphan_safe_pool(workers, _init_worker, (worker_cfg,))
        results = pool.map(_run_one, todo)
    elif todo:
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
        if pool is not None:  # on Ctrl-C or an error, the queued images are dropped, not waited for
            pool.shutdown(cancel_futures=True)
    if cfg.deidentify:
        settings = {k: v for k, v in to_dict(cfg).items() if k.startswith("deid") and k != "deid_secret"}
        audit.write_audit(out_dir, summary["failed"], {**settings, "profile": f"dicom-anonymizer {PROFILE_TABLE}"})
        if mapping_out is not None:
            audit.write_mapping(mapping_out, mapping)
    return summary


@cli_entry
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
                        "mapping (input file -> output name, UIDs, patient IDs, date shifts) to this CSV, mode 0600. "
                        "It is PHI itself: it must lie outside --out; without this flag it is never written")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = vars(parser.parse_args(argv))
    setup_logging(args.pop("verbose"))
    cli = {k: args.pop(k) for k in ("inputs", "out", "workers", "overwrite", "mapping_out")}
    cfg_path = args.pop("config")
    data = load_yaml(cfg_path) if cfg_path else {}
    data.update(args)
    cfg = from_dict(TextRemovalConfig, data, source=str(cfg_path or "command line"))
    summary = clean(cli["inputs"], cli["out"], cfg, workers=cli["workers"], overwrite=cli["overwrite"],
                    mapping_out=cli["mapping_out"])
    log.info("done %d, skipped (already done) %d, failed %d; outputs in %s", len(summary["done"]),
             len(summary["skipped"]), len(summary["failed"]), cli["out"])
    for line in summary["failed"]:
        log.error("failed: %s", line)
    for path in summary["review"]:
        log.warning("needs review (BurnedInAnnotation=YES, reasons in %s): %s", audit.AUDIT_CSV, path)
    return 1 if summary["failed"] else EXIT_REVIEW if summary["review"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The batch runner and CLI of the text pipeline: `python -m textremoval.clean INPUT... --out DIR`.

Per image it writes the cleaned image (same format as the input; DICOM keeps its tags and gets
BurnedInAnnotation=NO), `<name>.mask.png` and `<name>.regions.json`. The JSON is written last, so its
presence marks an image as done and a rerun resumes where the last one stopped. The library is
`remover.TextRemover`; reading, writing and input expansion live in `files`; with `--deidentify` each file
goes through `deid.writer` (header profile, pixel pass, keyed names, needs_review/) and the run writes
`deid_audit.csv/.json` (`deid.audit`)."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from cxrcommon.atomic import atomic_path, atomic_write_text, remove_stale_temps
from cxrcommon.cli import cli_entry
from cxrcommon.config import build_parser, from_dict, load_yaml, to_dict
from cxrcommon.errors import UserError
from cxrcommon.paths import check_out_dir

from .config import TextRemovalConfig, check_config
from .deid import audit
from .deid import files as deid_files
from .deid.pixels import clean_verified
from .deid.profile import DESCRIPTORS_RISK, PROFILE_TABLE, settings_fingerprint
from .deid.pseudonyms import Pseudonymizer, new_secret, resolve_secret
from .deid.writer import write_deidentified
from .files import expand_inputs, output_paths, read_for_cleaning, write_like
from .pool import orphan_safe_pool
from .remover import CleanResult, TextRemover, clean_image, get_remover

__all__ = ["CleanResult", "TextRemover", "clean", "clean_file", "clean_image", "expand_inputs", "main"]
log = logging.getLogger(__name__)
EXIT_REVIEW = 3  # --deidentify: some file needs a human look (it is under OUT/needs_review/)


@dataclass
class FileOutcome:
    """What happened to one input: `label` names it in logs and the summary (under --deidentify its output
    name, never the input's, which may hold the patient's name)."""
    label: str
    status: str                      # "ok" | "review" | "failed"
    erased: int = 0                  # text regions erased
    reason: str = ""                 # why it failed (no PHI: the input path is replaced by the label)
    mapping: dict[tuple[str, str], str] = field(default_factory=dict)  # old -> new identifiers (PHI)


class Worker:
    """One process's remover and pseudonymizer for a batch: set up once per process (the pool's
    initializer, or `setup` in the parent), then `run` per file."""

    def __init__(self) -> None:
        self._remover: TextRemover | None = None
        self._pseudo: Pseudonymizer | None = None
        self.random_key = new_secret()  # this process's key for clean_file calls given none

    def setup(self, cfg: TextRemovalConfig) -> None:
        if self._remover is None or self._remover.config != cfg:
            self._remover = get_remover(cfg)

    @property
    def remover(self) -> TextRemover:
        if self._remover is None:
            raise RuntimeError("Worker.run before Worker.setup: call setup(config) in this process first")
        return self._remover

    def pseudonymizer(self, secret: str) -> Pseudonymizer:
        """One Pseudonymizer per key in this process, so its mapping collects what this process used."""
        if self._pseudo is None or self._pseudo.key != secret.encode("utf-8"):
            self._pseudo = Pseudonymizer(secret)
        return self._pseudo

    def run(self, job: tuple[Path, Path, Path, str | None, str]) -> FileOutcome:
        path, rel, out_dir, secret, label = job
        try:
            pseudo = self.pseudonymizer(secret) if secret else None
            rec = clean_file(path, out_dir, rel=rel, remover=self.remover, pseudo=pseudo)
        except UserError as exc:  # one bad file must not stop the batch
            return FileOutcome(label, "failed", reason=str(exc).replace(str(path), label))
        except Exception as exc:  # a bug or a library's raw error: no text of it (paths, values) in the outcome
            log.debug("%s failed", label, exc_info=True)
            return FileOutcome(label, "failed", reason=f"unexpected {type(exc).__name__} while cleaning it — "
                               "rerun with --verbose for the traceback, and report it if the file opens elsewhere")
        status = "review" if rec.get("deidentify", {}).get("review") else "ok"
        return FileOutcome(label, status, sum(r["action"] == "erased" for r in rec["regions"]),
                           mapping=rec.get("mapping", {}))


_worker = Worker()  # this process's; pool workers set theirs up in _init_worker


def _init_worker(cfg: TextRemovalConfig) -> None:
    _worker.setup(cfg)


def _run_one(job: tuple[Path, Path, Path, str | None, str]) -> FileOutcome:
    return _worker.run(job)


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
        pseudo = pseudo or _worker.pseudonymizer(resolve_secret((config or cfg).deid_secret) or _worker.random_key)
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
    if cfg.deidentify and cfg.deid_clean_descriptors:
        log.warning(DESCRIPTORS_RISK)
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
        _worker.setup(cfg)
        results = map(_run_one, todo)
    try:
        for outcome in tqdm(results, total=len(todo), desc="textremoval", unit="img"):
            mapping.update(outcome.mapping)
            if outcome.status == "failed":
                log.error("skipping %s: %s", outcome.label, outcome.reason)
                summary["failed"].append(f"{outcome.label}: {outcome.reason}")
            else:
                summary["done"].append(outcome.label)
                if outcome.status == "review":
                    summary["review"].append(outcome.label)
    finally:
        if pool is not None:  # on Ctrl-C or an error, the queued images are dropped, not waited for
            pool.shutdown(cancel_futures=True)
    if cfg.deidentify:
        settings = {k: v for k, v in to_dict(cfg).items() if k.startswith("deid") and k != "deid_secret"}
        if cfg.deid_clean_descriptors:
            settings["risk"] = DESCRIPTORS_RISK
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

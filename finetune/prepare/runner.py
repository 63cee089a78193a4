"""The shared preparer: a dataset module's rows -> filters -> images -> manifest.csv + summary + excluded.csv.

Rows stream through; images are made by worker processes in ordered blocks, so memory stays flat and the
manifest keeps the dataset's order. Every file is written atomically (temp + rename): a killed run loses
nothing, and a rerun decodes only the images that are missing. One bad file is listed and skipped."""
from __future__ import annotations

import csv
import functools
import importlib
import itertools
import logging
import multiprocessing
import os
from pathlib import Path
from types import ModuleType
from typing import Iterator

from tqdm import tqdm

from cxrcommon.atomic import atomic_path, remove_stale_temps
from cxrcommon.csv_cells import safe_cell
from cxrcommon.errors import UserError
from cxrcommon.paths import check_out_dir, file_kind

from . import datasets
from .config import PrepareConfig
from .images import prepare_image
from .rows import (
    MANIFEST_COLUMNS,
    Excluded,
    SourceRow,
    apply_labels,
    caption,
    seeded_split,
    split_code,
    view_code,
    view_kept,
)
from .summary import Summary

log = logging.getLogger(__name__)
BLOCK = 256  # images handed to the workers at a time: bounded memory, ordered output


def has_reports(module: ModuleType, cfg: PrepareConfig) -> bool:
    """Whether `report` comes from the dataset's reports (else a caption is built from labels and view)."""
    return module.has_reports(cfg) if hasattr(module, "has_reports") else module.HAS_REPORTS


def check(cfg: PrepareConfig) -> tuple[ModuleType, Path, Path]:
    """(dataset module, dataset root, out folder), or one UserError line; writes nothing."""
    module = datasets.get(cfg.dataset)
    if not cfg.root or not cfg.out:
        raise UserError("give --root (the dataset's download folder) and --out (a new folder for the manifest)")
    root = Path(cfg.root).expanduser()
    if file_kind(root) != "a folder":
        raise UserError(f"--root {root} is not a folder ({file_kind(root)}) — pass the folder the download unpacked to")
    out = check_out_dir(cfg.out, [root])
    if cfg.size < 8:
        raise UserError(f"--size {cfg.size} is too small — use the training resolution, e.g. 512")
    if cfg.resize_mode not in ("pad", "crop"):
        raise UserError(f"--resize-mode {cfg.resize_mode!r} — choose pad or crop")
    if cfg.readers not in ("majority", "any", "all"):
        raise UserError(f"--readers {cfg.readers!r} — choose majority, any or all")
    apply_labels({}, {}, cfg.uncertain)
    seeded_split("", cfg.seed, cfg.val_fraction, cfg.test_fraction)
    caption(cfg.caption_template, "PA", ["x"], cfg.no_finding_text, cfg.dataset)
    try:
        found = module.find_root(root, cfg)
    except UserError as exc:
        raise UserError(_which_dataset(root, cfg) or str(exc)) from None
    return module, found, out


def _which_dataset(root: Path, cfg: PrepareConfig) -> str | None:
    """'this folder holds X, not Y' when another dataset module recognises the root."""
    for name, other in datasets.registry().items():
        if name == cfg.dataset:
            continue
        try:
            other.find_root(root, cfg)
        except Exception:  # noqa: BLE001 - any refusal means "not this one either"
            continue
        return (f"--root {root} holds {name}, not {cfg.dataset} — run `python -m finetune.prepare {name} "
                f"--root {root} ...`, or point --root at the {cfg.dataset} download")
    return None


def manifest_row(row: SourceRow, module: ModuleType, cfg: PrepareConfig, reports: bool) -> dict[str, str]:
    """The manifest's columns for one source row (image path filled in later)."""
    view = view_code(row.view)
    labels, unsure, names = apply_labels(row.labels, module.LABELS, cfg.uncertain)
    report = row.report.strip() if reports else caption(cfg.caption_template, view, names, cfg.no_finding_text,
                                                         module.NAME)
    split = split_code(row.split) or seeded_split(row.patient, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    return {"report": report, "labels": "|".join(labels), "patient": row.patient, "study": row.study,
            "view": view, "sex": row.sex, "age": "" if row.age is None else str(row.age), "race": row.race,
            "split": split, "source": module.NAME, "uncertain": "|".join(unsure)}


def _candidates(module: ModuleType, root: Path, cfg: PrepareConfig, summary: Summary, excluded: csv.writer,
                ) -> Iterator[tuple[SourceRow, dict[str, str]]]:
    """Rows that pass every filter before decoding; each one left out is counted and listed once."""
    wanted = {v.strip().upper() for v in cfg.views}
    reports = has_reports(module, cfg)

    def drop(reason: str, where: str, detail: str = "") -> None:
        summary.exclude(reason)
        excluded.writerow([safe_cell(reason), safe_cell(where), safe_cell(detail)])

    for item in module.rows(root, cfg):
        summary.rows_read += 1
        if isinstance(item, Excluded):
            drop(item.reason, item.where, item.detail)
            continue
        row = manifest_row(item, module, cfg, reports)
        if not view_kept(row["view"], wanted):
            drop(f"view {row['view'] or 'UNKNOWN'} (not in --views)", item.where, str(item.image))
        elif reports and cfg.require_report and not row["report"]:
            drop("no findings/impression text", item.where, str(item.image))
        elif not item.image.is_file():
            drop("image file missing", item.where, str(item.image))
        else:
            yield item, row


def _work(job: tuple[Path, Path], size: int, mode: str, module: str | None) -> tuple[int, str]:
    """(bits, "") or (-1, error) for one image; runs in a worker, so it never raises. `module`: the import
    name of a dataset module whose `read_image` decodes a format only it knows (None: the shared decoder;
    workers then never import dataset modules, nor what those import)."""
    reader = importlib.import_module(module).read_image if module else None
    try:
        return prepare_image(job[0], job[1], size, mode, reader), ""
    except Exception as exc:  # noqa: BLE001 - any decoder failure: list the file, go on
        return -1, f"{type(exc).__name__}: {exc}"


def prepare(cfg: PrepareConfig) -> dict:
    """Prepare one dataset; returns the summary (also written as summary.json / summary.md)."""
    module, root, out = check(cfg)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    summary = Summary(module.NAME, str(root))
    workers = cfg.workers or os.cpu_count() or 1
    work = functools.partial(_work, size=cfg.size, mode=cfg.resize_mode,
                             module=module.__name__ if hasattr(module, "read_image") else None)
    log.info("preparing %s from %s into %s (%d px, %s, %d worker(s))", module.NAME, root, out, cfg.size,
             cfg.resize_mode, workers)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        with atomic_path(out / "manifest.csv") as man_tmp, atomic_path(out / "excluded.csv") as exc_tmp, \
                open(man_tmp, "w", newline="", encoding="utf-8") as mf, \
                open(exc_tmp, "w", newline="", encoding="utf-8") as ef:
            manifest, excluded = csv.writer(mf), csv.writer(ef)
            manifest.writerow(MANIFEST_COLUMNS)
            excluded.writerow(["reason", "where", "detail"])
            rows = _candidates(module, root, cfg, summary, excluded)
            if cfg.limit is not None:
                rows = itertools.islice(rows, cfg.limit)
            bar = tqdm(desc=f"{module.NAME} images", unit=" img", disable=None)
            while block := list(itertools.islice(rows, BLOCK)):
                jobs = [(item.image, out / "images" / _relative(item.image, root).with_suffix(".png"))
                        for item, _ in block]
                results = pool.map(work, jobs, chunksize=8) if pool else map(work, jobs)
                for (item, row), (src, dst), (bits, error) in zip(block, jobs, results):
                    if bits < 0:
                        summary.exclude("unreadable image")
                        excluded.writerow(["unreadable image", safe_cell(item.where), safe_cell(f"{src}: {error}")])
                        log.warning("skipped %s: %s", src, error)
                        continue
                    summary.made += bits > 0
                    row = {"image": dst.relative_to(out).as_posix(), **row,
                           "source_image": _relative(src, root).as_posix()}
                    manifest.writerow([safe_cell(row[c]) for c in MANIFEST_COLUMNS])
                    summary.keep(row, bits)
                bar.update(len(block))
            bar.close()
    finally:
        if pool:
            pool.terminate()
    summary.write(out)
    log.info("%s: kept %d of %d rows (%d images made now, the rest already there); excluded: %s; see %s",
             module.NAME, summary.kept, summary.rows_read, summary.made,
             ", ".join(f"{n} {r}" for r, n in summary.excluded.most_common()) or "none", out / "summary.md")
    return summary.as_dict()


def _relative(image: Path, root: Path) -> Path:
    """The image's path under the root: the output mirrors the dataset's tree (unique, so resumable)."""
    try:
        return image.relative_to(root)
    except ValueError:  # an image found beside the root, not under it
        return Path(image.parent.name) / image.name

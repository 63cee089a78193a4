"""The shared preparer: a dataset module's rows -> filters -> images -> manifest.csv + summary + excluded.csv.

Rows stream through; images are made by worker processes in ordered blocks, so memory stays flat and the
manifest keeps the dataset's order. Every file is written atomically (temp + rename): a killed run loses
nothing, and a rerun decodes only the images that are missing. One bad file is listed and skipped."""
from __future__ import annotations

import csv
import functools
import importlib
import itertools
import json
import logging
import multiprocessing
import os
from pathlib import Path
from types import ModuleType
from typing import Iterator

from tqdm import tqdm

from cxrcommon.atomic import atomic_path, atomic_write_text, remove_stale_temps
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
    is_file,
    seeded_split,
    split_code,
    view_code,
    view_kept,
)
from .summary import Summary

log = logging.getLogger(__name__)
BLOCK = 256  # images handed to the workers at a time: bounded memory, ordered output
MAX_SIZE = 8192  # --size: past any source film (MIMIC's are ~3000 px); larger only upsamples, at 128 MB a PNG
SETTINGS = "settings.json"  # what the images in --out were made with: a rerun must match it
OUTPUTS = ("manifest.csv", "excluded.csv", "summary.json", "summary.md", "images")


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
    if not 8 <= cfg.size <= MAX_SIZE:
        raise UserError(f"--size {cfg.size} is out of range (8 to {MAX_SIZE}) — use the training resolution, e.g. 512")
    if cfg.workers < 0:
        raise UserError(f"--workers {cfg.workers} — give 0 (one per CPU core), 1 (in this process) or more")
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"--limit {cfg.limit} — give a number of rows of at least 1, or leave it out for all")
    wanted_views(cfg.views)
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
    check_settings(out, settings(module, found, cfg))
    return module, found, out


def wanted_views(views: list[str]) -> set[str]:
    """--views as view codes (`view_code`: "pa" and "posteroanterior" are PA, "lat" LATERAL; "PA,AP" is two),
    UNKNOWN kept as it is; a UserError when none is left."""
    names = [v.strip() for item in views for v in str(item).split(",") if v.strip()]
    if not names:
        raise UserError("--views names no view — give e.g. --views PA AP (LATERAL, FRONTAL, UNKNOWN, ...)")
    return {"UNKNOWN" if n.upper() == "UNKNOWN" else view_code(n) for n in names}


def settings(module: ModuleType, root: Path, cfg: PrepareConfig) -> dict:
    """What the images in --out depend on: the same file names from another root, size or mode are other pixels."""
    return {"dataset": module.NAME, "root": str(root.resolve()), "size": cfg.size, "resize_mode": cfg.resize_mode}


def check_settings(out: Path, current: dict) -> None:
    """A UserError when --out holds images made with other settings (a rerun would keep them and mix sizes or
    sources in one manifest), or outputs of something other than finetune.prepare (they would be overwritten)."""
    path = out / SETTINGS
    if not path.is_file():
        there = [name for name in OUTPUTS if (out / name).exists()]
        if there:
            raise UserError(f"--out {out} already holds {', '.join(there)} but no {SETTINGS}: not a finetune.prepare "
                            f"folder, or one from an older version — choose a new --out (or empty this one)")
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in current if old.get(k) != current[k]]
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} cannot be read ({exc}) — choose a new --out, or delete {path} and "
                        f"{out / 'images'}") from None
    if changed:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {current[k]!r}" for k in changed)
        raise UserError(f"--out {out} was made with other settings ({detail}); its images would not match — use "
                        f"another --out, the same settings, or delete {out / 'images'} and {path}")


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


def _candidates(items: Iterator[SourceRow | Excluded], module: ModuleType, root: Path, cfg: PrepareConfig,
                summary: Summary, excluded: csv.writer) -> Iterator[tuple[SourceRow, dict[str, str]]]:
    """Rows that pass every filter before decoding; each one left out is counted and listed once. Each output
    image is claimed once: a row listed again, or another source whose output name is the same (x.jpg beside
    x.png), would point a second manifest row at the first one's image. (One dict of two hashes per row:
    about 40 MB at MIMIC's 377k rows.)"""
    wanted = wanted_views(cfg.views)
    reports = has_reports(module, cfg)
    claimed: dict[int, int] = {}  # hash of the output's path -> hash of the source that made it

    def drop(reason: str, where: str, detail: str = "") -> None:
        summary.exclude(reason)
        excluded.writerow([safe_cell(reason), safe_cell(where), safe_cell(detail)])

    for item in items:
        summary.rows_read += 1
        if isinstance(item, Excluded):
            drop(item.reason, item.where, item.detail)
            continue
        row = manifest_row(item, module, cfg, reports)
        if not view_kept(row["view"], wanted):
            drop(f"view {row['view'] or 'UNKNOWN'} (not in --views)", item.where, str(item.image))
        elif reports and cfg.require_report and not row["report"]:
            drop("no findings/impression text", item.where, str(item.image))
        elif not is_file(item.image):
            drop("image file missing", item.where, str(item.image))
        elif clash := _claim(claimed, _output(item.image, root), item.image):
            drop(clash, item.where, f"{item.image} -> {_output(item.image, root)}")
        else:
            yield item, row


def _claim(claimed: dict[int, int], output: Path, source: Path) -> str:
    """"" when `output` is this row's to make (now claimed), else why not: the same source listed again, or
    another source already makes that output (x.jpg and x.png both listed)."""
    key, value = hash(output.as_posix()), hash(str(source))
    if key not in claimed:
        claimed[key] = value
        return ""
    return "image listed twice" if claimed[key] == value else "output name taken by another image"


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
    # the module's first row comes before anything is written: a UserError it raises reading its files (a CSV
    # without its columns, a label file in the wrong form) leaves no --out behind
    items = module.rows(root, cfg)
    first = next(items, None)
    items = itertools.chain([] if first is None else [first], items)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SETTINGS, json.dumps(settings(module, root, cfg), indent=1) + "\n")
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
            rows = _candidates(items, module, root, cfg, summary, excluded)
            if cfg.limit is not None:
                rows = itertools.islice(rows, cfg.limit)
            bar = tqdm(desc=f"{module.NAME} images", unit=" img", disable=None)
            while block := list(itertools.islice(rows, BLOCK)):
                jobs = [(item.image, out / _output(item.image, root)) for item, _ in block]
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


def _output(image: Path, root: Path) -> Path:
    """The output PNG's path under --out: images/ mirrors the dataset's tree."""
    return Path("images") / _relative(image, root).with_suffix(".png")


def _relative(image: Path, root: Path) -> Path:
    """The image's path under the root: the output mirrors the dataset's tree (unique, so resumable)."""
    try:
        return image.relative_to(root)
    except ValueError:  # an image found beside the root, not under it
        return Path(image.parent.name) / image.name

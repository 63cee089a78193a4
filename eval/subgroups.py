"""Any eval metric split by a manifest column (sex, age band, race, label, ...), each group with its N and a
seeded percentile bootstrap interval.

Why: a pooled FID or AUROC can hide a group the generator or the classifier serves badly (Seyyed-Kalantari et
al. 2021, Nature Medicine). Images are embedded once; a group is a list of row indices into the features,
predictions or scores already computed, so splitting costs no extra embedding.

Columns: `by` is any manifest column, plus two derived ones: `age_band` (<40, 40-65, >65 from `age`, unless the
manifest has its own `age_band`) and `label` (each '|'-separated label of `labels`, else of `label`: an image with
two findings is in both groups). `sex` and `race` are normalised (cxrcommon.demographics), so a real "Female" and
a generated "F" meet in one group; a blank or unknown value is the group "unknown"."""
from __future__ import annotations

import logging
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cxrcommon.atomic import read_jsonl
from cxrcommon.demographics import age_band, age_years, race_group, sex_code
from cxrcommon.errors import UserError

from .sources import MANIFEST_SUFFIXES

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
FOLDER_MANIFEST = "manifest.jsonl"   # what inference.generate writes next to its images
PATH_KEYS = ("file", "key", "file_name", "image", "path")
LABEL_COLUMNS = ("labels", "label")
DERIVED = {"age_band": ("age_band", "age"), "label": LABEL_COLUMNS}
LEVEL = 0.95

Metric = Callable[..., Mapping[str, float | None]]


def split_by(values: str | Sequence[str]) -> list[str]:
    """`--by sex,race` and `--by sex race` alike -> ["sex", "race"] (order kept, repeats dropped)."""
    items = [values] if isinstance(values, str) else list(values)
    out = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    return list(dict.fromkeys(out))


def _manifest_of(source: str | Path) -> Path | None:
    """The file whose rows describe `source`'s images: the manifest itself, or a folder's manifest.jsonl."""
    src = Path(source)
    if src.is_dir():
        return src / FOLDER_MANIFEST if (src / FOLDER_MANIFEST).is_file() else None
    return src if src.suffix.lower() in MANIFEST_SUFFIXES and src.is_file() else None


def check_by(by: Sequence[str], sources: Mapping[str, str | Path]) -> None:
    """Refuse, before anything is computed or written, a --by column some source cannot provide.

    Args:
        by: column names (after `split_by`).
        sources: what each image set is called (e.g. "--real") -> its folder or manifest.
    Raises: UserError naming the column, the file and what to do."""
    from cxrcommon.manifest import manifest_columns
    for what, source in sources.items():
        path = _manifest_of(source)
        if path is None:
            raise UserError(f"--by {', '.join(by)}: {what} {source} has no manifest to read groups from — pass a "
                            f".csv/.jsonl manifest (or a generated folder with {FOLDER_MANIFEST}) with those columns")
        cols = manifest_columns(path) if path.suffix.lower() == ".csv" else {
            k for row in read_jsonl(path) for k in row}
        for name in by:
            need = DERIVED.get(name, (name,))
            if not cols & set(need):
                raise UserError(f"--by {name}: {what} manifest {path} has no {' or '.join(map(repr, need))} column "
                                f"(it has {', '.join(sorted(cols)) or 'none'}) — add it or choose another --by")


def rows_for(paths: Sequence[Path], source: str | Path, image_column: str = "image") -> list[dict[str, Any]]:
    """The manifest row of each image in `paths` (as `sources.list_images` names them), {} for an image no row
    names. A folder's rows come from its manifest.jsonl, matched on the relative path, then the file name."""
    path = _manifest_of(source)
    if path is None:
        return [{} for _ in paths]
    if Path(source).is_dir():
        rows = [r for r in read_jsonl(path) if isinstance(r, dict)]
        by_path: dict[str, dict[str, Any]] = {}
        for row in rows:
            name = next((row[k] for k in PATH_KEYS if row.get(k)), None)
            if name is not None:
                by_path.setdefault(Path(str(name)).as_posix(), row)
                by_path.setdefault(Path(str(name)).name, row)
        root = Path(source)
        return [by_path.get(Path(p).relative_to(root).as_posix() if Path(p).is_relative_to(root) else "",
                            by_path.get(Path(p).name, {})) for p in paths]
    from cxrcommon.manifest import Columns, read_manifest
    records = read_manifest(path, Columns(image=image_column, text=None), on_error="skip", check_images=False)
    table = {Path(r.image): r.extra for r in records}
    return [table.get(Path(p), {}) for p in paths]


def values_of(row: Mapping[str, Any], by: str) -> list[str]:
    """The group(s) one manifest row falls in for column `by` (several only for `label`)."""
    def cell(key: str) -> str:
        value = row.get(key)
        return "" if value is None else str(value).strip()
    if by == "label":
        key = next((k for k in LABEL_COLUMNS if k in row), LABEL_COLUMNS[0])
        return [part.strip() for part in cell(key).split("|") if part.strip()] or [UNKNOWN]
    if by == "age_band" and "age_band" not in row:
        return [age_band(age_years(cell("age") or None))]
    if by == "sex":
        return [sex_code(cell(by)) or UNKNOWN]
    if by == "race":
        return [race_group(cell(by)) or UNKNOWN]
    return [cell(by) or UNKNOWN]


def groups(rows: Sequence[Mapping[str, Any]], by: str) -> dict[str, np.ndarray]:
    """{group value: indices of the rows in it}, groups sorted by name with "unknown" last."""
    index: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        for value in values_of(row, by):
            index[value].append(i)
    order = sorted(index, key=lambda g: (g == UNKNOWN, g))
    return {g: np.asarray(index[g], dtype=np.int64) for g in order}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and bool(np.isfinite(value))


def bootstrap_ci(metric: Metric, sets: Sequence[np.ndarray], *, n_boot: int, seed: int | Sequence[int],
                 level: float = LEVEL, centre: Mapping[str, Any] | None = None
                 ) -> tuple[dict[str, list[float | None]], int]:
    """Percentile bootstrap of `metric`: each index set is resampled with replacement within itself (so each set
    keeps its N), `metric(*resampled)` is computed n_boot times, and the (1 - level)/2 quantiles of each finite
    result key form its interval. A draw that raises ValueError (e.g. one class left) is dropped.

    FID and KID of a resample are biased upwards (a resample repeats ~37% of its images, fewer distinct images
    = more bias), so their plain percentile interval can lie wholly above the point estimate. With `centre`
    (the point estimates), each interval is moved by centre - median(draws): it keeps the bootstrap's spread,
    centred where the estimate is; the estimate's own small-N bias is the N warning's business.

    Args:
        metric: indices of each set -> {name: value}; a None/NaN value leaves that draw out of that name's interval.
        sets: one index array per set (e.g. real rows, fake rows of one group).
        n_boot: resamples, >= 0 (0: no interval).
        seed: seeds numpy's generator (an int or a sequence of ints).
        level: coverage of the interval, in (0, 1).
        centre: point estimates to re-centre the intervals on (None: plain percentile intervals).
    Returns: ({name: [low, high] or [None, None]}, draws that gave a result)."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = defaultdict(list)
    used = 0
    for _ in range(n_boot):
        sample = [rng.choice(ix, len(ix)) if len(ix) else ix for ix in sets]
        try:
            values = metric(*sample)
        except ValueError:
            continue
        used += 1
        for key, value in values.items():
            if _finite(value):
                draws[key].append(float(value))
    tail = (1 - level) / 2 * 100
    ci: dict[str, list[float | None]] = {}
    for key, v in draws.items():
        shift = float(centre[key]) - float(np.median(v)) if centre and _finite(centre.get(key)) else 0.0
        ci[key] = [float(np.percentile(v, tail)) + shift, float(np.percentile(v, 100 - tail)) + shift]
    return ci, used


def per_group(metric: Metric, index: Mapping[str, Sequence[np.ndarray]], *, names: Sequence[str], n_boot: int,
              seed: int = 0, min_n: int = 1, level: float = LEVEL,
              boot_metric: Metric | None = None, recentre: bool = False) -> list[dict[str, Any]]:
    """One row per group: its N per set, `metric` on the group's rows, and a bootstrap interval of each value.

    Args:
        metric: indices of each set -> {name: value} (see `bootstrap_ci`).
        index: group -> one index array per set (same order as `names`).
        names: what each set is called; the row gets `n_<name>` for each.
        n_boot: bootstrap resamples per group (each one `metric` call: the cost is n_boot x groups x metric).
        seed: the bootstrap of group g is seeded by (seed, crc32(g)), so adding a group changes no other's interval.
        min_n: a group with fewer rows in any set gets N and a note, no values.
        level: interval coverage.
        boot_metric: what each resample computes, when cheaper than `metric` (default `metric`); its keys get
            intervals.
        recentre: centre each interval on the group's point estimate (see `bootstrap_ci`; for FID/KID).
    Returns: rows {"group", "n_<name>"..., <metric keys>..., "ci": {key: [low, high]}, "n_boot_used", "note"}."""
    rows = []
    for group, sets in index.items():
        sets = [np.asarray(s, dtype=np.int64) for s in sets]
        row: dict[str, Any] = {"group": group, **{f"n_{n}": len(s) for n, s in zip(names, sets)}}
        short = [n for n, s in zip(names, sets) if len(s) < min_n]
        if short:
            row.update(ci={}, n_boot_used=0, note=f"fewer than {min_n} {short[0]} row(s): not scored")
            rows.append(row)
            continue
        try:
            row.update(metric(*sets))
        except ValueError as exc:
            row.update(ci={}, n_boot_used=0, note=str(exc))
            rows.append(row)
            continue
        ci, used = bootstrap_ci(boot_metric or metric, sets, n_boot=n_boot, seed=[seed, zlib.crc32(group.encode())],
                                level=level, centre=row if recentre else None)
        row.update(ci=ci, n_boot_used=used, note="")
        rows.append(row)
    return rows


def table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    """A Markdown table of per-group rows: N columns, then each metric as `value [low, high]`."""
    from .outputs import markdown_table

    def cell(row: Mapping[str, Any], key: str) -> str:
        value = row.get(key)
        if not _finite(value):
            return "n/a"
        low, high = row.get("ci", {}).get(key, [None, None])
        return f"{value:.4g}" + (f" [{low:.4g}, {high:.4g}]" if low is not None else "")
    n_cols = [k for k in (rows[0] if rows else {}) if k.startswith("n_") and k != "n_boot_used"]
    body = [{"group": r["group"], **{k: r[k] for k in n_cols}, **{k: cell(r, k) for k in keys},
             "note": r.get("note", "")} for r in rows]
    return markdown_table(body, ["group", *n_cols, *keys, "note"])


def sections(by_rows: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str], level: float = LEVEL
             ) -> dict[str, str]:
    """Report sections, one per --by column: 'By <column>' -> its table (intervals are `level` percentile)."""
    pct = f"{level:.0%}"
    return {f"By {col} ({pct} bootstrap CI)": table(rows, keys) for col, rows in by_rows.items()}

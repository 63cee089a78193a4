"""Balancing: count a real dataset and plan the synthetic images that fill its gaps.

By class (`plan_balance`: every class up to the largest), or by patient (`plan_joint`, `--balance-target`): every
cell of sex × age band × race up to its target share (`inference.targets`) of the total after balancing, adding
images only. With classes as well, each class is balanced alike: every class ends with the same total, split
over the cells by the target shares, so no class keeps a demographic skew of its own."""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from cxrcommon.demographics import AGE_BANDS, Demographics
from cxrcommon.errors import UserError
from cxrcommon.manifest import Columns, manifest_columns, read_manifest
from cxrcommon.reports import extract_sections

from .prompts import PromptRow
from .targets import Cell, Target, apportion, cell_of, choose, lenient, smallest_total

log = logging.getLogger(__name__)


LABEL_SEPARATOR = "|"  # finetune.prepare's multi-label column: "Cardiomegaly|Pleural Effusion"


def _labels(value: str | None) -> list[str]:
    """The classes of one row: a plain label, or each of a '|'-separated multi-label cell."""
    return [v.strip() for v in (value or "").split(LABEL_SEPARATOR) if v.strip()]


def manifest_column(manifest: str | Path, asked: str, default: str, fallback: str) -> str:
    """`asked`, except that the default name falls back to finetune.prepare's name for the same column
    (label -> labels, text -> report) when the manifest has only that one."""
    header = manifest_columns(manifest)
    return fallback if asked == default and default not in header and fallback in header else asked


def class_counts(manifest: str | Path, label_column: str, image_column: str = "image") -> dict[str, int]:
    """Images per class in a CSV/JSONL manifest (rows without a label are not counted; a multi-label row
    counts once for each of its classes)."""
    records = read_manifest(manifest, Columns(image=image_column, text=None, label=label_column),
                            on_error="skip", check_images=False)
    counts = collections.Counter(label for r in records for label in _labels(r.label))
    unlabelled = sum(not _labels(r.label) for r in records)
    if unlabelled:
        log.warning("%s: %d row(s) have no %r and are not counted", manifest, unlabelled, label_column)
    if not counts:
        raise UserError(f"{manifest}: no row has a value in column {label_column!r} — pass the class column "
                         f"with --label-column")
    return dict(counts)


def manifest_reports(manifest: str | Path, label_column: str, text_column: str,
                     image_column: str = "image") -> dict[str, list[PromptRow]]:
    """The real reports of each class, to use as prompts when no prompt file is given: their findings and
    impression, as finetune takes captions (the whole text of a report without those headers)."""
    records = read_manifest(manifest, Columns(image=image_column, text=text_column, label=label_column),
                            on_error="skip", check_images=False)
    by_label: dict[str, list[PromptRow]] = collections.defaultdict(list)
    for r in records:
        for label in _labels(r.label):
            text = extract_sections(r.text) or r.text
            by_label[label].append(PromptRow(prompt=text, n=1, index=r.line, label=label))
    return dict(by_label)


def plan_balance(counts: dict[str, int], templates: dict[str, list[PromptRow]],
                 target: int | None = None) -> list[PromptRow]:
    """Prompt rows that bring every class up to `target` images (default: the largest class).

    A class's deficit is spread evenly (round-robin) over that class's prompts; classes that only
    appear in `templates` count as 0 real images."""
    classes = sorted(set(counts) | set(templates))
    goal = max(counts.values(), default=0) if target is None else target
    rows: list[PromptRow] = []
    missing = []
    for label in classes:
        deficit = goal - counts.get(label, 0)
        if deficit <= 0:
            continue
        options = templates.get(label, [])
        if not options:
            missing.append(label)
            continue
        for j, tpl in enumerate(options):
            n = deficit // len(options) + (1 if j < deficit % len(options) else 0)
            if n:
                rows.append(PromptRow(prompt=tpl.prompt, n=n, index=len(rows) + 1, seed=tpl.seed,
                                      label=label, negative_prompt=tpl.negative_prompt,
                                      demographics=tpl.demographics))
    if missing:
        raise UserError(f"no prompt for class(es) {', '.join(map(repr, missing))} — add prompt-file rows with "
                         f"label set to each, or give the manifest a report-text column (--text-column)")
    for label in classes:
        planned = sum(r.n for r in rows if r.label == label)
        log.info("class %-20s real %6d + synthetic %6d = %d", label, counts.get(label, 0), planned,
                 counts.get(label, 0) + planned)
    return rows


def balance_prompts(manifest: str | Path, label_column: str, *, prompts: list[PromptRow] | None = None,
                    text_column: str = "text", image_column: str = "image", target: int | None = None,
                    mix: str | None = None) -> list[PromptRow]:
    """Plan for `--balance`: prompt-file rows grouped by their `label`, else the manifest's own reports. A
    finetune.prepare manifest is read as it is ('labels' and 'report' stand in for the default columns).

    `mix` (--balance-target: uniform, manifest or a file; see `inference.targets`) balances patients too
    (`plan_joint`); `target` is then the total per class (or in all, without classes) after balancing."""
    text_column = manifest_column(manifest, text_column, "text", "report")
    if mix:
        return balance_demographics(manifest, mix, label_column=label_column, prompts=prompts,
                                    text_column=text_column, image_column=image_column, total=target)
    label_column = manifest_column(manifest, label_column, "label", "labels")
    counts = class_counts(manifest, label_column, image_column)
    templates = _by_label(prompts) if prompts else manifest_reports(manifest, label_column, text_column,
                                                                    image_column)
    return plan_balance(counts, templates, target)


def _by_label(prompts: Sequence[PromptRow]) -> dict[str, list[PromptRow]]:
    """Prompt-file rows grouped by the class they depict; every row must name one."""
    unlabelled = [r.index for r in prompts if r.label is None]
    if unlabelled:
        raise UserError(f"--balance needs a label on every prompt row; rows on line(s) {unlabelled[:10]} have "
                         f"none — add a 'label' column (CSV/JSONL) naming the class each prompt depicts")
    templates: dict[str, list[PromptRow]] = collections.defaultdict(list)
    for r in prompts:
        templates[str(r.label)].append(r)
    return dict(templates)


# ---------------------------------------------------------------- by patient (sex × age band × race)

@dataclass(frozen=True)
class RealImage:
    """One row of the real manifest as balancing sees it."""
    labels: tuple[str, ...]
    patient: Demographics           # as recorded (leniently read); unknown fields empty
    report: str                     # findings + impression; "" when the manifest has no report text
    line: int


def real_images(manifest: str | Path, *, label_column: str | None, text_column: str | None,
                image_column: str = "image") -> list[RealImage]:
    """Every usable row of the manifest: its classes (with `label_column`), patient (columns sex, age, race, as
    finetune.prepare writes them) and report (with `text_column`)."""
    records = read_manifest(manifest, Columns(image=image_column, text=None, label=label_column),
                            on_error="skip", check_images=False)
    out = []
    for r in records:
        text = str(r.extra.get(text_column) or "") if text_column else ""
        out.append(RealImage(tuple(_labels(r.label)), lenient(r.extra.get("sex"), r.extra.get("age"),
                                                              r.extra.get("race")),
                             extract_sections(text) or text, r.line))
    return out


def requested_ages(k: int, band: str, ages: Sequence[int]) -> list[int]:
    """The ages asked for k images of an age band: k evenly spaced quantiles (ascending) of the real ages in that
    band, all sexes and races pooled (a gap cell has few patients of its own), so the synthetic ages follow the
    real ones; a band no real patient is in: evenly spaced over it (18-39, 40-65, 66-90)."""
    lo, hi = next((lo, hi) for name, lo, hi in AGE_BANDS if name == band)
    pool = sorted(a for a in ages if lo <= a < hi) or list(range(max(lo, 18), min(hi, 91)))
    return [pool[int((j + 0.5) / k * len(pool))] for j in range(k)]


def _pool(templates: Sequence[PromptRow], want: Demographics) -> list[PromptRow]:
    """The templates a cell draws on: those of the same sex or none recorded (a report may say "mastectomy" or
    "prostate"), all of them when no such one exists."""
    fits = [t for t in templates if not (want.sex and t.demographics.sex and t.demographics.sex != want.sex)]
    return fits or list(templates)


def _cell_rows(k: int, pool: Sequence[PromptRow], people: Sequence[Demographics], label: str | None,
               start: int) -> list[PromptRow]:
    """k images of one cell as prompt rows: templates spread evenly over the pool (round-robin past its size),
    image j asking for people[j]; neighbours with the same template and patient share a row."""
    rows: list[PromptRow] = []
    for j in range(k):
        tpl = pool[j * len(pool) // k if k <= len(pool) else j % len(pool)]
        last = rows[-1] if rows else None
        if last is not None and last.prompt == tpl.prompt and last.demographics == people[j] and \
                last.negative_prompt == tpl.negative_prompt:
            last.n += 1
            continue
        rows.append(PromptRow(prompt=tpl.prompt, n=1, index=start + len(rows), label=label or tpl.label,
                              negative_prompt=tpl.negative_prompt, demographics=people[j]))
    return rows


def plan_joint(real: Sequence[RealImage], target: Target, templates: Mapping[str, Sequence[PromptRow]], *,
               by_label: bool, total: int | None = None) -> list[PromptRow]:
    """Prompt rows that fill the gaps of `real` towards `target`.

    Each class (or, without `by_label`, the whole set: key "" of `templates`) ends with `total` images (default:
    the smallest at which every cell of every class reaches its share by additions alone); cell c of a class gets
    max(0, its share of that total, in whole images - its real images). A smaller `total` leaves cells already
    over their share as they are, so the result only approaches the target. Rows whose patient is unknown in a
    field the cells split by are not counted. The rows carry no seed of their own: one template serves many
    cells, which must not share noise.

    Arguments:
      real: the real images (`real_images`).
      target: the shares (`inference.targets.choose`).
      templates: class (or "") -> prompts to draw the reports from (a cell prefers same-sex ones, `_pool`).
      by_label: balance each class of `real` (a multi-label image counts for each of its classes).
      total: images per class after balancing, or None.
    """
    groups = sorted({g for r in real for g in r.labels} | set(templates)) if by_label else [""]
    counts: dict[str, collections.Counter[Cell]] = {g: collections.Counter() for g in groups}
    unknown = 0
    for r in real:
        cell = cell_of(r.patient, target.fields)
        unknown += cell is None
        for g in (r.labels if by_label else [""]):
            if cell is not None:
                counts[g][cell] += 1
    if unknown:
        log.warning("%d real image(s) lack a known %s and are not counted", unknown, " / ".join(target.fields))
    size = total if total is not None else max(smallest_total(counts[g], target.shares) for g in groups)
    goal = apportion(size, target.shares)
    ages = [r.patient.age for r in real if r.patient.age is not None]
    rows: list[PromptRow] = []
    missing = []
    for g in groups:
        for cell, want in goal.items():
            k = want - counts[g].get(cell, 0)
            if k <= 0:
                continue
            pool = _pool(templates.get(g, []), target.demographics(cell))
            if not pool:
                missing.append(g)
                break
            band = dict(zip(target.fields, cell)).get("age_band")
            people = [target.demographics(cell, age) for age in requested_ages(k, band, ages)] if band else \
                [target.demographics(cell)] * k
            rows += _cell_rows(k, pool, people, g or None, len(rows) + 1)
            log.log(logging.DEBUG if by_label else logging.INFO,  # with classes, a line per class follows
                    "%s%-28s real %6d + synthetic %6d = %d (share %.4f)", f"class {g}: " if g else "",
                    ", ".join(cell), counts[g].get(cell, 0), k, counts[g].get(cell, 0) + k, target.shares[cell])
        if by_label:
            planned = sum(r.n for r in rows if r.label == g)
            log.info("class %-20s real %6d + synthetic %6d (towards %s)", g, sum(counts[g].values()), planned,
                     target.source)
    if missing:
        raise UserError(f"no prompt for class(es) {', '.join(map(repr, missing))} — add prompt-file rows with "
                         f"label set to each, or give the manifest a report-text column (--text-column)")
    return rows


def balance_demographics(manifest: str | Path, mix: str, *, label_column: str, prompts: list[PromptRow] | None,
                         text_column: str, image_column: str, total: int | None) -> list[PromptRow]:
    """`balance_prompts` with a `--balance-target`: classes are balanced too when the manifest has the label
    column (the default 'label', or finetune.prepare's 'labels'; --label-column '' turns classes off)."""
    header = manifest_columns(manifest)
    label_column = manifest_column(manifest, label_column, "label", "labels") if label_column else ""
    by_label = bool(label_column) and (label_column in header or label_column != "label")
    if not prompts and text_column not in header:
        raise UserError(f"{manifest}: --balance without --prompts writes the manifest's own reports with the "
                        f"patients it asks for, but there is no column {text_column!r} — pass --text-column or "
                        f"--prompts")
    real = real_images(manifest, label_column=label_column if by_label else None,
                       text_column=None if prompts else text_column, image_column=image_column)
    target = choose(mix, [r.patient for r in real], manifest)
    log.info("balancing %s towards %s over %s%s", manifest, target.source, " × ".join(target.fields),
             f", each class of {label_column!r} alike" if by_label else "")
    if prompts:
        if any(r.demographics for r in prompts):
            log.warning("--balance-target: each planned image asks for its cell's patient; the sex/age/race "
                        "columns of the prompt file are not used")
        templates = _by_label(prompts) if by_label else {"": list(prompts)}
    else:
        templates = collections.defaultdict(list)
        for r in real:
            for g in (r.labels if by_label else [""]):
                if r.report:
                    templates[g].append(PromptRow(prompt=r.report, n=1, index=r.line, label=g or None,
                                                  demographics=r.patient))
    return plan_joint(real, target, dict(templates), by_label=by_label, total=total)

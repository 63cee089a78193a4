"""Class balancing: count each class of a real dataset and plan the synthetic images that even it out."""
from __future__ import annotations

import collections
import logging
from pathlib import Path

from cxrcommon.errors import UserError
from cxrcommon.manifest import Columns, manifest_columns, read_manifest
from cxrcommon.reports import extract_sections

from .prompts import PromptRow

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
                                      label=label, negative_prompt=tpl.negative_prompt))
    if missing:
        raise UserError(f"no prompt for class(es) {', '.join(map(repr, missing))} — add prompt-file rows with "
                         f"label set to each, or give the manifest a report-text column (--text-column)")
    for label in classes:
        planned = sum(r.n for r in rows if r.label == label)
        log.info("class %-20s real %6d + synthetic %6d = %d", label, counts.get(label, 0), planned,
                 counts.get(label, 0) + planned)
    return rows


def balance_prompts(manifest: str | Path, label_column: str, *, prompts: list[PromptRow] | None = None,
                    text_column: str = "text", image_column: str = "image",
                    target: int | None = None) -> list[PromptRow]:
    """Plan for `--balance`: prompt-file rows grouped by their `label`, else the manifest's own reports. A
    finetune.prepare manifest is read as it is ('labels' and 'report' stand in for the default columns)."""
    label_column = manifest_column(manifest, label_column, "label", "labels")
    text_column = manifest_column(manifest, text_column, "text", "report")
    counts = class_counts(manifest, label_column, image_column)
    if prompts:
        unlabelled = [r.index for r in prompts if r.label is None]
        if unlabelled:
            raise UserError(f"--balance needs a label on every prompt row; rows on line(s) {unlabelled[:10]} have "
                             f"none — add a 'label' column (CSV/JSONL) naming the class each prompt depicts")
        templates: dict[str, list[PromptRow]] = collections.defaultdict(list)
        for r in prompts:
            templates[str(r.label)].append(r)
    else:
        templates = manifest_reports(manifest, label_column, text_column, image_column)
    return plan_balance(counts, dict(templates), target)

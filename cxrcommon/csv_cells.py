"""CSV cells that a spreadsheet opens as text, never as a formula (CSV/formula injection, OWASP).

A cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return is prefixed with a single quote, as
OWASP recommends, so `=HYPERLINK(...)` in a file name or `=1+2` in a PatientID stays text in Excel,
LibreOffice and Sheets. Every CSV this project writes from user-controlled values (prompts, file names,
DICOM identifiers, labels) goes through `safe_row`/`safe_dict`.

Two deliberate choices:
- A cell that is a plain number (`-1.5`, `+3`, `-2e-05`) is left alone: a number cannot carry a formula, and
  the project's numeric columns (probabilities, scores) stay numbers for whoever reads them.
- A cell that already starts with a quote is prefixed too, so `unescape` undoes `safe_cell` exactly and a CSV
  the project reads back (`--mapping-out`, merged on every run) round-trips every value, a quote included.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def safe_cell(value: Any) -> str:
    """`value` as text a spreadsheet shows as text; None is the empty cell."""
    text = "" if value is None else str(value)
    if text.startswith(QUOTE) or (text.startswith(TRIGGERS) and not _NUMBER.fullmatch(text)):
        return QUOTE + text
    return text


def unescape(cell: str) -> str:
    """The value `safe_cell` was given (for CSVs the project reads back)."""
    return cell[1:] if cell.startswith(QUOTE) else cell


def safe_row(row: Iterable[Any]) -> list[str]:
    """A `csv.writer` row with every cell neutralised."""
    return [safe_cell(v) for v in row]


def safe_dict(row: Mapping[str, Any]) -> dict[str, str]:
    """A `csv.DictWriter` row with every cell neutralised."""
    return {k: safe_cell(v) for k, v in row.items()}

"""Prompt files (.txt, .csv, .jsonl) -> validated rows, with every bad line named before any GPU time is spent."""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cxrcommon.errors import MissingFileError, UserError
from cxrcommon.manifest import table_rows

log = logging.getLogger(__name__)

COLUMNS = ("prompt", "n", "seed", "label", "negative_prompt")


@dataclass
class PromptRow:
    """One prompt; `index` (the row's line number) feeds the per-image seeds, so it is stable
    when a bad line elsewhere is fixed."""
    prompt: str
    n: int
    index: int
    seed: int | None = None
    label: str | None = None
    negative_prompt: str | None = None


class PromptFileError(UserError):
    """A prompt file with problems; `.problems` lists each as `file:line: what — fix`. One problem is
    one line; `hint` (e.g. how to skip bad lines) follows the list and is not counted."""

    def __init__(self, path: Path, problems: list[str], hint: str = ""):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(problems[0] + (f" {hint}" if hint else ""))
            return
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        super().__init__(f"{path}: {len(problems)} bad line(s):\n  {shown}" + (f"\n  {hint}" if hint else ""))


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"'{name}' must be a whole number, got {value!r}")
    try:
        out = int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ValueError(f"'{name}' must be a whole number, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"'{name}' must be >= {minimum}, got {out}")
    return out


def _optional_text(value: Any, name: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"'{name}' must be text, got {type(value).__name__}")
    return str(value).strip()


def make_row(record: dict[str, Any], index: int, default_n: int) -> PromptRow:
    """Validate one record (a CSV row or JSON object) into a PromptRow; ValueError says what is wrong."""
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("empty or missing 'prompt'")
    n = record.get("n")
    seed = record.get("seed")
    return PromptRow(prompt=prompt.strip(), index=index,
                     n=default_n if n in (None, "") else _int(n, "n", 1),
                     seed=None if seed in (None, "") else _int(seed, "seed", 0),
                     label=_optional_text(record.get("label"), "label"),
                     negative_prompt=_optional_text(record.get("negative_prompt"), "negative_prompt"))


def _decode_lines(raw: bytes, path: Path) -> tuple[str, list[str]]:
    """UTF-8 text with each undecodable line blanked (keeping line numbers) and named as a problem, so
    --skip-bad-lines can skip it like any other bad line."""
    lines, problems = [], []
    for number, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            problems.append(f"{path}:{number}: not UTF-8 text — save the file as UTF-8")
            lines.append("")
    return "\n".join(lines), problems


def _txt(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield number, {"prompt": line}


def _csv_header_problem(text: str, path: Path) -> None:
    """A prompt CSV needs a 'prompt' column; other unknown columns are only worth a warning."""
    first = next(csv.reader(io.StringIO(text, newline="")), None)
    header = [h.strip() for h in first or []]
    if "prompt" not in header:
        raise PromptFileError(path, [f"{path}:1: the header needs a 'prompt' column (got {first}) — "
                                     f"add a first line such as: prompt,n,label"])
    unknown = sorted(set(header) - set(COLUMNS))
    if unknown:
        log.warning("%s: ignoring column(s) %s (known: %s)", path, ", ".join(unknown), ", ".join(COLUMNS))


def read_prompts(path: str | Path, *, default_n: int = 1, skip_bad: bool = False) -> list[PromptRow]:
    """Parse a prompt file. All problems are collected and raised together (or logged and
    skipped with `skip_bad`), each naming its line and the fix."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--prompts {path} is a folder — pass a prompt file (.txt, .csv or .jsonl)")
    if not path.is_file():
        raise MissingFileError(f"--prompts {path} does not exist — pass a prompt file (.txt, .csv or .jsonl)")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".csv", ".jsonl"):
        raise PromptFileError(path, [f"{path}: unknown prompt-file type {suffix!r} — use .txt, .csv or .jsonl"])
    text, problems = _decode_lines(path.read_bytes(), path)
    if suffix == ".csv":
        if problems and problems[0].startswith(f"{path}:1:"):
            raise PromptFileError(path, problems[:1])  # an unreadable header: no column names to go on
        _csv_header_problem(text, path)
    records = _txt(text) if suffix == ".txt" else table_rows(text, suffix[1:])
    rows: list[PromptRow] = []
    for number, record in records:
        if isinstance(record, str):  # a structural problem; its text already says how to fix it
            problems.append(f"{path}:{number}: {record}")
            continue
        try:
            rows.append(make_row(record, number, default_n))
        except ValueError as exc:
            problems.append(f"{path}:{number}: {exc} — fix or delete that line")
    if problems and not skip_bad:
        raise PromptFileError(path, problems, hint="(or pass --skip-bad-lines to skip bad lines)")
    for problem in problems:
        log.warning("skipping %s", problem)
    if not rows:
        raise PromptFileError(path, [f"{path}: no prompts found — add one prompt per line"])
    return rows


def write_prompts_jsonl(path: str | Path, rows: list[PromptRow]) -> None:
    """Write rows as a .jsonl prompt file (atomically) that `read_prompts` reads back."""
    from cxrcommon.atomic import atomic_write_text
    lines = [json.dumps({k: v for k, v in (("prompt", r.prompt), ("n", r.n), ("seed", r.seed), ("label", r.label),
                                            ("negative_prompt", r.negative_prompt)) if v is not None})
             for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")

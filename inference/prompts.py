"""Prompt files (.txt, .csv, .jsonl) -> validated rows, with every bad line named before any GPU time is spent."""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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


class PromptFileError(ValueError):
    """A prompt file with problems; `.problems` lists each as `file:line: what — fix`."""

    def __init__(self, path: Path, problems: list[str]):
        self.problems = problems
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        super().__init__(f"{path}: {len(problems)} bad line(s):\n  {shown}")


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


def _txt(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield number, {"prompt": line}


def _jsonl(text: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, f"not valid JSON ({exc.msg} at column {exc.colno})"
            continue
        yield number, obj if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"


def _csv(text: str, path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header or "prompt" not in [h.strip() for h in header]:
        raise PromptFileError(path, [f"{path}:1: the header needs a 'prompt' column (got {header}) — "
                                     f"add a first line such as: prompt,n,label"])
    header = [h.strip() for h in header]
    unknown = sorted(set(header) - set(COLUMNS))
    if unknown:
        log.warning("%s: ignoring column(s) %s (known: %s)", path, ", ".join(unknown), ", ".join(COLUMNS))
    start = reader.line_num
    for fields in reader:
        number, start = start + 1, reader.line_num
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            yield number, f"has {len(fields)} field(s) but the header has {len(header)} (quote prompts that contain commas)"
            continue
        yield number, dict(zip(header, fields, strict=True))


def read_prompts(path: str | Path, *, default_n: int = 1, skip_bad: bool = False) -> list[PromptRow]:
    """Parse a prompt file. All problems are collected and raised together (or logged and
    skipped with `skip_bad`), each naming its line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist; pass --prompts FILE (.txt, .csv or .jsonl)")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".csv", ".jsonl"):
        raise PromptFileError(path, [f"{path}: unknown prompt-file type {suffix!r} — use .txt, .csv or .jsonl"])
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise PromptFileError(path, [f"{path}:{line}: not UTF-8 text — save the file as UTF-8"]) from None
    records = _txt(text) if suffix == ".txt" else _jsonl(text) if suffix == ".jsonl" else _csv(text, path)
    rows: list[PromptRow] = []
    problems: list[str] = []
    for number, record in records:
        try:
            if isinstance(record, str):
                raise ValueError(record)
            rows.append(make_row(record, number, default_n))
        except ValueError as exc:
            problems.append(f"{path}:{number}: {exc} — fix or delete that line")
    if problems and not skip_bad:
        raise PromptFileError(path, problems + ["(or pass --skip-bad-lines to skip them)"])
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

"""Prompt files (.txt, .csv, .jsonl) -> validated rows, with every bad line named before any GPU time is spent.

A CSV whose header has `img_savename` is CheXGenBench's prompt form (`prompt,img_savename`, README "Generating
Synthetic Data"): each row names its one image, a path inside the output folder, which their metric scripts then
read back from the same CSV.

Optional `sex`, `age` and `race` columns ask for a patient: they are read strictly (a value the caption template
does not know is a bad line) and written in front of the report in the form the model was trained with
(`cxrcommon.demographics`), as finetune wrote its captions, so the prefix is never cut."""
from __future__ import annotations

import csv
import io
import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from cxrcommon.demographics import Demographics, parse_demographics
from cxrcommon.errors import MissingFileError, UserError
from cxrcommon.manifest import table_rows

from .captions import asked, asked_of, caption, caption_parts

if TYPE_CHECKING:
    from cxrcommon.reports import FittedText

log = logging.getLogger(__name__)

COLUMNS = ("prompt", "n", "seed", "label", "negative_prompt", "img_savename", "sex", "age", "race")
SAVENAME = "img_savename"  # CheXGenBench's column: the image's path inside the output folder
NAME_BYTES = 200  # longest part of an img_savename, in UTF-8: 255 on most file systems, less the temp name's tag
DEVICE_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10))}  # Windows


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
    savename: str | None = None     # CheXGenBench's img_savename: this row's one image, relative to the output
    demographics: Demographics = Demographics()  # the patient asked for; empty: none (the report alone)


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
    row = PromptRow(prompt=prompt.strip(), index=index,
                    n=default_n if n in (None, "") else _int(n, "n", 1),
                    seed=None if seed in (None, "") else _int(seed, "seed", 0),
                    label=_optional_text(record.get("label"), "label"),
                    negative_prompt=_optional_text(record.get("negative_prompt"), "negative_prompt"),
                    savename=savename(record[SAVENAME]) if record.get(SAVENAME) not in (None, "") else None,
                    demographics=parse_demographics(record.get("sex"), record.get("age"), record.get("race")))
    if row.savename and row.n != 1:
        raise ValueError(f"'{SAVENAME}' names one image, but n is {row.n} — set n to 1 (and --n-per-prompt 1)")
    return row


def savename(value: Any) -> str:
    """A CheXGenBench img_savename as a clean relative POSIX path inside the output folder; ValueError for an
    absolute path, '..', a hidden part or a backslash (the images must land inside the folder, where eval finds
    them), and for a name no file system takes or that breaks on another one: control characters (NUL, newline),
    a part over NAME_BYTES, a Windows device name (con.png) — refused here, not when the image is written."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"empty or missing '{SAVENAME}'")
    text = value.strip()
    if "\\" in text:
        raise ValueError(f"'{SAVENAME}' {text!r} has a backslash — separate folders with /")
    path = PurePosixPath(text)
    if path.is_absolute() or re.match(r"^[A-Za-z]:", text):
        raise ValueError(f"'{SAVENAME}' {text!r} is an absolute path — give a path inside the output folder")
    parts = [part for part in path.parts if part != "."]
    if ".." in parts:
        raise ValueError(f"'{SAVENAME}' {text!r} contains '..' — give a path inside the output folder")
    if not parts or any(part.startswith(".") for part in parts):
        raise ValueError(f"'{SAVENAME}' {text!r} names a hidden file or folder — use a name without a leading dot")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text):
        raise ValueError(f"'{SAVENAME}' {text!r} has a control character — use letters, digits, - _ . and /")
    if any(len(part.encode("utf-8")) > NAME_BYTES for part in parts):
        raise ValueError(f"'{SAVENAME}' {text[:40]!r}... has a part longer than {NAME_BYTES} bytes — shorten it")
    if any(part.split(".")[0].upper() in DEVICE_NAMES for part in parts):
        raise ValueError(f"'{SAVENAME}' {text!r} is a Windows device name (CON, NUL, COM1, ...) — rename it")
    return "/".join(parts)


def check_savenames(rows: Sequence[PromptRow], suffix: str, path: str | Path) -> None:
    """Refuse, naming each row, image names that end in another suffix than the output format writes."""
    problems = [f"{path}:{row.index}: '{SAVENAME}' {row.savename!r} does not end in {suffix}, the suffix --format "
                f"writes — rename it or choose the matching --format" for row in rows
                if row.savename and PurePosixPath(row.savename).suffix.lower() != suffix]
    if problems:
        raise PromptFileError(Path(path), problems)


def _savename_problems(rows: Sequence[PromptRow], path: Path, required: bool) -> list[str]:
    """Rows without a name (where CheXGenBench's form is used) and names used twice (compared case-blind and in
    one Unicode normal form: one file on macOS and Windows)."""
    problems, first = [], {}
    for row in rows:
        if row.savename is None:
            if required:
                problems.append(f"{path}:{row.index}: empty '{SAVENAME}' — CheXGenBench's prompt CSV names every "
                                f"image; fill it in or delete that line")
            continue
        seen = first.setdefault(unicodedata.normalize("NFC", row.savename).casefold(), row.index)
        if seen != row.index:
            problems.append(f"{path}:{row.index}: '{SAVENAME}' {row.savename!r} is already used on line {seen} — "
                            f"give each row its own name")
    return problems


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


def _csv_header_problem(text: str, path: Path) -> list[str]:
    """A prompt CSV needs a 'prompt' column; other unknown columns are only worth a warning. Returns the header."""
    first = next(csv.reader(io.StringIO(text, newline="")), None)
    header = [h.strip() for h in first or []]
    if "prompt" not in header:
        raise PromptFileError(path, [f"{path}:1: the header needs a 'prompt' column (got {first}) — "
                                     f"add a first line such as: prompt,n,label"])
    unknown = sorted(set(header) - set(COLUMNS))
    if unknown:
        log.warning("%s: ignoring column(s) %s (known: %s)", path, ", ".join(unknown), ", ".join(COLUMNS))
    return header


def read_prompts(path: str | Path, *, default_n: int = 1, skip_bad: bool = False,
                 savenames: bool = False) -> list[PromptRow]:
    """Parse a prompt file. All problems are collected and raised together (or logged and
    skipped with `skip_bad`), each naming its line and the fix.

    A CSV with an `img_savename` column is CheXGenBench's form: every row must name its one image, each name
    once. `savenames=True` demands that form (a CSV without the column is refused)."""
    from cxrcommon.paths import file_kind
    path = Path(path)
    kind = file_kind(path)
    if kind == "missing":
        raise MissingFileError(f"--prompts {path} does not exist — pass a prompt file (.txt, .csv or .jsonl)")
    if kind != "file":
        raise UserError(f"--prompts {path} is {kind}, not a file — pass a prompt file (.txt, .csv or .jsonl)")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".csv", ".jsonl"):
        raise PromptFileError(path, [f"{path}: unknown prompt-file type {suffix!r} — use .txt, .csv or .jsonl"])
    text, problems = _decode_lines(path.read_bytes(), path)
    named = savenames
    if suffix == ".csv":
        if problems and problems[0].startswith(f"{path}:1:"):
            raise PromptFileError(path, problems[:1])  # an unreadable header: no column names to go on
        header = _csv_header_problem(text, path)
        named = named or SAVENAME in header
        if savenames and SAVENAME not in header:
            raise PromptFileError(path, [f"{path}:1: CheXGenBench's prompt CSV needs the header prompt,{SAVENAME} "
                                         f"(got {','.join(header)}) — add an {SAVENAME} column naming each image"])
    elif savenames:
        raise PromptFileError(path, [f"{path}: CheXGenBench's prompt form is a CSV with the header "
                                     f"prompt,{SAVENAME} — not a {suffix} file"])
    records = _txt(text) if suffix == ".txt" else table_rows(text, suffix[1:])
    rows: list[PromptRow] = []
    for number, record in records:
        if isinstance(record, str):  # a structural problem; its text already says how to fix it
            problems.append(f"{path}:{number}: {record}")
            continue
        try:
            rows.append(make_row(record, number, default_n))
        except UserError as exc:  # a demographic value: its message already names what is accepted
            problems.append(f"{path}:{number}: {exc}")
        except ValueError as exc:
            problems.append(f"{path}:{number}: {exc} — fix or delete that line")
    bad_names = _savename_problems(rows, path, named)
    problems += bad_names
    rows = [r for r in rows if not any(p.startswith(f"{path}:{r.index}: ") for p in bad_names)]
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
                                            ("negative_prompt", r.negative_prompt), (SAVENAME, r.savename),
                                            ("sex", r.demographics.sex or None), ("age", r.demographics.age),
                                            ("race", r.demographics.race or None))
                         if v is not None})
             for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


class PromptFits(Mapping[int, "tuple[str, FittedText]"]):
    """Row index -> (original prompt, `FittedText`: the normalised text fitted to `max_windows` CLIP
    windows, impression first), each computed on first use and kept.

    Fitting tokenises a prompt several times; doing it for every row before the first image made a
    file of 20,000 reports wait minutes, so a job fits a row only when it reaches it, like it expands
    a row's `n` images. Policy "error" is the exception: it promises that every over-long prompt is
    named before any image is made, so it counts all tokens up front (one batched call) and raises
    one UserError naming each. Cut prompts are logged as a few examples plus a count (`summary`).

    `form`: the demographics template ('roentgen' / 'chexgen') that rows with demographics are captioned in;
    None only when no row has any."""

    def __init__(self, rows: Sequence[PromptRow], tokenizer: Any, *, policy: str, max_windows: int, source: str,
                 logger: logging.Logger = log, form: str | None = None):
        from cxrcommon.logs import RepeatedWarning
        if form is None and any(row.demographics for row in rows):
            raise ValueError("rows with demographics need a caption form")
        self.log = logger
        self.form = form
        self._rows = {row.index: row for row in rows}
        self._fits: dict[int, tuple[str, FittedText]] = {}
        self.tokenizer, self.policy, self.max_windows, self.source = tokenizer, policy, max_windows, source
        self.cut_warning = RepeatedWarning(logger, "prompts cut to fit", where="every cut prompt has "
                                           "prompt_truncated and prompt_original in manifest.jsonl")
        self.impression_warning = RepeatedWarning(logging.getLogger("cxrcommon.reports"),
                                                  "prompts with a shortened impression")
        if policy == "error":
            self._check_lengths()

    def _check_lengths(self) -> None:
        from cxrcommon.prompt_windows import WINDOW, count_tokens
        from cxrcommon.reports import ReportTooLongError
        rows = list(self._rows.values())
        counts = count_tokens(self.tokenizer, [caption(r.prompt, r.demographics, self.form) for r in rows])
        too_long = []
        for row, count in zip(rows, counts):
            if count.tokens > WINDOW * self.max_windows:
                try:
                    self[row.index]
                except ReportTooLongError as exc:
                    too_long.append(str(exc))
        if too_long:
            raise UserError("; ".join(too_long))

    def __getitem__(self, index: int) -> tuple[str, FittedText]:
        if index not in self._fits:
            from cxrcommon.reports import fit_windows
            row = self._rows[index]
            text, salient = caption_parts(row.prompt, row.demographics, self.form)
            fit = fit_windows(text, self.tokenizer, max_windows=self.max_windows, policy=self.policy,
                              name=f"{self.source}:{index}", salient=salient, warn=self.impression_warning)
            if fit.cut:
                self.cut_warning("%s:%d: prompt cut to %d CLIP window(s) of 75 tokens, impression first: %r",
                                 self.source, index, self.max_windows, fit.text)
            self._fits[index] = (row.prompt, fit)
        return self._fits[index]

    def reuse(self, finished: Sequence[dict]) -> None:
        """Take the fit of each row that already has an image from the job's own manifest records (what
        was encoded, its windows and cuts), so a resumed job does not re-fit the rows it skips. Only a
        record made from the same prompt text and demographics in the same form counts (same settings are
        checked by the caller's folder check); `tokens` is not stored there and reads -1."""
        from cxrcommon.reports import FittedText
        for rec in finished:
            row = self._rows.get(rec.get("prompt_index"))
            text, windows = rec.get("prompt"), rec.get("prompt_windows")
            if (row is None or row.index in self._fits or not isinstance(text, str)
                    or not str(windows).isdigit() or rec.get("prompt_original", text) != row.prompt
                    or asked(rec) != asked_of(row.demographics, self.form)):
                continue
            self._fits[row.index] = (row.prompt, FittedText(text, -1, int(windows),
                                                            cut=rec.get("prompt_truncated") == "true",
                                                            impression_cut=rec.get("prompt_impression_cut") == "true"))

    def __iter__(self) -> Iterator[int]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self) -> list["FittedRow"]:
        """The rows in file order, each reading its fitted text on first use of `.prompt`."""
        return [FittedRow(row, self) for row in self._rows.values()]

    def summary(self) -> None:
        """Log the held-back warnings' counts and how the prompts fitted so far were encoded."""
        self.cut_warning.summary()
        self.impression_warning.summary()
        fits = [fit for _, fit in self._fits.values()]
        self.log.info("%d prompt(s): %d longer than one CLIP window (encoded whole, up to %d windows), %d cut to fit, "
                 "%d with a shortened impression", len(fits), sum(f.windows > 1 for f in fits), self.max_windows,
                 sum(f.cut for f in fits), sum(f.impression_cut for f in fits))


class FittedRow:
    """A PromptRow whose `prompt` is the text as encoded (`PromptFits`), fitted when first read."""
    __slots__ = ("n", "index", "seed", "label", "negative_prompt", "savename", "demographics", "_fits")

    def __init__(self, row: PromptRow, fits: PromptFits):
        self.n, self.index, self.seed, self.label = row.n, row.index, row.seed, row.label
        self.savename = row.savename
        self.demographics = row.demographics
        self.negative_prompt, self._fits = row.negative_prompt, fits

    @property
    def prompt(self) -> str:
        return self._fits[self.index][1].text


"""What a dataset module yields, and the normalisation every dataset shares: labels onto one vocabulary,
sex/age/race, views, captions for label-only datasets, and the seeded patient split.

One place decides these, so a MIMIC row and a VinDr row mean the same thing column by column."""
from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import math
import re
import zlib
from pathlib import Path
from typing import Iterator, Mapping

from cxrcommon.demographics import age_years, race_group, sex_code  # noqa: F401 - the modules' API
from cxrcommon.errors import UserError

# CheXpert's 14 observations (Irvin et al. 2019), in its own order: the shared label vocabulary.
CHEXPERT_14 = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
               "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
               "Fracture", "Support Devices")
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
SPLITS = ("train", "validate", "test")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as surrogateescape reads it
MANIFEST_COLUMNS = ("image", "report", "labels", "patient", "study", "view", "sex", "age", "race", "split", "source",
                    "uncertain", "source_image")


@dataclasses.dataclass
class SourceRow:
    """One image of a dataset, as its files describe it (paths under the dataset root)."""
    image: Path                                 # the source image file
    patient: str
    study: str = ""
    view: str = ""                              # as the source writes it; normalised by `view_code`
    report: str = ""                            # findings + impression, where the dataset has reports
    labels: dict[str, float] = dataclasses.field(default_factory=dict)  # source name -> 1 / 0 / -1 (uncertain)
    sex: str = ""                               # as the source writes it; normalised by `sex_code`
    age: int | None = None                      # whole years at the study
    race: str = ""
    split: str = ""                             # the official split, or "" for the seeded patient split
    where: str = ""                             # file:line it came from, for messages


@dataclasses.dataclass
class Excluded:
    """A row the dataset module could not use; `reason` is counted in the summary, `where` names it."""
    reason: str
    where: str
    detail: str = ""


_VIEWS = {"PA": "PA", "POSTEROANTERIOR": "PA", "AP": "AP", "ANTEROPOSTERIOR": "AP", "AP_HORIZONTAL": "AP",
          "AP_SUPINE": "AP", "AP AXIAL": "AP", "LATERAL": "LATERAL", "LL": "LATERAL", "RL": "LATERAL",
          "LAT": "LATERAL", "L": "LATERAL", "FRONTAL": "FRONTAL", "PA LLD": "PA", "AP LLD": "AP", "AP RLD": "AP",
          "PA RLD": "PA"}


def view_code(value: str) -> str:
    """PA, AP, LATERAL or FRONTAL (frontal, PA/AP not recorded); another view keeps its own upper-case name
    (e.g. LAO, SWIMMERS) so the summary shows it; "" when the source gives none."""
    v = str(value).strip().upper().replace("-", "_")
    return _VIEWS.get(v, _VIEWS.get(v.replace("_", " "), v))


def view_kept(view: str, wanted: set[str]) -> bool:
    """Whether --views keeps `view`: FRONTAL passes with PA or AP, a view the source does not record ("")
    only when UNKNOWN is asked for (OpenI's NLM PNGs carry none)."""
    return view in wanted or (view == "FRONTAL" and bool(wanted & {"PA", "AP"})) or (view == "" and "UNKNOWN" in wanted)


def label_name(source_name: str, label_map: Mapping[str, str | None]) -> str:
    """The vocabulary name of a source finding: its CheXpert class, or its own name tidied (`tidy_name`)."""
    mapped = label_map.get(source_name)
    return mapped if mapped else tidy_name(source_name)


def tidy_name(name: str) -> str:
    """A source's finding name as one label: underscores and runs of whitespace (newlines too) one space, and
    "|" (the labels column's separator, so "a|b" would read as two labels) written "/"."""
    return " ".join(name.replace("_", " ").replace("|", "/").split())


def apply_labels(labels: Mapping[str, float], label_map: Mapping[str, str | None],
                 uncertain: str) -> tuple[list[str], list[str], list[str]]:
    """(positive vocabulary names, uncertain names left out, positive SOURCE names for the caption).

    `uncertain` is the --uncertain policy: ignore / zeros / ones. Names come out in vocabulary order
    (CheXpert's 14 first, then the rest alphabetically), each once."""
    if uncertain not in ("ignore", "zeros", "ones"):
        raise UserError(f"--uncertain {uncertain!r} — choose ignore, zeros or ones")
    positive, unsure, source_names = [], [], []
    for name, value in labels.items():
        if value is None or (isinstance(value, float) and math.isnan(value)) or not tidy_name(name):
            continue
        if value == POSITIVE or (value == UNCERTAIN and uncertain == "ones"):
            positive.append(label_name(name, label_map))
            source_names.append(tidy_name(name))
        elif value == UNCERTAIN and uncertain == "ignore":
            unsure.append(label_name(name, label_map))
    return _ordered(positive), _ordered(set(unsure) - set(positive)), list(dict.fromkeys(source_names))


def _ordered(names) -> list[str]:
    rank = {n: i for i, n in enumerate(CHEXPERT_14)}
    return sorted(set(names), key=lambda n: (rank.get(n, len(rank)), n))


def caption(template: str, view: str, findings: list[str], no_finding: str, source: str) -> str:
    """The caption of a label-only image: the template filled with the view and the source's own finding
    names ("mass", not only the class it maps onto), lower case, or `no_finding` when none is marked."""
    names = [f for f in findings if f.lower() != "no finding"]
    text = ", ".join(n.lower() for n in names) if names else no_finding
    if names:
        text = text[0].upper() + text[1:]
    view_text = {"FRONTAL": "Frontal", "LATERAL": "Lateral", "": "Frontal"}.get(view, view)
    try:
        return template.format(view=view_text, findings=text, source=source).strip()
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"--caption-template {template!r}: {exc} — use only {{view}}, {{findings}} and "
                        f"{{source}}") from None


def seeded_split(patient: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """train / validate / test for a patient, from a hash of (seed, patient): the same patient always lands
    on one side, whatever the row order, without holding the patient list in memory."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise UserError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be >= 0 and sum "
                        f"to less than 1")
    digest = hashlib.sha256(f"{seed}:{patient}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < test_fraction else "validate" if u < test_fraction + val_fraction else "train"


def split_code(value: str) -> str:
    """The official split names of the datasets onto train / validate / test."""
    v = str(value).strip().lower()
    return {"train": "train", "training": "train", "validate": "validate", "valid": "validate",
            "validation": "validate", "val": "validate", "test": "test", "testing": "test"}.get(v, "")


def open_text(path: Path) -> io.TextIOBase:
    """A CSV/TXT file for streaming, gzip or not, UTF-8 with a BOM tolerated. Bytes that are not UTF-8 come
    through as surrogate escapes (no UnicodeDecodeError mid-file), for `read_csv` to exclude their row."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", errors="surrogateescape", newline="")
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def check_gzip(path: Path) -> None:
    """A UserError naming a .gz file that is not gzip or ends early (a cut-off download). Read through once
    before its rows are used (a 377k-row file takes well under a second), so it stops the run before anything
    is written rather than after hours of images."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: not a whole gzip file ({exc}) — download it again") from None


def read_csv(path: Path, required: tuple[str, ...] = (),
             dialect: str = "excel") -> Iterator[tuple[int, dict[str, str] | Excluded]]:
    """(line number, row) of a CSV, streamed. A header without a `required` column is one UserError naming the
    file and the columns it has (so a wrong file fails before anything is written); short rows come back
    with the missing cells as None, for the caller to exclude. A row that cannot be read at all (bytes that
    are not UTF-8, a cell past the csv module's size limit) comes back as an Excluded naming its line: one
    bad row never stops a run."""
    if path.suffix == ".gz":
        check_gzip(path)
    with open_text(path) as f:
        reader = csv.DictReader(f, dialect=dialect)
        try:
            header = reader.fieldnames or []
        except csv.Error as exc:
            raise UserError(f"{path}: the header line cannot be read ({exc}) — is this the dataset's own file?"
                            ) from None
        missing = [c for c in required if c not in header]
        if missing:
            has = ", ".join(header[:12]) or "no header"
            raise UserError(f"{path}: no column(s) {', '.join(missing)} (it has {has}) — is this the dataset's "
                            "own file?")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield reader.line_num, Excluded("unreadable row", f"{path.name}:{reader.line_num}", str(exc))
                continue
            if bad := _NOT_UTF8.search("".join(v for v in row.values() if isinstance(v, str))):
                yield reader.line_num, Excluded("not UTF-8 text", f"{path.name}:{reader.line_num}",
                                                f"byte {ord(bad.group()) - 0xDC00:#04x} — save the file as UTF-8")
                continue
            yield reader.line_num, row


def is_file(path: Path) -> bool:
    """Path.is_file for a path built from a CSV cell: False, not an OSError that ends the run, where the OS
    refuses the name (a file name over 255 bytes)."""
    try:
        return path.is_file()
    except OSError:
        return False


def check_columns(path: Path, required: tuple[str, ...]) -> None:
    """`read_csv`'s refusals of a file (not gzip, cut off, a required column missing) now: for a file a module
    reads after others, so they come before the run's first row, not midway."""
    rows = read_csv(path, required)
    try:
        next(rows, None)
    finally:
        rows.close()


def require_file(root: Path, relative: str, dataset: str, hint: str = "") -> Path:
    """root/relative, or a UserError saying which file of which dataset was expected there."""
    path = root / relative
    if not path.is_file():
        raise UserError(f"{root} does not look like {dataset}: {relative} not found"
                        + (f" — {hint}" if hint else " — pass the folder the download unpacked to as --root"))
    return path

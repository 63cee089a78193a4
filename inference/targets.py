"""The demographic mix `--balance` aims at: a share for each cell of sex × age band × race.

Three ways to say it (`--balance-target`): `uniform` (every cell alike), `manifest` (the mix of the --balance
manifest itself: with --label-column, every class then gets the whole dataset's mix, which removes the
class-demographics confounding), or a file: a CSV with a `share` column gives the shares outright (columns
sex, age_band, race — any of them — and share, summing to 1), any other manifest gives its own mix (e.g. a
target population). A field splits the cells only where the real manifest records it: a dataset without race
is balanced over sex × age band."""
from __future__ import annotations

import collections
import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from cxrcommon.demographics import (
    AGE_BANDS,
    RACES,
    Demographics,
    age_band,
    age_years,
    parse_demographics,
    race_group,
    sex_code,
)
from cxrcommon.errors import MissingFileError, UserError

FIELDS = ("sex", "age_band", "race")
SEXES = ("F", "M")
BANDS = tuple(name for name, _, _ in AGE_BANDS)
SHARE_TOLERANCE = 1e-6  # an explicit target's shares must sum to 1 within this

Cell = tuple[str, ...]  # one value per field of the target, in FIELDS order


@dataclass(frozen=True)
class Target:
    """Shares over cells; `fields` are the FIELDS the cells split by, `source` how the target was given."""
    fields: tuple[str, ...]
    shares: dict[Cell, float]
    source: str

    def demographics(self, cell: Cell, age: int | None = None) -> Demographics:
        """The patient a cell asks for (`age`: one inside its band, chosen by the caller)."""
        values = dict(zip(self.fields, cell))
        return Demographics(values.get("sex", ""), age if "age_band" in values else None, values.get("race", ""))


def lenient(sex: object, age: object, race: object) -> Demographics:
    """A real manifest's values as recorded anywhere (M/Male, 54/"054Y", MIMIC's race strings); unknown: empty."""
    return Demographics(sex_code(sex), age_years(age), race_group(race))


def cell_of(d: Demographics, fields: Sequence[str]) -> Cell | None:
    """The cell of a patient, or None when a field the cells split by is unknown."""
    values = {"sex": d.sex, "age_band": age_band(d.age) if d.age is not None else "", "race": d.race}
    cell = tuple(values[f] for f in fields)
    return None if any(not v for v in cell) else cell


def recorded(people: Iterable[Demographics]) -> tuple[str, ...]:
    """The FIELDS that at least one patient has a value for."""
    people = list(people)
    have = {"sex": any(d.sex for d in people), "age_band": any(d.age is not None for d in people),
            "race": any(d.race for d in people)}
    return tuple(f for f in FIELDS if have[f])


def uniform(people: Sequence[Demographics], where: str) -> Target:
    """Every cell of the recorded fields alike; races are those the manifest has (a group it never records has
    no reports to draw on and no definition in that dataset)."""
    fields = _fields_or_refuse(recorded(people), where)
    values = {"sex": SEXES, "age_band": BANDS, "race": tuple(r for r in RACES if any(d.race == r for d in people))}
    cells = [()]
    for f in fields:
        cells = [c + (v,) for c in cells for v in values[f]]
    return Target(fields, {c: 1 / len(cells) for c in cells}, "uniform")


def mix(people: Sequence[Demographics], fields: Sequence[str], source: str) -> Target:
    """The shares of the cells among `people` whose cell is known."""
    counts = collections.Counter(c for d in people if (c := cell_of(d, fields)) is not None)
    total = sum(counts.values())
    if not total:
        raise UserError(f"{source}: no row has a known {' / '.join(fields)} — the target mix cannot be read from it")
    return Target(tuple(fields), {c: n / total for c, n in sorted(counts.items())}, source)


def read_shares(path: Path) -> Target:
    """An explicit target: a CSV of sex, age_band and/or race and a share per cell, shares summing to 1."""
    header = _csv_header(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, fieldnames=header)
        rows = [(reader.line_num, row) for row in reader][1:]  # line_num: blank lines and quoted newlines count
    fields = tuple(f for f in FIELDS if f in header)
    if "share" not in header or not fields:
        raise UserError(f"--balance-target {path}: the header needs a 'share' column and at least one of "
                        f"{', '.join(FIELDS)} (got {','.join(header)})")
    twice = sorted({h for h in header if h and header.count(h) > 1})
    if twice:
        raise UserError(f"--balance-target {path}: column(s) {', '.join(twice)} appear twice in the header — keep one")
    problems, shares = [], {}
    for line, row in rows:
        try:
            cell, share = _share_row(row, fields)
        except ValueError as exc:
            problems.append(f"{path}:{line}: {exc}")
            continue
        if cell in shares:
            problems.append(f"{path}:{line}: cell {', '.join(cell)} is given twice — give each cell one row")
        shares[cell] = share
    if problems:
        raise UserError("; ".join(problems))
    total = math.fsum(shares.values())
    if abs(total - 1) > SHARE_TOLERANCE:
        hint = " (they look like percentages: divide each by 100)" if abs(total - 100) <= 100 * SHARE_TOLERANCE else ""
        raise UserError(f"--balance-target {path}: the shares sum to {total:.9g}, not 1{hint} — make them add up to 1 "
                        f"(within {SHARE_TOLERANCE:g})")
    return Target(fields, shares, str(path))


def _share_row(row: Mapping[str, str | None], fields: Sequence[str]) -> tuple[Cell, float]:
    """One row of a shares CSV; ValueError says what is wrong."""
    if row.get(None):  # csv puts cells past the header under None: "F,0,5" is a decimal comma, not a share of 0
        raise ValueError(f"more cells than the header has columns ({', '.join(row[None])} left over) — write "
                         f"shares with a decimal point (0.5), and quote cells that hold a comma")
    values = {k: (v or "").strip() for k, v in row.items() if k}
    cell = []
    for f in fields:
        v = values.get(f, "")
        if f == "age_band" and v not in BANDS:
            raise ValueError(f"age_band {v!r} is not one of {', '.join(BANDS)}")
        d = parse_demographics(**{f: v}) if f != "age_band" else None
        value = v if d is None else d.sex or d.race
        if not value:
            raise ValueError(f"empty {f} — every row names its cell")
        cell.append(value)
    try:
        share = float(values.get("share", ""))
    except ValueError:
        raise ValueError(f"share {values.get('share')!r} is not a number") from None
    if not (math.isfinite(share) and share >= 0):
        raise ValueError(f"share {share} must be a number >= 0")
    return tuple(cell), share


def choose(spec: str, people: Sequence[Demographics], manifest: str | Path) -> Target:
    """The target `--balance-target spec` names, for the real manifest whose patients are `people`."""
    if spec == "uniform":
        return uniform(people, str(manifest))
    if spec == "manifest":
        return mix(people, _fields_or_refuse(recorded(people), str(manifest)), f"the mix of {manifest}")
    path = Path(spec)
    if not path.is_file():
        raise MissingFileError(f"--balance-target {spec}: not uniform, manifest, or a file — pass one of those "
                               f"(a CSV of sex,age_band,race,share, or a manifest whose mix to follow)")
    if path.suffix.lower() == ".csv" and "share" in _csv_header(path):
        target = read_shares(path)
    else:
        other = _manifest_people(path)
        fields = tuple(f for f in recorded(people) if f in recorded(other))
        target = mix(other, _fields_or_refuse(fields, f"{path} and {manifest}"), f"the mix of {path}")
    missing = [f for f in target.fields if f not in recorded(people)]
    if missing:
        raise UserError(f"--balance-target {spec} splits by {', '.join(missing)}, but {manifest} records none — "
                        f"give a target without {', '.join(missing)}, or a manifest that records it")
    return target


def _fields_or_refuse(fields: tuple[str, ...], where: str) -> tuple[str, ...]:
    if not fields:
        raise UserError(f"{where}: no sex, age or race values to balance by — use a manifest with sex/age/race "
                        f"columns (finetune.prepare writes them), or drop --balance-target")
    return fields


def _csv_header(path: Path) -> list[str]:
    """The column names, trimmed and lower-cased ('Share' is 'share')."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
            fh.read()  # the rest must decode too: a later row in Latin-1 is as unreadable as the header
    except UnicodeDecodeError as exc:
        raise UserError(f"--balance-target {path}: not UTF-8 text ({exc.reason} at byte {exc.start}) — save the "
                        f"file as UTF-8") from None
    return [h.strip().lower() for h in header]


def _manifest_people(path: Path) -> list[Demographics]:
    """The patients of a manifest used only for its mix."""
    from cxrcommon.manifest import Columns, read_manifest
    records = read_manifest(path, Columns(text=None), on_error="skip", check_images=False)
    return [lenient(r.extra.get("sex"), r.extra.get("age"), r.extra.get("race")) for r in records]


def apportion(total: int, shares: Mapping[Cell, float]) -> dict[Cell, int]:
    """`total` split over the cells in proportion to their shares, in whole images (largest remainder; ties go
    to the earlier cell), so the parts add up to `total` exactly."""
    weight = math.fsum(shares.values())
    exact = {c: total * s / weight for c, s in shares.items()}
    parts = {c: math.floor(x + 1e-9) for c, x in exact.items()}
    order = sorted(shares, key=lambda c: -(exact[c] - parts[c]))
    for c in order[:total - sum(parts.values())]:
        parts[c] += 1
    return parts


def smallest_total(counts: Mapping[Cell, int], shares: Mapping[Cell, float]) -> int:
    """The fewest images (real + synthetic) at which no cell with a share holds more than its share: the size
    a gap-filling plan reaches by adding images only."""
    return max((math.ceil(counts.get(c, 0) / s - 1e-9) for c, s in shares.items() if s > 0), default=0)

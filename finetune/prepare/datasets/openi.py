"""OpenI / Indiana University chest X-ray collection: 7,470 images (frontal and lateral) of 3,955 de-identified
radiology reports, Indiana Network for Patient Care, released by the National Library of Medicine.

Access: https://openi.nlm.nih.gov/faq (NLMCXR_png.tgz, NLMCXR_reports.tgz, optionally NLMCXR_dcm.tgz; CC BY-NC-ND
4.0) and the Kaggle re-packaging https://www.kaggle.com/datasets/raddar/chest-xrays-indiana-university.

Citation: Demner-Fushman D, Kohli MD, Rosenman MB, et al. Preparing a collection of radiology examinations for
distribution and retrieval. J Am Med Inform Assoc 23(2):304-310, 2016. doi:10.1093/jamia/ocv080

Layouts read (`--root`, or a folder with it as its only child holding them):

    NLM:    ecgen-radiology/<n>.xml          one report per file (NLMCXR_reports.tgz)
            NLMCXR_png/<image id>.png        or the PNGs flat in --root (NLMCXR_png.tgz)
            NLMCXR_dcm/**/<n>_IM-....dcm     optional (NLMCXR_dcm.tgz): read where a PNG is absent, and for views
    Kaggle: indiana_reports.csv              uid, MeSH, Problems, image, indication, comparison, findings, impression
            indiana_projections.csv          uid, filename, projection (Frontal / Lateral), one row per image
            images/images_normalized/<filename>   e.g. 1_IM-0001-4001.dcm.png

Where both are present the NLM reports are read (the release itself) and the Kaggle projections give the views.

From an NLM report: uId (CXR1 -> patient "1"), the AbstractText sections FINDINGS and IMPRESSION (the report:
findings then impression, via cxrcommon.reports.extract_sections), MeSH/major terms (labels) and one parentImage
per image (id CXR1_1_IM-0001-3001 -> NLMCXR_png/CXR1_1_IM-0001-3001.png). Every report is one examination of one
patient; the collection does not link a patient's reports, so patient = study = the report id. No sex, age or race
is released. No official split: patients are split by the seeded hash (SourceRow.split "").

Views: the XML names no view per image (its captions say "Xray Chest PA and Lateral" for the whole report), so:
indiana_projections.csv where present (Frontal -> FRONTAL, kept with PA/AP; Lateral -> LATERAL), else the DICOM
header's View Position where NLMCXR_dcm is unpacked (PA, AP, LL, LATERAL, RL; blank in about a third of the files
and sometimes wrong: torchxrayvision, which reads the same headers, found laterals among the 'PA's), else ""
(unknown, which the runner's view filter leaves out, under 'view unknown'). So the NLM PNGs alone give no
frontal image: unpack NLMCXR_dcm.tgz too, or put Kaggle's indiana_projections.csv beside them.

Labels: the MeSH major headings, each report's terms positive for all its images (OpenI marks no negatives) and
the same in both layouts (Kaggle's Problems column is these headings, ';'-separated). A heading is the term
before its first '/' qualifier ("Opacity/lung/base/left/mild" -> Opacity), so anatomical headings whose finding
is in the qualifier (Lung/hypoinflation, Spine/degenerative) keep the anatomy's name. `LABELS` maps the headings
whose CheXpert class is plain (the CheXpert labeler's own phrases): normal -> No Finding; Opacity, Airspace
Disease, Infiltrate -> Lung Opacity; Nodule, Mass -> Lung Lesion; Pulmonary Atelectasis -> Atelectasis; Pulmonary
Edema, Pulmonary Congestion -> Edema; Fractures, Bone -> Fracture; Catheters, Indwelling, Tube, Inserted,
Implanted Medical Device, Medical Device, Stents -> Support Devices; Cardiomegaly, Pleural Effusion,
Pneumothorax, Consolidation, Pneumonia by the same name. Every other heading keeps its own name. 'No Indexing'
and 'Technical Quality of Image Unsatisfactory' say nothing about the chest and are dropped."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

from cxrcommon.errors import UserError

from ..config import PrepareConfig
from ..rows import POSITIVE, Excluded, SourceRow, check_columns, is_file, read_csv

NAME = "openi"
HAS_REPORTS = True

XML_DIR = "ecgen-radiology"
PNG_DIR = "NLMCXR_png"
DCM_DIR = "NLMCXR_dcm"
REPORTS_CSV = "indiana_reports.csv"
PROJECTIONS_CSV = "indiana_projections.csv"
KAGGLE_IMAGES = ("images/images_normalized", "images", ".")
REPORT_COLUMNS = ("uid", "Problems", "findings", "impression")
PROJECTION_COLUMNS = ("uid", "filename", "projection")

LABELS: dict[str, str | None] = {
    "normal": "No Finding", "Cardiomegaly": "Cardiomegaly", "Pleural Effusion": "Pleural Effusion",
    "Pneumothorax": "Pneumothorax", "Pulmonary Atelectasis": "Atelectasis", "Opacity": "Lung Opacity",
    "Airspace Disease": "Lung Opacity", "Infiltrate": "Lung Opacity", "Nodule": "Lung Lesion",
    "Mass": "Lung Lesion", "Pulmonary Edema": "Edema", "Pulmonary Congestion": "Edema",
    "Consolidation": "Consolidation", "Pneumonia": "Pneumonia", "Fractures, Bone": "Fracture",
    "Catheters, Indwelling": "Support Devices", "Tube, Inserted": "Support Devices",
    "Implanted Medical Device": "Support Devices", "Medical Device": "Support Devices", "Stents": "Support Devices",
    # kept by their own names (torchxrayvision's Openi_Dataset classes without a CheXpert one)
    "Calcified Granuloma": None, "Granuloma": None, "Emphysema": None, "Pulmonary Emphysema": None,
    "Pulmonary Fibrosis": None, "Hernia, Hiatal": None, "Thickening": None,
}
NOT_FINDINGS = ("No Indexing", "Technical Quality of Image Unsatisfactory")

_UID_RE = re.compile(r"^CXR(\d+)$")
_IMAGE_ID_RE = re.compile(r"^CXR\d+_[A-Za-z0-9_-]+$")
_FILENAME_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9]+)*$")


def find_root(root: Path, cfg: PrepareConfig) -> Path:
    """`root`, or its one subfolder, holding ecgen-radiology/ or indiana_reports.csv (+ indiana_projections.csv);
    a UserError naming what it expected otherwise."""
    root = Path(root)
    found = root if _layout(root) else None
    if found is None and root.is_dir():
        inside = [d for d in sorted(root.iterdir()) if d.is_dir() and _layout(d)]
        found = inside[0] if len(inside) == 1 else None
    if found is not None and _layout(found) == "kaggle" and not (found / PROJECTIONS_CSV).is_file():
        raise UserError(f"{found} holds {REPORTS_CSV} but not {PROJECTIONS_CSV} — the Kaggle copy needs both (it "
                        f"names each report's images)")
    if found is not None:
        return found
    raise UserError(f"{root} does not look like OpenI: neither {XML_DIR}/*.xml (NLMCXR_reports.tgz unpacked) nor "
                    f"{REPORTS_CSV} (the Kaggle copy) found — pass the folder that holds them and the images as --root")


def _layout(root: Path) -> str:
    """'nlm', 'kaggle' or '' for a folder."""
    if (root / XML_DIR).is_dir() and next((root / XML_DIR).glob("*.xml"), None) is not None:
        return "nlm"
    return "kaggle" if (root / REPORTS_CSV).is_file() else ""


def rows(root: Path, cfg: PrepareConfig) -> Iterator[SourceRow | Excluded]:
    """One SourceRow per image (streamed report by report), or an Excluded naming the file/line and the fault."""
    layout = _layout(root)
    if not layout:
        raise UserError(f"{root}: neither {XML_DIR}/ nor {REPORTS_CSV} found — run with the folder find_root accepted")
    if layout == "kaggle":
        yield from _kaggle_rows(root)
    else:
        yield from _nlm_rows(root, _projections(root) if (root / PROJECTIONS_CSV).is_file() else {})


def _report(findings: str, impression: str) -> str:
    """Findings then impression, as every report-based dataset of finetune.prepare joins them. Imported here, not
    at the top: cxrcommon.reports imports torch (~2 s, ~0.5 GB), which the image workers (they import this
    module for `read_image`) never need."""
    from cxrcommon.reports import extract_sections
    return extract_sections({"findings": findings, "impression": impression})


def _labels(headings: list[str]) -> dict[str, float]:
    """{heading: 1.0} for a report's MeSH major terms ("Opacity/lung/base" -> Opacity), non-findings dropped."""
    names = (" ".join(h.split("/")[0].split()) for h in headings)
    return {n: POSITIVE for n in names if n and n not in NOT_FINDINGS}


def _stem(name: str) -> str:
    """The DICOM/Kaggle key of an image: 'CXR1_IM-0001-4001' / '1_IM-0001-4001.dcm.png' -> '1_IM-0001-4001'.
    Two NLM ids repeat the report number ('CXR1_1_IM-0001-3001'); their DICOM is '1_IM-0001-3001.dcm'."""
    name = name.removeprefix("CXR").split(".")[0]
    return re.sub(r"^(\d+)_\1_", r"\1_", name)


def _projections(root: Path) -> dict[str, str]:
    """Image key -> Frontal / Lateral from Kaggle's indiana_projections.csv (one row per image, ~7.5k: a dict
    is fine)."""
    found = {}
    for _, row in read_csv(root / PROJECTIONS_CSV, PROJECTION_COLUMNS):
        if isinstance(row, Excluded):  # the Kaggle layout lists it; beside the NLM one only views come from here
            continue
        if row.get("filename") and row.get("projection"):
            found[_stem(row["filename"].strip())] = row["projection"].strip()
    return found


def _dicom_view(path: Path) -> str:
    """View Position from a DICOM header ("" when absent or unreadable: the runner then reports the file)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ViewPosition"])
    except Exception:  # noqa: BLE001 - a broken header is the runner's "unreadable image" later
        return ""
    return str(ds.get("ViewPosition", "") or "").strip()


def _nlm_rows(root: Path, projections: dict[str, str]) -> Iterator[SourceRow | Excluded]:
    png_dir = root / PNG_DIR if (root / PNG_DIR).is_dir() else root
    dicoms = {_stem(p.name): p for p in (root / DCM_DIR).rglob("*.dcm")} if (root / DCM_DIR).is_dir() else {}
    for path in sorted((root / XML_DIR).glob("*.xml"), key=lambda p: (len(p.stem), p.stem)):
        where = f"{XML_DIR}/{path.name}"
        try:
            report = ET.parse(path).getroot()
        except ET.ParseError as exc:
            yield Excluded("malformed report XML", where, str(exc)[:120])
            continue
        uid_node = report.find("uId")
        uid = _UID_RE.match(uid_node.get("id", "") if uid_node is not None else "")
        if not uid:
            yield Excluded("malformed report XML", where, "no uId id='CXR<n>'")
            continue
        sections = {(t.get("Label") or "").lower(): (t.text or "") for t in report.iter("AbstractText")}
        text = _report(sections.get("findings", ""), sections.get("impression", ""))
        labels = _labels([m.text or "" for m in report.findall("MeSH/major")])
        images = report.findall("parentImage")
        if not images:
            yield Excluded("report without images", where)
        for image in images:
            image_id = image.get("id") or ""
            if not _IMAGE_ID_RE.match(image_id):
                yield Excluded("malformed report XML", where, f"parentImage id {image_id[:40]!r}")
                continue
            png, dcm = png_dir / f"{image_id}.png", dicoms.get(_stem(image_id))
            view = projections.get(_stem(image_id)) or (_dicom_view(dcm) if dcm else "")
            yield SourceRow(image=dcm if dcm and not is_file(png) else png, patient=uid.group(1),
                            study=uid.group(1), view=view, report=text, labels=dict(labels), where=where)


def _kaggle_rows(root: Path) -> Iterator[SourceRow | Excluded]:
    """The reports (3,955 rows) are held by uid, then the projections CSV is streamed and joined on it."""
    check_columns(root / PROJECTIONS_CSV, PROJECTION_COLUMNS)
    reports: dict[str, tuple[str, dict[str, float]]] = {}
    for line, row in read_csv(root / REPORTS_CSV, REPORT_COLUMNS):
        where = f"{REPORTS_CSV}:{line}"
        if isinstance(row, Excluded):
            yield row
        elif any(row.get(c) is None for c in REPORT_COLUMNS) or None in row:
            yield Excluded("malformed row", where, "wrong number of cells")
        elif not row["uid"].strip().isdigit():
            yield Excluded("malformed row", where, f"uid {row['uid'][:40]!r} is not a number")
        else:
            text = _report(row["findings"], row["impression"])
            reports[str(int(row["uid"]))] = (text, _labels(row["Problems"].split(";")))
    folders = [root / d for d in KAGGLE_IMAGES if (root / d).is_dir()]
    for line, row in read_csv(root / PROJECTIONS_CSV, PROJECTION_COLUMNS):
        where = f"{PROJECTIONS_CSV}:{line}"
        if isinstance(row, Excluded):
            yield row
            continue
        if any(row.get(c) is None for c in PROJECTION_COLUMNS) or None in row:
            yield Excluded("malformed row", where, "wrong number of cells")
            continue
        uid, filename = row["uid"].strip(), row["filename"].strip()
        if not uid.isdigit() or not _FILENAME_RE.match(filename):
            yield Excluded("malformed row", where, f"uid {uid[:40]!r}, filename {filename[:60]!r}")
            continue
        uid = str(int(uid))
        if uid not in reports:
            yield Excluded("no report row", where, f"uid {uid} is not in {REPORTS_CSV}")
            continue
        text, labels = reports[uid]
        image = next((d / filename for d in folders if is_file(d / filename)), root / KAGGLE_IMAGES[0] / filename)
        yield SourceRow(image=image, patient=uid, study=uid, view=row["projection"].strip(), report=text,
                        labels=dict(labels), where=where)

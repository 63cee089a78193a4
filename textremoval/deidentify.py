"""De-identify a DICOM header for sharing: the PS3.15 Basic Application Level Confidentiality Profile
(dicom-anonymizer's copy of Table E.1-1) plus the Options in `ps315_options`, keyed pseudonyms so the
files of a run stay linked, and an audit of what changed that names tags but never their old values.

The identifying strings are read from the header *before* it is scrubbed, so the pixel pass can erase
them wherever OCR reads them (as Presidio's DICOM redactor does) and the scrubbed header can be swept
for copies hidden in tags the profile keeps."""
from __future__ import annotations

import copy
import datetime as _dt
import difflib
import functools
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from .ps315_options import (CLEAN_DESCRIPTORS, MODIFIED_DATES, PATIENT_CHARACTERISTICS_CLEAN,
                            PATIENT_CHARACTERISTICS_KEEP)

PROFILE_TABLE = "dicomfields_2026c"   # dicom-anonymizer's newest copy of Table E.1-1
MAX_SHIFT_DAYS = 3650                 # dates move back 1..3650 days, the same amount for every file of a patient
# CID 7050 De-identification Method codes (DCM) for what we apply.
CODES = {"basic": ("113100", "Basic Application Confidentiality Profile"),
         "pixels": ("113101", "Clean Pixel Data Option"),
         "descriptors": ("113105", "Clean Descriptors Option"),
         "dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
         "characteristics": ("113108", "Retain Patient Characteristics Option")}
# Header attributes whose values identify the patient (or the people and places around the study).
IDENTIFYING = ("PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
               "PatientMotherBirthName", "PatientBirthDate", "AccessionNumber", "StudyID", "PatientAddress",
               "PatientTelephoneNumbers", "MedicalRecordLocator", "ReferringPhysicianName",
               "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName",
               "RequestingPhysician", "InstitutionName", "InstitutionAddress")
TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC", "AE", "CS"}
DATE_IN_TEXT = re.compile(r"\b(\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|(19|20)\d{6})\b")
MIN_LEN = 3                            # shorter strings (initials, marker letters) are not matched
OCR_FOLD = str.maketrans("0158", "OISB")  # characters OCR confuses, folded on both sides before comparing


class DeidentifyError(ValueError):
    """A file whose header cannot be de-identified; the message names the file and the fix."""


def normalize(text: str) -> str:
    """Upper-case letters and digits only, OCR look-alikes folded: how identifiers are compared."""
    return re.sub(r"[^0-9A-Z]", "", str(text).upper()).translate(OCR_FOLD)


def _date_forms(da: str) -> list[str]:
    try:
        d = _dt.datetime.strptime(da[:8], "%Y%m%d")
    except ValueError:
        return [da]
    return [da] + [d.strftime(f) for f in ("%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%Y-%m-%d", "%d/%m/%y")]


def identifiers(ds: Dataset) -> list[str]:
    """Every identifying string in the header (whole values, name components, date spellings)."""
    found: list[str] = []
    for kw in IDENTIFYING:
        elem = ds[kw] if kw in ds else None
        if elem is None or elem.VR == "SQ" or not elem.value:
            continue
        for value in (elem.value if elem.VM > 1 else [elem.value]):
            text = str(value)
            if elem.VR == "DA":
                found += _date_forms(text)
                continue
            found.append(text.replace("^", " ").strip())
            if elem.VR == "PN":
                found += re.split(r"[\s^,=]+", text)  # family, given, middle names on their own
    return sorted({s.strip() for s in found if len(normalize(s)) >= MIN_LEN}, key=lambda s: (-len(s), s))


def contains_identifier(text: str, idents: Iterable[str]) -> bool:
    """Whether `text` (a header value) holds an identifier verbatim, case and punctuation aside."""
    t = normalize(text)
    return any(len(i) >= MIN_LEN and i in t for i in map(normalize, idents))


def reads_as_identifier(text: str, idents: Iterable[str]) -> bool:
    """Whether OCR'd `text` contains (or is a fragment of) an identifier, allowing one OCR slip in five."""
    t = normalize(text)
    if len(t) < MIN_LEN:
        return False
    for ident in idents:
        i = normalize(ident)
        if len(i) < MIN_LEN:
            continue
        if i in t or t in i:
            return True
        if len(i) >= 5 and len(t) >= len(i) - 1:
            windows = (t[k:k + len(i)] for k in range(len(t) - len(i) + 1))
            if any(difflib.SequenceMatcher(None, w, i).ratio() >= 0.8 for w in windows):
                return True
    return False


class Pseudonymizer:
    """Keyed, stateless replacements: the same secret maps the same UID, patient or date to the same
    new value in every file and process of a run (so series and studies stay linked), and records
    what it mapped so `--mapping-out` can write it."""

    def __init__(self, secret: str):
        self.key = secret.encode("utf-8")
        self.mapping: dict[tuple[str, str], str] = {}

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self.key, f"{kind}\0{value}".encode("utf-8"), hashlib.sha256).digest()

    def uid(self, old: str) -> str:
        new = f"2.25.{int.from_bytes(self._digest('uid', old)[:16], 'big')}"  # a UUID-sized integer
        self.mapping[("uid", old)] = new
        return new

    def patient(self, old: str) -> str:
        new = "ANON-" + self._digest("patient", old).hex()[:12].upper()
        self.mapping[("patient_id", old)] = new
        return new

    def shift_days(self, patient: str) -> int:
        days = -(1 + int.from_bytes(self._digest("shift", patient)[:4], "big") % MAX_SHIFT_DAYS)
        self.mapping[("date_shift_days", patient)] = str(days)
        return days


@functools.lru_cache(maxsize=1)
def basic_profile() -> dict[tuple, Callable]:
    """dicom-anonymizer's Basic Profile actions, tag -> action(dataset, tag)."""
    from dicomanonymizer.simpledicomanonymizer import initialize_actions
    return initialize_actions(PROFILE_TABLE)


def _tag(kw: str) -> tuple[int, int]:
    t = Tag(kw)
    return (t.group, t.element)


def _vr(tag: tuple) -> str:
    try:
        return dictionary_VR((tag[0] << 16) | tag[1])
    except KeyError:
        return ""


def shift_date(value: str, days: int) -> str:
    """DA 'YYYYMMDD' or the date part of a DT moved by `days`; anything unparsable becomes ''."""
    try:
        d = _dt.datetime.strptime(value[:8], "%Y%m%d") + _dt.timedelta(days=days)
    except ValueError:
        return ""
    return d.strftime("%Y%m%d") + value[8:]


def each_value(value: Any, fn: Callable[[Any], Any]) -> Any:
    """`fn` on every value of a multi-valued element, or on its one value."""
    return [fn(v) for v in value] if isinstance(value, (list, tuple, MultiValue)) else fn(value)


def _clean_one(text: str, idents: Iterable[str]) -> str:
    text = DATE_IN_TEXT.sub("", text)
    for ident in idents:
        text = re.sub(r"[\s^]*".join(map(re.escape, re.split(r"[\s^]+", ident))), "", text, flags=re.IGNORECASE)
    return re.sub(r"\s{2,}", " ", text).strip()


def clean_text(value: Any, idents: Iterable[str]) -> Any:
    """A descriptor with every identifier and written date cut out (the Clean Descriptors Option)."""
    return each_value(value, lambda v: _clean_one(str(v), idents))


@dataclass
class HeaderResult:
    dataset: Dataset                           # the de-identified copy (pixels untouched)
    identifiers: list[str]                     # identifying strings read before scrubbing (PHI: never written)
    tags: dict[str, list[str]]                 # removed / replaced / emptied / kept / added -> tag names
    codes: list[tuple[str, str]]               # CID 7050 codes applied to the header
    mapping: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, old) -> new (PHI)


def _actions(cfg: Any, pseudo: Pseudonymizer, idents: list[str], patient: str) -> dict[tuple, Callable]:
    """The Basic Profile with our Options and keyed replacements laid over it."""
    def set_value(fn: Callable[[Any], Any]) -> Callable:
        def action(ds: Dataset, tag: tuple) -> None:
            elem = ds.get(tag)
            if elem is not None and elem.value not in (None, ""):
                elem.value = fn(elem.value)
        return action

    def keep(ds: Dataset, tag: tuple) -> None:
        """Option K: the value stays."""

    uid = set_value(lambda v: each_value(v, lambda u: pseudo.uid(str(u))))
    rules = dict(basic_profile())
    for tag in list(rules):
        if len(tag) == 2 and _vr(tag) == "UI":
            rules[tag] = uid
    rules[_tag("PatientID")] = set_value(lambda v: pseudo.patient(str(v)))
    if cfg.deid_retain_patient_characteristics:
        rules.update({_tag(k): keep for k in PATIENT_CHARACTERISTICS_KEEP})
    cleaned = set(CLEAN_DESCRIPTORS) if cfg.deid_clean_descriptors else set()
    if cfg.deid_retain_patient_characteristics:
        cleaned |= PATIENT_CHARACTERISTICS_CLEAN
    clean = set_value(lambda v: clean_text(v, idents))
    rules.update({_tag(k): clean for k in cleaned if _vr(_tag(k)) != "SQ"})
    if cfg.deid_retain_dates:
        days = pseudo.shift_days(patient)
        for k in MODIFIED_DATES:
            vr = _vr(_tag(k))
            rules[_tag(k)] = set_value(lambda v, d=days: shift_date(str(v), d)) if vr in ("DA", "DT") else keep
    return rules


def _apply(ds: Dataset, rules: dict[tuple, Callable]) -> None:
    """The profile on this dataset, then on every item of the sequences it kept (PS3.15: keeping a
    sequence means applying the profile inside it); private tags go too."""
    from dicomanonymizer.simpledicomanonymizer import anonymize_dataset
    anonymize_dataset(ds, extra_anonymization_rules=rules, delete_private_tags=True,
                      base_rules_gen=dict)
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _apply(item, rules)


def _sweep(ds: Dataset, idents: list[str]) -> list[str]:
    """Cut identifiers out of any text the profile kept (anywhere, sequences included); returns tag names."""
    hits: list[str] = []

    def visit(dataset: Dataset, elem: Any) -> None:
        if elem.VR not in TEXT_VRS or not elem.value:
            return
        values = elem.value if elem.VM > 1 else [elem.value]
        if any(contains_identifier(str(v), idents) for v in values):
            cleaned = "" if elem.VR == "PN" else clean_text(elem.value, idents)
            elem.value = "" if contains_identifier(str(cleaned), idents) else cleaned
            hits.append(tag_name(elem.tag))
    ds.walk(visit)
    return hits


def tag_name(tag: Any) -> str:
    t = Tag(tag)
    return keyword_for_tag(t) or f"({t.group:04X},{t.element:04X})" + (" private" if t.is_private else "")


def _changes(before: Dataset, after: Dataset) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"removed": [], "replaced": [], "emptied": [], "kept": [], "added": []}
    for elem in before:
        now = after.get(elem.tag)
        kind = ("removed" if now is None else "emptied" if now.value in (None, "", b"") or now.VM == 0
                else "kept" if now.value == elem.value else "replaced")
        out[kind].append(tag_name(elem.tag))
    out["added"] = [tag_name(e.tag) for e in after if e.tag not in before]
    return out


def _header_only(ds: Dataset) -> Dataset:
    head = Dataset()
    for elem in ds:
        if elem.tag != 0x7FE00010:
            head.add(copy.deepcopy(elem))
    return head


def deidentify_dataset(ds: Dataset, cfg: Any, pseudo: Pseudonymizer, *, source: str = "<dataset>") -> HeaderResult:
    """A de-identified copy of `ds` (the input is not changed). `cfg` carries the deid_* options of
    TextRemovalConfig. Raises DeidentifyError naming `source` when the header cannot be processed."""
    idents = identifiers(ds)
    patient = str(ds.get("PatientID", "") or ds.get("PatientName", "") or ds.get("StudyInstanceUID", ""))
    out = copy.deepcopy(ds)
    before = _header_only(ds)
    try:
        _apply(out, _actions(cfg, pseudo, idents, patient))
    except Exception as exc:  # the library raises NotImplementedError for VRs it cannot replace, and others
        raise DeidentifyError(f"{source}: header could not be de-identified ({type(exc).__name__}: {exc}); "
                              "nothing was written — inspect the file with `python -m pydicom show`") from exc
    swept = _sweep(out, idents)
    codes = [CODES["basic"]]
    if cfg.deid_retain_dates:
        codes.append(CODES["dates"])
    if cfg.deid_retain_patient_characteristics:
        codes.append(CODES["characteristics"])
    if cfg.deid_clean_descriptors:
        codes.append(CODES["descriptors"])
    out.PatientIdentityRemoved = "YES"
    out.LongitudinalTemporalInformationModified = "MODIFIED" if cfg.deid_retain_dates else "REMOVED"
    tags = _changes(before, _header_only(out))
    tags["swept"] = swept
    return HeaderResult(out, idents, tags, codes, dict(pseudo.mapping))


def mark_method(ds: Dataset, codes: list[tuple[str, str]]) -> None:
    """PatientIdentityRemoved, DeidentificationMethod and its code sequence, as PS3.15 E.1.1 item 6 asks."""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [f"synthcxr {m}"[:64] for _, m in codes]
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(items)


def finish_dataset(ds: Dataset, header: HeaderResult, pixels_clean: bool) -> None:
    """The last touches on the written file: BurnedInAnnotation and Clean Pixel Data (113101) only when
    the pixel pass left nothing behind, the keyed SOP Instance UID back (writing made a random one), and
    a file meta and preamble that describe us rather than the source (PS3.15 E.1.1 item 7)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    ds.BurnedInAnnotation = "NO" if pixels_clean else "YES"
    mark_method(ds, header.codes + ([CODES["pixels"]] if pixels_clean else []))
    ds.SOPInstanceUID = header.dataset.SOPInstanceUID
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta, ds.preamble = meta, b"\0" * 128


def new_secret() -> str:
    """A random key for one run: without `deid_secret`, UIDs and date shifts link only within the run."""
    return secrets.token_hex(16)

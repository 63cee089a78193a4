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
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID

from cxrcommon.errors import MissingFileError, UserError

from .ps315_options import CLEAN_DESCRIPTORS, PATIENT_CHARACTERISTICS_CLEAN, PATIENT_CHARACTERISTICS_KEEP

PROFILE_TABLE = "dicomfields_2026c"   # dicom-anonymizer's newest copy of Table E.1-1
MAX_SHIFT_DAYS = 3650                 # dates move back 1..3650 days, the same amount for every file of a patient
# CID 7050 De-identification Method codes (DCM) for what we apply.
CODES = {"basic": ("113100", "Basic Application Confidentiality Profile"),
         "pixels": ("113101", "Clean Pixel Data Option"),
         "descriptors": ("113105", "Clean Descriptors Option"),
         "dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
         "characteristics": ("113108", "Retain Patient Characteristics Option")}
# Free-text VRs: the only ones identifiers are read from (besides dates) and swept out of. Coded VRs (CS, AE,
# UI) hold defined terms that a cut would corrupt (MONOCHROME2, ISO_IR 100).
TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC"}
# Free-text VRs that still carry codes, never swept (a code value is no identifier, and cutting breaks it).
CODED = frozenset({"CodeValue", "LongCodeValue", "CodingSchemeDesignator", "CodingSchemeVersion",
                   "ContextGroupVersion", "MappingResourceName"})
SECRET_ENV = "SYNTHCXR_DEID_SECRET"   # where --deid-secret is read from when it is not given
DATE_IN_TEXT = re.compile(r"\b(\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|(19|20)\d{6})\b")
MIN_LEN = 3                            # shorter strings (initials, marker letters) are not matched
OCR_FOLD = str.maketrans("0158", "OISB")  # characters OCR confuses, folded on both sides before comparing


class DeidentifyError(ValueError):
    """A file whose header cannot be de-identified; the message names the file and the fix."""


def normalize(text: str) -> str:
    """Upper-case letters and digits only, OCR look-alikes folded: how identifiers are compared."""
    return re.sub(r"[^0-9A-Z]", "", str(text).upper()).translate(OCR_FOLD)


def date_forms(value: str) -> list[str]:
    """The ways a header date is commonly burned into a film, so the real one can be erased from the pixels
    (next to the shifted header date it would reveal the shift). The 00010101 placeholder is none."""
    try:
        d = _dt.datetime.strptime(value[:8], "%Y%m%d")
    except ValueError:
        return []
    if d.year < 1800:
        return []
    return [d.strftime(f) for f in ("%Y%m%d", "%Y-%m-%d", "%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%d-%b-%Y",
                                    "%d/%m/%y")]


def _values(elem: Any) -> list[str]:
    return [str(v) for v in (elem.value if elem.VM > 1 else [elem.value])] if elem.value not in (None, "") else []


def identifiers(ds: Dataset, scrubbed: set[tuple[int, int]]) -> list[str]:
    """Every identifying string in the header, sequences included: each person name (whole and by
    component), each date in its written forms, and each free-text value of an attribute the profile
    removes or replaces (`scrubbed`: IDs, accession, institution, station, department, ...)."""
    found: list[str] = []

    def visit(_: Dataset, elem: Any) -> None:
        if elem.VR in ("DA", "DT"):
            found.extend(f for v in _values(elem) for f in date_forms(v))
        elif elem.VR == "PN" or (elem.VR in TEXT_VRS and (elem.tag.group, elem.tag.element) in scrubbed
                                 and elem.keyword not in CODED):
            for text in _values(elem):
                found.append(text.replace("^", " ").strip())
                if elem.VR == "PN":
                    found.extend(re.split(r"[\s^,=]+", text))  # family, given, middle names on their own
    ds.walk(visit)
    return sorted({s.strip() for s in found if len(normalize(s)) >= MIN_LEN}, key=lambda s: (-len(s), s))


def _words(text: str) -> list[str]:
    return [w.translate(OCR_FOLD) for w in re.findall(r"[0-9A-Z]+", str(text).upper())]


def contains_identifier(text: str, idents: Iterable[str]) -> bool:
    """Whether `text` (a header value) holds an identifier as whole words, case and punctuation aside:
    'ROME' is in 'ROME CLINIC' but not in 'MONOCHROME2'."""
    words = _words(text)
    for ident in idents:
        iw = _words(ident)
        if iw and len(normalize(ident)) >= MIN_LEN and any(words[k:k + len(iw)] == iw
                                                           for k in range(len(words) - len(iw) + 1)):
            return True
    return False


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
    """Keyed, stateless replacements: the same secret maps the same UID, patient, date or file to the same
    new value in every file and process of a run (so series and studies stay linked), and records what it
    mapped so `--mapping-out` can write it."""

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

    def file_name(self, rel: str | Path) -> Path:
        """The output name of input `rel` (its path under the input folder): a keyed hash with the suffix,
        so neither a patient's name in a file or folder name nor the folder layout reaches the outputs."""
        rel = Path(rel)
        new = Path(self._digest("file", rel.as_posix()).hex()[:20] + rel.suffix.lower())
        self.mapping[("file", rel.as_posix())] = new.name
        return new


def resolve_secret(value: str | None) -> str | None:
    """`--deid-secret` as given: 'file:PATH' reads the key from a file (kept out of shell history and `ps`);
    unset falls back to the SYNTHCXR_DEID_SECRET environment variable; None when neither is set."""
    if value and value.startswith("file:"):
        path = Path(value[5:]).expanduser()
        if not path.is_file():
            raise MissingFileError(f"--deid-secret {value}: no such file — give file:PATH of a file holding the key")
        value = path.read_text(encoding="utf-8").strip()
        if not value:
            raise UserError(f"--deid-secret file {path} is empty — put the key in it")
        return value
    return value or os.environ.get(SECRET_ENV) or None


def settings_fingerprint(cfg: Any, pseudo: Pseudonymizer | None) -> dict[str, Any]:
    """What an output was made with, for the resume check: whether it was de-identified, the deid_* options
    and a one-way hash of the key (never the key: the outputs are shared)."""
    fp: dict[str, Any] = {"deidentify": bool(cfg.deidentify)}
    if cfg.deidentify and pseudo is not None:
        fp.update({k: v for k, v in sorted(vars(cfg).items()) if k.startswith("deid_") and k != "deid_secret"})
        fp["profile"] = PROFILE_TABLE
        fp["key_sha256"] = hashlib.sha256(b"synthcxr-deid-fingerprint\0" + pseudo.key).hexdigest()[:16]
    return fp


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
    """DA 'YYYYMMDD' or the date part of a DT moved by `days`; a placeholder that cannot move (00010101,
    set by an earlier anonymizer) stays as it is; anything unparsable becomes ''."""
    try:
        d = _dt.datetime.strptime(value[:8], "%Y%m%d")
    except ValueError:
        return ""
    try:
        return (d + _dt.timedelta(days=days)).strftime("%Y%m%d") + value[8:]
    except OverflowError:
        return value


def each_value(value: Any, fn: Callable[[Any], Any]) -> Any:
    """`fn` on every value of a multi-valued element, or on its one value."""
    return [fn(v) for v in value] if isinstance(value, (list, tuple, MultiValue)) else fn(value)


def _clean_one(text: str, idents: Iterable[str]) -> str:
    text = DATE_IN_TEXT.sub("", text)
    for ident in idents:
        words = re.findall(r"[0-9A-Za-z]+", ident)
        if words:  # whole words only, any punctuation between them
            text = re.sub(r"(?<![0-9A-Za-z])" + r"[^0-9A-Za-z]*".join(map(re.escape, words)) + r"(?![0-9A-Za-z])",
                          "", text, flags=re.IGNORECASE)
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


def _keep(ds: Dataset, tag: tuple) -> None:
    """Option K: the value stays."""


def _set_value(fn: Callable[[Any], Any]) -> Callable:
    def action(ds: Dataset, tag: tuple) -> None:
        elem = ds.get(tag)
        if elem is not None and elem.value not in (None, ""):
            elem.value = fn(elem.value)
    return action


@dataclass
class Profile:
    """The Basic Profile with our Options and keyed replacements laid over it, applied by `_apply`."""
    rules: dict[tuple, Callable]               # (group, element) -> action(dataset, tag)
    ranges: list[tuple[tuple, Callable]]       # (group, element, group mask, element mask) -> action
    retained: set[tuple]                       # tags kept or cleaned by an Option (not identifiers)
    pseudo: Pseudonymizer
    days: int | None                           # date shift (Modified Dates Option) or None

    def action(self, tag: Tag) -> Callable | None:
        rule = self.rules.get((tag.group, tag.element))
        if rule is None:
            rule = next((a for (g, e, gm, em), a in self.ranges
                         if tag.group & gm == g & gm and tag.element & em == e & em), None)
        return rule


def _profile(cfg: Any, pseudo: Pseudonymizer, idents: list[str], patient: str) -> Profile:
    rules: dict[tuple, Callable] = {}
    ranges: list[tuple[tuple, Callable]] = []
    for tag, act in basic_profile().items():
        (rules.__setitem__(tag, act) if len(tag) == 2 else ranges.append((tag, act)))
    rules[_tag("PatientID")] = _set_value(lambda v: pseudo.patient(str(v)))
    retained: set[tuple] = set()
    if cfg.deid_retain_patient_characteristics:
        retained |= {_tag(k) for k in PATIENT_CHARACTERISTICS_KEEP}
        rules.update({_tag(k): _keep for k in PATIENT_CHARACTERISTICS_KEEP})
    cleaned = set(CLEAN_DESCRIPTORS) if cfg.deid_clean_descriptors else set()
    if cfg.deid_retain_patient_characteristics:
        cleaned |= PATIENT_CHARACTERISTICS_CLEAN
    clean = _set_value(lambda v: clean_text(v, idents))
    for k in cleaned:
        if _vr(_tag(k)) != "SQ":  # a cleaned sequence is kept and the profile applied inside it
            rules[_tag(k)] = clean
        retained.add(_tag(k))
    days = pseudo.shift_days(patient) if cfg.deid_retain_dates else None
    return Profile(rules, ranges, retained, pseudo, days)


def is_class_uid(elem: Any) -> bool:
    """SOP Class, Transfer Syntax and other UIDs the standard defines: they name a kind of object, not the
    patient's, and remapping them makes the file unreadable."""
    kw = elem.keyword or ""
    return kw.endswith("ClassUID") or "TransferSyntax" in kw or all(UID(str(v)).is_valid and UID(str(v)).name
                                                                      != str(v) for v in _values(elem))


def _apply(ds: Dataset, profile: Profile) -> None:
    """The profile on one dataset level, then inside every sequence it keeps (PS3.15: keeping a sequence
    means applying the profile inside it). Our actions for UIDs, sequences and dates run instead of
    dicom-anonymizer's (its UIDs are random per process and it empties the elements of a sequence);
    its actions only ever see plain values. Private tags go too."""
    from dicomanonymizer.simpledicomanonymizer import delete, empty

    for elem in list(ds):
        if elem.tag.is_private:
            continue
        key = (elem.tag.group, elem.tag.element)
        rule = profile.action(elem.tag)
        if elem.VR == "SQ":
            if rule is delete:
                del ds[elem.tag]
            elif rule is empty:
                elem.value = Sequence([])
            else:
                for item in elem.value:
                    _apply(item, profile)
        elif elem.VR in ("DA", "DT", "TM") and profile.days is not None and "Birth" not in (elem.keyword or ""):
            # Modified Dates Option, by VR (PS3.15 E.3.6 Note 4): every date moves by the patient's shift,
            # wherever it is and whatever the profile's edition lists; times stay
            if elem.VR != "TM":
                elem.value = each_value(elem.value, lambda v: shift_date(str(v), profile.days))
        elif elem.VR == "UI" and rule is not None and rule is not _keep:
            if rule is delete:
                del ds[elem.tag]
            elif not is_class_uid(elem):
                elem.value = each_value(elem.value, lambda u: profile.pseudo.uid(str(u)))
        elif rule is not None:
            rule(ds, key)
    ds.remove_private_tags()


def _sweep(ds: Dataset, idents: list[str]) -> list[str]:
    """Cut identifiers (whole words) out of any free text the profile kept, sequences included; returns tag
    names. Coded values (CS, AE, UI, code items) are never touched."""
    hits: list[str] = []

    def visit(dataset: Dataset, elem: Any) -> None:
        if elem.VR not in TEXT_VRS or elem.keyword in CODED or not elem.value:
            return
        if any(contains_identifier(v, idents) for v in _values(elem)):
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
    """A de-identified copy of `ds` (the input is not changed), with a file meta and preamble of its own.
    `cfg` carries the deid_* options of TextRemovalConfig. Raises DeidentifyError naming `source` (give a
    non-identifying name) when the header cannot be processed."""
    patient = str(ds.get("PatientID", "") or ds.get("PatientName", "") or ds.get("StudyInstanceUID", ""))
    idents: list[str] = []  # filled below; the Clean Descriptors rule reads it when applied
    profile = _profile(cfg, pseudo, idents, patient)
    idents += identifiers(ds, {k for k in profile.rules if k not in profile.retained})
    out = copy.deepcopy(ds)
    before = _header_only(ds)
    try:
        _apply(out, profile)
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
    _fresh_file_meta(out)
    tags = _changes(before, _header_only(out))
    tags["swept"] = swept
    return HeaderResult(out, idents, tags, codes, dict(pseudo.mapping))


def _fresh_file_meta(ds: Dataset) -> None:
    """A file meta and preamble that describe us rather than the source (PS3.15 E.1.1 item 7): the source's
    preamble (128 free bytes) and meta can carry anything, so none of it is copied."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    old = getattr(ds, "file_meta", None)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    meta.TransferSyntaxUID = old.TransferSyntaxUID if old is not None and "TransferSyntaxUID" in old else \
        "1.2.840.10008.1.2.1"
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta, ds.preamble = meta, b"\0" * 128


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
    """The last touches on the written file: BurnedInAnnotation=NO and Clean Pixel Data (113101) only when
    a verification pass read nothing left, the keyed SOP Instance UID back (writing made a random one), and
    the fresh file meta and preamble."""
    ds.BurnedInAnnotation = "NO" if pixels_clean else "YES"
    mark_method(ds, header.codes + ([CODES["pixels"]] if pixels_clean else []))
    ds.SOPInstanceUID = header.dataset.SOPInstanceUID
    syntax = ds.file_meta.TransferSyntaxUID  # what the pixels were written in
    ds.file_meta = copy.deepcopy(header.dataset.file_meta)
    ds.file_meta.TransferSyntaxUID = syntax


def new_secret() -> str:
    """A random key for one run: without `deid_secret`, UIDs and date shifts link only within the run."""
    return secrets.token_hex(16)

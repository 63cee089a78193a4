"""De-identify a DICOM header for sharing: the PS3.15 Basic Application Level Confidentiality Profile
(dicom-anonymizer's copy of Table E.1-1) plus the Options in `options`, keyed pseudonyms (`pseudonyms`) so
the files of a run stay linked, and an audit of what changed that names tags but never their old values.

The identifying strings are read from the header *before* it is scrubbed (`scrubber.identifiers`), so the
pixel pass can erase them wherever OCR reads them (as Presidio's DICOM redactor does) and the scrubbed
header can be swept for copies hidden in tags the profile keeps."""
from __future__ import annotations

import copy
import datetime as _dt
import functools
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID

from cxrcommon.errors import UserError

from .options import (
    CLEAN_DESCRIPTORS,
    PATIENT_CHARACTERISTICS_CLEAN,
    PATIENT_CHARACTERISTICS_KEEP,
)
from .pseudonyms import Pseudonymizer
from .scrubber import CODED, Identifiers, clean_text, contains_identifier, each_value, identifiers, sweep, values

PROFILE_TABLE = "dicomfields_2026c"   # dicom-anonymizer's newest copy of Table E.1-1
# CID 7050 De-identification Method codes (DCM) for what we apply.
CODES = {"basic": ("113100", "Basic Application Confidentiality Profile"),
         "pixels": ("113101", "Clean Pixel Data Option"),
         "descriptors": ("113105", "Clean Descriptors Option"),
         "dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
         "characteristics": ("113108", "Retain Patient Characteristics Option")}
DATE_PART = re.compile(r"(?:(?<=^)|(?<=-))(\d{8})")  # the date at the start of a value or after a range's '-'
# Attributes the profile's table does not list are kept, but never these: values that cannot be read (UN),
# links that can carry anything (UR), binary documents, and free text (removed unless --clean-descriptors,
# which sweeps it); nor attributes that hold a birth date, address, phone, e-mail or signature by name.
UNLISTED_REMOVED_VRS = frozenset({"UN", "UR", "OB", "OW", "OD", "OF", "OL", "OV"})
UNLISTED_TEXT_VRS = frozenset({"ST", "LT", "UT", "UC"})
BINARY_KEPT = re.compile(r"(PixelData|LookupTableData|LUTData|ICCProfile|SegmentedPaletteColor.*)$")
UNLISTED_PERSONAL = re.compile(r"Birth|Address|Telephone|Email|Contact|Signature")
# Logged and put in the audit whenever the Clean Descriptors Option is on.
DESCRIPTORS_RISK = ("--clean-descriptors keeps free text (descriptions, comments, report text) that the Basic "
                    "Profile removes, cut of the names, IDs, addresses and dates the scrubber recognises; a name or "
                    "identifier it does not recognise stays. Read the kept text before sharing, or run without it")

class DeidentifyError(UserError):
    """A file whose header cannot be de-identified; the message names the file and the fix."""


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
    """Every date of a DA or DT value moved by `days`: 'YYYYMMDD', a DT's date part (its time and offset stay)
    and both ends of a range ('20230115-20230301'). A placeholder that cannot move (00010101, set by an
    earlier anonymizer) stays as it is; a value with no parsable date becomes ''."""
    def move(m: re.Match) -> str:
        try:
            d = _dt.datetime.strptime(m.group(1), "%Y%m%d")
        except ValueError:
            raise _Unparsable from None
        try:
            return (d + _dt.timedelta(days=days)).strftime("%Y%m%d")
        except OverflowError:
            return m.group(1)
    try:
        out = DATE_PART.sub(move, value)
    except _Unparsable:
        return ""
    return out if DATE_PART.search(value) else ""


class _Unparsable(Exception):
    pass


@dataclass
class HeaderResult:
    dataset: Dataset                           # the de-identified copy (pixels untouched)
    identifiers: Identifiers                   # identifying strings read before scrubbing (PHI: never written)
    tags: dict[str, list[str]]                 # removed / replaced / emptied / kept / added -> tag names
    codes: list[tuple[str, str]]               # CID 7050 codes applied to the header
    mapping: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, old) -> new (PHI)


def _keep(ds: Dataset, tag: tuple) -> None:
    """Option K: the value stays."""


def cap_age(value: Any) -> str:
    """An age over 89 years shown as 090Y: HIPAA Safe Harbor groups the very old, who are few enough to find."""
    text = str(value)
    return "090Y" if re.fullmatch(r"\d{3}Y", text) and int(text[:3]) > 89 else text


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
    clean_descriptors: bool = False            # free text kept (and swept) rather than removed

    def action(self, tag: Tag) -> Callable | None:
        rule = self.rules.get((tag.group, tag.element))
        if rule is None:
            rule = next((a for (g, e, gm, em), a in self.ranges
                         if tag.group & gm == g & gm and tag.element & em == e & em), None)
        return rule


def _profile(cfg: Any, pseudo: Pseudonymizer, idents: Identifiers, patient: str) -> Profile:
    rules: dict[tuple, Callable] = {}
    ranges: list[tuple[tuple, Callable]] = []
    for tag, act in basic_profile().items():
        if len(tag) == 2:
            rules[tag] = act
        else:
            ranges.append((tag, act))
    rules[_tag("PatientID")] = _set_value(lambda v: pseudo.patient(str(v)))
    if not cfg.deid_clean_descriptors:  # PS3.15 X: the report text of an SR, whose items the table keeps
        from dicomanonymizer.simpledicomanonymizer import delete
        rules[_tag("ContentSequence")] = delete
    retained: set[tuple] = set()
    if cfg.deid_retain_patient_characteristics:
        retained |= {_tag(k) for k in PATIENT_CHARACTERISTICS_KEEP}
        rules.update({_tag(k): _keep for k in PATIENT_CHARACTERISTICS_KEEP})
        rules[_tag("PatientAge")] = _set_value(cap_age)
    cleaned = set(CLEAN_DESCRIPTORS) if cfg.deid_clean_descriptors else set()
    if cfg.deid_retain_patient_characteristics:
        cleaned |= PATIENT_CHARACTERISTICS_CLEAN
    clean = _set_value(lambda v: clean_text(v, idents))
    for k in cleaned:
        if _vr(_tag(k)) != "SQ":  # a cleaned sequence is kept and the profile applied inside it
            rules[_tag(k)] = clean
        retained.add(_tag(k))
    days = pseudo.shift_days(patient) if cfg.deid_retain_dates else None
    if cfg.deid_clean_descriptors:  # the report's text kept, the profile applied inside and every text swept
        retained.add(_tag("ContentSequence"))
    return Profile(rules, ranges, retained, pseudo, days, bool(cfg.deid_clean_descriptors))


def is_standard_uid(elem: Any) -> bool:
    """UIDs the standard registers (SOP classes, transfer syntaxes, coding schemes): they name a kind of
    object, not the patient's, and remapping them makes the file unreadable. Any other UID, a vendor's
    'class' UID included, can embed anything (an MRN, a birth date) and is remapped."""
    return all(UID(str(v)).is_valid and UID(str(v)).name != str(v) for v in values(elem))


def _dictionary_pn(elem: Any) -> bool:
    """A person-name attribute by the dictionary (whatever VR the file stores) that the table does not list."""
    try:
        return dictionary_VR(elem.tag) == "PN"
    except KeyError:
        return False


def _is_reference(keyword: str) -> bool:
    """Sequences of references to other objects: kept with their UIDs remapped, so the links survive."""
    return keyword.startswith(("Referenced", "Source"))


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
        kw = elem.keyword or ""
        if elem.VR == "SQ":
            if rule is None or rule is _keep or key in profile.retained or _is_reference(kw):
                for item in elem.value:
                    _apply(item, profile)
            elif rule is empty:
                elem.value = Sequence([])
            else:  # X, and X/Z, X/D, U: a person's or place's details; a dummy is worth nothing to research
                del ds[elem.tag]
        elif elem.VR in ("DA", "DT", "TM") and profile.days is not None and "Birth" not in kw:
            # Modified Dates Option, by VR (PS3.15 E.3.6 Note 4): every date moves by the patient's shift,
            # wherever it is and whatever the profile's edition lists; times stay
            if elem.VR != "TM":
                elem.value = each_value(elem.value, lambda v: shift_date(str(v), profile.days))
        elif elem.VR == "UI" and rule is not _keep:
            if rule is delete:
                del ds[elem.tag]
            elif not is_standard_uid(elem):
                elem.value = each_value(elem.value, lambda u: profile.pseudo.uid(str(u)))
        elif rule is not None:
            rule(ds, key)
        elif (elem.VR in UNLISTED_REMOVED_VRS and not BINARY_KEPT.search(kw)) or UNLISTED_PERSONAL.search(kw) \
                or (elem.VR in UNLISTED_TEXT_VRS and not profile.clean_descriptors) or _dictionary_pn(elem) \
                or elem.VR in ("DA", "DT"):  # dates are not shifted (retain-dates off): an unlisted one goes too
            del ds[elem.tag]
    ds.remove_private_tags()


def _drop_coded_identifiers(ds: Dataset, idents: Identifiers) -> list[str]:
    """Remove coded values (CS, code values) that hold a header identifier or a date: a code cannot be cut
    without breaking it, and a staff or patient ID used as a code value is an identifier all the same."""
    hits: list[str] = []

    def visit(dataset: Dataset, elem: Any) -> None:
        if (elem.VR == "CS" or elem.keyword in CODED) and any(contains_identifier(v, idents) for v in values(elem)):
            hits.append(tag_name(elem.tag))
            del dataset[elem.tag]
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
    idents = Identifiers()  # filled below; the Clean Descriptors rule reads it when applied
    profile = _profile(cfg, pseudo, idents, patient)
    # descriptors and comments hold identifiers but are none (a film's "CHEST" must not read as PHI)
    containers = {_tag(k) for k in CLEAN_DESCRIPTORS | PATIENT_CHARACTERISTICS_CLEAN if _vr(_tag(k)) != "SQ"}
    idents.update(identifiers(ds, {k for k in profile.rules if k not in profile.retained and k not in containers}))
    out = copy.deepcopy(ds)
    before = _header_only(ds)
    try:
        _apply(out, profile)
    except Exception as exc:  # the library raises NotImplementedError for VRs it cannot replace, and others
        raise DeidentifyError(f"{source}: header could not be de-identified ({type(exc).__name__} in the profile "
                              "library); nothing was written — inspect the file with `python -m pydicom show`") from exc
    swept = [tag_name(t) for t in sweep(out, idents)] + _drop_coded_identifiers(out, idents)
    codes = [CODES["basic"]]
    if cfg.deid_retain_dates:
        codes.append(CODES["dates"])
    if cfg.deid_retain_patient_characteristics:
        codes.append(CODES["characteristics"])
    if cfg.deid_clean_descriptors:
        codes.append(CODES["descriptors"])
    out.PatientIdentityRemoved = "YES"
    out.LongitudinalTemporalInformationModified = "MODIFIED" if cfg.deid_retain_dates else "REMOVED"
    _fresh_file_meta(out, pseudo, source)
    tags = _changes(before, _header_only(out))
    tags["swept"] = swept
    return HeaderResult(out, idents, tags, codes, dict(pseudo.mapping))


def _fresh_file_meta(ds: Dataset, pseudo: Pseudonymizer, source: str) -> None:
    """A file meta and preamble that describe us rather than the source (PS3.15 E.1.1 item 7): the source's
    preamble (128 free bytes) and meta can carry anything, so none of it is copied."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    old = getattr(ds, "file_meta", None)
    meta = FileMetaDataset()
    # an object without them (old toolkits) still needs both in its meta: Secondary Capture, a keyed new instance
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "") or "1.2.840.10008.5.1.4.1.1.7"
    if not ds.get("SOPInstanceUID"):
        ds.SOPInstanceUID = pseudo.uid(f"missing-sop-instance:{ds.get('StudyInstanceUID', '')}:{source}")
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
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

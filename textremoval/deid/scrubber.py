"""The scrubber: which strings of a DICOM header identify the patient, and where they appear again, in
free-text tags (the Clean Descriptors Option) and in what OCR reads off the pixels."""
from __future__ import annotations

import datetime as _dt
import difflib
import re
from typing import Any, Callable, Iterable

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

# UI) hold defined terms that a cut would corrupt (MONOCHROME2, ISO_IR 100).
TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC"}
# Free-text VRs that still carry codes, never swept (a code value is no identifier, and cutting breaks it).
CODED = frozenset({"CodeValue", "LongCodeValue", "CodingSchemeDesignator", "CodingSchemeVersion",
                   "ContextGroupVersion", "MappingResourceName"})
DATE_IN_TEXT = re.compile(r"\b(\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|(19|20)\d{6})\b")
MIN_LEN = 3                            # shorter strings (initials, marker letters) are not matched
OCR_FOLD = str.maketrans("0158", "OISB")  # characters OCR confuses, folded on both sides before comparing


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


def values(elem: Any) -> list[str]:
    return [str(v) for v in (elem.value if elem.VM > 1 else [elem.value])] if elem.value not in (None, "") else []


def identifiers(ds: Dataset, scrubbed: set[tuple[int, int]]) -> list[str]:
    """Every identifying string in the header, sequences included: each person name (whole and by
    component), each date in its written forms, and each free-text value of an attribute the profile
    removes or replaces (`scrubbed`: IDs, accession, institution, station, department, ...)."""
    found: list[str] = []

    def visit(_: Dataset, elem: Any) -> None:
        if elem.VR in ("DA", "DT"):
            found.extend(f for v in values(elem) for f in date_forms(v))
        elif elem.VR == "PN" or (elem.VR in TEXT_VRS and (elem.tag.group, elem.tag.element) in scrubbed
                                 and elem.keyword not in CODED):
            for text in values(elem):
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


def sweep(ds: Dataset, idents: list[str]) -> list[Any]:
    """Cut identifiers (whole words) out of any free text the profile kept, sequences included; returns the
    tags cut. Coded values (CS, AE, UI, code items) are never touched."""
    hits: list[str] = []

    def visit(dataset: Dataset, elem: Any) -> None:
        if elem.VR not in TEXT_VRS or elem.keyword in CODED or not elem.value:
            return
        if any(contains_identifier(v, idents) for v in values(elem)):
            cleaned = "" if elem.VR == "PN" else clean_text(elem.value, idents)
            elem.value = "" if contains_identifier(str(cleaned), idents) else cleaned
            hits.append(elem.tag)
    ds.walk(visit)
    return hits


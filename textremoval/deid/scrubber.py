"""The scrubber: which strings of a DICOM header identify the patient, and where they appear again, in
free-text tags (the Clean Descriptors Option) and in what OCR reads off the pixels.

What identifies is decided by the attribute (its keyword and dictionary VR), never by the VR a file stores:
a PatientName written as LO is still a name. Each kind is matched with its variants:
- name tokens: case- and accent-insensitive, alone, possessive, hyphenated, glued to initials or punctuation
  (a token of 7+ letters cuts any word it sits in);
- numbers (IDs, accession, phone): any separators between the characters, with or without a prefix
  (`MRN 8823-1977`), the digits alone, and a phone number's local part;
- addresses: every run of two or more words and every distinctive word (`42 Wallaby Way` of
  `42 Wallaby Way Sydney`);
- dates: in free text *every* date is cut, numeric or written (month names from CLDR via Babel, in the
  languages of the public CXR datasets; ordinals; two-digit years), not only the header's own.
OCR text is compared with rapidfuzz, allowing one slip in five."""
from __future__ import annotations

import datetime as _dt
import functools
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

# Free-text VRs: identifiers are swept out of these only. Coded VRs (CS, AE, UI) hold defined terms that a
# cut would corrupt (MONOCHROME2, ISO_IR 100).
TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC"}
# Free-text VRs that still carry codes, never swept (a code value is no identifier, and cutting breaks it).
CODED = frozenset({"CodeValue", "LongCodeValue", "CodingSchemeDesignator", "CodingSchemeVersion",
                   "ContextGroupVersion", "MappingResourceName"})
# VRs whose values are never identifiers in their own right (numbers, codes, binary, sequences, UIDs).
NOT_TEXT = {"SQ", "UI", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "DS", "IS", "OB", "OW", "OF", "OD", "OL",
            "OV", "UN", "AT", "TM", "AS", "CS"}
MIN_LEN = 3                               # shorter strings (initials, marker letters) are not matched
MIN_DIGITS = 4                            # a digit run this long from an ID or phone is matched on its own
OCR_FOLD = str.maketrans("0158", "OISB")  # characters OCR confuses, folded on both sides before comparing
OCR_MIN_SCORE = 80                        # rapidfuzz partial_ratio (0-100) at which OCR text reads as an identifier
# Languages whose month names are cut from free text: English, Spanish (PadChest), and the other languages of
# European CXR archives. Abbreviations only for English and Spanish: elsewhere they collide with words.
MONTH_LOCALES = ("en", "es", "de", "fr", "it", "pt")
ABBREVIATED_LOCALES = ("en", "es")
# Address words that say what kind of place, not which: never cut on their own.
PLACE_WORDS = frozenset("street st road rd avenue ave lane ln drive dr court ct place pl way boulevard blvd highway "
                        "hwy apartment apt unit suite floor flat house north south east west calle avenida plaza "
                        "paseo piso puerta".split())
ID_KEYWORD = re.compile(r"(ID|IDs|Number|Numbers|Locator|Identifier)$")
SEP = r"[\s\-./_:#,]*"                    # what may stand between the characters of a number


def normalize(text: str) -> str:
    """Upper-case letters and digits only, accents and OCR look-alikes folded: how OCR text is compared."""
    return re.sub(r"[^0-9A-Z]", "", fold_accents(str(text)).upper()).translate(OCR_FOLD)


def fold_accents(text: str) -> str:
    """Each character replaced by its base letter (ñ -> n, é -> e): same length, so spans found in the folded
    text cut the same characters of the original."""
    return "".join(unicodedata.normalize("NFKD", c)[0] if c.isalpha() else c for c in text)


@functools.lru_cache(maxsize=1)
def _month_pattern() -> str:
    from babel.dates import get_month_names

    names = set()
    for loc in MONTH_LOCALES:
        widths = ("wide", "abbreviated") if loc in ABBREVIATED_LOCALES else ("wide",)
        for width in widths:
            for context in ("format", "stand-alone"):
                names |= {fold_accents(n).lower().rstrip(".") for n in get_month_names(width, context, loc).values()}
    names |= {"sept"}
    return "(?:" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\.?"


@functools.lru_cache(maxsize=1)
def date_regex() -> re.Pattern:
    """Any date in text: numeric (2023-01-15, 15/01/23, 15.01.2023, 20230115) or written with a month name
    (15 January 2023, Jan. 15, 2023, 23rd April 1961, 23 de abril de 1961, April 1961, 23 April)."""
    month = _month_pattern()
    day = r"(?:[0-3]?\d)(?:st|nd|rd|th|er|o|º|°|\.)?"
    year = r"(?:\d{4}|'?\d{2})"
    of = r"(?:\s+(?:de|del|of)\s+|[\s,./-]+)"
    numeric = (r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.](?:\d{4}|\d{2})"
               r"|(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])")
    written = (rf"{day}{of}{month}(?:{of}{year})?"          # 23 April 1961, 23 de abril de 1961, 23 April
               rf"|{month}{of}{day}(?:,?{of}{year})"        # April 23, 1961, Jan. 15 2023
               rf"|{month}{of}\d{{4}}")                     # April 1961
    return re.compile(rf"(?<![0-9A-Za-z])(?:{numeric}|{written})(?![0-9A-Za-z])", re.IGNORECASE)


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
                                    "%d/%m/%y", "%d %B %Y", "%B %d %Y")]


def values(elem: Any) -> list[str]:
    """An element's values as strings (none for an empty one)."""
    if elem.value in (None, "", b""):
        return []
    return [str(v) for v in (elem.value if elem.VM > 1 and isinstance(elem.value, (list, MultiValue)) else
                             [elem.value])]


@dataclass
class Identifiers:
    """The identifying strings of one header, by kind (PHI: never written). Iterating yields every string
    OCR text is compared with."""
    names: set[str] = field(default_factory=set)      # name and address words, cut wherever they stand
    phrases: set[str] = field(default_factory=set)    # multi-word values and address runs, cut as a whole
    numbers: set[str] = field(default_factory=set)    # IDs, accession and phone numbers, letters and digits only
    dates: set[str] = field(default_factory=set)      # the header's dates in their burnt-in forms

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.names | self.phrases | self.numbers | self.dates, key=lambda s: (-len(s), s)))

    def __bool__(self) -> bool:
        return bool(self.names or self.phrases or self.numbers or self.dates)

    def update(self, other: "Identifiers") -> None:
        for kind in ("names", "phrases", "numbers", "dates"):
            getattr(self, kind).update(getattr(other, kind))
        self.__dict__.pop("_regex", None)

    @classmethod
    def of(cls, strings: Iterable[str]) -> "Identifiers":
        """Plain strings (a caller's list): multi-word ones as phrases, each word of 3+ letters as a name, digit
        runs as numbers."""
        found = cls()
        for s in strings:
            found.add_text(s)
        return found

    def add_name(self, text: str) -> None:
        words = [w for w in re.split(r"[\s^,=.\-_/()]+", text) if w]
        for w in words:
            if len(w) >= MIN_LEN and not w.isdigit():
                self.names.add(w)
        if len(words) > 1:
            self.phrases.add(" ".join(words))

    def add_number(self, text: str) -> None:
        core = re.sub(r"[^0-9A-Za-z]", "", fold_accents(text))
        if len(core) >= MIN_LEN:
            self.numbers.add(core.upper())
        digits = re.sub(r"\D", "", text)
        runs = re.findall(r"\d+", text) + [digits]
        if len(digits) >= 9:  # a phone number's local part, written without its country or area code
            runs += [digits[-8:], digits[-7:]]
        self.numbers.update(r for r in runs if len(r) >= MIN_DIGITS)

    def add_address(self, text: str) -> None:
        words = [w for w in re.split(r"[\s,^;]+", text) if w]
        self.phrases.update(" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 2, len(words) + 1))
        self.names.update(w for w in words if len(w) >= 4 and w.isalpha() and w.lower() not in PLACE_WORDS)
        self.numbers.update(w for w in words if w.isdigit() and len(w) >= MIN_DIGITS)

    def add_text(self, text: str) -> None:
        text = text.strip()
        if re.search(r"\d", text) and len(re.sub(r"\D", "", text)) >= MIN_DIGITS:
            self.add_number(text)
        if len(normalize(text)) >= MIN_LEN and re.search(r"[A-Za-z]", text):
            self.phrases.add(text.replace("^", " ").strip())
            if "^" in text:
                self.add_name(text)

    def regex(self) -> re.Pattern | None:
        """One pattern matching every name, phrase and number with its variants (on accent-folded text)."""
        if "_regex" not in self.__dict__:
            parts = []
            for p in sorted(self.phrases, key=len, reverse=True):
                words = re.findall(r"\w+", fold_accents(p))
                if words and len("".join(words)) >= MIN_LEN:
                    parts.append(r"(?<!\w)" + r"\W*".join(map(re.escape, words)) + r"(?:['’]s)?(?!\w)")
            for n in sorted(self.numbers, key=len, reverse=True):
                body = SEP.join(map(re.escape, n))
                parts.append((r"(?<!\d)" if n[0].isdigit() else r"(?<![0-9A-Za-z])") + body +
                             (r"(?!\d)" if n[-1].isdigit() else r"(?![0-9A-Za-z])"))
            for w in sorted(self.names, key=len, reverse=True):
                w = re.escape(fold_accents(w))
                # up to two glued initials before it (ZQuixotewright), possessive or plural after, a hyphenated
                # double name whole; 7+ letters: also inside any longer word (no English word hides such a name)
                parts.append(rf"[\w'’-]*{w}[\w'’-]*" if len(w) >= 7 else
                             rf"(?<![^\W\d_])[^\W\d_]{{0,2}}{w}(?:['’]?s)?(?:-[^\W\d_]+)*(?![^\W\d_])")
            self.__dict__["_regex"] = re.compile("|".join(parts), re.IGNORECASE) if parts else None
        return self.__dict__["_regex"]


# Other identifiers written in free text whatever the header says: a labelled record or accession number,
# and anything shaped like a phone number (8+ digits in groups).
LABELLED_ID = re.compile(r"(?<![0-9A-Za-z])(?:MRN|MR|NHS|SSN|DNI|NIE|NHC|CIP|ID|ACC|ACCESSION|PATIENT|PAT|HC|"
                         r"RECORD)\s*(?:NO\.?|NUMBER|NUM|N[º°o]|#|:)?\s*[:#]?\s*[A-Z]{0,3}[-\s]?\d[\d\-/ ]{2,}\d"
                         r"(?![0-9A-Za-z])", re.IGNORECASE)
PHONE = re.compile(r"(?<![\w.])\+?\(?\d{1,4}\)?(?:[\s.-]?\(?\d{2,4}\)?){2,5}(?![\w.])")


def _phone_like(match: re.Match) -> bool:
    return len(re.sub(r"\D", "", match.group())) >= 8


def identifiers(ds: Dataset, scrubbed: set[tuple[int, int]]) -> Identifiers:
    """Every identifying value in the header, sequences and private tags included: person names (by the
    attribute's dictionary VR, whatever VR the file stores, and PN-shaped private values), dates, IDs and
    numbers, addresses, and every other text value of an attribute the profile removes or replaces
    (`scrubbed`: institution, station, department, ...)."""
    found = Identifiers()

    def visit(_: Dataset, elem: Any) -> None:
        key = (elem.tag.group, elem.tag.element)
        try:
            vr = dictionary_VR(elem.tag) if not elem.tag.is_private else elem.VR
        except KeyError:
            vr = elem.VR
        kw = elem.keyword or ""
        if elem.VR in ("DA", "DT") or vr in ("DA", "DT"):
            found.dates.update(f for v in values(elem) for f in date_forms(v))
            return
        if elem.VR in ("SQ", "UI") or vr in ("SQ", "UI") or kw in CODED:
            return
        texts = [v for v in values(elem) if isinstance(v, str)] if not isinstance(elem.value, bytes) else []
        for text in texts:
            if vr == "PN" or elem.VR == "PN" or (elem.tag.is_private and "^" in text):
                found.add_name(text)
            elif "Address" in kw:
                found.add_address(text)
            elif "Telephone" in kw or (ID_KEYWORD.search(kw) and key in scrubbed):
                found.add_number(text)
            elif key in scrubbed and vr not in NOT_TEXT and elem.VR not in NOT_TEXT:
                found.add_text(text)
    ds.walk(visit)
    return found


def _as_identifiers(idents: Identifiers | Iterable[str]) -> Identifiers:
    return idents if isinstance(idents, Identifiers) else Identifiers.of(idents)


def _spans(text: str, ids: Identifiers) -> list[tuple[int, int]]:
    folded = fold_accents(text)
    spans = [m.span() for m in date_regex().finditer(folded)]
    spans += [m.span() for m in LABELLED_ID.finditer(folded)]
    spans += [m.span() for m in PHONE.finditer(folded) if _phone_like(m)]
    if (rx := ids.regex()) is not None:
        spans += [m.span() for m in rx.finditer(folded) if m.end() > m.start()]
    return spans


def scrub_text(text: str, idents: Identifiers | Iterable[str]) -> str:
    """`text` with every date, labelled ID, phone-like number and header identifier (with its variants) cut."""
    spans = _spans(text, _as_identifiers(idents))
    if not spans:
        return text
    keep = [True] * len(text)
    for a, b in spans:
        keep[a:b] = [False] * (b - a)
    out = "".join(c if k else " " for c, k in zip(text, keep))
    return re.sub(r"\s{2,}", " ", out).strip(" ,;:-")


def contains_identifier(text: str, idents: Identifiers | Iterable[str]) -> bool:
    """Whether `text` (a header value) holds a date or an identifier that `scrub_text` would cut."""
    return bool(_spans(text, _as_identifiers(idents)))


def reads_as_identifier(text: str, idents: Identifiers | Iterable[str]) -> bool:
    """Whether OCR'd `text` contains (or is a fragment of) an identifier or any date, allowing OCR slips."""
    from rapidfuzz import fuzz

    if text and date_regex().search(fold_accents(text)):
        return True
    t = normalize(text)
    if len(t) < MIN_LEN:
        return False
    for ident in idents:
        i = normalize(ident)
        if len(i) < MIN_LEN:
            continue
        if i in t or t in i:
            return True
        if len(i) >= 5 and len(t) >= len(i) - 1 and fuzz.partial_ratio(i, t) >= OCR_MIN_SCORE:
            return True
    return False


def each_value(value: Any, fn: Callable[[Any], Any]) -> Any:
    """`fn` on every value of a multi-valued element, or on its one value."""
    return [fn(v) for v in value] if isinstance(value, (list, tuple, MultiValue)) else fn(value)


def clean_text(value: Any, idents: Identifiers | Iterable[str]) -> Any:
    """A descriptor with every identifier and date cut out (the Clean Descriptors Option)."""
    ids = _as_identifiers(idents)
    return each_value(value, lambda v: scrub_text(str(v), ids))


def sweep(ds: Dataset, idents: Identifiers) -> list[Any]:
    """Cut identifiers and dates out of any free text the profile kept, sequences included; returns the tags
    cut. Coded values (CS, AE, UI, code items) are never touched; a person-name attribute is emptied."""
    hits: list[Any] = []

    def visit(_: Dataset, elem: Any) -> None:
        if elem.VR not in TEXT_VRS or elem.keyword in CODED or not elem.value or isinstance(elem.value, bytes):
            return
        if any(contains_identifier(v, idents) for v in values(elem)):
            cleaned = "" if elem.VR == "PN" else clean_text(elem.value, idents)
            elem.value = "" if any(contains_identifier(str(v), idents) for v in
                                   (cleaned if isinstance(cleaned, list) else [cleaned])) else cleaned
            hits.append(elem.tag)
    ds.walk(visit)
    return hits

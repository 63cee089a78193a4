"""The scrubber: which strings of a DICOM header identify the patient, and where they appear again, in
free-text tags (the Clean Descriptors Option) and in what OCR reads off the pixels.

What identifies is decided by the attribute (its keyword and dictionary VR), never by the VR a file stores:
a PatientName written as LO is still a name. Each kind is matched with its variants:
- name tokens: in every ASCII folding (anyascii: accents, ø, ß, CJK, invisible characters; German ue/oe/ss;
  look-alike Cyrillic/Greek letters), alone, possessive, hyphenated, glued to initials, apostrophes any way;
  5+ letters with anything glued after, 7+ inside any word; 1-2 letters next to a title or another name part;
- numbers (IDs, accession, phone): any separators between the characters, with or without a prefix
  (`MRN 8823-1977`), the digits alone, and a phone number's local part;
- addresses: every run of two or more words and every distinctive word (`42 Wallaby Way` of
  `42 Wallaby Way Sydney`); institutions: every distinctive word (Mary of St Mary's Hospital);
- dates: in free text *every* date is cut, numeric or written (month names from CLDR via Babel, in the
  languages of the public CXR datasets; ordinals; two-digit years; ISO weeks; Roman months; CJK), not only the
  header's own; e-mail and web addresses, IPv4 addresses, phone-shaped numbers and ages over 89 likewise.
Every pattern runs in linear time (a 1 MB value in about a second): names are found as substrings and their
word widened in Python, every other quantifier is bounded or anchored at a word start.
OCR text is compared with rapidfuzz, allowing one slip in five."""
from __future__ import annotations

import bisect
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
MIN_LEN = 3                               # shorter name parts are cut only next to a title or another part
MIN_DIGITS = 4                            # a digit run this long from an ID or phone is matched on its own
OCR_FOLD = str.maketrans("0158", "OISB")  # characters OCR confuses, folded on both sides before comparing
OCR_MIN_SCORE = 80                        # rapidfuzz partial_ratio (0-100) at which OCR text reads as an identifier
# Languages whose month names are cut from free text: English, Spanish (PadChest), and the other languages of
# European CXR archives. Abbreviations only for English and Spanish: elsewhere they collide with words.
MONTH_LOCALES = ("en", "es", "de", "fr", "it", "pt", "nl", "pl", "sv", "da", "nb", "ca")
ABBREVIATED_LOCALES = ("en", "es")
# Address words that say what kind of place, not which: never cut on their own.
PLACE_WORDS = frozenset("street st road rd avenue ave lane ln drive dr court ct place pl way boulevard blvd highway "
                        "hwy apartment apt unit suite floor flat house north south east west calle avenida plaza "
                        "paseo piso puerta".split())
# Institution words that say what kind of institution, not which: never cut on their own.
INSTITUTION_WORDS = PLACE_WORDS | frozenset(
    "hospital hospitals hospitalario hospitalaria hopital ospedale krankenhaus klinikum klinik clinic clinics clinica "
    "clinique clinical medical medicine medico medica center centre centro centrum university universitario "
    "universitaria universitat universite universita health healthcare salud saint sainte santa santo sankt royal "
    "national nacional regional general community memorial children childrens women womens county district city "
    "institute instituto institut istituto foundation fundacion trust services service care group sciences "
    "radiology radiologia imaging diagnostic diagnostics department departamento unit emergency complejo private "
    "public policlinico infirmary ward wing campus school college".split())
# Titles before a name: a 1-2 letter name part (Wu, Li, Ng) is cut after one.
TITLES = re.compile(r"(?<![a-z])(?:mr|mrs|ms|mx|miss|dr|dra|prof|sr|sra|srta|sig|herr|frau|mme|mlle|m\.)\.?"
                    r"[\s]{0,3}$")
ID_KEYWORD = re.compile(r"(ID|IDs|Number|Numbers|Locator|Identifier)$")
SEP = r"[\s\-./_:#,]{0,3}"                # what may stand between the characters of a number
NAME_SEP = " ,.;:^_-'"                    # what may stand between two parts of a name
WORD = re.compile(r"[a-z0-9_'-]*")
LETTERS = re.compile(r"[a-z]*")        # a word's rest, on lower-cased folded text (apostrophes, hyphens in)
# Letters of other scripts drawn like Latin ones (a Cyrillic С in "Сarter"): read as the Latin letter in a
# second fold of the text, so both a look-alike attack and a real Cyrillic name are matched.
HOMOGLYPHS = str.maketrans(dict(zip(
    "АВЕЅІЈКМНОРСТХУаеѕіјорсхуԁһԛԝΑΒΕΖΗΙΚΜΝΟΡΤΥΧαοικνρτυχ",
    "ABESIJKMHOPCTXYaesijopcxydhqwABEZHIKMNOPTYXaoiknptux")))
_HOMOGLYPH_RX = re.compile("[" + "".join(chr(c) for c in HOMOGLYPHS) + "]")
# Scripts written without spaces between words: each character folds to its own word, so a name in it is found
# with word boundaries like a Latin one.
_SPACELESS = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL")
# German (and Nordic) transliterations: a name with these letters is also matched written with the pair.
GERMAN = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "Ä": "Ae", "Ö": "Oe", "Ü": "Ue", "ß": "ss", "ø": "oe",
                        "Ø": "Oe", "å": "aa", "Å": "Aa"})


@functools.lru_cache(maxsize=65536)
def _fold_char(c: str, look_alikes: bool) -> str:
    from anyascii import anyascii

    if look_alikes:
        c = c.translate(HOMOGLYPHS)
    out = anyascii(c)
    if out and unicodedata.name(c, "").startswith(_SPACELESS):
        out = f" {out} "
    return out


@dataclass
class Folded:
    """Text transliterated to ASCII (anyascii: ø -> o, ß -> ss, 山 -> Shan, invisible and combining characters
    -> nothing), with where each folded character came from, so a span found in it cuts the original."""
    text: str
    starts: list[int] = field(default_factory=list)   # folded start of each piece (pieces never empty)
    pieces: list[tuple[int, int, bool]] = field(default_factory=list)  # (original start, original end, as is)

    def span(self, a: int, b: int) -> tuple[int, int]:
        """The original characters a folded span [a, b) came from (and invisible ones right after it)."""
        if not self.pieces:
            return a, b
        i = bisect.bisect_right(self.starts, a) - 1
        o, _, same = self.pieces[i]
        start = o + (a - self.starts[i] if same else 0)
        j = bisect.bisect_right(self.starts, b - 1) - 1
        o, end, same = self.pieces[j]
        last = (self.starts[j + 1] if j + 1 < len(self.starts) else len(self.text)) - 1
        if same and b - 1 < last:
            return start, o + (b - self.starts[j])
        return start, self.pieces[j + 1][0] if j + 1 < len(self.pieces) else self.size

    size: int = 0


def fold(text: str, look_alikes: bool = False) -> Folded:
    """`text` in ASCII, with the map back to it (none needed for ASCII text)."""
    if text.isascii():
        return Folded(text, size=len(text))
    out: list[str] = []
    starts, pieces = [], []
    f = 0
    for m in re.finditer(r"[\x00-\x7f]+|[^\x00-\x7f]+", text):
        run, o = m.group(), m.start()
        if run.isascii():
            starts.append(f)
            pieces.append((o, m.end(), True))
            out.append(run)
            f += len(run)
            continue
        for k, c in enumerate(run):
            piece = _fold_char(c, look_alikes)
            if piece:
                starts.append(f)
                pieces.append((o + k, o + k + 1, False))
                out.append(piece)
                f += len(piece)
    return Folded("".join(out), starts, pieces, len(text))


def fold_accents(text: str) -> str:
    """Each character transliterated to ASCII (ñ -> n, ø -> o, ß -> ss, Ѕ -> Dz), invisible ones dropped."""
    return fold(text).text


def _folds(text: str) -> list[Folded]:
    """The folds a text is searched in: as written, and with look-alike letters read as Latin when it has any."""
    return [fold(text)] + ([fold(text, True)] if _HOMOGLYPH_RX.search(text) else [])


def normalize(text: str) -> str:
    """Upper-case letters and digits only, accents and OCR look-alikes folded: how OCR text is compared."""
    return re.sub(r"[^0-9A-Z]", "", fold_accents(str(text).translate(HOMOGLYPHS)).upper()).translate(OCR_FOLD)


def name_variants(token: str) -> set[str]:
    """A name part as it may be written in ASCII: transliterated (Müller -> Muller), German-style (Mueller), with
    look-alike letters read as Latin, and an apostrophe kept, dropped or a space (O'Brien, OBrien, O Brien)."""
    forms = {token, token.translate(GERMAN), token.translate(HOMOGLYPHS)}
    out = set()
    for f in forms:
        a = re.sub(r"\s+", " ", fold_accents(f)).strip().lower()
        if a:
            out.add(a)
            if "'" in a:
                out |= {a.replace("'", ""), a.replace("'", " ")}
            if len(a) >= 5 and re.search(r"(ae|oe|ue)", a):   # Mueller written for a header's Müller
                out.add(re.sub(r"(?<=[aou])e", "", a))
    return {v for v in out if re.search(r"[a-z]", v)}


@functools.lru_cache(maxsize=1)
def _month_names() -> tuple[list[str], list[str]]:
    """(wide, abbreviated) month names of MONTH_LOCALES, folded, longest first."""
    from babel.dates import get_month_names

    wide, abbr = set(), {"sept"}
    for loc in MONTH_LOCALES:
        widths = ("wide", "abbreviated") if loc in ABBREVIATED_LOCALES else ("wide",)
        for width in widths:
            for context in ("format", "stand-alone"):
                for n in get_month_names(width, context, loc).values():
                    n = re.sub(r"^(?:de |d')", "", fold_accents(n).lower()).rstrip(".")   # Catalan "de març"
                    (wide if width == "wide" else abbr).add(n)
    key = functools.partial(sorted, key=len, reverse=True)
    return key(wide), key(abbr - wide)


def _month_pattern(wide_only: bool = False) -> str:
    wide, abbr = _month_names()
    names = wide if wide_only else sorted(wide + abbr, key=len, reverse=True)
    return _trie(names) + r"\.?"


def _trie(words: Iterable[str]) -> str:
    """An alternation of literal words as a prefix tree (mar(?:ch|zo|s)...): Python's re tries the branches of a
    plain alternation one by one, a tree only along the letters that match."""
    tree: dict = {}
    for w in words:
        node = tree
        for c in w:
            node = node.setdefault(c, {})
        node[""] = {}

    def walk(node: dict) -> str:
        alts = [re.escape(c) + walk(sub) for c, sub in sorted(node.items()) if c]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body
    return "(?:" + walk(tree) + ")"


@functools.lru_cache(maxsize=1)
def date_regex() -> re.Pattern:
    """Any date in (folded) text: numeric (2023-01-15, 15/01/23, 15.01.2023, 20230115, 2023-01, 2023-W03-1,
    2023-015), written with a month name (15 January 2023, Jan. 15, 2023, 23rd April 1961, 23 de abril de 1961,
    April 1961, 23 April, April 23, Mar-61, March '61, 01MAR1961, 1961 March 1), a Roman month (1-III-1961) or
    CJK/Korean characters (1961年3月1日)."""
    month, wide = _month_pattern(), _month_pattern(True)
    glued = _trie(sum(_month_names(), []))
    day = r"(?:[0-3]?\d)(?:st|nd|rd|th|er|o|deg|\.)?"
    year = r"(?:\d{4}|'?\d{2})"
    of = r"(?:\s{1,3}(?:(?:de|del|of)\s{1,3}|d')|[\s,./-]{1,3})"
    roman = r"(?-i:XII|XI|X|IX|VIII|VII|VI|V|IV|III|II|I)"
    numeric = (r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.](?:\d{4}|\d{2})"
               r"|(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
               r"|(?:19|20)\d{2}[-/](?:0[1-9]|1[0-2])"                          # 1961-03
               r"|\d{4}-?W[0-5]\d(?:-?[1-7])?"                                 # 1961-W09-3
               r"|(?:19|20)\d{2}-(?:[0-2]\d\d|3[0-5]\d|36[0-6])"               # 1961-060
               rf"|[0-3]?\d(?:[-./]{roman}[-./](?:\d{{4}}|\d{{2}})|\s{{1,3}}{roman}\s{{1,3}}\d{{4}})"  # 1-III-1961
               r"|\d{2,4}\s{0,3}(?:Nian|Nyeon)\s{0,3}\d{1,2}\s{0,3}(?:Yue|Wol)(?:\s{0,3}\d{1,2}\s{0,3}(?:Ri|Hao|Il))?")
    digit_first = (rf"{numeric}"
                   rf"|{day}{of}{month}(?:{of}{year})?"               # 23 April 1961, 23 de abril de 1961, 23 April
                   rf"|[0-3]?\d{glued}(?:\d{{4}}|\d{{2}})"           # 01MAR1961
                   rf"|\d{{4}}{of}{month}(?:{of}{day})?")              # 1961 March 1
    letter_first = (rf"{month}(?:{of}(?:{day},?{of}{year}|\d{{4}})"  # April 23, 1961, Jan. 15 2023, April 1961
                    rf"|\s{{0,3}}['-]\d{{2}})"                       # Mar-61, March '61
                    rf"|{wide}{of}[0-3]?\d(?:st|nd|rd|th)?")          # April 23 (a full name: "mar 2 clips" is none)
    weekday = rf"{_weekday_pattern()}[,.]?\s{{1,3}}"                  # Monday 1961 March 1: the weekday goes too
    return re.compile(rf"(?<![0-9A-Za-z])(?:(?=\d)(?:{digit_first})|(?=[A-Za-z])(?:{weekday}(?:{digit_first}|"
                      rf"{letter_first})|{letter_first}))(?![0-9A-Za-z])", re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def _weekday_pattern() -> str:
    from babel.dates import get_day_names

    names = set()
    for loc in MONTH_LOCALES:
        for width in ("wide", "abbreviated") if loc in ABBREVIATED_LOCALES else ("wide",):
            names |= {fold_accents(n).lower().rstrip(".") for n in get_day_names(width, "format", loc).values()}
    return _trie(names) + r"\.?"


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
                                    "%d/%m/%y", "%d %B %Y", "%B %d %Y", "%y%m%d", "%d%m%y")]


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
    short_names: set[str] = field(default_factory=set)  # 1-2 letter name parts: cut next to a title or a name

    KINDS = ("names", "phrases", "numbers", "dates", "short_names")

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.names | self.phrases | self.numbers | self.dates, key=lambda s: (-len(s), s)))

    def __bool__(self) -> bool:
        return bool(self.names or self.phrases or self.numbers or self.dates or self.short_names)

    def update(self, other: "Identifiers") -> None:
        for kind in self.KINDS:
            getattr(self, kind).update(getattr(other, kind, ()))
        self.__dict__.pop("_regex", None)
        self.__dict__.pop("_names", None)

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
            if w.isdigit():
                continue
            parts = [p for p in re.split(r"['’‘ʼ`´]", w) if p]   # O'Brien: also Brien alone
            for part in ([w] if len(parts) > 1 else []) + parts:
                if len(part) >= MIN_LEN or (len(part) > 1 and not part.isascii() and _spaceless(part)):
                    self.names.add(part)
                elif part.isalpha():
                    self.short_names.add(part)
        if len(words) > 1:
            self.phrases.add(" ".join(words))

    def add_number(self, text: str) -> None:
        core = re.sub(r"[^0-9A-Za-z]", "", fold_accents(text))
        if len(core) >= (MIN_DIGITS if core.isdigit() else MIN_LEN):  # a 3-digit study number is no identifier
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

    def add_institution(self, text: str) -> None:
        """An institution's name: the whole value, and each word of 4+ letters that says which institution
        (Mary of "St Mary's Hospital"), not what kind (Hospital, General, Clinic, ...)."""
        self.add_text(text)
        for w in re.split(r"[^\w'’]+", text):
            w = re.sub(r"['’]s?$", "", w)
            if len(w) >= 4 and w.isalpha() and fold_accents(w).lower() not in INSTITUTION_WORDS:
                self.names.add(w)

    def add_text(self, text: str) -> None:
        text = text.strip()
        if re.search(r"\d", text) and len(re.sub(r"\D", "", text)) >= MIN_DIGITS:
            self.add_number(text)
        if len(normalize(text)) >= MIN_LEN and re.search(r"[^\W\d_]", text):
            self.phrases.add(text.replace("^", " ").strip())
            if "^" in text:
                self.add_name(text)

    def regex(self) -> re.Pattern | None:
        """One pattern matching every phrase, number and header date with its variants (on folded text). Every
        quantifier is bounded or anchored at a word start, so it runs in linear time."""
        if "_regex" not in self.__dict__:
            parts = []
            for p in sorted(self.phrases, key=len, reverse=True):
                words = re.findall(r"[A-Za-z0-9]+", fold_accents(p.translate(HOMOGLYPHS)))
                if words and len("".join(words)) >= MIN_LEN:
                    parts.append(r"(?<![A-Za-z0-9])" + r"[^A-Za-z0-9]{0,5}".join(map(re.escape, words)) +
                                 r"(?:['’]s)?(?![A-Za-z0-9])")
            for n in sorted(self.numbers, key=len, reverse=True):
                body = SEP.join(map(re.escape, n))
                parts.append((r"(?<!\d)" if n[0].isdigit() else r"(?<![0-9A-Za-z])") + body +
                             (r"(?!\d)" if n[-1].isdigit() else r"(?![0-9A-Za-z])"))
            for d in sorted(self.dates, key=len, reverse=True):   # 610301: a header date only, never any 6 digits
                parts.append(r"(?<![0-9A-Za-z])" + re.escape(fold_accents(d)) + r"(?![0-9A-Za-z])")
            self.__dict__["_regex"] = (re.compile("(?=[0-9A-Za-z])(?:" + "|".join(parts) + ")", re.IGNORECASE)
                                       if parts else None)
        return self.__dict__["_regex"]

    def name_forms(self) -> tuple[list[str], list[str]]:
        """(name parts, short name parts), each in every folded form, lower case, longest first."""
        if "_names" not in self.__dict__:
            long = {v for n in self.names for v in name_variants(n)}
            short = {v for n in self.short_names for v in name_variants(n)}
            self.__dict__["_names"] = (sorted(long, key=len, reverse=True), sorted(short - long, key=len, reverse=True))
        return self.__dict__["_names"]

    def name_spans(self, low: str) -> list[tuple[int, int]]:
        """Where the name parts stand in lower-cased folded text. A part is found as a plain substring, then its
        word is checked and widened in Python (no backtracking: linear in the text):
        - 3-4 letters: a whole word, behind up to two glued initials (JSmith), possessive or plural, or the
          first of a hyphenated double name (ROME is no part of ROMEO);
        - 5-6 letters: also with letters or digits glued after it (smithj61, SMITHJOHN1961): the word goes;
        - 7+ letters: inside any word (no English word hides such a name): the word goes;
        - 1-2 letters (Wu, Li, Ng): a whole word next to a title (Mr, Dra, Herr, Mme, ...) or another part of
          the name."""
        long, short = self.name_forms()
        spans: list[tuple[int, int]] = []
        for v in long:
            n, i, covered = len(v), 0, 0
            while (a := low.find(v, i)) >= 0:
                b, pre = a + n, 0
                while pre < 3 and a - pre > covered and low[a - pre - 1].isalpha():
                    pre += 1
                letters = len(re.sub(r"[^a-z]", "", v))
                if letters >= 7:
                    start = a
                    while start > covered and (low[start - 1].isalnum() or low[start - 1] in "_'-"):
                        start -= 1
                    end = WORD.match(low, b).end()
                elif pre > 2:           # deep inside a word: so is every later find in it
                    i = LETTERS.match(low, b).end()
                    continue
                elif letters >= 5:
                    start, end = a - pre, WORD.match(low, b).end()
                else:
                    start, end = a - pre, b
                    m = re.compile(r"(?:'?s)?(?:-[a-z]{1,40})*").match(low, b)
                    end = m.end()
                    if end < len(low) and low[end].isalpha():
                        i = a + 1
                        continue
                spans.append((start, end))
                covered = i = max(end, a + 1)
        if short and (spans or TITLE_ANYWHERE.search(low)):
            spans += self._short_spans(low, short, spans)
        return spans

    def _short_spans(self, low: str, short: list[str], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        found = []
        for v in short:
            i = 0
            while (a := low.find(v, i)) >= 0:
                b = a + len(v)
                i = b
                if (a == 0 or not low[a - 1].isalpha()) and (b == len(low) or not low[b].isalpha()):
                    found.append((a, b))
        ends = {b for _, b in spans + found}
        starts = {a for a, _ in spans + found}
        out = []
        for a, b in found:
            left = any(a - k in ends and all(c in NAME_SEP for c in low[a - k:a]) for k in range(1, 4))
            right = any(b + k in starts and all(c in NAME_SEP for c in low[b:b + k]) for k in range(1, 4))
            if left or right or TITLES.search(low[max(0, a - 10):a]):
                out.append((a, b))
        return out


TITLE_ANYWHERE = re.compile(r"(?<![a-z])(?:mr|mrs|ms|mx|miss|dr|dra|prof|sr|sra|srta|sig|herr|frau|mme|mlle|m\.)"
                            r"(?![a-z])")


def _spaceless(text: str) -> bool:
    return any(unicodedata.name(c, "").startswith(_SPACELESS) for c in text)


# Other identifiers written in free text whatever the header says: a labelled record or accession number,
# anything shaped like a phone number (8+ digits in groups, or 3+4), e-mail and web addresses, IPv4
# addresses, and an age over 89 (HIPAA Safe Harbor: ages over 89 identify). Every leading unbounded run is
# anchored at a word start by a lookbehind that excludes its own characters: linear time.
LABELLED_ID = re.compile(r"(?<![0-9A-Za-z])(?=[MNSDCIAPHRmnsdciaphr])"
                         r"(?:MRN|MR|NHS|SSN|DNI|NIE|NHC|CIP|ID|ACC|ACCESSION|PATIENT|PAT|HC|"
                         r"RECORD)\s{0,3}(?:NO\.?|NUMBER|NUM|N[º°o]|#|:)?\s{0,3}[:#]?\s{0,3}[A-Z]{0,3}[-\s]?"
                         r"\d[\d\-/ ]{2,40}\d(?![0-9A-Za-z])", re.IGNORECASE)
PHONE = re.compile(r"(?<![\w.])\+?\(?\d{1,4}\)?(?:[\s.-]?\(?\d{2,4}\)?){2,5}(?![\w.])")
SHORT_PHONE = re.compile(r"(?<![\w.-])\d{3}[-.]\d{4}(?![\w-]|\.\d)")
EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,8}")
URL = re.compile(r"(?<![A-Za-z0-9./])(?:https?://|ftp://|www\.)[^\s<>\"']*[^\s<>\"'.,;:!?)\]]", re.IGNORECASE)
IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\d.]|\.\d)")
_OLD = r"(?:9\d|1[0-4]\d)"
AGE_OVER_89 = re.compile(
    rf"(?=[19aeilwAEILW])(?:(?<![\d.,]){_OLD}\s{{0,2}}-?\s{{0,2}}(?:years?|yrs?|y)\s{{0,2}}-?\s{{0,2}}"
    rf"(?:old|o\b|/o\b|\.o\.?)"
    rf"|(?<![\d.,]){_OLD}\s{{0,2}}(?:yo|y/o|y\.o\.?|years?\s{{1,2}}of\s{{1,2}}age)(?![a-z])"
    rf"|(?<![a-z])(?:aged?|edad|edad\s{{1,2}}de|alter|age|eta|idade|leeftijd|wiek)\s{{0,2}}[:=]?\s{{0,2}}{_OLD}"
    rf"(?!\d)(?:\s{{0,2}}(?:anos|ans|anni|jahre|jaar|lat|ar|years?))?"
    rf"|(?<![\d.,]){_OLD}\s{{0,2}}(?:anos|ans|anni|jahre|jaar|lat|years)(?![a-z]))", re.IGNORECASE)
GENERIC = (LABELLED_ID, EMAIL, URL, IPV4, AGE_OVER_89, SHORT_PHONE)


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
            elif kw.startswith("Institution") and key in scrubbed and vr not in NOT_TEXT:
                found.add_institution(text)
            elif key in scrubbed and vr not in NOT_TEXT and elem.VR not in NOT_TEXT:
                found.add_text(text)
    ds.walk(visit)
    return found


def _as_identifiers(idents: Identifiers | Iterable[str]) -> Identifiers:
    return idents if isinstance(idents, Identifiers) else Identifiers.of(idents)


def _spans(text: str, ids: Identifiers) -> list[tuple[int, int]]:
    """Where dates, generic identifiers and the header's identifiers stand in `text` (original positions): found
    in each ASCII fold of it and mapped back."""
    spans: list[tuple[int, int]] = []
    rx = ids.regex()
    for f in _folds(text):
        t = f.text
        found = [m.span() for m in date_regex().finditer(t)] if re.search(r"\d", t) else []
        found += [m.span() for m in PHONE.finditer(t) if _phone_like(m)]
        found += [m.span() for g in GENERIC for m in g.finditer(t)]
        if rx is not None:
            found += [m.span() for m in rx.finditer(t) if m.end() > m.start()]
        found += ids.name_spans(t.lower())
        spans += [f.span(a, b) for a, b in found if b > a]
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

"""Patient demographics in one vocabulary, and the caption prefix that carries them into the model.

Sex is M / F, age whole years, race one of the groups the fairness literature reports on. The prefix follows
the anchors: RoentGen-v2 writes "28 year old WHITE female. <report>", ChexGen "sex:Male, age:71.0,
race:Black. <impression>". Ages over 89 are written "90+" (HIPAA Safe Harbor). The prefix comes first, so
the report-length policy, which keeps text from the start, never cuts it."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import unicodedata
from pathlib import Path

import yaml

from .errors import UserError

FORMS = ("roentgen", "chexgen")
CARD_KEY = "synthcxr"  # the model card's front-matter block that records how captions were written
RACES = ("WHITE", "BLACK", "ASIAN", "HISPANIC/LATINO", "OTHER")
AGE_BANDS = (("<40", 0, 40), ("40-65", 40, 66), (">65", 66, 10**3))
MAX_AGE = 120
SAFE_HARBOR_AGE = 89  # ages above are written "90+"

_SEX = {"M": "M", "MALE": "M", "MAN": "M", "F": "F", "FEMALE": "F", "WOMAN": "F", "W": "F"}
_AGE_RE = re.compile(r"^\s*(\d{1,3}(?:\.\d+)?)\s*([YMWD])?\s*$", re.IGNORECASE)
_RACE_KEYS = (("HISPANIC", "HISPANIC/LATINO"), ("LATINO", "HISPANIC/LATINO"), ("SOUTH AMERICAN", "HISPANIC/LATINO"),
              ("WHITE", "WHITE"), ("PORTUGUESE", "WHITE"), ("CAUCASIAN", "WHITE"), ("BLACK", "BLACK"),
              ("AFRICAN", "BLACK"), ("ASIAN", "ASIAN"), ("NATIVE", "OTHER"), ("PACIFIC", "OTHER"),
              ("MULTIPLE", "OTHER"), ("OTHER", "OTHER"))
_RACE_WORDS = [(re.compile(rf"\b{key}\b"), group) for key, group in _RACE_KEYS]  # whole words: not BLACKWELL
_NOT_HISPANIC = re.compile(r"\bNO[NT][- ]?(?:HISPANIC|LATINO)(?:\s*(?:OR|/)\s*(?:NO[NT][- ]?)?LATINO)?\b")
_NEGATION = re.compile(r"\bNO[NT]\b|\bNON-")  # "non-white", "not black": says only what the patient is not
_RACE_UNKNOWN = re.compile(r"\b(?:UNKNOWN|UNABLE|DECLINED|REFUSED|NAN|NONE)\b")


def sex_code(value: object) -> str:
    """M / F from the usual spellings (M, Male, f, FEMALE); anything else (O, U, blank) is unknown ("")."""
    return _SEX.get(unicodedata.normalize("NFKC", str(value or "")).strip().upper(), "")  # NFKC: full-width Ｍ


def age_years(value: object) -> int | None:
    """Whole years from 54, "54", "54.0" or DICOM age strings ("054Y", "006M", "010W", "003D"); None when
    unknown or outside 0-120 (a typo, not a patient)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    m = _AGE_RE.match(str(value))
    if not m:
        return None
    n = float(m.group(1))
    years = {"M": n / 12, "W": n / 52, "D": n / 365}.get((m.group(2) or "Y").upper(), n)
    return int(years) if 0 <= years <= MAX_AGE else None


def race_group(value: object) -> str:
    """A race string (MIMIC-IV's 33, CheXpert Plus's, or a group name) -> WHITE, BLACK, ASIAN,
    HISPANIC/LATINO, OTHER, or "" when unknown, declined, or only a negation ("Non-Hispanic", "not white")."""
    v = _NOT_HISPANIC.sub("", str(value or "").strip().upper())
    if not v.strip(" ,/-") or _RACE_UNKNOWN.search(v) or _NEGATION.search(v):
        return ""
    return _named_group(v) or "OTHER"


def _named_group(v: str) -> str:
    """The group an upper-case race string names in whole words, "" if none. Hispanic/Latino wins (CheXpert
    Plus's "White, Hispanic"); a group with OTHER's words beside it keeps its own ("WHITE - OTHER EUROPEAN");
    two groups ("Black and White") are OTHER, as MIMIC's "MULTIPLE RACE/ETHNICITY"."""
    named = {group for word, group in _RACE_WORDS if word.search(v)}
    if "HISPANIC/LATINO" in named:
        return "HISPANIC/LATINO"
    specific = named - {"OTHER"}
    return specific.pop() if len(specific) == 1 else "OTHER" if named else ""


def age_band(age: int | None) -> str:
    """<40, 40-65 or >65; "unknown" when the age is not known."""
    if age is None:
        return "unknown"
    return next(name for name, lo, hi in AGE_BANDS if lo <= age < hi)


@dataclasses.dataclass(frozen=True)
class Demographics:
    """What is known of one patient; "" / None where not known (or dropped)."""
    sex: str = ""
    age: int | None = None
    race: str = ""

    def __bool__(self) -> bool:
        return bool(self.sex or self.age is not None or self.race)


def parse_demographics(sex: object = "", age: object = "", race: object = "", *, where: str = "") -> Demographics:
    """Strict reading of user input (a prompt file row, the app's fields): blank is "not given", anything
    else must be understood, or one UserError names the value, where it is, and what is accepted."""
    at = f"{where}: " if where else ""
    s = sex_code(sex)
    if str(sex or "").strip() and not s:
        raise UserError(f"{at}sex {sex!r} is not one the template knows — use M, F, male or female (or leave it empty)")
    a = None
    if str(age or "").strip():
        a = age_years(age)
        if a is None:
            raise UserError(f"{at}age {age!r} is not an age in whole years from 0 to {MAX_AGE} — fix it or leave "
                            f"it empty")
    r = ""
    if str(race or "").strip():
        r = race_group(race)
        if not r or not _named_group(_NOT_HISPANIC.sub("", str(race).upper())):
            raise UserError(f"{at}race {race!r} is not one the template knows — use one of {', '.join(RACES)} "
                            f"(or leave it empty)")
    return Demographics(s, a, r)


def age_text(age: int) -> str:
    """Whole years, "90+" above 89 (HIPAA Safe Harbor)."""
    return "90+" if age > SAFE_HARBOR_AGE else str(age)


def prefix(d: Demographics, form: str = "roentgen") -> str:
    """The caption prefix for `d` in the anchors' forms; "" when nothing is known.

    roentgen: "28 year old WHITE female." (a missing sex reads "patient"; a missing field is left out)
    chexgen:  "sex:Female, age:28.0, race:White." (missing fields left out)"""
    if form not in FORMS:
        raise UserError(f"demographics template {form!r} — choose one of {', '.join(FORMS)}")
    if not d:
        return ""
    if form == "chexgen":
        parts = []
        if d.sex:
            parts.append(f"sex:{'Male' if d.sex == 'M' else 'Female'}")
        if d.age is not None:
            parts.append(f"age:{age_text(d.age)}" if d.age > SAFE_HARBOR_AGE else f"age:{float(d.age):.1f}")
        if d.race:
            parts.append(f"race:{d.race.title()}")
        return ", ".join(parts) + "."
    words = []
    if d.age is not None:
        words.append(f"{age_text(d.age)} year old")
    if d.race:
        words.append(d.race)
    words.append({"M": "male", "F": "female"}.get(d.sex, "patient"))
    return " ".join(words) + "."


def caption_with(text: str, d: Demographics, form: str = "roentgen") -> str:
    """`text` with the demographics prefix first."""
    head = prefix(d, form)
    return f"{head} {text}".strip() if head else text


def drop_fields(d: Demographics, p: float, seed: int, key: str) -> Demographics:
    """`d` with each field dropped independently with probability p, decided by (seed, key, field): the same
    row keeps the same caption every epoch (so cached text embeddings stay valid), and the model still learns
    prompts that omit any of the fields."""
    if p <= 0:
        return d

    def keep(name: str) -> bool:
        h = hashlib.sha256(f"{seed}:{key}:{name}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64 >= p
    return Demographics(d.sex if keep("sex") else "", d.age if keep("age") else None, d.race if keep("race") else "")


def card_template(folder: str | Path) -> str | None:
    """The demographics form a model or LoRA folder was trained with, from its model card (README.md front
    matter, written by finetune.card); the parent folder's card counts too (a LoRA saved in <run>/lora).
    "none" when the card says it was trained without them; None when no card says anything (then a base
    model's card may). A card naming another form is a UserError: captions in a form the model never learnt
    would fail only when the first prompt with a patient is reached, after other images were written."""
    for card in (Path(folder) / "README.md", Path(folder).parent / "README.md"):
        if card.is_file():
            text = card.read_text(encoding="utf-8", errors="replace")
            if text.startswith("---"):
                try:
                    front = yaml.safe_load(text.split("---", 2)[1]) or {}
                except yaml.YAMLError:
                    continue
                block = front.get(CARD_KEY) if isinstance(front, dict) else None
                form = block.get("demographics_template") if isinstance(block, dict) else None
                if form and form not in (*FORMS, "none"):
                    raise UserError(f"{card}: {CARD_KEY}.demographics_template {form!r} is not one of "
                                    f"{', '.join(FORMS)}, none — fix the model card's front matter")
                if form:
                    return str(form)
    return None

"""Radiology report text -> CLIP prompt: pick sections, clean placeholders, fit the token budget.

SD 2.x's text encoder sees 77 positions (BOS and EOS included); the stock pipeline silently drops the
rest. We encode long reports in windows of 75 tokens (`cxrcommon.prompt_windows`), up to a cap of
`max_windows`. Only a report longer than that cap is cut, and then by salience: the IMPRESSION first
(the line that says what the image shows), then the FINDINGS, then the rest, dropping whole trailing
sentences; every cut is counted and an impression that had to be shortened is logged."""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Callable, Mapping, Sequence

from .errors import UserError
from .token_count import DEFAULT_MAX_WINDOWS, WINDOW, count_tokens

log = logging.getLogger(__name__)

POLICIES = ("sentence", "hard", "error")

# Headers seen in MIMIC-CXR (upper case) and IU-Xray / OpenI (title case) reports. Any of them ends
# the section before it; "findings and impression" counts as findings.
_HEADER_NAMES = {
    "findings": "findings", "finding": "findings", "findings and impression": "findings",
    "impression": "impression", "impressions": "impression",
    "indication": "indication", "indications": "indication", "clinical indication": "indication",
    "reason for exam": "indication", "reason for examination": "indication",
    "history": "history", "clinical history": "history", "clinical information": "history",
    "comparison": "comparison", "comparisons": "comparison",
    "technique": "technique", "examination": "examination", "exam": "examination",
    "procedure": "examination", "type of examination": "examination",
    "wet read": "wet read", "final report": "final report", "addendum": "addendum",
    "recommendation": "recommendation", "recommendations": "recommendation",
    "recommendation(s)": "recommendation",
    "notification": "notification",
    # MIMIC-CXR's section_parser.py (MIT-LCP/mimic-cxr) reads these as the impression (1,802 reports)
    "conclusion": "impression", "conclusions": "impression",
}
_HEADER_RE = re.compile(
    r"\b(?P<name>" + "|".join(sorted((re.escape(h) for h in _HEADER_NAMES), key=len, reverse=True))
    + r")\s*:", re.IGNORECASE)
_FINAL_REPORT_RE = re.compile(r"^\s*FINAL REPORT\b", re.IGNORECASE)
_PLACEHOLDER_RE = re.compile(r"_{2,}|\bX{2,}\b|\[\*\*.*?\*\*\]")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])(?<!\bDr\.)(?<!\bvs\.)(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\bapprox\.)\s+")


class ReportTooLongError(UserError):
    """A report exceeds the CLIP token limit under policy="error"."""


@dataclasses.dataclass
class ReportStats:
    """How many reports went in, how many needed more than one CLIP window, how many were cut to the
    window cap (and how many of those lost part of their impression), how many ended up empty."""
    total: int = 0
    cut: int = 0
    empty: int = 0
    policy: str = "sentence"
    max_windows: int = DEFAULT_MAX_WINDOWS
    multi_window: int = 0
    impression_cut: int = 0

    def summary(self) -> str:
        pct = lambda n: 100.0 * n / self.total if self.total else 0.0  # noqa: E731
        return (f"{self.total} reports: {self.multi_window} ({pct(self.multi_window):.1f}%) longer than one CLIP "
                f"window of {WINDOW} tokens, {self.cut} ({pct(self.cut):.1f}%) cut to {self.max_windows} "
                f"window(s) (policy {self.policy}; impression shortened in {self.impression_cut}), "
                f"{self.empty} empty")

    def add(self, fitted: "FittedText") -> None:
        self.multi_window += fitted.windows > 1
        self.cut += fitted.cut
        self.impression_cut += fitted.impression_cut


@dataclasses.dataclass(frozen=True)
class FittedText:
    """A prompt as it will be encoded, and what fitting it to the window cap did to it."""
    text: str
    tokens: int                   # CLIP tokens of `text` (no BOS/EOS)
    windows: int                  # 75-token windows it fills
    cut: bool = False             # something of the original was dropped
    impression_cut: bool = False  # ... and that included part of the impression

    def tags(self, original: str) -> dict[str, str | None]:
        """Provenance/manifest fields: the whole original text whenever it differs from what was encoded."""
        return {"prompt_windows": str(self.windows), "prompt_truncated": "true" if self.cut else None,
                "prompt_impression_cut": "true" if self.impression_cut else None,
                "prompt_original": original if original != self.text else None}


def _is_header(text: str, m: re.Match[str]) -> bool:
    """A header starts a line, follows a sentence end, or is written in capitals (flattened MIMIC)."""
    before = text[:m.start()].rstrip(" \t")
    return (not before or before.endswith(("\n", ".", ":", ";")) or m.group("name").isupper())


def extract_sections(text: str | Mapping[str, Any],
                     sections: Sequence[str] = ("findings", "impression"), untitled_lead: bool = True) -> str:
    """The wanted sections, in the order asked, joined by a space.

    `text` is a free-text report (MIMIC "FINDINGS: ... IMPRESSION: ...", IU-Xray "Findings: ...")
    or a mapping of fields as parsed from OpenI XML ({"findings": ..., "impression": ...}).
    A report with no header at all is returned whole (less a leading "FINAL REPORT" title); one with
    other headers only gives the text before its first header (often "", which the caller counts as
    empty), or "" with `untitled_lead=False` (MIMIC-CXR, where that text is the exam's title)."""
    wanted = [s.lower() for s in sections]
    if isinstance(text, Mapping):
        fields = {_HEADER_NAMES.get(str(k).lower().strip(), str(k).lower().strip()): v
                  for k, v in text.items()}
        return " ".join(str(fields[s]).strip() for s in wanted if fields.get(s) and str(fields[s]).strip())
    headers = [m for m in _HEADER_RE.finditer(text) if _is_header(text, m)]
    if not headers:
        return _FINAL_REPORT_RE.sub("", text).strip()
    found: dict[str, list[str]] = {}
    for m, nxt in zip(headers, headers[1:] + [None]):
        body = text[m.end():nxt.start() if nxt else len(text)].strip()
        found.setdefault(_HEADER_NAMES[m.group("name").lower()], []).append(body)
    picked = " ".join(b for s in wanted for b in found.get(s, []) if b)
    if picked or any(s in found for s in wanted) or not untitled_lead:
        return picked
    # Only other sections (e.g. a case note "Day 1: ... History: ..."): the untitled lead text.
    return _FINAL_REPORT_RE.sub("", text[:headers[0].start()]).strip()


def normalize_report(text: str) -> str:
    """One line of text without de-identification placeholders (`___`, `XXXX`, `[** **]`).

    Removing a placeholder must not leave "  ", " ,", ", ." or an empty "()" behind, so the prompt
    reads like the reports the model will be asked with."""
    t = _PLACEHOLDER_RE.sub(" ", text)
    t = re.sub(r"\s+", " ", t)
    t = re.sub(r"\(\s*[,;:]?\s*\)", " ", t)                 # "( )" left by a removed name
    t = re.sub(r"\s+([,;:.!?)])", r"\1", t)                 # no space before punctuation
    t = re.sub(r"\(\s+", "(", t)
    t = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", t)           # ", ," -> ","
    t = re.sub(r"[,;:]+\s*([.!?])", r"\1", t)               # ", ." -> "."
    t = re.sub(r"([.!?])(?:\s*[.,;:])+", r"\1", t)          # ". ." / ". ," -> "."
    t = re.sub(r"^[\s,;:.!?]+", "", t)                      # nothing dangling at the start
    t = re.sub(r"\s+", " ", t)
    return t.strip()


def _n_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]]


def _hard_cut(text: str, tokenizer: Any, max_tokens: int) -> str:
    """Cut at the end of the last token that fits; shrink further if re-tokenising the cut word grew."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    keep = max_tokens - 2
    while keep > 0:
        cut = text[:offsets[keep - 1][1]].rstrip()
        if _n_tokens(tokenizer, [cut])[0] <= max_tokens:
            return cut
        keep -= 1
    return ""


def fit_clip_limit(text: str, tokenizer: Any, *, max_tokens: int = 77, policy: str = "sentence",
                   name: str | None = None) -> tuple[str, bool]:
    """(text that fits in `max_tokens` CLIP tokens incl. BOS/EOS, whether it was cut).

    policy "sentence": keep the longest run of whole sentences that fits (a first sentence that alone
    is too long is cut at token level); "hard": cut at token level; "error": raise
    ReportTooLongError naming the report (`name`)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown CLIP-limit policy {policy!r}; use one of {', '.join(POLICIES)}")
    n = _n_tokens(tokenizer, [text])[0]
    if n <= max_tokens:
        return text, False
    if policy == "error":
        raise ReportTooLongError(
            f"report {name or repr(text[:60] + '...')} has {n} CLIP tokens, more than {max_tokens} — "
            f"shorten it, or use policy 'sentence' or 'hard' to cut it")
    if policy == "sentence":
        # CLIP splits words on whitespace before BPE, so sentence token counts add up; verified below.
        sentences = _SENTENCE_END_RE.split(text)
        counts = [len(ids) for ids in tokenizer(sentences, add_special_tokens=False, verbose=False)["input_ids"]]
        keep, total = 0, 2
        while keep < len(sentences) and total + counts[keep] <= max_tokens:
            total += counts[keep]
            keep += 1
        while keep and _n_tokens(tokenizer, [" ".join(sentences[:keep])])[0] > max_tokens:
            keep -= 1
        if keep:
            return " ".join(sentences[:keep]), True
    return _hard_cut(text, tokenizer, max_tokens), True


def _sections(text: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(text before the first header, [(section name, header as written, body)]) in report order."""
    headers = [m for m in _HEADER_RE.finditer(text) if _is_header(text, m)]
    lead = text[:headers[0].start()] if headers else text
    return lead.strip(), [(_HEADER_NAMES[m.group("name").lower()], text[m.start():m.end()],
                           text[m.end():nxt.start() if nxt else len(text)].strip())
                          for m, nxt in zip(headers, headers[1:] + [None])]


SALIENCE = ("impression", "findings")  # what is kept first when a report must be cut


def salient_order(text: str) -> tuple[str, str]:
    """(the report with its IMPRESSION first, then FINDINGS, then the rest; the impression's text).

    A report without an impression header comes back unchanged, with "" as its impression."""
    lead, parts = _sections(text)
    impression = impression_of(text)
    if not impression:
        return text, ""
    rank = lambda part: SALIENCE.index(part[0]) if part[0] in SALIENCE else len(SALIENCE)  # noqa: E731
    ordered = [f"{header} {body}" for _, header, body in sorted(parts, key=rank) if body]
    rest_at = sum(1 for p in parts if p[0] in SALIENCE and p[2])
    ordered.insert(rest_at, lead)
    return " ".join(t for t in ordered if t), impression


def impression_of(report: str | Mapping[str, Any]) -> str:
    """The IMPRESSION section's text, "" when the report has none (a report without headers has none)."""
    if isinstance(report, Mapping):
        return extract_sections(report, ["impression"])
    return " ".join(body for name, _, body in _sections(report)[1] if name == "impression" and body)


def fit_windows(text: str, tokenizer: Any, *, max_windows: int = DEFAULT_MAX_WINDOWS, policy: str = "sentence",
                name: str | None = None, salient: tuple[str, str] | None = None,
                warn: Callable[..., None] | None = None) -> FittedText:
    """`text` as it will be encoded in at most `max_windows` windows of 75 CLIP tokens.

    A text that fits is returned unchanged. A longer one is cut by `policy` ("sentence": whole trailing
    sentences, "hard": tokens, "error": raise ReportTooLongError naming `name`) after putting its
    impression first (`salient_order`, or `salient` = (ordered text, impression) from a caller that
    knows the sections); a shortened impression is logged (through `warn`, e.g. a
    `cxrcommon.logs.RepeatedWarning` that summarises a batch; default: a warning each), never dropped silently.

    Args:
        text: the prompt (a normalized report); any length.
        tokenizer: the model's CLIP tokenizer (counts the tokens and makes the hard cuts).
        max_windows: int >= 1, the cap in windows of 75 CLIP tokens (DEFAULT_MAX_WINDOWS = 3: 225 tokens).
        policy: "sentence", "hard" or "error", how a text over the cap is cut (see above).
        name: what logs and ReportTooLongError call the report (e.g. its file or row); None = its first 60
            characters.
        salient: (text with its impression first, the impression's text), or None to derive both from `text`
            with `salient_order`.
        warn: called as warn(format, *args) when the impression was shortened; None = `log.warning`.
    Returns: FittedText: the text to encode, its token and window counts (windows <= max_windows), and whether
        it (`cut`) and its impression (`impression_cut`) were shortened."""
    if max_windows < 1:
        raise ValueError(f"max_windows must be at least 1, got {max_windows}")
    count = count_tokens(tokenizer, [text])[0]
    if count.tokens <= WINDOW * max_windows:
        return FittedText(text, count.tokens, count.windows)
    if policy == "error":
        raise ReportTooLongError(
            f"report {name or repr(text[:60] + '...')} has {count.tokens} CLIP tokens, more than {max_windows} "
            f"window(s) of {WINDOW} hold — shorten it, raise --max-windows, or use policy 'sentence' or 'hard' "
            f"to cut it (impression kept first)")
    ordered, impression = salient or salient_order(text)
    limit = WINDOW * max_windows + 2
    cut, _ = fit_clip_limit(ordered, tokenizer, max_tokens=limit, policy=policy, name=name)
    kept = normalize_report(cut)  # each impression sentence must survive (there may be several headers)
    lost = any(normalize_report(x) not in kept for x in _SENTENCE_END_RE.split(impression) if x.strip())
    if lost:
        (warn or log.warning)("%s: the report's impression is longer than %d window(s); kept its first %s",
                              name or repr(text[:60] + "..."), max_windows, "sentences" if cut else "tokens")
    final = count_tokens(tokenizer, [cut])[0]
    return FittedText(cut, final.tokens, final.windows, cut=True, impression_cut=lost)


def prepare_reports(texts: Sequence[str | Mapping[str, Any]], tokenizer: Any = None, *,
                    sections: Sequence[str] = ("findings", "impression"), policy: str = "sentence",
                    max_windows: int = DEFAULT_MAX_WINDOWS, names: Sequence[str] | None = None,
                    prefixes: Sequence[str] | None = None) -> tuple[list[str], ReportStats]:
    """Reports -> CLIP-ready prompts (same order and length; empty ones stay "") plus counts, logged.

    A report over `max_windows` windows is cut with its impression first. `tokenizer` defaults to the
    offline CLIP tokenizer; `names` label reports in errors. `prefixes` (e.g. demographics) go in front of
    each non-empty report and are never cut: cuts keep text from the start, and the prefix is the start."""
    if tokenizer is None:
        from .tokenizer import clip_tokenizer
        tokenizer = clip_tokenizer()
    from .logs import RepeatedWarning
    stats = ReportStats(total=len(texts), policy=policy, max_windows=max_windows)
    warn = RepeatedWarning(log, "reports with a shortened impression")
    by_salience = sorted(sections, key=lambda s: SALIENCE.index(s) if s in SALIENCE else len(SALIENCE))
    out: list[str] = []
    for i, raw in enumerate(texts):
        text = normalize_report(extract_sections(raw, sections))
        if not text:
            stats.empty += 1
            out.append("")
            continue
        salient = (normalize_report(extract_sections(raw, by_salience)),
                   normalize_report(impression_of(raw)) if "impression" in sections else "")
        if prefixes is not None and prefixes[i]:
            text, salient = f"{prefixes[i]} {text}", (f"{prefixes[i]} {salient[0]}", salient[1])
        fitted = fit_windows(text, tokenizer, max_windows=max_windows, policy=policy,
                             name=names[i] if names is not None else f"#{i}", salient=salient, warn=warn)
        stats.add(fitted)
        out.append(fitted.text)
    warn.summary()
    log.info(stats.summary())
    return out, stats

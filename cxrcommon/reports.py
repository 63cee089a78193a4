"""Radiology report text -> CLIP prompt: pick sections, clean placeholders, fit the 77-token limit.

SD 2.x's text encoder sees at most 77 tokens (BOS and EOS included); anything longer is silently
dropped by the pipeline. Cutting here, at a sentence boundary and with a count of how many reports
were cut, makes that loss visible and keeps the prompt grammatical."""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Mapping, Sequence

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
    "notification": "notification", "conclusion": "conclusion", "conclusions": "conclusion",
}
_HEADER_RE = re.compile(
    r"\b(?P<name>" + "|".join(sorted((re.escape(h) for h in _HEADER_NAMES), key=len, reverse=True))
    + r")\s*:", re.IGNORECASE)
_FINAL_REPORT_RE = re.compile(r"^\s*FINAL REPORT\b", re.IGNORECASE)
_PLACEHOLDER_RE = re.compile(r"_{2,}|\bX{2,}\b|\[\*\*.*?\*\*\]")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])(?<!\bDr\.)(?<!\bvs\.)(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\bapprox\.)\s+")


class ReportTooLongError(ValueError):
    """A report exceeds the CLIP token limit under policy="error"."""


@dataclasses.dataclass
class ReportStats:
    """How many reports went in, how many were cut to fit CLIP, how many ended up empty."""
    total: int = 0
    cut: int = 0
    empty: int = 0
    policy: str = "sentence"
    max_tokens: int = 77

    def summary(self) -> str:
        pct = 100.0 * self.cut / self.total if self.total else 0.0
        return (f"{self.total} reports: {self.cut} ({pct:.1f}%) cut to {self.max_tokens} CLIP tokens "
                f"(policy {self.policy}), {self.empty} empty")


def _is_header(text: str, m: re.Match[str]) -> bool:
    """A header starts a line, follows a sentence end, or is written in capitals (flattened MIMIC)."""
    before = text[:m.start()].rstrip(" \t")
    return (not before or before.endswith(("\n", ".", ":", ";")) or m.group("name").isupper())


def extract_sections(text: str | Mapping[str, Any],
                     sections: Sequence[str] = ("findings", "impression")) -> str:
    """The wanted sections, in the order asked, joined by a space.

    `text` is a free-text report (MIMIC "FINDINGS: ... IMPRESSION: ...", IU-Xray "Findings: ...")
    or a mapping of fields as parsed from OpenI XML ({"findings": ..., "impression": ...}).
    A report with no header at all is returned whole; one with other headers only gives the text
    before its first header (often "", which the caller counts as empty)."""
    wanted = [s.lower() for s in sections]
    if isinstance(text, Mapping):
        fields = {_HEADER_NAMES.get(str(k).lower().strip(), str(k).lower().strip()): v
                  for k, v in text.items()}
        return " ".join(str(fields[s]).strip() for s in wanted if fields.get(s) and str(fields[s]).strip())
    headers = [m for m in _HEADER_RE.finditer(text) if _is_header(text, m)]
    if not headers:
        return text.strip()
    found: dict[str, list[str]] = {}
    for m, nxt in zip(headers, headers[1:] + [None]):
        body = text[m.end():nxt.start() if nxt else len(text)].strip()
        found.setdefault(_HEADER_NAMES[m.group("name").lower()], []).append(body)
    picked = " ".join(b for s in wanted for b in found.get(s, []) if b)
    if picked or any(s in found for s in wanted):
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


def prepare_reports(texts: Sequence[str | Mapping[str, Any]], tokenizer: Any = None, *,
                    sections: Sequence[str] = ("findings", "impression"), policy: str = "sentence",
                    max_tokens: int = 77, names: Sequence[str] | None = None) -> tuple[list[str], ReportStats]:
    """Reports -> CLIP-ready prompts (same order and length; empty ones stay "") plus counts, logged.

    `tokenizer` defaults to the offline CLIP tokenizer; `names` label reports in errors."""
    if tokenizer is None:
        from .tokenizer import clip_tokenizer
        tokenizer = clip_tokenizer()
    stats = ReportStats(total=len(texts), policy=policy, max_tokens=max_tokens)
    out: list[str] = []
    for i, raw in enumerate(texts):
        text = normalize_report(extract_sections(raw, sections))
        if not text:
            stats.empty += 1
            out.append("")
            continue
        name = names[i] if names is not None else f"#{i}"
        text, was_cut = fit_clip_limit(text, tokenizer, max_tokens=max_tokens, policy=policy, name=name)
        stats.cut += was_cut
        out.append(text)
    log.info(stats.summary())
    return out, stats

"""Report text: section extraction (MIMIC, IU-Xray, OpenI fields), placeholders, the window cap and its salience cut."""
from __future__ import annotations

import csv
import logging

import pytest

from cxrcommon.reports import (
    FittedText,
    ReportStats,
    ReportTooLongError,
    extract_sections,
    fit_clip_limit,
    fit_windows,
    impression_of,
    normalize_report,
    prepare_reports,
    salient_order,
)
from cxrcommon.tokenizer import clip_tokenizer

MIMIC_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.  Clips project over the left lung,
 potentially within the breast. The imaged upper abdomen is unremarkable.
 Chronic deformity of the posterior left sixth and seventh ribs are noted.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

MIMIC_IMPRESSION_ONLY = """                                 FINAL REPORT
 HISTORY:  ___-year-old man with shortness of breath.

 COMPARISON:  Chest radiograph from ___.

 IMPRESSION:
 Moderate cardiomegaly is stable. Mild pulmonary vascular congestion has
 improved since ___. Small bilateral pleural effusions.  No pneumothorax.
 Dr. ___ was notified by Dr. ___ at ___ on ___ by telephone.
"""

MIMIC_WET_READ = ("WET READ: ___ ___ 3:12 AM  Low lung volumes, no focal consolidation.  "
                  "FINAL REPORT  INDICATION: Chest pain.  FINDINGS: Lungs are clear. Heart size is normal. "
                  "IMPRESSION: No acute intrathoracic process. RECOMMENDATION(S): none")

IU_XRAY = ("Comparison: XXXX. Indication: XXXX-year-old male, chest pain. Findings: The cardiomediastinal "
           "silhouette is within normal limits for size and contour. The lungs are normally inflated "
           "without evidence of focal airspace disease, pleural effusion, or pneumothorax. Stable "
           "calcified granuloma within the right upper lung. No acute bone abnormality.. "
           "Impression: No acute cardiopulmonary process.")

IU_XRAY_LINES = """Indication: Positive TB test
Findings: Heart size normal. Lungs are clear. XXXX are normal. No pneumonia, effusions, edema,
pneumothorax, adenopathy, nodules or masses.
Impression: Normal chest"""

OPENI_FIELDS = {"COMPARISON": "None.", "INDICATION": "XXXX-year-old female with chest pain.",
                "FINDINGS": "The heart and lungs have XXXX XXXX in the interval. Both lungs are clear.",
                "IMPRESSION": "No active disease."}

LONG_REPORT = ("FINDINGS: Portable semi-upright AP view of the chest demonstrates interval placement of a "
               "right internal jugular central venous catheter with tip terminating in the mid superior vena "
               "cava. Endotracheal tube terminates approximately 4.5 cm above the carina. Enteric tube courses "
               "below the diaphragm with tip in the stomach and side port beyond the gastroesophageal junction. "
               "Worsening bilateral perihilar and basilar airspace opacities are compatible with pulmonary "
               "edema, with superimposed infection not excluded. Moderate right and small left pleural "
               "effusions are present with adjacent atelectasis. No pneumothorax is seen. "
               "IMPRESSION: Lines and tubes in standard position. Worsening pulmonary edema.")


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def n_tokens(tok, text: str) -> int:
    return len(tok(text)["input_ids"])


def test_mimic_sections_stop_at_other_headers():
    out = normalize_report(extract_sections(MIMIC_FULL))
    assert out.startswith("There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular")
    assert out.endswith("ribs are noted. No acute cardiopulmonary process.")
    for leaked in ("ascites", "Chest PA and lateral", "None.", "EXAMINATION", "FINAL REPORT", "  "):
        assert leaked not in out
    assert extract_sections(MIMIC_FULL, ("impression",)) == "No acute cardiopulmonary process."
    assert extract_sections(MIMIC_FULL, ("indication",)).startswith("___F with new onset ascites")


def test_mimic_impression_only_and_flattened_wet_read():
    out = normalize_report(extract_sections(MIMIC_IMPRESSION_ONLY))
    assert out.startswith("Moderate cardiomegaly is stable.") and "shortness of breath" not in out
    flat = normalize_report(extract_sections(MIMIC_WET_READ))
    assert flat == "Lungs are clear. Heart size is normal. No acute intrathoracic process."
    # order follows the request, not the report
    assert normalize_report(extract_sections(MIMIC_WET_READ, ("impression", "findings"))) == \
        "No acute intrathoracic process. Lungs are clear. Heart size is normal."


def test_iu_xray_sections_inline_and_per_line():
    out = normalize_report(extract_sections(IU_XRAY))
    assert out.startswith("The cardiomediastinal silhouette")
    assert out.endswith("No acute bone abnormality. No acute cardiopulmonary process.")
    assert "chest pain" not in out and "Comparison" not in out and ".." not in out
    lines = normalize_report(extract_sections(IU_XRAY_LINES))
    assert lines == ("Heart size normal. Lungs are clear. are normal. No pneumonia, effusions, edema, "
                     "pneumothorax, adenopathy, nodules or masses. Normal chest")


def test_openi_fields_mapping():
    out = normalize_report(extract_sections(OPENI_FIELDS))
    assert out == "The heart and lungs have in the interval. Both lungs are clear. No active disease."
    assert extract_sections({"findings": "", "impression": "Clear."}) == "Clear."


def test_no_header_returns_whole_text_and_other_headers_give_lead_text():
    note = "  73 yo. Fever + cough.\nSevere respiratory insufficiency. "
    assert extract_sections(note) == "73 yo. Fever + cough.\nSevere respiratory insufficiency."
    case = "Day 4: bilateral consolidations, intubated. History: 73 year old male with pacemaker."
    assert extract_sections(case) == "Day 4: bilateral consolidations, intubated."
    assert extract_sections("FINAL REPORT\n INDICATION: cough.\n COMPARISON: none.") == ""
    # a lower-case "impression:" inside a sentence is not a header
    assert extract_sections("Findings: my impression: unclear effusion.") == "my impression: unclear effusion."


def test_mimic_quirks_conclusion_title_and_untitled_lead():
    """MIMIC-CXR: CONCLUSION is the impression (section_parser.py), the FINAL REPORT title is no text, and
    with untitled_lead=False a report with only other headers gives "" (its lead is the exam title)."""
    report = " FINAL REPORT\n INDICATION:  Fever.\n\n FINDINGS:\n Clear.\n\n CONCLUSION:\n No pneumonia.\n"
    assert normalize_report(extract_sections(report)) == "Clear. No pneumonia."
    assert impression_of(report) == "No pneumonia."
    assert extract_sections("   FINAL REPORT\n Lungs are clear.\n") == "Lungs are clear."
    titled = " FINAL REPORT\n CHEST RADIOGRAPH\n\n COMPARISON:  ___.\n\n Lungs are clear.\n"
    assert extract_sections(titled) == "CHEST RADIOGRAPH"
    assert extract_sections(titled, untitled_lead=False) == ""


@pytest.mark.parametrize("raw, clean", [
    ("Comparison to ___ study.  No change.", "Comparison to study. No change."),
    ("Dr. ___ was notified by Dr. ___ at ___ on ___ , ___ .", "Dr. was notified by Dr. at on."),
    ("The XXXX are intact.   XXXX XXXX.  Heart normal.", "The are intact. Heart normal."),
    ("Findings discussed with ( ___ ) today.", "Findings discussed with today."),
    ("___. Lungs clear ,  no effusion ; ___ ,", "Lungs clear, no effusion;"),
    ("Patient [**Name (NI) 123**] seen.\n\n\tHeart\tnormal .", "Patient seen. Heart normal."),
    ("Multiple XXXX", "Multiple"),
    ("XXXX", ""),
])
def test_placeholders_and_whitespace(raw, clean):
    out = normalize_report(raw)
    assert out == clean
    assert "  " not in out and " ." not in out and " ," not in out and ",." not in out


def test_normalize_keeps_real_x_and_underscores_in_words():
    assert (normalize_report("X-ray shows 2 x 3 cm nodule in snake_case.")
            == "X-ray shows 2 x 3 cm nodule in snake_case.")


def test_short_report_untouched(tok):
    assert fit_clip_limit("No acute cardiopulmonary process.", tok) == ("No acute cardiopulmonary process.", False)


def test_long_report_cut_at_sentence_boundary_and_fits(tok):
    text = normalize_report(extract_sections(LONG_REPORT))
    assert n_tokens(tok, text) > 77
    cut, was_cut = fit_clip_limit(text, tok)
    assert was_cut and cut.endswith(".") and text.startswith(cut)
    assert text[len(cut)] == " "  # the cut falls between sentences, not inside one
    assert n_tokens(tok, cut) <= 77
    # it is the longest run of sentences that fits: one more sentence would not
    rest = text[len(cut):].strip()
    next_sentence = rest.split(". ")[0] + "."
    assert n_tokens(tok, cut + " " + next_sentence) > 77


def test_hard_policy_fills_the_budget(tok):
    text = normalize_report(extract_sections(LONG_REPORT))
    cut, was_cut = fit_clip_limit(text, tok, policy="hard")
    assert was_cut and text.startswith(cut)
    assert 75 <= n_tokens(tok, cut) <= 77  # token-level: (nearly) the whole budget is used
    sentence_cut, _ = fit_clip_limit(text, tok)
    assert len(cut) > len(sentence_cut)


def test_single_overlong_sentence_falls_back_to_token_cut(tok):
    text = "Diffuse " + ", ".join(["bilateral patchy opacity"] * 40) + "."
    cut, was_cut = fit_clip_limit(text, tok, max_tokens=20)
    assert was_cut and cut and text.startswith(cut) and n_tokens(tok, cut) <= 20


def test_error_policy_names_the_report(tok):
    with pytest.raises(ReportTooLongError, match=r"report s12345/r1\.txt has \d+ CLIP tokens, more than 77"):
        fit_clip_limit(LONG_REPORT, tok, policy="error", name="s12345/r1.txt")
    with pytest.raises(ValueError, match="unknown CLIP-limit policy 'chop'"):
        fit_clip_limit(LONG_REPORT, tok, policy="chop")


def test_prepare_reports_counts_windows_cuts_and_empty(tok, caplog):
    texts = [MIMIC_FULL, IU_XRAY, LONG_REPORT, "FINDINGS: ___ IMPRESSION: XXXX", OPENI_FIELDS, ""]
    with caplog.at_level(logging.INFO, logger="cxrcommon.reports"):
        out, stats = prepare_reports(texts, tok)  # default: 3 windows of 75 tokens, nothing here is cut
    assert len(out) == len(texts) and out[3] == "" and out[5] == ""
    assert out[2] == normalize_report(extract_sections(LONG_REPORT))  # whole, impression included
    assert stats == ReportStats(total=6, cut=0, empty=2, policy="sentence", max_windows=3, multi_window=2)
    assert stats.summary() in caplog.text and "2 (33.3%) longer than one CLIP window" in stats.summary()
    one, stats1 = prepare_reports(texts, tok, max_windows=1)  # the stock 77-token limit
    assert stats1.cut == 2 and stats1.multi_window == 0 and all(n_tokens(tok, t) <= 77 for t in one)
    with pytest.raises(ReportTooLongError, match=r"report case-1 has 86 CLIP tokens, more than 1 window"):
        prepare_reports(texts, tok, policy="error", max_windows=1, names=[f"case-{i + 1}" for i in range(len(texts))])


def test_a_cut_keeps_the_impression_first_then_findings(tok):
    """Under a cap the impression survives (it was at the end, the first thing a plain cut drops)."""
    out, stats = prepare_reports([LONG_REPORT], tok, max_windows=1)
    assert out[0].startswith("Lines and tubes in standard position. Worsening pulmonary edema. Portable semi-upright")
    assert stats.cut == 1 and stats.impression_cut == 0 and n_tokens(tok, out[0]) <= 77
    text = normalize_report(LONG_REPORT)  # a prompt keeps its headers; the impression moves up with its own
    fit = fit_windows(text, tok, max_windows=1)
    assert fit.cut and not fit.impression_cut and fit.windows == 1
    assert fit.text.startswith("IMPRESSION: Lines and tubes in standard position. Worsening pulmonary edema. FINDINGS:")
    assert fit.tags(text) == {"prompt_windows": "1", "prompt_truncated": "true", "prompt_impression_cut": None,
                              "prompt_original": text}
    whole = fit_windows(text, tok)  # 2 windows fit under the default cap: nothing moves
    assert whole == FittedText(text, 147, 2) and whole.tags(text)["prompt_original"] is None


def test_an_impression_too_long_for_the_cap_is_cut_loudly(tok, caplog):
    report = "FINDINGS: Clear lungs. IMPRESSION: " + " ".join(f"Finding {i} is described here." for i in range(30))
    with caplog.at_level(logging.WARNING, logger="cxrcommon.reports"):
        fit = fit_windows(report, tok, max_windows=1, name="notes.csv:7")
    assert fit.cut and fit.impression_cut and fit.text.startswith("IMPRESSION: Finding 0 is")
    assert "FINDINGS" not in fit.text and n_tokens(tok, fit.text) <= 77
    assert "notes.csv:7: the report's impression is longer than 1 window(s)" in caplog.text


def test_several_impression_headers_kept_whole_are_not_reported_as_cut(tok):
    report = ("FINDINGS: " + " ".join(f"Finding {i} is described here." for i in range(25))
              + " IMPRESSION: Left effusion. IMPRESSION: No pneumothorax.")
    fit = fit_windows(report, tok, max_windows=1)
    assert fit.cut and not fit.impression_cut
    assert fit.text.startswith("IMPRESSION: Left effusion. IMPRESSION: No pneumothorax. FINDINGS: Finding 0")


def test_salient_order_leaves_reports_without_an_impression_alone():
    assert salient_order("Day 4: intubated. History: 73 year old.") == ("Day 4: intubated. History: 73 year old.", "")
    assert salient_order("History: cough. FINDINGS: Lungs clear. IMPRESSION: Nothing acute.") == \
        ("IMPRESSION: Nothing acute. FINDINGS: Lungs clear. History: cough.", "Nothing acute.")
    assert impression_of({"findings": "Clear.", "impression": "Normal."}) == "Normal."
    assert impression_of("Lungs are clear, no impression of effusion.") == ""


def test_real_clinical_notes(realcxr, tok):
    with open(realcxr / "manifest.csv", newline="", encoding="utf-8") as f:
        notes = [r["report_text"] for r in csv.DictReader(f) if r["report_text"].strip()]
    out, stats = prepare_reports(notes, tok)
    assert stats.total == len(notes) > 100 and stats.empty == 0
    assert stats.multi_window > 100  # almost half of these notes need a second window ...
    assert 0 < stats.cut < stats.multi_window / 4  # ... few a fourth (measured: 154 and 24 of 331)
    assert max(n_tokens(tok, t) for t in out) <= 3 * 75 + 2
    assert sum(a != b for a, b in zip(out, (normalize_report(extract_sections(n)) for n in notes))) == stats.cut

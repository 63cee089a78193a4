"""PrepareConfig: every `python -m finetune.prepare` option in one dataclass (YAML keys == fields == --flags)."""
from __future__ import annotations

from dataclasses import dataclass

from cxrcommon.config import field

DEFAULT_TEMPLATE = "{view} chest x-ray. {findings}."


@dataclass
class PrepareConfig:
    dataset: str = field("", "which download to read: mimic-cxr, chexpert, chexpert-plus, chestx-ray14, openi, "
                             "vindr-cxr, padchest or jsrt")
    root: str = field("", "the dataset's folder, as its official download (or a named re-packaging) lays it out")
    out: str = field("", "output folder: manifest.csv, summary.md/json, excluded.csv and images/ (not inside --root)")
    reports: str | None = field(None, "mimic-cxr: folder holding the unzipped report files (files/p10/... .txt); "
                                      "default: look under --root")
    mimic_iv: str | None = field(None, "mimic-cxr: the MIMIC-IV folder that holds hosp/patients.csv.gz and "
                                       "hosp/admissions.csv.gz, for sex, age at the study and race")
    size: int = field(512, "output image side in pixels (square)")
    resize_mode: str = field("pad", "make images square by pad (keep the whole film, as finetune does) or crop")
    views: list[str] = field(["PA", "AP"], "views kept (PA, AP, LATERAL, ...; any case, 'PA,AP' too); FRONTAL (a "
                                           "frontal film whose "
                                           "PA/AP is not recorded) passes when PA or AP is kept; add UNKNOWN to "
                                           "keep films whose view the source does not record")
    uncertain: str = field("ignore", "uncertain labels (-1): ignore (listed in the 'uncertain' column, neither "
                                     "positive nor negative), zeros (negative) or ones (positive)")
    readers: str = field("majority", "vindr-cxr, three readers per image: a finding counts when a majority, any "
                                     "or all of the image's readers marked it")
    caption_template: str = field(DEFAULT_TEMPLATE, "caption of a label-only image; {view}, {findings} (the "
                                                    "source's own finding names) and {source} are filled in")
    no_finding_text: str = field("No acute cardiopulmonary findings", "what {findings} says when no finding "
                                                                      "is marked")
    padchest_report: bool = field(False, "padchest: use the stemmed Spanish report as the report instead of "
                                         "the label caption")
    require_report: bool = field(True, "drop rows whose report has no findings/impression text (datasets "
                                       "with reports only)")
    val_fraction: float = field(0.05, "share of patients put in 'validate' where the dataset has no official split")
    test_fraction: float = field(0.10, "share of patients put in 'test' where the dataset has no official split")
    seed: int = field(0, "seed of the patient-level split where the dataset has no official split")
    workers: int = field(0, "image worker processes (0 = one per CPU core; 1 = in this process)")
    limit: int | None = field(None, "stop after this many kept rows (a quick look at a big dataset)")
    verbose: bool = field(False, "debug logging, and full tracebacks on errors")

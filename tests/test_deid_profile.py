"""The red-team's header classes (#24 review): attributes the table does not list, date ranges, UIDs that are
not the standard's, and identifiers in codes and person sequences. Each with invented values."""
from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from textremoval.config import TextRemovalConfig
from textremoval.deid.profile import deidentify_dataset, shift_date
from textremoval.deid.pseudonyms import Pseudonymizer

MRN, FAMILY = "40917733", "VANTERPOOL"


def base() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", "1.2.3.4.5.6"
    ds.StudyInstanceUID, ds.PatientName, ds.PatientID = "1.2.3.4", f"{FAMILY}^ILSE", MRN
    return ds


def run(ds: Dataset, **kw) -> Dataset:
    cfg = TextRemovalConfig(deidentify=True, deid_secret="k", **kw)
    return deidentify_dataset(ds, cfg, Pseudonymizer("k")).dataset


def everything(ds: Dataset) -> str:
    return " ".join(f"{e.value!r}" for e in ds.iterall() if e.VR != "SQ").upper()


@pytest.mark.parametrize("descriptors", [False, True])
def test_unlisted_links_binary_unknown_and_personal_attributes_are_removed(descriptors):
    ds = base()
    ds.RetrieveURL = f"https://viewer.example/study?mrn={MRN}&who={FAMILY}"
    ds.add_new(0x00111234 & 0xFFFEFFFF, "UN", f"{FAMILY}^ILSE".encode())     # an unknown even-group tag
    ds.HPGLDocument = f"{FAMILY} signed".encode()
    ds.PatientBirthDateInAlternativeCalendar = "3 Muharram 1390"
    ds.add_new(0x00081049, "LO", f"{FAMILY}^ILSE")                          # a PN attribute stored as LO
    out = run(ds, deid_clean_descriptors=descriptors)
    assert FAMILY not in everything(out) and MRN not in everything(out) and "MUHARRAM" not in everything(out)
    assert "RetrieveURL" not in out and "HPGLDocument" not in out


def test_unlisted_free_text_is_removed_by_default_and_swept_when_kept():
    ds = base()
    ds.TextValue = f"Discussed with {FAMILY.title()} on the ward"
    assert "TextValue" not in run(ds)
    kept = run(ds, deid_clean_descriptors=True)
    assert kept.TextValue == "Discussed with on the ward"


@pytest.mark.parametrize("value", ["19990203-19990410", "20011231-", "-20020105", "20040506070809-20040507"])
def test_every_date_of_a_range_moves(value):
    moved = shift_date(value, -30)
    originals = [p[:8] for p in value.split("-") if p]
    assert moved and not [d for d in originals if d in moved], moved


def test_only_registered_uids_are_kept_every_other_is_remapped():
    ds = base()
    ds.SOPClassUID = f"1.2.{MRN}.19610301"                                     # a vendor 'class' UID with an MRN
    ds.add_new(0x00209161, "UI", "1.2.826.0.1.77.5")                          # ConcatenationUID, unlisted
    ds.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"                    # CR Image Storage: registered
    out = run(ds)
    assert MRN not in everything(out) and "1.2.826.0.1.77.5" not in everything(out)
    assert out.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.1"


def test_person_sequences_and_codes_holding_identifiers_go():
    staff = Dataset()
    staff.CodeValue, staff.CodingSchemeDesignator, staff.CodeMeaning = "EMP-77120", "L", "staff"
    op = Dataset()
    op.PersonIdentificationCodeSequence = Sequence([staff])
    ds = base()
    ds.OperatorIdentificationSequence = Sequence([op])
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = MRN, "99LOCAL", "record"
    item = Dataset()
    item.ValueType, item.ConceptNameCodeSequence = "CONTAINER", Sequence([concept])
    ds.ContentSequence = Sequence([item])
    ds.BodyPartExamined = FAMILY                                               # a name in a CS attribute
    for kw in ({}, {"deid_clean_descriptors": True}):
        out = run(ds, **kw)
        assert "EMP-77120" not in everything(out) and MRN not in everything(out) and FAMILY not in everything(out)


def test_ages_over_89_are_grouped():
    ds = base()
    ds.PatientAge = "097Y"
    assert run(ds).PatientAge == "090Y"
    ds.PatientAge = "063Y"
    assert run(ds).PatientAge == "063Y"


def test_without_retained_dates_an_unlisted_date_goes_too():
    ds = base()
    ds.add_new(0x0008041F, "DT", "20190304101500")        # StudyUpdateDateTime, not in the table
    ds.StudyDate = "20190304"
    out = run(ds, deid_retain_dates=False)
    assert "20190304" not in everything(out)
    assert "20190304" not in everything(run(ds))          # shifted when dates are retained

"""Two Option columns of PS3.15 Table E.1-1 that `--deidentify` applies on top of the Basic Profile (the
third, Retain Longitudinal Temporal Information with Modified Dates, is applied by VR in profile.py:
every DA/DT moves, so it does not depend on this list's edition).

dicom-anonymizer carries the Basic Profile column only; these lists were extracted (by a script, not typed)
from the DICOM standard's Table E.1-1 (PS3.15 Annex E, as published in the chsasank/dicom_standard
reStructuredText edition) and name attributes by their pydicom keyword."""
from __future__ import annotations

# Rtn. Pat. Chars. Opt. = K: kept as they are (age, sex, size, weight, ...).
PATIENT_CHARACTERISTICS_KEEP = frozenset({
    "EthnicGroup", "PatientAge", "PatientSex", "PatientSexNeutered", "PatientSize", "PatientWeight",
    "PregnancyStatus", "SmokingStatus",
})

# Rtn. Pat. Chars. Opt. = C: kept, cleaned of identifiers.
PATIENT_CHARACTERISTICS_CLEAN = frozenset({
    "Allergies", "PatientState", "PreMedication", "SpecialNeeds",
})

# Clean Desc. Opt. = C: free-text descriptors kept, cleaned of identifiers and dates.
CLEAN_DESCRIPTORS = frozenset({
    "AcquisitionComments", "AcquisitionDeviceProcessingDescription", "AcquisitionProtocolDescription",
    "AdditionalPatientHistory", "AdmittingDiagnosesCodeSequence", "AdmittingDiagnosesDescription", "Allergies",
    "BeamDescription", "BolusDescription", "ClinicalTrialSeriesDescription",
    "ClinicalTrialTimePointDescription", "CommentsOnThePerformedProcedureStep", "CompensatorDescription",
    "ConceptualVolumeCombinationDescription", "ConceptualVolumeDescription", "ContainerDescription",
    "ContrastBolusAgent", "ContributionDescription", "DecompositionDescription", "DerivationDescription",
    "DeviceSettingDescription", "DischargeDiagnosisDescription", "DoseReferenceDescription",
    "EntityDescription", "EntityLabel", "EntityLongLabel", "EntityName", "EquipmentFrameOfReferenceDescription",
    "FixationDeviceDescription", "FractionGroupDescription", "FractionationNotes", "FrameComments",
    "IdentifyingComments", "ImageComments", "ImagingServiceRequestComments", "Impressions",
    "InterlockDescription", "InterlockOriginDescription", "InterpretationDiagnosisDescription",
    "InterpretationText", "LabelText", "LongDeviceDescription", "MakerNote", "MedicalAlerts",
    "MultienergyAcquisitionDescription", "Occupation", "PatientComments", "PatientState",
    "PerformedProcedureStepDescription", "PrescriptionDescription", "PrescriptionNotes",
    "PrescriptionNotesSequence", "PriorTreatmentDoseDescription", "ProtocolName", "RTPhysicianIntentNarrative",
    "RTPlanDescription", "RTPlanLabel", "RTPlanName", "RTPrescriptionLabel", "RTToleranceSetLabel",
    "RTTreatmentApproachLabel", "RadiationDoseIdentificationLabel", "RadiationDoseInVivoMeasurementLabel",
    "RadiationGenerationModeDescription", "RadiationGenerationModeLabel", "ReasonForOmissionDescription",
    "ReasonForRequestedProcedureCodeSequence", "ReasonForStudy", "ReasonForSuperseding",
    "ReasonForTheImagingServiceRequest", "ReasonForTheRequestedProcedure", "ReasonForVisit",
    "ReasonForVisitCodeSequence", "RequestAttributesSequence", "RequestedContrastAgent",
    "RequestedProcedureComments", "RequestedProcedureDescription",
    "RespiratoryMotionCompensationTechniqueDescription", "ResultsComments", "ScheduledProcedureStepDescription",
    "SeriesDescription", "ServiceEpisodeDescription", "SetupTechniqueDescription", "ShieldingDeviceDescription",
    "SpecimenDetailedDescription", "SpecimenShortDescription", "StudyComments", "StudyDescription",
    "TreatmentPositionGroupLabel", "TreatmentSite", "TreatmentTechniqueNotes",
    "TreatmentToleranceViolationDescription", "UserContentLabel", "UserContentLongLabel", "VisitComments",
})

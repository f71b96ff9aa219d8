"""De-identification of DICOM objects: the Basic Application Level Confidentiality Profile of
DICOM PS3.15 Annex E (Table E.1-1), for the attributes present, with UIDs replaced
consistently through a keyed hash.

Actions, applied recursively inside sequences: **X** remove, **Z** replace with an empty
value (or the pseudonym, for PatientName/PatientID), **D** replace with a dummy value, **U**
replace the UID with ``2.25.<keyed hash>`` (the same original UID always gets the same
replacement, so series, studies and references stay linked across files). Every UID that is
not a well-known DICOM UID (SOP classes, transfer syntaxes, coding schemes) is replaced, which
covers all U rows of the table. Private attributes, curves and overlays are removed. Pixel
data is kept as it is, so an object whose BurnedInAnnotation is YES is refused.
PatientIdentityRemoved and DeidentificationMethod(CodeSequence) record what was done.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Final

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary

from wsi.atomic import write_bytes_atomic

from .errors import DeidentificationError
from .keys import StudyKeys

#: Z: emptied (type 2 attributes the profile keeps with a zero-length value).
EMPTY: Final = frozenset({
    "AccessionNumber", "ContentCreatorName", "ContentDate", "ContentTime", "PatientBirthDate",
    "PatientSex", "ReferringPhysicianName", "StudyDate", "StudyID", "StudyTime",
    "FillerOrderNumberImagingServiceRequest", "PlacerOrderNumberImagingServiceRequest",
    "VerifyingObserverName", "PersonName", "ContrastBolusAgent", "AcquisitionDate",
    "AcquisitionTime", "SeriesDate", "SeriesTime",
})

#: X: removed.
REMOVE: Final = frozenset({
    "AcquisitionComments", "AcquisitionContextSequence", "AcquisitionDateTime",
    "AcquisitionDeviceProcessingDescription", "AcquisitionProtocolDescription",
    "ActualHumanPerformersSequence", "AdditionalPatientHistory", "AdmissionID",
    "AdmittingDate", "AdmittingDiagnosesCodeSequence", "AdmittingDiagnosesDescription",
    "AdmittingTime", "Allergies", "Arbitrary", "AuthorObserverSequence", "BranchOfService",
    "CommentsOnThePerformedProcedureStep", "ConfidentialityConstraintOnPatientDataDescription",
    "ContributionDescription", "CountryOfResidence", "CurrentPatientLocation",
    "CustodialOrganizationSequence", "DataSetTrailingPadding", "DerivationDescription",
    "DetectorID", "DeviceSerialNumber", "DeviceUID", "DigitalSignaturesSequence",
    "DischargeDiagnosisDescription", "DistributionAddress", "DistributionName",
    "EthnicGroup", "FrameComments", "GantryID", "GeneratorID", "HumanPerformerName",
    "HumanPerformerOrganization", "IconImageSequence", "IdentifyingComments", "ImageComments",
    "ImagePresentationComments", "ImagingServiceRequestComments", "Impressions",
    "InstanceCreationDate", "InstanceCreationTime", "InstitutionAddress",
    "InstitutionalDepartmentName", "InstitutionCodeSequence", "InstitutionName",
    "InsurancePlanIdentification", "IntendedRecipientsOfResultsIdentificationSequence",
    "InterpretationApproverSequence", "InterpretationAuthor", "InterpretationDiagnosisDescription",
    "InterpretationIDIssuer", "InterpretationRecorder", "InterpretationText",
    "InterpretationTranscriber", "IssuerOfAdmissionID", "IssuerOfPatientID",
    "LastMenstrualDate", "MedicalAlerts", "MedicalRecordLocator", "MilitaryRank",
    "ModifiedAttributesSequence", "ModifyingDeviceID", "ModifyingDeviceManufacturer",
    "NameOfPhysiciansReadingStudy", "NamesOfIntendedRecipientsOfResults", "Occupation",
    "OperatorIdentificationSequence", "OperatorsName", "OriginalAttributesSequence",
    "OrderCallbackPhoneNumber", "OrderEnteredBy", "OrderEntererLocation",
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "ParticipantSequence", "PatientAddress", "PatientAge", "PatientBirthName",
    "PatientBirthTime", "PatientComments", "PatientInstitutionResidence",
    "PatientInsurancePlanCodeSequence", "PatientMotherBirthName",
    "PatientPrimaryLanguageCodeSequence",
    "PatientReligiousPreference", "PatientSexNeutered", "PatientSize", "PatientState",
    "PatientTelephoneNumbers", "PatientTransportArrangements", "PatientWeight",
    "PerformedLocation", "PerformedProcedureStepDescription", "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime", "PerformedProcedureStepID",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "PerformedStationAETitle", "PerformedStationGeographicLocationCodeSequence",
    "PerformedStationName", "PerformedStationNameCodeSequence", "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence", "PersonAddress", "PersonTelephoneNumbers",
    "PhysicianApprovingInterpretation", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence",
    "PlateID", "PreMedication", "PregnancyStatus", "ProtocolName",
    "ReasonForTheImagingServiceRequest",
    "ReasonForStudy", "ReferencedPatientAliasSequence", "ReferencedPatientSequence",
    "ReferencedStudySequence", "ReferringPhysicianAddress",
    "ReferringPhysicianIdentificationSequence", "ReferringPhysicianTelephoneNumbers",
    "RegionOfResidence", "RequestAttributesSequence", "RequestedContrastAgent",
    "RequestedProcedureComments", "RequestedProcedureDescription", "RequestedProcedureID",
    "RequestedProcedureLocation", "RequestingPhysician", "RequestingService",
    "ResponsibleOrganization", "ResponsiblePerson", "ResultsComments",
    "ResultsDistributionListSequence",
    "ResultsIDIssuer", "ScheduledHumanPerformersSequence", "ScheduledPatientInstitutionResidence",
    "ScheduledPerformingPhysicianIdentificationSequence", "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepDescription", "ScheduledProcedureStepEndDate",
    "ScheduledProcedureStepEndTime", "ScheduledProcedureStepLocation",
    "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
    "ScheduledStationAETitle", "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledStationName", "ScheduledStationNameCodeSequence", "ScheduledStudyLocation",
    "ScheduledStudyLocationAETitle", "SeriesDescription", "ServiceEpisodeDescription",
    "ServiceEpisodeID", "SmokingStatus", "SourceApplicationEntityTitle", "SpecialNeeds",
    "StationName", "StudyComments", "StudyDescription", "StudyIDIssuer", "TextComments",
    "TextString", "TimezoneOffsetFromUTC", "TopicAuthor", "TopicKeywords", "TopicSubject",
    "TopicTitle", "VerifyingOrganization", "VisitComments",
})

#: Well-known UIDs that identify no one and must stay (SOP classes, transfer syntaxes, …).
_KNOWN_UIDS: Final = frozenset(UID_dictionary)

METHOD: Final = "DICOM PS3.15 Annex E Basic Profile (slidepipe)"


def _is_overlay_or_curve(group: int) -> bool:
    return 0x5000 <= group <= 0x50FF or (0x6000 <= group <= 0x60FF and group % 2 == 0)


def _clean(dataset: Dataset, keys: StudyKeys) -> None:
    for element in list(dataset):
        tag, keyword = element.tag, element.keyword
        if tag.is_private or _is_overlay_or_curve(tag.group) or keyword in REMOVE:
            del dataset[tag]
        elif keyword in EMPTY:
            element.value = None
        elif element.VR == "UI" and element.value:
            values = element.value if element.VM > 1 else [element.value]
            replaced = [v if str(v) in _KNOWN_UIDS else keys.uid(str(v)) for v in values]
            element.value = replaced if element.VM > 1 else replaced[0]
        elif element.VR == "SQ":
            for item in element.value:
                _clean(item, keys)


def deidentify(dataset: Dataset, keys: StudyKeys, pseudonym: str) -> Dataset:
    """A de-identified copy of ``dataset`` (which is left untouched); ``pseudonym`` becomes
    PatientName and PatientID. Raises DeidentificationError for burned-in annotation."""
    if str(dataset.get("BurnedInAnnotation", "NO")).upper() == "YES":
        raise DeidentificationError("the image has burned-in annotation (BurnedInAnnotation "
                                    "YES); its pixels may show identifiers, so it is not "
                                    "exported")
    clean = copy.deepcopy(dataset)
    _clean(clean, keys)
    clean.PatientName = pseudonym
    clean.PatientID = pseudonym
    clean.PatientIdentityRemoved = "YES"
    clean.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    clean.DeidentificationMethodCodeSequence = Sequence([code])
    if hasattr(dataset, "file_meta"):
        meta = FileMetaDataset(dataset.file_meta)
        if "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = clean.SOPInstanceUID
        meta.pop("SourceApplicationEntityTitle", None)
        clean.file_meta = meta
    return clean


def deidentify_file(source: Path, target: Path, keys: StudyKeys, pseudonym: str) -> Path:
    """Read ``source``, de-identify it and write it to ``target`` (parents created)."""
    clean = deidentify(pydicom.dcmread(source), keys, pseudonym)
    buffer = io.BytesIO()
    clean.save_as(buffer, enforce_file_format=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(target, buffer.getvalue())
    return target

"""DICOM outputs a radiologist's viewer opens: a binary DICOM Segmentation (SEG) and an RT Structure Set
(RTSTRUCT) that reference the source CT/MR series, optionally anonymized.

    sources = source_datasets("PATIENT_DICOM")              # same slice order as medio.read_image's (Z, Y, X)
    write_seg(labels, sources, ["liver", "tumour"], "out/seg.dcm")
    write_rtstruct(labels, sources, ["liver", "tumour"], "out/rtstruct.dcm")   # needs rt-utils
    read_seg_labels("out/seg.dcm", sources)                 # -> labels again, (Z, Y, X)

``labels`` is a ``(Z, Y, X)`` array of class indices ``0..K`` (0 = background) in the order
:func:`source_datasets` returns the slices; ``class_names[k - 1]`` names class ``k``. The IODs are built by
highdicom (SEG) and rt-utils (RTSTRUCT), never by hand.

Identifiers. Without ``anonymize`` the outputs carry the source's patient and study identifiers (copied by
highdicom / rt-utils, never invented; attributes the source lacks stay empty) and reference the source's own
SOP instances. With ``anonymize=True`` both writers build from :func:`anonymized_sources`: in-memory copies with
the PS3.15 Basic Profile identifiers removed or emptied and every Study/Series/SOP Instance/Frame of Reference
UID replaced through one :class:`UIDMap`; the output then references the *remapped* series, so a viewer shows
it over the anonymized series exported with the same map (:func:`write_series`), not over the original.

Research software, not a medical device.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import secrets
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from errors import ConfigError, InputError

if TYPE_CHECKING:  # annotations only: pydicom is imported where it is used
    from pydicom import Dataset

log = logging.getLogger(__name__)

_PIXEL_DATA = 0x7FE00010
_SEG_SERIES_NUMBER = 900       # series numbers of the outputs (viewers sort series by number)
_RTSTRUCT_SERIES_NUMBER = 901
_DEVICE_SERIAL = "none"        # the SEG's Enhanced General Equipment needs one; software has no serial number
_DUMMY_DATE, _DUMMY_TIME = "19000101", "000000"  # Type 1 dates of an anonymized SEG (PS3.15 action D)
_RT_UTILS_MISSING = "writing RTSTRUCT needs rt-utils: pip install rt-utils opencv-python-headless"

# Type 2 patient / study attributes highdicom and rt-utils read from the first source; added EMPTY to the
# working copies when the source lacks them (an empty value means "unknown", nothing is invented).
_TYPE2_SOURCE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")

# ---- DICOM PS3.15 Annex E, Table E.1-1 "Application Level Confidentiality Profile Attributes", Basic Profile
# column, for the attributes that can reach a SEG or RTSTRUCT built from these sources (Patient, General Study,
# Patient Study, Clinical Trial, General Series/Equipment modules, and the references). Actions: Z = replace
# with a zero-length value (these are Type 2 in the outputs), X = remove, U = replace the UID consistently
# (:class:`UIDMap`). Where the table allows X/Z/D we remove. Beyond the list, every remaining date / time
# (DA, DT, TM) is emptied (the table lists them one by one, with Z, X or D) and private attributes are removed
# (Basic Profile). Pixel data is kept as is: burned-in text is not detected (Basic Profile assumes none).
_ZERO = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
         "StudyTime", "ReferringPhysicianName", "ContentCreatorName")
_REMOVE = (
    # patient
    "IssuerOfPatientID", "PatientBirthTime", "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence",
    "PatientBirthName", "PatientAge", "PatientSize", "PatientWeight", "PatientAddress", "PatientMotherBirthName",
    "MilitaryRank", "BranchOfService", "MedicalRecordLocator", "PatientTelephoneNumbers", "EthnicGroup",
    "Occupation", "AdditionalPatientHistory", "PatientComments", "PatientReligiousPreference",
    "ResponsiblePerson", "ResponsibleOrganization", "ReferencedPatientSequence", "PatientInsurancePlanCodeSequence",
    "PregnancyStatus", "SmokingStatus", "LastMenstrualDate", "MedicalAlerts", "Allergies", "CountryOfResidence",
    "RegionOfResidence", "PatientState",
    # study, visit, request
    "StudyDescription", "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence",
    "ReferringPhysicianIdentificationSequence", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "RequestingPhysician", "RequestingService", "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence", "AdmissionID", "IssuerOfAdmissionIDSequence", "ReferencedStudySequence",
    "IssuerOfAccessionNumberSequence", "RequestAttributesSequence", "ReasonForStudy", "RequestedProcedureDescription",
    "ReferencedPerformedProcedureStepSequence", "PerformedProcedureStepID", "PerformedProcedureStepDescription",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime", "ScheduledProcedureStepID", "StudyComments",
    # clinical trial modules (their Type 1 attributes are D in the table: the optional modules are dropped)
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription", "ClinicalTrialCoordinatingCenterName",
    "ClinicalTrialProtocolEthicsCommitteeName", "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    "ClinicalTrialSeriesID", "ClinicalTrialSeriesDescription",
    # series, equipment, acquisition
    "SeriesDescription", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "InstitutionCodeSequence", "StationName", "DeviceSerialNumber", "DeviceUID", "OperatorsName",
    "OperatorIdentificationSequence", "PerformingPhysicianName", "PerformingPhysicianIdentificationSequence",
    "ProtocolName", "ImageComments", "DerivationDescription", "AcquisitionComments", "InstanceCreatorUID",
    "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime",
)
# ... and from the sources only: their own references to other images, equipment history and timestamps
# (X/Z/U* and X/D in the table). In the outputs these are the outputs' own references (kept, UIDs remapped) and
# creation times (emptied with the other dates).
_REMOVE_FROM_SOURCES = ("SourceImageSequence", "ReferencedImageSequence", "ReferencedSeriesSequence",
                        "ReferencedInstanceSequence", "ContributingEquipmentSequence", "ContentDate", "ContentTime",
                        "SeriesDate", "SeriesTime", "InstanceCreationDate", "InstanceCreationTime")
_REMAP = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "MediaStorageSOPInstanceUID",
          "ReferencedSOPInstanceUID", "ReferencedSOPInstanceUIDInFile", "FrameOfReferenceUID",
          "ReferencedFrameOfReferenceUID", "RelatedFrameOfReferenceUID", "SynchronizationFrameOfReferenceUID",
          "SourceFrameOfReferenceUID", "TargetFrameOfReferenceUID", "IrradiationEventUID", "UID",
          "StorageMediaFileSetUID", "DimensionOrganizationUID", "ConcatenationUID", "TrackingUID")

# ---- segment codes (SNOMED CT via pydicom's code dictionary), first matching word wins: lesion words
# before organ words, so "livertumor01" is a neoplasm and "liverkyst" a cyst. (category, type) attribute names
# of pydicom's codes.SCT.
_MAS, _ANAT, _TISSUE = "MorphologicallyAbnormalStructure", "AnatomicalStructure", "Tissue"
_CODE_WORDS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("metasta",), _MAS, "Metastasis"),
    (("tumor", "tumour", "neoplasm", "cancer", "carcinoma", "malignan"), _MAS, "Neoplasm"),
    (("cyst", "kyst"), _MAS, "Cyst"),
    (("nodule",), _MAS, "Nodule"),
    (("mass",), _MAS, "Mass"),
    (("lesion", "polyp"), _MAS, "Lesion"),
    (("liver", "hepat"), _ANAT, "Liver"),
    (("kidney", "renal"), _ANAT, "Kidney"),
    (("hippocamp",), _ANAT, "Hippocampus"),
    (("spleen",), _ANAT, "Spleen"),
    (("lung",), _ANAT, "Lung"),
    (("pancrea",), _ANAT, "Pancreas"),
    (("heart",), _ANAT, "Heart"),
    (("brain",), _ANAT, "Brain"),
    (("prostate",), _ANAT, "Prostate"),
    (("gallbladder",), _ANAT, "Gallbladder"),
    (("bladder",), _ANAT, "Bladder"),
    (("stomach",), _ANAT, "Stomach"),
    (("colon",), _ANAT, "Colon"),
    (("esophag", "oesophag"), _ANAT, "Esophagus"),
    (("trachea",), _ANAT, "Trachea"),
    (("bone",), _ANAT, "Bone"),
    (("skin",), _ANAT, "Skin"),
    (("portal",), _ANAT, "PortalVein"),
    (("aorta",), _ANAT, "Aorta"),
    (("artery", "arterial"), _ANAT, "Artery"),
    (("vein", "venous"), _ANAT, "Vein"),
    (("vessel", "vascul"), _ANAT, "BloodVessel"),
)
# fallback by predict.py role when no word matches
_ROLE_CODES = {"lesion": (_MAS, "Lesion"), "organ": (_ANAT, "Organ"), "tubular": (_ANAT, "BloodVessel")}
_GENERIC_CODE = (_TISSUE, "Tissue")


# --------------------------------------------------------------------------------------------- reading
def source_datasets(path: str | os.PathLike, series: str | None = None) -> list[Dataset]:
    """The source series' full pydicom datasets in exactly the slice order ``medio.read_image(path)`` stacks
    them into its ``(Z, Y, X)`` array (DICOM folder or zip; ``series`` as in medio). A single DICOM file gives
    a one-item list (its 2D labels are accepted as ``(1, H, W)`` or ``(H, W)``)."""
    import dicom_io
    import medio

    p = Path(path)
    if p.is_file() and medio.detect_format(p) == "dicom" and p.suffix.lower() != ".zip":
        if series is not None:
            raise InputError(f"{p}: series='{series}' given for a single DICOM file (expected a folder or zip)")
        medio.read_image(p)  # same checks (readable, pixel data, one 2D frame) as the volume reader
        import pydicom

        return [pydicom.dcmread(p, force=True)]
    return dicom_io.dicom_series_datasets(p, series)


def require_dicom(meta: Any, path: str | os.PathLike, output_type: str = "dicom-seg") -> None:
    """Raise InputError unless the input described by ``meta`` (a medio.ImageMeta) is DICOM: a SEG or RTSTRUCT
    must reference its source images."""
    if getattr(meta, "format", None) != "dicom":
        raise InputError(f"{path}: --output-type {output_type} needs a DICOM series input "
                         f"(got {getattr(meta, 'format', '?')}); a SEG must reference its source images")


def read_seg_labels(path: str | os.PathLike, sources: Sequence[Dataset]) -> np.ndarray:
    """A SEG written by :func:`write_seg` (or any binary / labelmap SEG over these sources) back as a uint8
    ``(Z, Y, X)`` array of segment numbers ordered like ``sources`` (0 where no segment; overlapping segments
    are an error). For an anonymized SEG pass the anonymized sources (same :class:`UIDMap`)."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
        arr = seg.get_pixels_by_source_instance(
            [str(ds.SOPInstanceUID) for ds in sources], combine_segments=True,
            assert_missing_frames_are_empty=True, dtype=np.uint8)
    except (OSError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
        raise InputError(f"{path}: cannot read the segmentation over these sources "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from exc
    return np.ascontiguousarray(arr)


# ------------------------------------------------------------------------------------------ anonymization
class UIDMap:
    """One consistent replacement for every original UID: ``generate_uid(entropy_srcs=[uid, salt])``, so the
    same UID and salt always give the same replacement. ``salt`` defaults to a random secret: pass your own
    (and keep it private) to get identical UIDs across runs; use ONE map for all outputs of a case."""

    def __init__(self, salt: str | None = None) -> None:
        self.salt = secrets.token_hex(16) if salt is None else str(salt)
        self.mapping: dict[str, str] = {}

    def __call__(self, uid: Any) -> str:
        """The replacement of ``uid`` (recorded in :attr:`mapping`)."""
        from pydicom.uid import generate_uid

        key = str(uid)
        if key not in self.mapping:
            self.mapping[key] = str(generate_uid(entropy_srcs=[key, self.salt]))
        return self.mapping[key]

    def __contains__(self, uid: object) -> bool:
        return str(uid) in self.mapping


def _walk(ds: Dataset) -> Iterable[Dataset]:
    """Every dataset inside ``ds`` (itself first, then sequence items, recursively)."""
    yield ds
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def _values(elem) -> list:
    return list(elem.value) if elem.VM > 1 else [elem.value]


def _deidentify(ds: Dataset, uid_map: UIDMap, *, source: bool) -> None:
    """Apply the Basic Profile actions above to ``ds`` in place, recursively. ``source``: a source image (also
    remove its references, replace every UID of the U list); else an output (replace only UIDs the map has
    seen: the output's own new UIDs stay)."""
    from pydicom.datadict import tag_for_keyword

    ds.remove_private_tags()
    zero = {tag_for_keyword(k) for k in _ZERO}
    remove = {tag_for_keyword(k) for k in _REMOVE + (_REMOVE_FROM_SOURCES if source else ())}
    remap = {tag_for_keyword(k) for k in _REMAP}
    datasets = list(_walk(ds))
    if getattr(ds, "file_meta", None) is not None:
        datasets.append(ds.file_meta)
    for item in datasets:
        for tag in [elem.tag for elem in item if elem.tag in remove]:
            del item[tag]
        for elem in list(item):
            if elem.tag in zero or (elem.VR in ("DA", "DT", "TM") and not elem.is_empty):
                elem.value = ""
            elif elem.tag in remap and not elem.is_empty:
                new = [uid_map(v) if (source or v in uid_map) else str(v) for v in _values(elem)]
                elem.value = new if elem.VM > 1 else new[0]


def _leaked_uids(ds: Dataset, uid_map: UIDMap) -> list[str]:
    """Original UIDs (keys of the map) still present anywhere in ``ds`` (any UI element, recursively)."""
    found = []
    datasets = list(_walk(ds)) + ([ds.file_meta] if getattr(ds, "file_meta", None) is not None else [])
    for item in datasets:
        for elem in item:
            if elem.VR == "UI" and not elem.is_empty:
                found += [str(v) for v in _values(elem) if v in uid_map]
    return found


def anonymized_sources(sources: Sequence[Dataset], uid_map: UIDMap) -> list[Dataset]:
    """In-memory copies of ``sources`` with the PS3.15 Basic Profile identifiers (Table E.1-1, list above)
    removed or emptied, private attributes removed, every date/time emptied and Study / Series / SOP Instance /
    Frame of Reference UIDs replaced through ``uid_map``. Pixel data is kept when present. The originals are
    not modified. Missing Type 2 attributes and a missing FrameOfReferenceUID are filled as for the writers."""
    return _anonymized(sources, uid_map, pixels=True)


def _anonymized(sources: Sequence[Dataset], uid_map: UIDMap, *, pixels: bool) -> list[Dataset]:
    out = _prepared(sources, pixels=pixels)
    for ds in out:
        _deidentify(ds, uid_map, source=True)
    return out


# ------------------------------------------------------------------------------------------------ helpers
def _copy(ds: Dataset, pixels: bool) -> Dataset:
    """Deep copy of a dataset, without its pixel data unless ``pixels``."""
    if pixels or _PIXEL_DATA not in ds:
        return copy.deepcopy(ds)
    import pydicom

    new = pydicom.Dataset()
    for elem in ds:
        if elem.tag != _PIXEL_DATA:
            new.add(copy.deepcopy(elem))
    if getattr(ds, "file_meta", None) is not None:
        new.file_meta = copy.deepcopy(ds.file_meta)
    return new


def _prepared(sources: Sequence[Dataset], *, pixels: bool) -> list[Dataset]:
    """Working copies the IOD builders accept: required references checked, absent Type 2 patient / study
    attributes added empty, and a FrameOfReferenceUID derived from the SeriesInstanceUID when the series has
    none (e.g. 3D-IRCADb; logged), identical for every output of that series."""
    from pydicom.uid import generate_uid

    if not sources:
        raise InputError("no DICOM source images given (a SEG / RTSTRUCT must reference its source series)")
    need = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns",
            "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
    out = []
    for ds in sources:
        missing = [k for k in need if k not in ds or ds[k].is_empty]
        if missing:
            raise InputError(f"{getattr(ds, 'filename', None) or ds.get('SOPInstanceUID', 'DICOM source')}: "
                             f"source image lacks {', '.join(missing)} (needed to reference it from a SEG/RTSTRUCT)")
        new = _copy(ds, pixels)
        for kw in _TYPE2_SOURCE:
            if kw not in new:
                setattr(new, kw, "")
        out.append(new)
    series = {str(ds.SeriesInstanceUID) for ds in out}
    if len(series) != 1:
        raise InputError(f"source images belong to {len(series)} series (expected one series)")
    fors = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in out}
    if fors == {""}:
        derived = str(generate_uid(entropy_srcs=["FrameOfReferenceUID", next(iter(series))]))
        log.warning("source series %s has no FrameOfReferenceUID; the outputs declare %s, derived from the series UID",
                    next(iter(series)), derived)
        for ds in out:
            ds.FrameOfReferenceUID = derived
    elif len(fors) != 1:
        raise InputError(f"source images of series {next(iter(series))} have {len(fors)} different "
                         f"FrameOfReferenceUIDs (expected one)")
    return out


def _check_labels(labels: np.ndarray, sources: Sequence[Dataset], class_names: Sequence[str]) -> np.ndarray:
    if not class_names or any(not str(n).strip() for n in class_names):
        raise ConfigError(f"class names {list(class_names)!r}: give one non-empty name per class")
    if len({str(n) for n in class_names}) != len(class_names):
        raise ConfigError(f"class names {list(class_names)!r} are not unique")
    arr = np.asarray(labels)
    if arr.ndim == 2 and len(sources) == 1:
        arr = arr[None]
    want = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    if arr.shape != want:
        raise InputError(f"labels have shape {arr.shape} but the DICOM series is {want} (slices, rows, columns)")
    if arr.dtype != bool and not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"labels have dtype {arr.dtype} (expected integer class indices 0..{len(class_names)})")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo < 0 or hi > len(class_names):
        raise InputError(f"labels hold class {lo if lo < 0 else hi} but {len(class_names)} class name(s) were "
                         f"given (expected 0..{len(class_names)})")
    return arr.astype(np.uint8)


def _version() -> str:
    """This project's version: pyproject.toml's [project].version, else the installed package's."""
    try:
        import tomllib

        with open(Path(__file__).with_name("pyproject.toml"), "rb") as fh:
            return str(tomllib.load(fh)["project"]["version"])
    except Exception:  # noqa: BLE001 - Python 3.10 (no tomllib) or no pyproject beside the module
        try:
            from importlib.metadata import version

            return version("medseg-unet")
        except Exception:  # noqa: BLE001
            return "unknown"


def segment_codes(name: str, role: str | None = None) -> tuple[Any, Any]:
    """(SegmentedPropertyCategory, SegmentedPropertyType) SNOMED CT codes for a class name: a known word
    (liver, kidney, hippocampus, tumour, polyp, vessel, ...), else by role (lesion / organ / tubular), else
    Tissue / Tissue."""
    from pydicom.sr.codedict import codes

    n = str(name).lower()
    for words, category, kind in _CODE_WORDS:
        if any(w in n for w in words):
            return getattr(codes.SCT, category), getattr(codes.SCT, kind)
    category, kind = _ROLE_CODES.get(role or "", _GENERIC_CODE)
    return getattr(codes.SCT, category), getattr(codes.SCT, kind)


def _atomic_write(out: Path, write: Callable[[str], None]) -> Path:
    from fileio import atomic_write

    return atomic_write(out, ".dcm", write)


def _out_path(out_path: str | os.PathLike, sources: Sequence[Dataset]) -> Path:
    out = Path(out_path)
    if out.is_dir():
        raise InputError(f"{out}: is a folder (expected a file path for the DICOM output)")
    names = {Path(f).resolve() for f in (getattr(ds, "filename", None) for ds in sources) if isinstance(f, str) and f}
    if out.resolve() in names:
        raise InputError(f"{out}: refusing to overwrite a source image")
    return out


def _finish_anonymized(ds: Dataset, uid_map: UIDMap) -> None:
    """Output pass: the same profile on the output itself, then a check that no original UID survived."""
    _deidentify(ds, uid_map, source=False)
    leaked = _leaked_uids(ds, uid_map)
    if leaked:  # pragma: no cover - would be a bug in this module
        raise RuntimeError(f"anonymized output still holds {len(leaked)} original UID(s), e.g. {leaked[0]}")


def write_series(datasets: Sequence[Dataset], folder: str | os.PathLike) -> list[Path]:
    """Write datasets (e.g. :func:`anonymized_sources`) as ``folder/IM00000.dcm``, ... in list order, so a viewer
    can load them with an anonymized SEG/RTSTRUCT. Returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(datasets):
        if getattr(ds, "file_meta", None) is None or "TransferSyntaxUID" not in ds.file_meta:
            raise InputError(f"dataset {k} ({ds.get('SOPInstanceUID', '?')}) has no file meta / transfer syntax "
                             f"(expected datasets read from DICOM files)")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        paths.append(folder / f"IM{k:05d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


# --------------------------------------------------------------------------------------------------- SEG
def write_seg(labels: np.ndarray, sources: Sequence[Dataset], class_names: Sequence[str],
              out_path: str | os.PathLike, *, roles: Sequence[str] | None = None, anonymize: bool = False,
              uid_map: UIDMap | None = None) -> Path:
    """Write a binary DICOM Segmentation (highdicom) of ``labels`` over ``sources`` and return its path.

    One segment per class (``SegmentLabel`` = class name, coded category / type from :func:`segment_codes`,
    ``roles`` used where the name has no known code), algorithm "medseg" (this project's version, family
    Artificial Intelligence). The SEG references every source instance, shares their FrameOfReferenceUID and
    copies their patient / study identifiers. Classes absent from ``labels`` are still described as segments,
    with no frames (empty frames are omitted). ``anonymize``: build from :func:`anonymized_sources` with
    ``uid_map`` (a new random-salt map when None; ignored without ``anonymize``), empty the SEG's own dates
    (its Type 1 content date/time get a dummy 19000101 000000). Written atomically.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    out = _out_path(out_path, sources)
    labels = _check_labels(labels, sources, class_names)
    if roles is not None and len(roles) != len(class_names):
        raise ConfigError(f"{len(roles)} roles given for {len(class_names)} classes")
    if anonymize:
        uid_map = uid_map if uid_map is not None else UIDMap()
        srcs = _anonymized(sources, uid_map, pixels=False)  # highdicom needs the metadata only
    else:
        srcs = _prepared(sources, pixels=False)
    version = _version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medseg", family=codes.cid7162.ArtificialIntelligence, version=version, source="medseg")
    descriptions = []
    for k, name in enumerate(class_names, start=1):
        category, kind = segment_codes(name, roles[k - 1] if roles else None)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=k, segment_label=str(name)[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    seg = hd.seg.Segmentation(
        source_images=srcs, pixel_array=labels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=_SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medseg", manufacturer_model_name="medseg",
        software_versions=version, device_serial_number=_DEVICE_SERIAL, omit_empty_frames=True,
        content_label="MEDSEG", content_description="medseg automatic segmentation (research software)",
        series_description="medseg segmentation")
    if anonymize:
        _finish_anonymized(seg, uid_map)
        seg.ContentDate, seg.ContentTime = _DUMMY_DATE, _DUMMY_TIME  # Type 1 (PS3.15 action D)
        seg.SeriesDescription, seg.DeviceSerialNumber = "medseg segmentation", _DEVICE_SERIAL
    return _atomic_write(out, lambda tmp: seg.save_as(tmp, enforce_file_format=True))


# ----------------------------------------------------------------------------------------------- RTSTRUCT
def _fix_contour_geometry(rt_ds: Dataset, series: Sequence[Dataset]) -> None:
    """rt-utils (1.2.7) maps contour pixels (column x, row y) to patient coordinates with PixelSpacing's two
    values swapped and with one mean slice gap from the first slice (qurit/rt-utils#92), in float32. Recover
    each point's integer pixel (x, y) with rt-utils' own matrix, then recompute it from the referenced slice's
    ImagePositionPatient, ImageOrientationPatient and PixelSpacing (row spacing, column spacing) in float64."""
    from rt_utils import image_helper

    inverse = np.linalg.inv(image_helper.get_pixel_to_patient_transformation_matrix(series).astype(np.float64))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in series}
    for roi in rt_ds.ROIContourSequence:
        if "ContourSequence" in roi and len(roi.ContourSequence) == 0:
            del roi.ContourSequence  # an empty class: ROI without contours
        for contour in roi.get("ContourSequence", []):
            ds = by_uid[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            pts = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            pix = (np.c_[pts, np.ones(len(pts))] @ inverse.T)[:, :2]
            xy = np.rint(pix)
            if np.abs(pix - xy).max() > 0.05:  # pragma: no cover - rt-utils changed its geometry
                raise RuntimeError("rt-utils contour points are not on pixel centres; cannot correct their geometry")
            iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
            dy, dx = (float(v) for v in ds.PixelSpacing)  # row spacing, column spacing
            world = (np.asarray(ds.ImagePositionPatient, dtype=np.float64)
                     + xy[:, :1] * dx * iop[:3] + xy[:, 1:2] * dy * iop[3:])
            contour.ContourData = [round(float(v), 4) for v in world.ravel()]
            contour.NumberOfContourPoints = len(world)


@contextlib.contextmanager
def _quiet_rt_utils() -> Iterator[None]:
    """rt-utils prints to stdout and sets FileDataset.is_little_endian / is_implicit_VR, which pydicom 3 logs and
    warns about as deprecated: keep both out of the user's console."""
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"pydicom\..*|rt_utils\..*")
            warnings.filterwarnings("ignore", message=r".*(is_little_endian|is_implicit_VR).*")
            yield
    finally:
        pydicom_log.setLevel(level)


def write_rtstruct(labels: np.ndarray, sources: Sequence[Dataset], class_names: Sequence[str],
                   out_path: str | os.PathLike, *, anonymize: bool = False, uid_map: UIDMap | None = None) -> Path:
    """Write an RT Structure Set (rt-utils) with one ROI per class (``ROIName`` = class name, closed planar
    contours through the centres of each slice's boundary voxels, holes as separate contours) over ``sources``
    (which need their pixel data: rt-utils loads the series from a temporary folder). Classes absent from
    ``labels`` become ROIs without contours. Contour coordinates are recomputed exactly from each slice's
    geometry (see :func:`_fix_contour_geometry`). ``anonymize`` / ``uid_map`` as in :func:`write_seg`.
    Raises ConfigError when rt-utils is not installed. Written atomically."""
    try:
        from rt_utils import RTStructBuilder
    except ImportError as exc:
        raise ConfigError(_RT_UTILS_MISSING) from exc

    out = _out_path(out_path, sources)
    labels = _check_labels(labels, sources, class_names)
    missing = [k for k, ds in enumerate(sources) if _PIXEL_DATA not in ds]
    if missing:
        raise InputError(f"source image {missing[0]} has no pixel data (rt-utils loads the series with its pixels)")
    if anonymize:
        uid_map = uid_map if uid_map is not None else UIDMap()
        srcs = anonymized_sources(sources, uid_map)
    else:
        srcs = _prepared(sources, pixels=True)
    index = {str(ds.SOPInstanceUID): z for z, ds in enumerate(srcs)}
    with tempfile.TemporaryDirectory(prefix="medseg_rtstruct_") as tmp, _quiet_rt_utils():
        write_series(srcs, tmp)
        try:
            rt = RTStructBuilder.create_new(dicom_series_path=tmp)
        except Exception as exc:
            raise InputError(f"rt-utils cannot load the source series ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]})") from exc
        order = [index[str(ds.SOPInstanceUID)] for ds in rt.series_data]  # rt-utils slice i -> our z
        if sorted(order) != list(range(len(srcs))):  # pragma: no cover
            raise RuntimeError("rt-utils loaded a different set of slices than the sources")
        ordered = labels[order]
        for k, name in enumerate(class_names, start=1):
            # rt-utils masks are (rows, columns, slices) in its own slice order
            rt.add_roi(mask=np.ascontiguousarray((ordered == k).transpose(1, 2, 0)), name=str(name)[:64],
                       roi_generation_algorithm="AUTOMATIC")
    ds = rt.ds
    _fix_contour_geometry(ds, rt.series_data)
    version = _version()
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "medseg", "medseg", version
    if "InstitutionName" in ds:
        del ds.InstitutionName  # rt-utils writes its own lab's name there
    ds.StructureSetLabel, ds.StructureSetName = "medseg", "medseg automatic segmentation"
    ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "medseg RTSTRUCT", _RTSTRUCT_SERIES_NUMBER, 1
    if anonymize:
        _finish_anonymized(ds, uid_map)
        ds.SeriesDescription = "medseg RTSTRUCT"
    return _atomic_write(out, lambda tmp: ds.save_as(tmp, enforce_file_format=True))

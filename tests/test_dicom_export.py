"""Tests for dicom_export.py: DICOM SEG / RTSTRUCT outputs over generated CT series, anonymization, and the
3D-IRCADb liver mask as a SEG (optional real data)."""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

import dicom_export as dx
import medio
from errors import ConfigError, InputError
from scan_fixtures import ct_series

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IRCAD = DATA / "ircadb01_patient1" / "3Dircadb1.1"
OBLIQUE = (0.866025, 0.5, 0.0, -0.5, 0.866025, 0.0)           # in-plane rotation by 30 degrees
DOUBLE_OBLIQUE = (1.0, 0.0, 0.0, 0.0, 0.8, -0.6)              # tilted gantry-like plane
CORONAL = (1, 0, 0, 0, 0, -1)
IDENTITY = {"PatientName": "Doe^Jane", "PatientID": "PID-4711", "PatientBirthDate": "19600203",
            "PatientSex": "F", "AccessionNumber": "ACC-0815", "InstitutionName": "St Elsewhere Hospital",
            "ReferringPhysicianName": "House^Gregory", "StudyID": "STUDY-42", "OtherPatientIDs": "OTHER-99",
            "StudyDate": "20210304", "StudyTime": "101500", "SeriesDate": "20210304", "AcquisitionDate": "20210304",
            "StudyDescription": "CT ABDOMEN Jane", "PatientAge": "061Y", "StationName": "CT-ROOM-3",
            "FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.777", "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.778"}
IDENTIFYING_TEXT = ("Doe^Jane", "PID-4711", "19600203", "ACC-0815", "St Elsewhere", "House^Gregory", "STUDY-42",
                    "OTHER-99", "20210304", "101500", "CT ABDOMEN", "061Y", "CT-ROOM-3")


def blob_labels(shape: tuple[int, int, int]) -> np.ndarray:
    """Two compact classes per slice (a disc and a rectangle) that move from slice to slice; no holes."""
    z, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    labels = np.zeros(shape, np.uint8)
    for k in range(z):
        labels[k][(yy - h / 2 + k % 2) ** 2 + (xx - w / 3 - k) ** 2 <= (min(h, w) / 4) ** 2] = 1
        labels[k, 2 + k % 3: h // 2, w - 5: w - 2] = 2
    labels[0] = 0  # one empty slice
    return labels


def pixel_labels(sources) -> np.ndarray:
    """Labels that are a function of each slice's own stored pixels: lets a test check which source instance a
    SEG frame belongs to without trusting any ordering."""
    return np.stack([_pixel_rule(ds.pixel_array) for ds in sources])


def _pixel_rule(pixels: np.ndarray) -> np.ndarray:
    return ((pixels > 900).astype(np.uint8) + (pixels > 1500)).astype(np.uint8)


def series(tmp_path: Path, name: str = "series", **kw) -> tuple[Path, list]:
    kw.setdefault("extra", {"FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.1"})
    folder = tmp_path / name
    ct_series(folder, **kw)
    return folder, dx.source_datasets(folder)


def seg_frames(path: Path) -> list[tuple[str, int, np.ndarray, list[float]]]:
    """(referenced SOPInstanceUID, segment number, frame pixels, ImagePositionPatient) per frame, read with plain
    pydicom (independent of highdicom's reader)."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    out = []
    for frame, item in zip(pixels, ds.PerFrameFunctionalGroupsSequence, strict=True):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        out.append((str(uid), int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber), frame,
                    [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]))
    return out


def all_uids(ds) -> set[str]:
    """Every UI value anywhere in a dataset (recursively, file meta included)."""
    found: set[str] = set()

    def walk(item):
        for elem in item:
            if elem.VR == "SQ":
                for sub in elem.value:
                    walk(sub)
            elif elem.VR == "UI" and not elem.is_empty:
                found.update(str(v) for v in (elem.value if elem.VM > 1 else [elem.value]))
    walk(ds)
    if getattr(ds, "file_meta", None) is not None:
        walk(ds.file_meta)
    return found


def instance_uids(sources) -> set[str]:
    """The identifying UIDs of a series (not class / transfer-syntax UIDs)."""
    keys = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")
    return {str(ds.get(k)) for ds in sources for k in keys if ds.get(k)}


def boundary_band(mask2d: np.ndarray) -> np.ndarray:
    """Voxels within one voxel of the mask's in-plane boundary (dilation minus erosion)."""
    m = mask2d.astype(bool)
    return ndimage.binary_dilation(m) & ~ndimage.binary_erosion(m)


def rasterise_contours(rt_ds, roi_number: int, sources) -> np.ndarray:
    """Our own rasterisation of one ROI, from each contour's referenced slice geometry (correct PixelSpacing
    order); also checks every contour point lies on a pixel centre of its own slice's plane."""
    import cv2

    index = {str(ds.SOPInstanceUID): z for z, ds in enumerate(sources)}
    out = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns)), np.uint8)
    roi = next(r for r in rt_ds.ROIContourSequence if int(r.ReferencedROINumber) == roi_number)
    polygons: dict[int, list] = {}
    for contour in roi.get("ContourSequence", []):
        z = index[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
        ds = sources[z]
        iop = np.asarray(ds.ImageOrientationPatient, float)
        dy, dx_ = (float(v) for v in ds.PixelSpacing)
        rel = np.asarray(contour.ContourData, float).reshape(-1, 3) - np.asarray(ds.ImagePositionPatient, float)
        x, y = rel @ iop[:3] / dx_, rel @ iop[3:] / dy
        assert np.abs(rel @ np.cross(iop[:3], iop[3:])).max() < 1e-3          # in the slice's plane
        assert np.abs(x - np.rint(x)).max() < 1e-3 and np.abs(y - np.rint(y)).max() < 1e-3  # on pixel centres
        assert int(contour.NumberOfContourPoints) == len(x)
        polygons.setdefault(z, []).append(np.stack([np.rint(x), np.rint(y)], 1).astype(np.int32))
    for z, polys in polygons.items():
        cv2.fillPoly(out[z], polys, 1)
        cv2.polylines(out[z], polys, True, 1)
    return out


# ------------------------------------------------------------------------------------------------ sources
@pytest.mark.parametrize("iop", [(1, 0, 0, 0, 1, 0), OBLIQUE])
def test_source_datasets_in_read_image_order_folder_and_zip(tmp_path, iop):
    folder, sources = series(tmp_path, iop=iop, n=5, gap=-2.5)  # positions descending along the normal
    arr, _ = medio.read_image(folder)
    stacked = np.stack([ds.pixel_array.astype(np.float32) - 1024 for ds in sources])
    np.testing.assert_array_equal(stacked, arr)
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"PATIENT_DICOM/{f.name}")
    assert [ds.SOPInstanceUID for ds in dx.source_datasets(archive)] == [ds.SOPInstanceUID for ds in sources]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no dicom")
    with pytest.raises(InputError, match="no DICOM"):
        dx.source_datasets(tmp_path / "notes")
    one = dx.source_datasets(folder / "image_0")  # a single file: one dataset
    assert len(one) == 1 and "PixelData" in one[0]


# ---------------------------------------------------------------------------------------------------- SEG
def test_seg_round_trip_references_identifiers_and_codes(tmp_path):
    _, sources = series(tmp_path, n=6, shape=(12, 15), patient=("Doe^Jane", "PID-4711", "20210304"),
                        extra={"FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.5", "AccessionNumber": "ACC-0815"})
    labels = pixel_labels(sources)
    assert set(np.unique(labels)) == {0, 1, 2}
    out = dx.write_seg(labels, sources, ["liver", "liver tumour"], tmp_path / "out" / "seg.dcm")
    assert out == tmp_path / "out" / "seg.dcm" and [p.name for p in out.parent.iterdir()] == ["seg.dcm"]

    np.testing.assert_array_equal(dx.read_seg_labels(out, sources), labels)      # highdicom, voxel for voxel
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    rebuilt = {uid: np.zeros((12, 15), np.uint8) for uid in by_uid}
    for uid, segment, frame, ipp in seg_frames(out):                             # plain pydicom, per frame
        rebuilt[uid][frame.astype(bool)] = segment
        np.testing.assert_allclose(ipp, [float(v) for v in by_uid[uid].ImagePositionPatient], atol=1e-4)
    for uid, ds in by_uid.items():
        np.testing.assert_array_equal(rebuilt[uid], _pixel_rule(ds.pixel_array))

    seg, src = pydicom.dcmread(out), sources[0]
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == src.SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in ref_series.ReferencedInstanceSequence} == set(by_uid)
    for key in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "AccessionNumber"):
        assert str(seg[key].value) == str(src[key].value), key
    assert seg.StudyID == "" and seg.PatientBirthDate == ""                      # absent in the source: empty
    liver, tumour = seg.SegmentSequence
    assert (liver.SegmentLabel, liver.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("liver", "10200004")
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    assert tumour.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Neoplasm"
    assert tumour.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    algorithm = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "medseg" and algorithm.AlgorithmVersion == dx._version() != "unknown"
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"


@pytest.mark.parametrize("iop,gap", [(OBLIQUE, 2.5), (DOUBLE_OBLIQUE, -3.0), (CORONAL, -2.5)])
def test_seg_oblique_and_reversed_series_round_trip(tmp_path, iop, gap):
    _, sources = series(tmp_path, n=5, shape=(9, 11), iop=iop, gap=gap, spacing=(0.8, 0.5))
    labels = pixel_labels(sources)
    out = dx.write_seg(labels, sources, ["kidney", "lesion"], tmp_path / "seg.dcm")
    np.testing.assert_array_equal(dx.read_seg_labels(out, sources), labels)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    for uid, segment, frame, ipp in seg_frames(out):
        np.testing.assert_array_equal(frame.astype(bool), _pixel_rule(by_uid[uid].pixel_array) == segment)
        np.testing.assert_allclose(ipp, [float(v) for v in by_uid[uid].ImagePositionPatient], atol=1e-4)
    seg = pydicom.dcmread(out)
    np.testing.assert_allclose(
        [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient],
        iop, atol=1e-5)


def test_seg_empty_class_and_empty_mask_and_codes_fallback(tmp_path):
    _, sources = series(tmp_path, n=3, shape=(6, 7))
    labels = np.zeros((3, 6, 7), np.uint8)
    labels[1, 2:4, 2:5] = 1
    out = dx.write_seg(labels, sources, ["1", "2"], tmp_path / "seg.dcm", roles=["organ", "lesion"])
    seg = pydicom.dcmread(out)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["1", "2"]           # class 2 is empty but described
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Organ"
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lesion"
    assert {s for _, s, _, _ in seg_frames(out)} == {1} and int(seg.NumberOfFrames) == 1  # empty frames omitted
    np.testing.assert_array_equal(dx.read_seg_labels(out, sources), labels)
    empty = dx.write_seg(np.zeros_like(labels), sources, ["polyp"], tmp_path / "empty.dcm")
    assert dx.read_seg_labels(empty, sources).sum() == 0
    assert dx.segment_codes("something")[1].meaning == "Tissue"
    assert dx.segment_codes("livertumor01")[1].meaning == "Neoplasm"
    assert dx.segment_codes("portalvein")[1].meaning == "Portal vein"


def test_seg_without_frame_of_reference_gets_one_derived_from_the_series(tmp_path, caplog):
    _, sources = series(tmp_path, n=2, extra={})
    assert "FrameOfReferenceUID" not in sources[0]
    a = dx.write_seg(np.ones((2, 6, 7), np.uint8), sources, ["liver"], tmp_path / "a.dcm")
    b = dx.write_rtstruct(np.ones((2, 6, 7), np.uint8), sources, ["liver"], tmp_path / "b.dcm")
    for_a = pydicom.dcmread(a).FrameOfReferenceUID
    assert for_a == pydicom.dcmread(b).ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    assert "no FrameOfReferenceUID" in caplog.text
    assert "FrameOfReferenceUID" not in sources[0]  # the caller's datasets are not modified


def test_labels_and_class_names_are_checked(tmp_path):
    _, sources = series(tmp_path, n=2)
    with pytest.raises(InputError, match=r"shape \(2, 7, 6\).*\(2, 6, 7\)"):
        dx.write_seg(np.zeros((2, 7, 6), np.uint8), sources, ["liver"], tmp_path / "x.dcm")
    with pytest.raises(InputError, match="class 2 but 1 class name"):
        dx.write_seg(np.full((2, 6, 7), 2, np.uint8), sources, ["liver"], tmp_path / "x.dcm")
    with pytest.raises(ConfigError, match="not unique"):
        dx.write_rtstruct(np.zeros((2, 6, 7), np.uint8), sources, ["a", "a"], tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def test_require_dicom_for_a_nifti_input(tmp_path):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 3), np.float32), np.eye(4)), str(path))
    _, meta = medio.read_image(path)
    with pytest.raises(InputError) as info:
        dx.require_dicom(meta, path)
    assert str(info.value) == (f"{path}: --output-type dicom-seg needs a DICOM series input (got nifti); "
                               f"a SEG must reference its source images")
    folder, _ = series(tmp_path, n=2)
    dx.require_dicom(medio.read_image(folder)[1], folder)  # a DICOM series passes


# ----------------------------------------------------------------------------------------------- RTSTRUCT
def test_rtstruct_round_trip_with_rt_utils(tmp_path):
    from rt_utils import RTStructBuilder

    folder, sources = series(tmp_path, n=5, shape=(24, 24), spacing=(0.7, 0.7), gap=-2.0)
    labels = blob_labels((5, 24, 24))
    out = dx.write_rtstruct(labels, sources, ["liver", "tumour"], tmp_path / "rt.dcm")
    ds = pydicom.dcmread(out)
    assert ds.Modality == "RTSTRUCT" and [r.ROIName for r in ds.StructureSetROISequence] == ["liver", "tumour"]
    assert ds.PatientName == "" and ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    refs = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert {str(c.ReferencedSOPInstanceUID) for c in refs.ContourImageSequence} == \
        {str(s.SOPInstanceUID) for s in sources}
    rt = RTStructBuilder.create_from(dicom_series_path=str(folder), rt_struct_path=str(out))
    assert rt.get_roi_names() == ["liver", "tumour"]
    z_of = [next(z for z, s in enumerate(sources) if s.SOPInstanceUID == d.SOPInstanceUID) for d in rt.series_data]
    for k, name in enumerate(["liver", "tumour"], start=1):
        mask = rt.get_roi_mask_by_name(name)                      # (rows, columns, slices) in rt-utils order
        back = np.zeros(labels.shape, bool)
        back[z_of] = mask.transpose(2, 0, 1)
        truth = labels == k
        diff = back ^ truth
        assert not any((diff[z] & ~boundary_band(truth[z])).any() for z in range(5)), name
        assert diff.sum() <= 0.05 * truth.sum(), (name, diff.sum(), truth.sum())


@pytest.mark.parametrize("iop,gap", [(OBLIQUE, 2.5), (DOUBLE_OBLIQUE, -3.0)])
def test_rtstruct_geometry_on_anisotropic_oblique_non_square_series(tmp_path, iop, gap):
    # rt-utils alone swaps PixelSpacing's two values (qurit/rt-utils#92); the writer recomputes the points
    _, sources = series(tmp_path, n=4, shape=(20, 26), spacing=(0.9, 0.5), iop=iop, gap=gap)
    labels = blob_labels((4, 20, 26))
    ds = pydicom.dcmread(dx.write_rtstruct(labels, sources, ["organ", "lesion"], tmp_path / "rt.dcm"))
    for k in (1, 2):
        back = rasterise_contours(ds, k, sources).astype(bool)
        truth = labels == k
        assert not any(((back[z] ^ truth[z]) & ~boundary_band(truth[z])).any() for z in range(4)), k
        assert (back ^ truth).sum() <= 0.05 * truth.sum()


def test_rtstruct_needs_rt_utils(tmp_path, monkeypatch):
    _, sources = series(tmp_path, n=2)
    monkeypatch.setitem(sys.modules, "rt_utils", None)
    with pytest.raises(ConfigError) as info:
        dx.write_rtstruct(np.zeros((2, 6, 7), np.uint8), sources, ["liver"], tmp_path / "rt.dcm")
    assert str(info.value) == "writing RTSTRUCT needs rt-utils: pip install rt-utils opencv-python-headless"


# ---------------------------------------------------------------------------------------------- anonymize
def test_anonymize_removes_identifiers_and_remaps_uids_consistently(tmp_path):
    _, sources = series(tmp_path, n=4, shape=(16, 16), extra=IDENTITY)
    originals = instance_uids(sources)
    labels = blob_labels((4, 16, 16))
    salt = "project-secret"
    seg = dx.write_seg(labels, sources, ["liver", "tumour"], tmp_path / "seg.dcm", anonymize=True,
                       uid_map=dx.UIDMap(salt))
    uid_map = dx.UIDMap(salt)
    rt = dx.write_rtstruct(labels, sources, ["liver", "tumour"], tmp_path / "rt.dcm", anonymize=True, uid_map=uid_map)
    anon = dx.anonymized_sources(sources, dx.UIDMap(salt))

    # the anonymized copies: same pixels, new UIDs from the map, no identifiers; the originals untouched
    assert [ds.SOPInstanceUID for ds in anon] == [uid_map(ds.SOPInstanceUID) for ds in sources]
    assert not instance_uids(anon) & originals and sources[0].PatientName == "Doe^Jane"
    np.testing.assert_array_equal(anon[2].pixel_array, sources[2].pixel_array)

    for path in (seg, rt):
        ds = pydicom.dcmread(path)
        raw = path.read_bytes()
        assert not all_uids(ds) & originals, path.name                  # no original UID anywhere
        for text in IDENTIFYING_TEXT:
            assert text.encode() not in raw, (path.name, text)
        for key in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "ReferringPhysicianName",
                    "StudyID", "StudyDate", "StudyTime"):
            assert key not in ds or ds[key].is_empty, (path.name, key)
        for key in ("InstitutionName", "OtherPatientIDs", "PatientAge", "StationName", "StudyDescription"):
            assert key not in ds, (path.name, key)
        assert ds.StudyInstanceUID == anon[0].StudyInstanceUID == uid_map(sources[0].StudyInstanceUID)

    s = pydicom.dcmread(seg)
    assert s.FrameOfReferenceUID == anon[0].FrameOfReferenceUID
    assert s.ReferencedSeriesSequence[0].SeriesInstanceUID == anon[0].SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in s.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == \
        {str(ds.SOPInstanceUID) for ds in anon}
    assert {uid for uid, _, _, _ in seg_frames(seg)} <= {str(ds.SOPInstanceUID) for ds in anon}
    np.testing.assert_array_equal(dx.read_seg_labels(seg, anon), labels)
    r = pydicom.dcmread(rt)
    refs = r.ReferencedFrameOfReferenceSequence[0]
    assert refs.FrameOfReferenceUID == anon[0].FrameOfReferenceUID
    assert {str(c.ReferencedSOPInstanceUID) for c in
            refs.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence} == \
        {str(ds.SOPInstanceUID) for ds in anon}

    # the anonymized series written out reads back (same order) and carries the SEG
    folder = tmp_path / "anon_series"
    dx.write_series(anon, folder)
    reread = dx.source_datasets(folder)
    assert [ds.SOPInstanceUID for ds in reread] == [ds.SOPInstanceUID for ds in anon]
    np.testing.assert_array_equal(dx.read_seg_labels(seg, reread), labels)
    assert not any(text.encode() in p.read_bytes() for p in folder.iterdir() for text in IDENTIFYING_TEXT)

    # deterministic for one salt, different for another
    again = pydicom.dcmread(dx.write_seg(labels, sources, ["liver", "tumour"], tmp_path / "again.dcm",
                                         anonymize=True, uid_map=dx.UIDMap(salt)))
    other = pydicom.dcmread(dx.write_seg(labels, sources, ["liver", "tumour"], tmp_path / "other.dcm",
                                         anonymize=True, uid_map=dx.UIDMap("another salt")))
    def refs_of(d) -> tuple[str, str, str]:
        return d.StudyInstanceUID, d.FrameOfReferenceUID, d.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert refs_of(again) == refs_of(s) and not set(refs_of(other)) & set(refs_of(s))


# ---------------------------------------------------------------------------------------- real data (optional)
@pytest.mark.realdata
@pytest.mark.skipif(not IRCAD.exists(), reason=f"real data not found at {IRCAD}")
def test_real_ircadb_liver_as_seg_and_rtstruct(tmp_path):
    """The real liver mask over 16 real CT slices through the liver, as a SEG and an RTSTRUCT (the whole 129-slice
    series is read in test_medio and predicted in the benchmark's whole-CT row)."""
    import shutil

    from rt_utils import RTStructBuilder

    sources = dx.source_datasets(IRCAD / "PATIENT_DICOM")
    _, meta = medio.read_image(IRCAD / "PATIENT_DICOM")
    liver, _ = medio.read_mask(IRCAD / "MASKS_DICOM.zip", series="liver", reference=meta)
    z0 = int(np.argmax(liver.sum(axis=(1, 2)))) - 8
    sources, liver = sources[z0:z0 + 16], liver[z0:z0 + 16]
    slab = tmp_path / "slab"
    slab.mkdir()
    for ds in sources:
        shutil.copy(ds.filename, slab / Path(ds.filename).name)
    seg = dx.write_seg(liver, sources, ["liver"], tmp_path / "liver_seg.dcm")
    back = dx.read_seg_labels(seg, sources)
    np.testing.assert_array_equal(back, liver)
    assert liver.all(axis=0).any()  # the slab is inside the liver on every slice
    ds = pydicom.dcmread(seg, stop_before_pixels=True)
    assert ds.PatientName == "liver_01^patient" and ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert len(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 16

    rt_path = dx.write_rtstruct(liver, sources, ["liver"], tmp_path / "liver_rt.dcm")
    rt = RTStructBuilder.create_from(dicom_series_path=str(slab), rt_struct_path=str(rt_path))
    mask = rt.get_roi_mask_by_name("liver")
    z_of = {str(s.SOPInstanceUID): z for z, s in enumerate(sources)}
    vol = np.zeros(liver.shape, bool)
    for i, d in enumerate(rt.series_data):
        vol[z_of[str(d.SOPInstanceUID)]] = mask[:, :, i]
    assert (vol ^ liver.astype(bool)).sum() <= 0.01 * liver.sum()

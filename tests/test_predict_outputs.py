"""predict.py's outputs for other software: DICOM SEG / RTSTRUCT over a generated series (read back voxel for
voxel), --anonymize (no source identifier in any output), --series on a zip of two series, the per-input error
of a DICOM output asked of a NIfTI, and cohort.csv on a mixed batch (rows, order, units, status, exit code).
Optional real data: the 3D-IRCADb CT as a SEG."""
from __future__ import annotations

import csv
import hashlib
import json
import re
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from scan_fixtures import ct_series

import dicom_export as dx
import medio
import predict
from checkpoint import save_checkpoint
from model import UNet
from preprocess import Preprocessing, to_planes

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IRCAD = DATA / "ircadb01_patient1" / "3Dircadb1.1"
CLASSES = ["liver", "tumour"]
STUDY_UID, FOR_UID = "1.2.826.0.1.3680043.8.498.4711", "1.2.826.0.1.3680043.8.498.4712"
IDENTITY = {"PatientBirthDate": "19600203", "PatientSex": "F", "AccessionNumber": "ACC-0815",
            "InstitutionName": "St Elsewhere Hospital", "ReferringPhysicianName": "House^Gregory",
            "StudyID": "STUDY-42", "OtherPatientIDs": "OTHER-99", "StudyTime": "101500", "SeriesDate": "20210304",
            "StudyDescription": "CT ABDOMEN Jane", "PatientAge": "061Y", "StationName": "CT-ROOM-3",
            "StudyInstanceUID": STUDY_UID, "FrameOfReferenceUID": FOR_UID}
PATIENT = ("Doe^Jane", "PID-4711", "20210304")
IDENTIFYING = ("Doe^Jane", "Doe Jane", "PID-4711", "19600203", "ACC-0815", "St Elsewhere", "House^Gregory",
               "House Gregory", "STUDY-42",
               "OTHER-99", "20210304", "101500", "CT ABDOMEN", "061Y", "CT-ROOM-3", STUDY_UID, FOR_UID)
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny untrained 2-class CT model (window 40/400) whose logits are centred on CT-like planes, so both
    classes and the background each take a good share of a generated series."""
    prep = Preprocessing(normalization="window", window=[40.0, 400.0], patch_size=16, class_names=CLASSES,
                         class_values=[[1], [2]])
    torch.manual_seed(0)
    model = UNet(1, 3, 4).eval()
    hu = np.random.default_rng(1).integers(0, 2000, (4, 24, 20)).astype(np.float32) - 1024
    with torch.no_grad():
        model.outc.conv.bias -= model(torch.from_numpy(to_planes(hu, 3, prep))).transpose(0, 1).flatten(1).mean(1)
    path = tmp_path_factory.mktemp("ct_model") / "ct.pth"
    return save_checkpoint(path, model, {"epochs": 1}, 1, {"dice": 0.5}, {"preprocessing": prep.to_dict()})


def series(root: Path, name: str = "CT_SERIES", **kw) -> Path:
    kw = {"n": 5, "shape": (24, 20), "patient": PATIENT, "extra": IDENTITY, **kw}
    ct_series(root / name, **kw)
    return root / name


def run(ckpt: Path, inputs: list, out: Path, *more: str) -> int:
    return predict.main(["--checkpoint", str(ckpt), "--input", *map(str, inputs), "--output-dir", str(out),
                         "--no-progress", "--lang", "en", "--threads", "1", *more])


def sha(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(sha(p).encode() for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cohort(out: Path) -> tuple[list[str], list[dict]]:
    with open(out / "cohort.csv", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# ---------------------------------------------------------------------------------------- SEG / RTSTRUCT
def test_seg_and_rtstruct_over_the_source_series_equal_the_mask(ckpt, tmp_path):
    pytest.importorskip("rt_utils")
    src = series(tmp_path / "in")
    before = sha(src)
    out = tmp_path / "out"
    assert run(ckpt, [src], out, "--output-type", "dicom-seg,rtstruct") == 0
    case = out / "CT_SERIES"
    assert {p.name for p in case.iterdir()} >= {"mask.nii.gz", "seg.dcm", "rtstruct.dcm", "report.json"}
    mask, _ = medio.read_mask(case / "mask.nii.gz")
    assert all((mask == k).sum() > 20 for k in (1, 2))  # both classes present: a real comparison
    sources = dx.source_datasets(src)
    back = dx.read_seg_labels(case / "seg.dcm", sources)
    np.testing.assert_array_equal(back, mask)
    assert int((back > 0).sum()) == int((mask > 0).sum())
    seg = pydicom.dcmread(case / "seg.dcm", stop_before_pixels=True)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == CLASSES and seg.PatientID == "PID-4711"
    rt = pydicom.dcmread(case / "rtstruct.dcm")
    assert [r.ROIName for r in rt.StructureSetROISequence] == CLASSES
    assert rt.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == FOR_UID
    rep = json.loads((case / "report.json").read_text(encoding="utf-8"))
    assert rep["outputs"]["dicom_seg"] == "seg.dcm" and rep["outputs"]["rtstruct"] == "rtstruct.dcm"
    assert sha(src) == before and sorted(p.name for p in (tmp_path / "in").iterdir()) == ["CT_SERIES"]


def test_anonymize_leaves_no_source_identifier_and_is_reproducible_with_a_salt(ckpt, tmp_path):
    pytest.importorskip("rt_utils")
    src = series(tmp_path / "in")
    source_uids = {str(ds.SOPInstanceUID) for ds in dx.source_datasets(src)} | {
        str(dx.source_datasets(src)[0].SeriesInstanceUID)}
    outs = tmp_path / "a", tmp_path / "b"
    for out in outs:
        assert run(ckpt, [src], out, "--output-type", "dicom-seg,rtstruct", "--anonymize",
                   "--anonymize-salt", "pepper") == 0
    case = outs[0] / "CT_SERIES"
    for name in ("seg.dcm", "rtstruct.dcm", "report.json", "report.html"):
        data = re.sub(rb"base64,[A-Za-z0-9+/=]+", b"", (case / name).read_bytes())  # images: random letters
        leaked = [t for t in (*IDENTIFYING, *source_uids) if t.encode() in data]
        assert not leaked, (name, leaked)
    rep = json.loads((case / "report.json").read_text(encoding="utf-8"))
    assert "patient" not in rep["input"] and rep["input"]["anonymized"] is True
    # the SEG references the anonymized series written beside it, voxel for voxel the mask
    anon = dx.source_datasets(case / "series")
    mask, _ = medio.read_mask(case / "mask.nii.gz")
    np.testing.assert_array_equal(dx.read_seg_labels(case / "seg.dcm", anon), mask)
    for f in (case / "series").iterdir():
        data = f.read_bytes()
        assert not [t for t in (*IDENTIFYING, *source_uids) if t.encode() in data], f.name
    a, b = (pydicom.dcmread(o / "CT_SERIES" / "seg.dcm", stop_before_pixels=True) for o in outs)
    assert (a.StudyInstanceUID, a.FrameOfReferenceUID) == (b.StudyInstanceUID, b.FrameOfReferenceUID)


def test_series_picks_one_of_two_series_in_a_zip(ckpt, tmp_path, capsys):
    root = tmp_path / "exam"
    series(root, "ARTERIAL", n=4, description="ARTERIAL", seed=1)
    series(root, "VENOUS", n=6, description="VENOUS", seed=2)
    (tmp_path / "in").mkdir()
    zpath = tmp_path / "in" / "exam.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(root.rglob("*")):
            zf.write(f, f.relative_to(root).as_posix())
    out = tmp_path / "out"
    assert run(ckpt, [zpath], out / "ambiguous") == 1  # medio refuses to guess: the message names --series
    assert "choose one with --series ARTERIAL or --series VENOUS" in capsys.readouterr().err
    assert run(ckpt, [zpath], out / "venous", "--series", "VENOUS") == 0
    assert medio.read_mask(out / "venous" / "exam" / "mask.nii.gz")[0].shape == (6, 24, 20)
    assert run(ckpt, [zpath], out / "arterial", "--series", "ARTERIAL", "--output-type", "dicom-seg") == 0
    mask, _ = medio.read_mask(out / "arterial" / "exam" / "mask.nii.gz")
    assert mask.shape == (4, 24, 20)
    back = dx.read_seg_labels(out / "arterial" / "exam" / "seg.dcm", dx.source_datasets(zpath, series="ARTERIAL"))
    np.testing.assert_array_equal(back, mask)


# ------------------------------------------------------------------------------------- per-input errors
def test_dicom_output_of_a_nifti_is_a_per_input_error_and_the_batch_goes_on(ckpt, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    nii = tmp_path / "in" / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 24, 3), np.float32), np.eye(4)), str(nii))
    src = series(tmp_path / "in")
    out = tmp_path / "out"
    assert run(ckpt, [nii, src], out, "--output-type", "dicom-seg") == 1
    err = capsys.readouterr().err
    assert "vol.nii.gz: --output-type dicom-seg needs a DICOM series input (got nifti)" in err
    assert "Traceback" not in err
    assert (out / "CT_SERIES" / "seg.dcm").is_file() and not (out / "vol").exists()
    _, rows = cohort(out)
    assert [r["case_id"] for r in rows] == ["vol", "CT_SERIES"]
    assert "needs a DICOM series input" in rows[0]["status"] and rows[1]["status"] == "ok"


def test_cohort_table_of_a_mixed_batch(ckpt, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    good = inp / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 26), dtype=np.uint8)).save(good)
    corrupt = inp / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    vol = inp / "scan.nii.gz"
    hu = np.random.default_rng(2).integers(-1000, 1000, (4, 22, 18)).astype(np.float32)
    nib.save(nib.Nifti1Image(hu.T.copy(), np.diag([0.7, 0.6, 2.5, 1.0])), str(vol))
    missing = inp / "gone.nii.gz"
    hashes = {p: sha(p) for p in (good, corrupt, vol)}
    outs = tmp_path / "en", tmp_path / "zh"
    assert run(ckpt, [good, corrupt, missing, vol], outs[0]) == 1
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(good), str(corrupt), str(missing), str(vol),
                         "--output-dir", str(outs[1]), "--no-progress", "--lang", "zh", "--threads", "1"]) == 1
    columns, rows = cohort(outs[0])
    assert columns == cohort(outs[1])[0]  # --lang never changes the column names
    assert columns[:4] == ["case_id", "source_path", "shape", "spacing_mm"] and columns[-1] == "status"
    assert {"liver_volume_ml", "tumour_volume_ml", "liver_pixels", "tumour_pixels", "lesion_count",
            "largest_lesion_diameter_mm", "mean_foreground_probability"} <= set(columns)
    assert [r["case_id"] for r in rows] == ["photo", "broken", "gone", "scan"]
    assert [r["source_path"] for r in rows] == [str(p) for p in (good, corrupt, missing, vol)]
    assert rows[0]["status"] == rows[3]["status"] == "ok"
    assert "broken.png" in rows[1]["status"] and "no such file" in rows[2]["status"]
    assert rows[0]["shape"] == "30x26" and rows[0]["spacing_mm"] == "" and rows[0]["liver_volume_ml"] == ""
    assert rows[3]["shape"] == "4x22x18" and rows[3]["spacing_mm"] == "2.5x0.6x0.7"
    labels = medio.read_mask(outs[0] / "scan" / "mask.nii.gz")[0]
    assert float(rows[3]["liver_volume_ml"]) == pytest.approx((labels == 1).sum() * 2.5 * 0.6 * 0.7 / 1000, rel=1e-5)
    assert int(rows[0]["liver_pixels"]) == int((np.asarray(Image.open(outs[0] / "photo" / "mask.png")) == 1).sum())
    assert 0.0 < float(rows[3]["mean_foreground_probability"]) <= 1.0 and rows[1]["lesion_count"] == ""
    assert all(sha(p) == h for p, h in hashes.items())
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- real data
@pytest.mark.realdata
@pytest.mark.skipif(not IRCAD.exists(), reason=f"real data not found at {IRCAD}")
def test_real_ircadb_series_as_seg(trained_model, tmp_path):
    """The session's tiny checkpoint on 16 slices of the 3D-IRCADb CT (the real files; the whole series is the
    benchmark's whole-CT row): the SEG holds as many voxels as the mask."""
    import shutil

    import torch

    src = tmp_path / "ct" / "PATIENT_DICOM"
    src.mkdir(parents=True)
    for i in range(60, 76):  # through the liver
        shutil.copy(IRCAD / "PATIENT_DICOM" / f"image_{i}", src / f"image_{i}")
    out = tmp_path / "out"
    ckpt = torch.load(trained_model.checkpoint, weights_only=True)
    ckpt["preprocessing"]["resize_long_side"] = ckpt["preprocessing"]["patch_size"]  # one window per slice: fast
    small = tmp_path / "one_window.pth"
    torch.save(ckpt, small)
    assert run(small, [src], out, "--output-type", "dicom-seg", "--overlap", "0", "--batch-size", "64") == 0
    mask, _ = medio.read_mask(out / "PATIENT_DICOM" / "mask.nii.gz")
    back = dx.read_seg_labels(out / "PATIENT_DICOM" / "seg.dcm", dx.source_datasets(src))
    assert mask.shape == (16, 512, 512) and 0 < int((mask > 0).sum()) == int((back > 0).sum())
    np.testing.assert_array_equal(back, mask)

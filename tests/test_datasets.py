"""Dataset layouts, the dataset check, per-case splits, patch sampling and a tiny real-data run."""
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import pytest
from PIL import Image

import datasets
import run
from errors import InputError
from preprocess import Preprocessing
from test_medio import ct_series, zip_folders

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _nifti(path: Path, data: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))


def make_msd(root: Path, n: int = 6, shape=(20, 22, 12), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        lab = np.zeros(shape, np.uint8)
        lab[5:10, 6:12, 2:10] = 1
        lab[10:14, 6:12, 2:10] = 2
        img = rng.normal(100, 10, shape).astype(np.float32) + lab * 50
        _nifti(root / "imagesTr" / f"case_{i:03d}_0000.nii.gz", img)
        _nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", lab)
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "Anterior", "2": "Posterior"}}))
    return root


def make_drive_like(root: Path) -> Path:
    for split, ids in (("training", (21, 22, 23)), ("test", (1, 2))):
        for sub in ("images", "1st_manual", "mask"):
            (root / "DRIVE" / split / sub).mkdir(parents=True)
        for i in ids:
            rgb = np.zeros((24, 26, 3), np.uint8)
            rgb[..., 1] = 100
            rgb[8:12] = 200
            Image.fromarray(rgb).save(root / "DRIVE" / split / "images" / f"{i:02d}_{split}.tif")
            vessel = np.zeros((24, 26), np.uint8)
            vessel[8:12] = 255
            Image.fromarray(vessel).save(root / "DRIVE" / split / "1st_manual" / f"{i:02d}_manual1.gif")
            fov = np.zeros((24, 26), np.uint8)
            fov[2:22, 2:24] = 255
            Image.fromarray(fov).save(root / "DRIVE" / split / "mask" / f"{i:02d}_{split}_mask.gif")
    return root


def test_msd_layout_names_split_and_load(tmp_path):
    spec = datasets.discover(make_msd(tmp_path / "Task01"))
    assert spec.layout == "msd" and len(spec.cases) == 6
    assert spec.label_names == {"anterior": 1, "posterior": 2}
    assert spec.cases[0].case_id == "case_000" and spec.cases[0].mask.name == "case_000.nii.gz"
    prep = Preprocessing(normalization="zscore", class_values=[[1], [2]], class_names=["anterior", "posterior"])
    cases = datasets.load_cases(spec.cases, prep)
    assert cases[0].planes.shape == (12, 1, 22, 20) and cases[0].labels.shape == (12, 22, 20)
    assert set(np.unique(cases[0].labels)) == {0, 1, 2}
    split = datasets.split_cases(spec.cases, 0.2, 0.2, seed=1)
    ids = split["train"] + split["val"] + split["test"]
    assert sorted(ids) == sorted(c.case_id for c in spec.cases) and len(set(ids)) == 6  # whole patients only
    assert split == datasets.split_cases(spec.cases, 0.2, 0.2, seed=1)


def test_paired_official_split_with_fov(tmp_path):
    spec = datasets.discover(make_drive_like(tmp_path / "drive"))
    assert spec.layout == "paired (official split)"
    by_id = {c.case_id: c for c in spec.cases}
    assert by_id["01"].split == "test" and by_id["21"].split == "train"
    assert by_id["21"].mask.name == "21_manual1.gif" and by_id["21"].roi.name == "21_training_mask.gif"
    split = datasets.split_cases(spec.cases, 0.2, 0.2, seed=0)  # fractions of all 5 cases
    assert split["test"] == ["01", "02"] and len(split["val"]) == 1 and len(split["train"]) == 2
    case = datasets.load_case(by_id["21"], Preprocessing(normalization="unit", in_channels=3))
    assert case.planes.shape == (1, 3, 24, 26) and case.roi.shape == (1, 24, 26) and case.roi.sum() == 20 * 22


def test_paired_by_stem_and_explicit_dirs(tmp_path):
    for d in ("imgs_here", "gt_here"):
        (tmp_path / d).mkdir()
    for name in ("a1", "b2"):
        Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "imgs_here" / f"{name}.png")
        Image.fromarray(np.full((20, 20), 255, np.uint8)).save(tmp_path / "gt_here" / f"{name}_mask.png")
    with pytest.raises(InputError, match="no known dataset layout"):
        datasets.discover(tmp_path)
    spec = datasets.discover(tmp_path, tmp_path / "imgs_here", tmp_path / "gt_here")
    assert [(c.case_id, c.mask.name) for c in spec.cases] == [("a1", "a1_mask.png"), ("b2", "b2_mask.png")]


def test_dicom_series_with_zipped_mask_series(tmp_path):
    case = tmp_path / "patient1"
    vol, _, _ = ct_series(case / "PATIENT_DICOM", n=4, shape=(8, 9), seed=1)
    liver = np.zeros((4, 8, 9), np.uint8)
    liver[1:3, 2:6, 2:7] = 255
    ct_series(tmp_path / "m" / "liver", n=4, shape=(8, 9), seed=1, values=liver, bits=8)
    ct_series(tmp_path / "m" / "tumor", n=4, shape=(8, 9), seed=1, values=np.zeros_like(liver), bits=8)
    zip_folders(case / "MASKS_DICOM.zip", {"MASKS_DICOM/liver": tmp_path / "m" / "liver",
                                          "MASKS_DICOM/tumor": tmp_path / "m" / "tumor"})
    spec = datasets.discover(tmp_path)
    assert spec.layout == "dicom+masks" and spec.structures == ["liver", "tumor"]
    with pytest.raises(InputError, match="available: liver, tumor"):
        datasets.resolve_dicom_labels(spec, None)
    with pytest.raises(InputError, match="unknown structure"):
        datasets.resolve_dicom_labels(spec, "spleen")
    spec.cases[0].mask_series = datasets.resolve_dicom_labels(spec, "liver")
    loaded = datasets.load_case(spec.cases[0], Preprocessing(normalization="window", window=[40, 400]))
    assert loaded.labels.sum() == 2 * 4 * 5 and loaded.planes.shape == (4, 1, 8, 9)


def test_dataset_check_lists_every_problem_before_failing(tmp_path):
    root = make_msd(tmp_path / "T", n=4)
    (root / "imagesTr" / "case_001_0000.nii.gz").write_bytes(b"garbage")
    _nifti(root / "labelsTr" / "case_002.nii.gz", np.zeros((5, 5, 5), np.uint8))  # wrong shape
    (root / "labelsTr" / "case_003.nii.gz").unlink()  # missing mask
    spec = datasets.discover(root)
    with pytest.raises(InputError) as e:
        datasets.load_cases(spec.cases, Preprocessing(normalization="zscore"))
    msg = str(e.value)
    assert "3 of 4 cases" in msg
    assert "case_001_0000.nii.gz" in msg and "case_002" in msg and "case_003_0000.nii.gz: no matching mask" in msg


def test_patch_dataset_foreground_oversampling_and_determinism():
    planes = [np.zeros((1, 40, 50), np.float32) for _ in range(3)]
    labels = [np.zeros((40, 50), np.uint8) for _ in range(3)]
    labels[1][30:33, 40:43] = 1
    small = [np.zeros((1, 10, 12), np.float32)], [np.ones((10, 12), np.uint8)]
    ds = datasets.PatchDataset(planes + small[0], labels + small[1], patch=16, length=40, fg_prob=1.0, seed=0)
    x, y = ds.__getitems__(list(range(40)))
    assert x.shape == (40, 1, 16, 16) and y.shape == (40, 16, 16)
    assert all(y[i].any() for i in range(40)), "fg_prob=1: every patch holds foreground"
    x2, y2 = ds.__getitems__(list(range(40)))
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    ds.set_epoch(1)
    assert not np.array_equal(ds.__getitems__(list(range(40)))[1], y)


def test_run_on_a_tiny_msd_dataset_writes_per_case_metrics(tmp_path):
    root = make_msd(tmp_path / "T", n=6)
    out = tmp_path / "out"
    code = run.main(["--data", str(root), "--labels", "anterior,posterior", "--epochs", "1", "--image-size", "16",
                     "--base-channels", "4", "--batch-size", "8", "--samples-per-epoch", "32", "--device", "cpu",
                     "--no-progress", "--tta", "--output-dir", str(out), "--checkpoint", str(out / "best_unet.pth")])
    assert code == 0
    for name in ("metrics_per_case.csv", "metrics_summary.json", "summary.json", "history.json", "split.json",
                 "training_history.png", "segmentation_results.png", "best_unet.pth"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "metrics_per_case.csv", encoding="utf-8")))
    split = json.loads((out / "split.json").read_text())
    assert {r["case"] for r in rows} == set(split["test"]) and {r["class"] for r in rows} == {"anterior", "posterior"}
    assert {"dice", "iou", "sensitivity", "precision", "hd95", "true_lesions", "detected_lesions"} <= set(rows[0])
    stats = json.loads((out / "metrics_summary.json").read_text())
    assert set(stats["per_class"]) == {"anterior", "posterior"} and "dice_std" in stats["per_class"]["anterior"]
    # the post-processing decision is recorded with the validation scores behind it, in the summary and the model
    summary = json.loads((out / "summary.json").read_text())
    post = summary["postprocessing"]
    assert set(post["validation"]) == {"anterior", "posterior"} and set(post["largest_component"]) <= {"anterior", "posterior"}
    for name, v in post["validation"].items():
        assert (name in post["largest_component"]) == (v["val_dice_largest"] > v["val_dice"])
    ckpt = torch.load(out / "best_unet.pth", map_location="cpu", weights_only=True)
    assert ckpt["postprocessing"] == post and ckpt["preprocessing"]["mirror_tta"] is True
    assert summary["hd95_unit"] == "mm"


def test_check_only_reports_volumes(tmp_path):
    root = make_msd(tmp_path / "T", n=2)
    out = tmp_path / "chk"
    assert run.main(["--data", str(root), "--labels", "1+2", "--check", "--output-dir", str(out)]) == 0
    rep = json.loads((out / "dataset_report.json").read_text())
    assert rep["cases"][0]["structures"]["anterior+posterior"] == {"voxels": (5 + 4) * 6 * 8, "volume_ml": 0.43}


@pytest.mark.realdata
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
def test_real_layouts_are_detected():
    expect = {"msd_hippocampus": ("msd", 260), "drive": ("paired (official split)", 40),
              "kvasir_seg": ("paired", 1000), "ircadb01_patient1": ("dicom+masks", 1)}
    for name, (layout, n) in expect.items():
        spec = datasets.discover(DATA / name)
        assert (spec.layout, len(spec.cases)) == (layout, n), name
        assert all(c.mask is not None for c in spec.cases), name

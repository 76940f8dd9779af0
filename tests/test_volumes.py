"""Volumes as volumes: channel files grouped into cases, 4D NIfTI channels, the 3D U-Net pipeline, regions."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import data_gen
import datasets
import medio
from errors import InputError
from experiments import run_dataset
from inference import predict_image, predict_volume
from model import UNet
from preprocess import Preprocessing
from train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _nifti(path: Path, zyx: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(zyx.T), np.diag([*spacing[::-1], 1.0])), str(path))
    return path


def _tiny_cfg(root: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(root), dim=3, epochs=6, base_channels=4, lr=1e-2, samples_per_epoch=32, progress=False,
                figures=False, output_dir=str(out), checkpoint=str(out / "best.pth"), threads=1)
    return TrainConfig(**{**base, **kw})


def test_channel_files_are_grouped_by_case_id(tmp_path):
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    vol = np.zeros((4, 5, 6), np.float32)
    for case in ("a", "a_b"):
        for c in (0, 1):
            _nifti(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", vol + c)
        _nifti(root / "labelsTr" / f"{case}.nii.gz", vol.astype(np.uint8))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}, "labels": {"x": 1}}))
    spec = datasets.discover(root)
    assert [c.case_id for c in spec.cases] == ["a", "a_b"] and spec.channel_names == ["T1", "T2"]
    assert [p.name for p in spec.cases[1].channels] == ["a_b_0000.nii.gz", "a_b_0001.nii.gz"]
    image, meta = medio.read_channels(spec.cases[1].channels, "a_b")
    assert image.shape == (4, 5, 6, 2) and meta.channels == 2 and float(image[..., 1].max()) == 1.0


def test_a_missing_channel_and_a_misaligned_channel_are_listed_by_the_dataset_check(tmp_path):
    root = tmp_path / "ds"
    data_gen.write_two_channel_dataset(root, 4, shape=(12, 12, 12))
    (root / "imagesTr" / "case_001_0001.nii.gz").unlink()
    _nifti(root / "imagesTr" / "case_002_0001.nii.gz", np.zeros((12, 12, 11), np.float32))
    spec = datasets.discover(root)
    with pytest.raises(InputError) as e:
        datasets.load_cases(spec.cases, Preprocessing(normalization="zscore", in_channels=2))
    msg = str(e.value)
    assert "2 of 4 cases" in msg
    assert "case_001_0001 missing (expected 2 channels" in msg
    assert "channel" in msg and "case_002_0001.nii.gz has shape (12, 12, 11)" in msg


def test_two_channel_lesion_trains_to_dice_09_in_3d(tmp_path):
    """The lesion is only where both channels are bright: a 3D U-Net on both channels finds it."""
    root = tmp_path / "ds"
    data_gen.write_two_channel_dataset(root, 12, shape=(20, 20, 20), seed=0)
    summary = run_dataset(_tiny_cfg(root, tmp_path / "out"))
    assert summary["dice"] >= 0.9, summary["dice"]
    ckpt = torch.load(tmp_path / "out" / "best.pth", weights_only=True)
    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    assert prep.dim == 3 and prep.in_channels == 2 and prep.channel_names == ["A", "B"]
    assert ckpt["model_args"]["dim"] == 3 and ckpt["model_args"]["n_channels"] == 2


def test_regions_are_trained_with_one_sigmoid_each_and_reported_per_region(tmp_path):
    root = tmp_path / "ds"
    data_gen.write_two_channel_dataset(root, 10, shape=(16, 16, 16), seed=1, parts=True)
    summary = run_dataset(_tiny_cfg(root, tmp_path / "out", labels="whole=1+2+3,overlap=2", epochs=4))
    assert set(summary["per_class"]) == {"whole", "overlap"}
    assert summary["preprocessing"]["regions"] and summary["per_class"]["whole"]["dice"] > 0.7
    ckpt = torch.load(tmp_path / "out" / "best.pth", weights_only=True)
    assert ckpt["model_args"]["n_classes"] == 2  # one sigmoid per region, no background channel


def test_3d_sliding_window_equals_whole_volume_inference_when_one_window_fits():
    torch.manual_seed(0)
    model = UNet(2, 3, 4, dim=3).eval()
    volume = np.random.default_rng(0).random((2, 16, 16, 16), dtype=np.float32)
    with torch.no_grad():
        whole = torch.softmax(model(torch.from_numpy(volume)[None]), 1)[0].numpy()
    np.testing.assert_allclose(predict_volume(model, volume, (16, 16, 16)), whole, atol=1e-6)
    tiled = predict_volume(model, np.pad(volume, ((0, 0), (0, 8), (0, 0), (0, 5))), (16, 16, 16), overlap=0.5)
    assert tiled.shape == (3, 24, 16, 21) and np.allclose(tiled.sum(0), 1.0, atol=1e-5)


def test_predict_image_maps_a_resampled_3d_prediction_back_to_the_input_grid():
    torch.manual_seed(0)
    pools = [[1, 2, 2], [2, 2, 2], [1, 1, 1], [1, 1, 1]]
    model = UNet(1, 3, 4, dim=3, pool=pools).eval()
    prep = Preprocessing(normalization="zscore", class_names=["lesion", "organ"], class_values=[[1], [2]], dim=3,
                         spacing=[2.0, 1.0, 1.0], patch=[8, 16, 16], pool=pools, crop_nonzero=True)
    image = np.zeros((10, 30, 28), np.float32)
    image[2:8, 5:25, 6:20] = np.random.default_rng(0).random((6, 20, 14))
    meta = medio.ImageMeta("x.nii.gz", "nifti", (10, 30, 28), (3.0, 0.8, 0.8), (0.0,) * 3, ((1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)))
    probs = predict_image(model, image, meta, prep)
    assert probs.shape == (10, 3, 30, 28)  # (Z, C_out, Y, X) on the input grid
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    assert np.all(probs[0, 0] == 1.0)  # outside the non-zero box: background

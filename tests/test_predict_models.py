"""predict.py / diagnosis.py on every kind of model the training side writes: 3D networks (resampled to their
spacing and mapped back), multi-channel cases (a 4D NIfTI, the channel files of a case, a folder of them),
region models (nested sigmoids: the innermost region is written, every region is measured) and ONNX files
(masks equal to the .pth's in fp32).

``PYTHONPATH=. python tests/test_predict_models.py memory DIR`` writes the 512x512x200 CT volume and the tiny untrained 2D and
3D checkpoints the memory figures of predict.py are measured on (``/usr/bin/time -v python predict.py ...``).
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import data_gen
import diagnosis
import medio
import predict
from checkpoint import save_checkpoint
from diagnosis import DiagnosisSettings as Settings
from model import UNet
from preprocess import Preprocessing, to_planes
from train import split_indices

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HIPPO = DATA / "msd_hippocampus" / "imagesTr"
NO_FONT = Settings(embed_font=False, lang="en")
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- helpers
def tiny(n_channels: int, n_classes: int, dim: int = 2, seed: int = 0, **kw) -> UNet:
    """A base-4 U-Net with random weights (eval mode)."""
    torch.manual_seed(seed)
    return UNet(n_channels, n_classes, 4, dim=dim, **kw).eval()


def centre(model: UNet, x: torch.Tensor) -> UNet:
    """Shift each output's logits to mean 0 on ``x``, so masks are neither empty nor full (agreement then means
    something)."""
    with torch.no_grad():
        model.outc.conv.bias -= model(x).transpose(0, 1).flatten(1).mean(1)
    return model


def save_model(path: Path, model: UNet, prep: Preprocessing) -> Path:
    return save_checkpoint(path, model, {"epochs": 1, "data": "toy"}, 1, {"dice": 0.5},
                           {"preprocessing": prep.to_dict()})


def nifti(path: Path, zyx: np.ndarray, spacing=(2.5, 0.8, 0.8)) -> Path:
    """A NIfTI of a (Z, Y, X[, C]) array with an axis-aligned affine of ``spacing`` (dz, dy, dx)."""
    data = np.moveaxis(zyx, (0, 1, 2), (2, 1, 0)) if zyx.ndim == 4 else zyx.T
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), np.diag([*spacing[::-1], 1.0])), str(path))
    return path


def ct_volume(shape=(200, 512, 512), seed: int = 0) -> np.ndarray:
    """HU-like float32 CT: air around a body ellipse of soft tissue (~40 HU) with noise, a brighter organ, a few
    dark lesions and a spine-like bone column, so every window and normalisation sees a realistic range."""
    z, h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    body = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.47 * w)) ** 2 <= 1
    organ = ((yy - 0.45 * h) / (0.18 * h)) ** 2 + ((xx - 0.35 * w) / (0.2 * w)) ** 2 <= 1
    bone = ((yy - 0.75 * h) / (0.05 * h)) ** 2 + ((xx - w / 2) / (0.05 * w)) ** 2 <= 1
    out = np.empty(shape, np.float32)
    for k in range(z):
        sl = np.full((h, w), -1000.0, np.float32)
        sl[body] = 40.0
        sl[organ] = 90.0
        sl[bone] = 700.0
        if z // 3 <= k < 2 * z // 3:  # two lesions over the middle third
            for cy, cx, r in ((0.42, 0.3, 0.03), (0.5, 0.4, 0.02)):
                sl[((yy - cy * h) ** 2 + (xx - cx * w) ** 2) <= (r * h) ** 2] = 20.0
        out[k] = sl + rng.normal(0, 12, (h, w)).astype(np.float32) * body
    return out


def run(argv: list[str]) -> int:
    return predict.main([*map(str, argv), "--no-progress", "--lang", "en"])


def mask_of(folder: Path) -> np.ndarray:
    m = folder / "mask.nii.gz"
    return medio.read_mask(m)[0] if m.exists() else np.asarray(Image.open(folder / "mask.png"))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    inter, total = np.logical_and(a, b).sum(), a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * inter / total


class Step(nn.Module):
    """Stand-in with an exactly known answer: one logit per output, 20 * (x - t) of the first channel."""

    def __init__(self, thresholds=(0.5,)):
        super().__init__()
        self.t = thresholds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([20.0 * (x[:, :1] - t) for t in self.t], dim=1)


def bundle(model: nn.Module, **prep) -> diagnosis.ModelBundle:
    p = Preprocessing(**{"normalization": "none", "patch_size": 16, "class_names": ["lesion"], **prep})
    return diagnosis.ModelBundle(model=model, prep=p, device=torch.device("cpu"), precision="fp32",
                                 channels_last=False)


# ---------------------------------------------------------------------------------------------- 3D
def test_3d_model_is_resampled_to_its_spacing_and_mapped_back(tmp_path):
    """A step 'network' on a blob: the mask after resampling to 2 x 1 x 1 mm and back is the blob again."""
    image = np.zeros((12, 40, 36), np.float32)
    zz, yy, xx = np.mgrid[:12, :40, :36]
    image[((zz - 6) / 4.0) ** 2 + ((yy - 20) / 10.0) ** 2 + ((xx - 15) / 8.0) ** 2 <= 1] = 1.0
    b = bundle(Step(), dim=3, spacing=[2.0, 1.0, 1.0], patch=[8, 16, 16], pool=[[1, 2, 2]] * 4)
    (tmp_path / "in").mkdir()
    src = nifti(tmp_path / "in" / "blob.nii.gz", image, spacing=(3.0, 0.8, 0.8))
    res = diagnosis.predict_case(b, src, tmp_path / "out", NO_FONT)
    assert res.labels.shape == image.shape and res.probs.shape == (12, 1, 40, 36)
    assert dice(res.labels == 1, image > 0.5) > 0.9
    vol = res.summary["structures"][0]["volume_ml"]
    assert vol == pytest.approx((image > 0.5).sum() * 3.0 * 0.8 * 0.8 / 1000, rel=0.15)
    with pytest.raises(Exception, match="3D network but the image is 2D"):
        diagnosis.segment(b, np.zeros((20, 20), np.float32), medio.ImageMeta(
            "flat.png", "png", (20, 20), (1.0, 1.0), (0.0, 0.0), ((1.0, 0.0), (0.0, 1.0))))


def test_3d_checkpoint_through_the_command_line(tmp_path):
    pools = [[1, 2, 2], [2, 2, 2], [1, 2, 2], [1, 1, 1]]
    prep = Preprocessing(normalization="window", window=[40.0, 400.0], class_names=["liver", "tumour"],
                         class_values=[[1], [2]], dim=3, spacing=[2.5, 1.5, 1.5], patch=[8, 32, 32], pool=pools,
                         crop_nonzero=True)
    ckpt = save_model(tmp_path / "m3d.pth", centre(tiny(1, 3, dim=3, pool=pools), torch.rand(1, 1, 8, 32, 32)), prep)
    (tmp_path / "in").mkdir()
    src = nifti(tmp_path / "in" / "ct.nii.gz", ct_volume((10, 48, 40)))
    out = tmp_path / "out"
    assert run(["--checkpoint", ckpt, "--input", src, "--output-dir", out]) == 0
    rep = json.loads((out / "ct" / "report.json").read_text(encoding="utf-8"))
    assert rep["model"]["architecture"].startswith("3D U-Net") and "3D network" in rep["model"]["preprocessing_text"]
    mask = nib.load(str(out / "ct" / "mask.nii.gz"))
    assert mask.shape == (40, 48, 10) and np.allclose(mask.affine, nib.load(str(src)).affine)
    with open(out / "cohort.csv", encoding="utf-8") as f:
        row = next(csv.DictReader(f))
    assert row["shape"] == "10x48x40" and row["spacing_mm"] == "2.5x0.8x0.8" and row["status"] == "ok"
    assert set(row) >= {"liver_volume_ml", "tumour_volume_ml", "lesion_count", "largest_lesion_diameter_mm"}


# ------------------------------------------------------------------------------------- multi-channel
def test_multichannel_case_from_4d_nifti_channel_files_or_folder(tmp_path):
    prep = Preprocessing(normalization="zscore", in_channels=2, patch_size=32, class_names=["lesion"],
                         channels=[{"name": "A", "normalization": "zscore", "window": None},
                                   {"name": "B", "normalization": "window", "window": [40.0, 400.0]}])
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (6, 40, 36)).astype(np.float32), rng.normal(40, 200, (6, 40, 36)).astype(np.float32)
    model = centre(tiny(2, 1), torch.from_numpy(to_planes(np.stack([a, b], -1), 3, prep)))
    ckpt = save_model(tmp_path / "m2.pth", model, prep)
    folder = tmp_path / "in" / "case_files"
    folder.mkdir(parents=True)
    files = [nifti(folder / f"pat_{c:04d}.nii.gz", v) for c, v in enumerate((a, b))]
    four_d = nifti(tmp_path / "in" / "four_d.nii.gz", np.stack([a, b], -1))
    outs = tmp_path / "o1", tmp_path / "o2", tmp_path / "o3"
    assert run(["--checkpoint", ckpt, "--input", four_d, "--output-dir", outs[0]]) == 0
    assert run(["--checkpoint", ckpt, "--input", *files, "--output-dir", outs[1], "--display-channel", "1"]) == 0
    assert run(["--checkpoint", ckpt, "--input", folder, "--output-dir", outs[2]]) == 0
    masks = [mask_of(outs[0] / "four_d"), mask_of(outs[1] / "pat"), mask_of(outs[2] / "pat")]
    assert 0 < masks[0].sum() < masks[0].size  # a real comparison
    assert all(np.array_equal(masks[0], m) for m in masks[1:])
    rep = json.loads((outs[1] / "pat" / "report.json").read_text(encoding="utf-8"))
    assert rep["input"]["channels"] == 2 and rep["input"]["channel_names"] == ["A", "B"]
    assert [Path(p).name for p in rep["input"]["channel_files"]] == ["pat_0000.nii.gz", "pat_0001.nii.gz"]


def test_channel_count_mismatches_are_refused_naming_both(tmp_path, capsys):
    prep = Preprocessing(normalization="zscore", in_channels=2, patch_size=32, class_names=["lesion"],
                         channels=[{"name": "T1", "normalization": "zscore"}, {"name": "T2", "normalization": "zscore"}])
    ckpt = save_model(tmp_path / "m2.pth", tiny(2, 1), prep)
    (tmp_path / "in").mkdir()
    vol = np.random.default_rng(0).normal(size=(4, 20, 20)).astype(np.float32)
    single = nifti(tmp_path / "in" / "scan.nii.gz", vol)
    lone = nifti(tmp_path / "in" / "solo_0000.nii.gz", vol)
    out = tmp_path / "out"
    assert run(["--checkpoint", ckpt, "--input", single, lone, "--output-dir", out]) == 1
    err = capsys.readouterr().err
    assert "scan.nii.gz: the image has 1 channel but the model takes 2 (T1, T2); pass all channel files" in err
    assert "solo: channel file(s) solo_0001 missing (expected 2 channels" in err
    assert "Traceback" not in err
    assert run(["--checkpoint", ckpt, "--input", single, "--output-dir", out, "--display-channel", "2"]) == 2
    assert "--display-channel 2: the model takes 2 channel(s) (T1, T2); expected 0..1" in capsys.readouterr().err


def test_single_channel_model_never_groups_channel_named_files(tmp_path):
    prep = Preprocessing(normalization="zscore", patch_size=32, class_names=["lesion"])
    ckpt = save_model(tmp_path / "m1.pth", tiny(1, 1), prep)
    (tmp_path / "in").mkdir()
    vol = np.random.default_rng(0).normal(size=(3, 20, 20)).astype(np.float32)
    files = [nifti(tmp_path / "in" / f"x_{c:04d}.nii.gz", vol) for c in (0, 1)]
    assert run(["--checkpoint", ckpt, "--input", *files, "--output-dir", tmp_path / "out"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["x_0000", "x_0001"]


# ------------------------------------------------------------------------------------------- regions
def test_region_model_writes_the_innermost_region_and_measures_every_region(tmp_path):
    """Two nested regions (whole > 0.25, core > 0.75 of the intensity): the mask holds 2 in the core and 1 in the
    rest of the whole region; the report measures each region and counts the tumour once."""
    image = np.zeros((40, 40), np.float32)
    yy, xx = np.mgrid[:40, :40]
    r2 = (yy - 20) ** 2 + (xx - 20) ** 2
    image[r2 <= 12 ** 2] = 0.5
    image[r2 <= 5 ** 2] = 1.0
    image[2:5, 2:5] = 0.5  # a second, small lesion of the whole region only
    b = bundle(Step((0.25, 0.75)), class_names=["whole tumour", "tumour core"], class_values=[[1, 2], [2]],
               regions=True)
    src = tmp_path / "in" / "t.png"
    src.parent.mkdir()
    Image.fromarray((image * 255).astype(np.uint8)).save(src)
    b.prep.normalization = "unit"
    res = diagnosis.predict_case(b, src, tmp_path / "out", Settings(embed_font=False, lang="en", fill_holes=False))
    whole, core = r2 <= 144, r2 <= 25
    want = np.where(core, 2, np.where(whole, 1, 0))
    want[2:5, 2:5] = 1
    np.testing.assert_array_equal(res.labels, want)
    np.testing.assert_array_equal(np.asarray(Image.open(res.files["mask"])), want)
    s = {x["class"]: x["pixels"] for x in res.summary["structures"]}
    assert s == {"whole tumour": int(whole.sum()) + 9, "tumour core": int(core.sum())}
    assert res.summary["n_lesions"] == 2
    big = res.lesions[0]
    assert big["class"] == "whole tumour" and big["pixels"] == int(whole.sum())
    assert {r["class"]: r["pixels"] for r in big["regions"]} == s | {"whole tumour": int(whole.sum())}
    assert res.report["settings"]["decision"].startswith("sigmoid per region")
    assert 0.9 < res.summary["mean_foreground_probability"] <= 1.0


# ---------------------------------------------------------------------------------------------- ONNX
def _masks(out: Path) -> dict[str, np.ndarray]:
    return {p.name: mask_of(p) for p in sorted(out.iterdir()) if p.is_dir()}


def test_onnx_masks_equal_the_checkpoints_on_the_synthetic_test_images(trained_model, tmp_path):
    pytest.importorskip("onnxruntime")
    import export

    cfg = trained_model.config
    onnx_path, _ = export.export_checkpoint(trained_model.checkpoint, tmp_path / "model.onnx")
    data = data_gen.generate_dataset(cfg.num_samples, cfg.image_size, cfg.seed, cfg.difficulty)
    test_idx = split_indices(len(data), cfg.val_fraction, cfg.test_fraction, cfg.seed)["test"]
    folder = tmp_path / "in" / "test_images"
    folder.mkdir(parents=True)
    for i in test_idx:
        Image.fromarray(np.rint(data.images[i] * 255).astype(np.uint8)).save(folder / f"t{i:03d}.png")
    common = ["--input", folder, "--threads", "1"]
    assert run(["--checkpoint", trained_model.checkpoint, "--precision", "fp32", "--output-dir", tmp_path / "pth", *common]) == 0
    assert run(["--checkpoint", onnx_path, "--output-dir", tmp_path / "onnx", *common]) == 0
    want, got = _masks(tmp_path / "pth"), _masks(tmp_path / "onnx")
    assert list(want) == list(got) and len(want) == len(test_idx)
    scores = [dice(want[k] > 0, got[k] > 0) for k in want]
    assert min(scores) >= 0.999 and sum(m.any() for m in want.values()) >= len(want) // 2, scores
    rep = json.loads((tmp_path / "onnx" / f"t{test_idx[0]:03d}" / "report.json").read_text(encoding="utf-8"))
    assert rep["model"]["architecture"].endswith("(ONNX, onnxruntime)") and rep["model"]["parameters"] > 0
    assert rep["model"]["device"] == "cpu" and rep["model"]["precision"] == "fp32"


@pytest.mark.realdata
@pytest.mark.skipif(not HIPPO.exists(), reason=f"real data not found at {HIPPO}")
def test_onnx_masks_equal_the_checkpoints_on_two_hippocampus_cases(tmp_path):
    pytest.importorskip("onnxruntime")
    import export

    prep = Preprocessing(normalization="zscore", class_names=["anterior", "posterior"], class_values=[[1], [2]],
                         patch_size=32)
    cases = [HIPPO / f"hippocampus_{i}.nii.gz" for i in ("001", "003")]
    (tmp_path / "in").mkdir()
    first = to_planes(medio.read_image(cases[0])[0], 3, prep)
    model = centre(tiny(1, 3, seed=3), torch.from_numpy(first[::4, :, :32, :32].copy()))
    ckpt = save_model(tmp_path / "hippo.pth", model, prep)
    onnx_path, _ = export.export_checkpoint(ckpt, tmp_path / "hippo.onnx")
    common = ["--input", *cases, "--threads", "1", "--roles", "organ,organ"]
    assert run(["--checkpoint", ckpt, "--precision", "fp32", "--output-dir", tmp_path / "pth", *common]) == 0
    assert run(["--checkpoint", onnx_path, "--output-dir", tmp_path / "onnx", *common]) == 0
    want, got = _masks(tmp_path / "pth"), _masks(tmp_path / "onnx")
    for name in want:
        assert all((want[name] == k).sum() > 100 for k in (1, 2)), name  # both classes: a real comparison
        assert min(dice(want[name] == k, got[name] == k) for k in (1, 2)) >= 0.999, name


# ------------------------------------------------------------------------------ memory measurement set-up
def write_memory_inputs(folder: Path) -> None:
    """The 512x512x200 CT (0.8 x 0.8 x 2.5 mm) and tiny untrained 2D / 3D checkpoints (CT window) that predict.py's
    peak memory is measured on."""
    folder.mkdir(parents=True, exist_ok=True)
    nifti(folder / "ct_512x512x200.nii.gz", ct_volume((200, 512, 512)))
    prep2 = Preprocessing(normalization="window", window=[40.0, 400.0], patch_size=256,
                          class_names=["liver", "tumour"], class_values=[[1], [2]])
    save_model(folder / "tiny_2d.pth", tiny(1, 3), prep2)
    pools = [[1, 2, 2], [2, 2, 2], [1, 2, 2], [1, 1, 1]]
    prep3 = Preprocessing(normalization="window", window=[40.0, 400.0], class_names=["liver", "tumour"],
                          class_values=[[1], [2]], dim=3, spacing=[2.5, 1.6, 1.6], patch=[32, 128, 128], pool=pools,
                          crop_nonzero=True)
    save_model(folder / "tiny_3d.pth", tiny(1, 3, dim=3, pool=pools), prep3)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "memory":
        sys.exit("usage: PYTHONPATH=. python tests/test_predict_models.py memory DIR")
    write_memory_inputs(Path(sys.argv[2]))

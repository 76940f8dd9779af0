"""predict.py and the diagnosis core it runs (diagnosis.py, measure.py, roles.py) with report.py: stand-in models
with exactly known outputs, hand-made masks with known sizes, geometry of the written masks, batch behaviour of the
CLI, and agreement with training-time evaluation."""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.uid import generate_uid
from scan_fixtures import ct_slice, oblique_affine
from torch import nn

import data_gen
import diagnosis
import measure
import medio
import predict
import report
from checkpoint import save_checkpoint
from diagnosis import DiagnosisSettings as Settings
from errors import CheckpointError, InputError
from metrics import per_case_scores
from model import UNet
from preprocess import Preprocessing
from roles import class_roles
from train import TrainConfig, split_indices

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"real data not found at {DATA}")
NOTICE_ZH = "本报告由科研软件自动生成，不是医疗器械，不能作为临床诊断依据。"
NOTICE_EN = "Research software, not a medical device; not for clinical diagnosis."
NO_FONT = Settings(embed_font=False)  # the report's font subset takes time and is tested once


# ------------------------------------------------------------------------------------------- helpers
class StepModel(nn.Module):
    """Stand-in: one logit 20 * (x - 0.5) of the first channel, so probability > 0.5 exactly where x > 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 * (x[:, :1] - 0.5)


class ThreeClassModel(nn.Module):
    """Stand-in softmax model: argmax = 0 for x < 0.25, 1 (organ) for 0.25 < x < 0.75, 2 (lesion) for x > 0.75."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :1]
        return torch.cat([torch.zeros_like(v), 20.0 * (v - 0.25), 40.0 * (v - 0.5)], dim=1)


def bundle(model: nn.Module | None = None, **prep) -> diagnosis.ModelBundle:
    p = Preprocessing(**{"normalization": "none", "patch_size": 16, "class_names": ["lesion"], **prep})
    return diagnosis.ModelBundle(model=model or StepModel(), prep=p, device=torch.device("cpu"), precision="fp32",
                               channels_last=False)


def meta2d(shape, spacing=(1.0, 1.0), known=True) -> medio.ImageMeta:
    return medio.ImageMeta(path="mem.png", format="png", shape=tuple(shape), spacing=tuple(spacing), origin=(0.0, 0.0),
                           direction=((1.0, 0.0), (0.0, 1.0)), spacing_known=known)


def meta3d(shape, spacing, affine=None) -> medio.ImageMeta:
    return medio.ImageMeta(path="mem.nii.gz", format="nifti", shape=tuple(shape), spacing=tuple(spacing),
                           origin=(0.0, 0.0, 0.0), direction=tuple(tuple(float(i == j) for j in range(3)) for i in range(3)),
                           affine=None if affine is None else np.asarray(affine, float).tolist())


def sha(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(sha(p).encode() for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return path


def write_series(folder: Path, raw: np.ndarray, *, spacing=(0.7, 0.6), gap=2.5, iop=(1, 0, 0, 0, 1, 0),
                 start=(-40.0, 25.0, 100.0)) -> np.ndarray:
    """A CT series (RescaleIntercept -1024) of a known patient, slice k at start + k * gap * normal, files written
    in shuffled order. Returns the expected RAS affine."""
    uid = generate_uid()
    iop_a = np.asarray(iop, float)
    normal = np.cross(iop_a[:3], iop_a[3:])
    folder.mkdir(parents=True, exist_ok=True)
    for n, k in enumerate(np.random.default_rng(0).permutation(len(raw))):
        ct_slice(folder / f"IM{n}", raw[k], position=np.asarray(start) + k * gap * normal, uid=uid, instance=int(k) + 1,
                 iop=iop, spacing=spacing, thickness=gap, patient=("Test^Patient", "P001", "20240131"))
    lps = np.eye(4)
    dy, dx = spacing
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = iop_a[:3] * dx, iop_a[3:] * dy, normal * gap, start
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ckpt(trained_model) -> Path:
    """The session's trained checkpoint (tests/conftest.py): base 8, 8-bit images, 32-px patches."""
    return trained_model.checkpoint


# -------------------------------------------------------------------------------------- measurements
def test_two_lesions_2d_areas_diameters_anisotropic():
    labels = np.zeros((30, 40), np.uint8)
    labels[2:6, 3:9] = 1     # 4 x 6 px
    labels[20:22, 30:33] = 1  # 2 x 3 px
    probs = np.full((1, 1, 30, 40), 0.1, np.float32)
    probs[0, 0, 2:6, 3:9] = 0.8
    probs[0, 0, 2, 3] = 0.96
    probs[0, 0, 20:22, 30:33] = 0.6
    res = measure.analyze_mask(labels, probs, meta2d((30, 40), (0.5, 0.8)), Preprocessing())
    big, small = res["lesions"]
    assert (big["id"], big["pixels"], small["id"], small["pixels"]) == (1, 24, 2, 6)
    assert big["area_mm2"] == pytest.approx(24 * 0.4) and small["area_mm2"] == pytest.approx(6 * 0.4)
    assert big["max_diameter_mm"] == pytest.approx(math.hypot(4 * 0.5, 6 * 0.8))  # 5.2 mm, outline corners
    assert small["max_diameter_mm"] == pytest.approx(math.hypot(2 * 0.5, 3 * 0.8))
    assert big["centroid_index"] == [3.5, 5.5] and big["centroid_mm"] == [1.75, 4.4]
    assert (big["bbox_min"], big["bbox_max"], big["extent_mm"]) == ([2, 3], [5, 8], [2.0, 4.8])
    assert big["max_probability"] == pytest.approx(0.96)
    assert big["mean_probability"] == pytest.approx((23 * 0.8 + 0.96) / 24, abs=1e-4)
    s = res["summary"]
    assert s["n_lesions"] == 2 and s["lesion_total"]["area_mm2"] == pytest.approx(12.0)
    assert s["max_diameter_mm"] == pytest.approx(5.2) and s["lesion_burden_percent"] is None

    unknown = measure.analyze_mask(labels, None, meta2d((30, 40), known=False), Preprocessing())
    les = unknown["lesions"][0]
    assert les["area_mm2"] is None and les["max_diameter_mm"] is None
    assert les["max_diameter_px"] == pytest.approx(math.hypot(4, 6)) and les["mean_probability"] is None
    assert "像素" in report.findings_sentence({"summary": unknown["summary"]}, "zh")


def test_max_diameter_equals_brute_force_over_voxel_corners():
    import itertools

    from scipy.spatial.distance import pdist

    rng = np.random.default_rng(3)
    for shape, spacing in (((9, 11), (0.5, 0.8)), ((5, 7, 6), (2.0, 0.5, 0.7)), ((1, 6, 1), (3.0, 1.0, 1.0))):
        for _ in range(4):
            mask = rng.random(shape) > 0.6
            mask.flat[0] = True
            corners = np.array(list(itertools.product((-0.5, 0.5), repeat=len(shape))))
            pts = ((np.argwhere(mask)[:, None, :] + corners[None]).reshape(-1, len(shape))) * np.asarray(spacing)
            assert measure.max_diameter(mask, spacing) == pytest.approx(pdist(pts).max())
    assert measure.max_diameter(np.ones((1, 1), bool), (0.5, 0.8)) == pytest.approx(math.hypot(0.5, 0.8))


def test_volume_3d_ml_diameter_and_world_centroid():
    spacing = (2.0, 0.5, 0.5)  # (dz, dy, dx)
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    labels = np.zeros((10, 20, 24), np.uint8)
    labels[2:5, 5:9, 6:11] = 1  # 3 x 4 x 5 voxels
    zz, yy, xx = np.mgrid[:10, :20, :24]
    ball = (zz - 7) ** 2 + (yy - 14) ** 2 + (xx - 17) ** 2 <= 4
    labels[ball] = 1
    res = measure.analyze_mask(labels, None, meta3d(labels.shape, spacing, affine), Preprocessing())
    assert [les["voxels"] for les in res["lesions"]] == [60, int(ball.sum())]
    box = res["lesions"][0]
    assert box["volume_ml"] == pytest.approx(60 * 2.0 * 0.5 * 0.5 / 1000) and box["volume_mm3"] == pytest.approx(30.0)
    assert res["lesions"][1]["volume_ml"] == pytest.approx(ball.sum() * 0.5 / 1000)
    assert box["max_diameter_mm"] == pytest.approx(math.sqrt(6.0 ** 2 + 2.0 ** 2 + 2.5 ** 2))
    assert box["axial_diameter_mm"] == pytest.approx(math.hypot(2.0, 2.5))
    assert (box["slice_index"], box["slice_range"]) == (2, [2, 4])
    assert box["centroid_index"] == [3.0, 6.5, 8.0]
    assert box["centroid_world_mm"] == pytest.approx([-10 + 8 * 0.5, 20 + 6.5 * 0.5, 5 + 3 * 2.0])
    assert box["extent_mm"] == [6.0, 2.0, 2.5]
    s = res["summary"]
    assert s["lesion_total"]["volume_ml"] == pytest.approx((60 + ball.sum()) * 0.5e-3)
    ball_d = res["lesions"][1]["max_diameter_mm"]  # 5 slices x 2 mm tall: the ball is the longest lesion
    assert 10.0 <= ball_d < 10.5 and s["max_diameter_mm"] == ball_d and s["max_diameter_lesion"] == 2
    assert report.findings_sentence({"summary": s}, "zh") == f"检出 2 处疑似病灶，最大直径 {ball_d:.1f} mm，总体积 0.05 mL。"
    assert report.findings_sentence({"summary": s}, "en") == (
        f"2 suspected lesions detected, largest diameter {ball_d:.1f} mm, total volume 0.05 mL.")


def test_postprocess_min_size_fill_holes_keep_largest_organ():
    m2 = meta2d((30, 40), (0.5, 0.8))
    labels = np.zeros((30, 40), np.uint8)
    labels[2:6, 3:9] = 1          # 24 px = 9.6 mm²
    labels[20:22, 30:33] = 1      # 6 px = 2.4 mm²
    labels[10:17, 20:27] = 1      # 7 x 7 ring around a 5 x 5 hole
    labels[11:16, 21:26] = 0
    out = diagnosis.postprocess(labels, m2, ["lesion"], min_lesion_size=3.0, fill_holes=True)
    assert out[20:22, 30:33].sum() == 0 and out[2:6, 3:9].all() and out[10:17, 20:27].all()
    assert diagnosis.postprocess(labels, m2, ["lesion"], min_lesion_size=2.0)[20:22, 30:33].all()  # 2.4 mm² stays
    assert not diagnosis.postprocess(labels, m2, ["lesion"], fill_holes=False)[13, 23]
    assert measure.size_unit(m2) == ("mm²", pytest.approx(0.4))
    # unknown spacing: pixels
    out_px = diagnosis.postprocess(labels, meta2d((30, 40), known=False), ["lesion"], min_lesion_size=7, fill_holes=False)
    assert out_px[20:22, 30:33].sum() == 0 and out_px[2:6, 3:9].all()
    # volumes: mm³, holes filled per slice
    vol = np.zeros((4, 12, 12), np.uint8)
    vol[1, 2:7, 2:7] = 1
    vol[1, 4, 4] = 0
    vol[3, 9, 9] = 1  # 1 voxel = 2 mm³
    m3 = meta3d(vol.shape, (2.0, 1.0, 1.0))
    out3 = diagnosis.postprocess(vol, m3, ["lesion"], min_lesion_size=3.0)
    assert out3[1, 4, 4] == 1 and out3[3, 9, 9] == 0 and measure.size_unit(m3)[0] == "mm³"
    # organ: largest component kept, holes filled without overwriting the lesion inside
    two = np.zeros((20, 20), np.uint8)
    two[2:12, 2:12] = 1
    two[5:8, 5:8] = 2            # lesion inside the organ
    two[4, 9] = 0                # a background hole in the organ
    two[15:18, 15:18] = 1        # small organ fragment
    out2 = diagnosis.postprocess(two, meta2d((20, 20)), ["organ", "lesion"])
    assert out2[15:18, 15:18].sum() == 0 and out2[4, 9] == 1 and (out2[5:8, 5:8] == 2).all()
    assert class_roles(["liver", "tumor"]) == ["organ", "lesion"]
    assert class_roles(["foreground"]) == ["lesion"]
    assert class_roles(["1", "2"]) == ["organ", "lesion"]
    assert class_roles(["Anterior", "Posterior"]) == ["organ", "organ"]


def test_learned_largest_component_step_from_the_checkpoint():
    """Training chose 'largest component' for a class on validation: predict applies it to that class only,
    whatever its role, and not with --no-postprocess."""
    image = np.zeros((24, 24), np.float32)
    image[2:10, 2:10] = 1.0       # 64 px
    image[18:20, 18:20] = 1.0     # 4 px fragment
    b = bundle(class_names=["vessel"])  # tubular: no role-based largest step
    assert diagnosis.segment(b, image, meta2d(image.shape)).labels.sum() == 68
    b.info = {"postprocessing": {"largest_component": ["vessel"]}}
    assert diagnosis.learned_largest(b) == [1]
    seg = diagnosis.segment(b, image, meta2d(image.shape))
    assert seg.labels.sum() == 64 and seg.raw_labels.sum() == 68
    assert diagnosis.segment(b, image, meta2d(image.shape), Settings(learned_postprocess=False)).labels.sum() == 68


# ------------------------------------------------------------------------------------ geometry, formats
def test_nifti_mask_keeps_affine_and_sliding_window(tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.random((24, 20, 6)) > 0.7).astype(np.float32)  # (i, j, k): slices of 20 x 24 > 16-px patch
    data[3:9, 4:10, 2:4] = 1.0
    src = tmp_path / "in" / "scan.nii.gz"
    src.parent.mkdir()
    img = nib.Nifti1Image(data, oblique_affine())
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=2)
    nib.save(img, str(src))
    before = sha(src)
    res = diagnosis.predict_case(bundle(), src, tmp_path / "out",
                                 Settings(fill_holes=False, embed_font=False, save_probability=True))
    out = nib.load(str(res.files["mask"]))
    assert res.files["mask"] == tmp_path / "out" / "scan" / "mask.nii.gz"
    np.testing.assert_allclose(out.affine, nib.load(str(src)).affine, atol=1e-6)
    assert out.shape == data.shape and int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
    np.testing.assert_array_equal(np.asarray(out.dataobj), (data > 0.5).astype(np.uint8))  # sliding window exact
    prob = nib.load(str(res.files["probability"])).get_fdata()
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-20 * (data - 0.5))), atol=1e-5)
    rep = json.loads((res.output_dir / "report.json").read_text(encoding="utf-8"))
    n = int(data.sum())
    total = sum(les["voxels"] for les in rep["lesions"])
    assert total == n and rep["summary"]["lesion_total"]["volume_ml"] == pytest.approx(n * 0.8 * 1.0 * 2.5 / 1000, rel=1e-5)
    assert rep["input"]["spacing_mm"] == pytest.approx([2.5, 1.0, 0.8])
    assert rep["notice"] == NOTICE_ZH and rep["schema"] == diagnosis.REPORT_SCHEMA
    assert sha(src) == before and sorted(p.name for p in src.parent.iterdir()) == ["scan.nii.gz"]


def test_dicom_series_gives_nifti_with_dicom_affine(tmp_path):
    raw = np.zeros((4, 18, 20), np.uint16)  # stored values; HU = raw - 1024
    raw[1:3, 5:11, 6:14] = 2000              # HU 976: bright
    series = tmp_path / "in" / "CT_SERIES"
    expected_affine = write_series(series, raw, iop=(0, 1, 0, 0, 0, -1))  # sagittal slices
    before = sha(series)
    b = bundle(normalization="window", window=[0.0, 200.0])
    res = diagnosis.predict_case(b, series, tmp_path / "out", Settings(embed_font=False, lang="en"))
    out = nib.load(str(res.files["mask"]))
    assert res.files["mask"].name == "mask.nii.gz" and res.case == "CT_SERIES"
    np.testing.assert_allclose(out.affine, expected_affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.dataobj).T, (raw > 1000).astype(np.uint8))
    rep = res.report
    assert rep["input"]["patient"] == {"name": "Test Patient", "id": "P001", "study_date": "2024-01-31"}
    assert rep["summary"]["n_lesions"] == 1
    assert rep["lesions"][0]["volume_ml"] == pytest.approx(2 * 6 * 8 * 2.5 * 0.7 * 0.6 / 1000)
    assert rep["summary"]["findings"].startswith("1 suspected lesion detected, largest diameter")
    assert sha(series) == before


def test_png_jpeg_rgb_small_and_large_images(tmp_path):
    big = np.zeros((70, 90), np.uint8)   # larger than the 16-px patch: sliding window
    big[10:30, 20:45] = 255
    big[50:60, 70:75] = 200
    small = np.zeros((10, 12, 3), np.uint8)  # smaller than the patch: padded; RGB -> luminance
    small[2:6, 3:9] = 255
    (tmp_path / "in").mkdir()
    p_big, p_small = save_png(tmp_path / "in" / "big.png", big), save_png(tmp_path / "in" / "small.png", small)
    b = bundle(normalization="unit")
    r1 = diagnosis.predict_case(b, p_big, tmp_path / "out", NO_FONT)
    r2 = diagnosis.predict_case(b, p_small, tmp_path / "out", NO_FONT)
    m1 = np.asarray(Image.open(r1.files["mask"]))
    m2 = np.asarray(Image.open(r2.files["mask"]))
    assert r1.files["mask"].name == "mask.png" and m1.shape == big.shape and m2.shape == small.shape[:2]
    np.testing.assert_array_equal(m1, np.where(big > 127, 255, 0))
    np.testing.assert_array_equal(m2 > 0, small[..., 0] > 127)
    assert [les["pixels"] for les in r1.lesions] == [500, 50] and r1.lesions[0]["area_mm2"] is None
    png = Image.open(r1.files["overlay"])
    assert png.format == "PNG" and png.size[0] > 500


def test_wrong_channels_is_a_clear_input_error(tmp_path):
    import tifffile

    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "five.tif"
    tifffile.imwrite(path, np.zeros((40, 50, 5), np.uint8))
    with pytest.raises(InputError, match=r"five\.tif.*5 colour channels"):
        diagnosis.predict_case(bundle(), path, tmp_path / "out", NO_FONT)


def test_multiclass_organ_volume_and_lesion_burden(tmp_path):
    vol = np.zeros((20, 20, 4), np.float32)  # (i, j, k)
    vol[2:14, 2:14, :] = 0.5   # organ 12 x 12 x 4
    vol[5:8, 5:8, 1:3] = 1.0   # lesion 3 x 3 x 2 inside
    vol[17:19, 17:19, 0] = 0.5  # organ fragment: dropped (largest component kept)
    (tmp_path / "in").mkdir()
    src = tmp_path / "in" / "abd.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 3.0, 1.0])), str(src))
    b = bundle(ThreeClassModel(), class_names=["liver", "tumor"], class_values=[[1], [2]])
    res = diagnosis.predict_case(b, src, tmp_path / "out", NO_FONT)
    s = res.summary
    organ_vox, lesion_vox = 12 * 12 * 4 - 18, 18
    liver = next(st for st in s["structures"] if st["class"] == "liver")
    assert liver["voxels"] == organ_vox and liver["components"] == 1 and liver["role"] == "organ"
    assert liver["volume_ml"] == pytest.approx(organ_vox * 1.92 / 1000)
    assert s["lesion_burden_percent"] == pytest.approx(100 * lesion_vox / (organ_vox + lesion_vox))
    assert res.lesions[0]["class"] == "tumor" and res.lesions[0]["volume_ml"] == pytest.approx(18 * 1.92 / 1000)
    assert res.report["settings"]["threshold"] is None
    assert "肝脏体积" in s["findings"] and "病灶负荷" in s["findings"]
    html_text = (res.output_dir / "report.html").read_text(encoding="utf-8")
    assert "肝脏" in html_text and "argmax" in html_text


# ----------------------------------------------------------------------------------------- report HTML
def test_html_report_self_contained_escaped_and_bilingual(tmp_path):
    img = np.zeros((40, 40), np.uint8)
    img[5:15, 5:15] = 255
    (tmp_path / "in").mkdir()
    src = save_png(tmp_path / "in" / "case<b>&x.png", img)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing CJK glyph in the overlay would be a UserWarning
        zh = diagnosis.predict_case(bundle(normalization="unit"), src, tmp_path / "out", case_name="zh")
        en = diagnosis.predict_case(bundle(normalization="unit"), src, tmp_path / "out", Settings(lang="en"),
                                    case_name="en")
    page = (zh.output_dir / "report.html").read_text(encoding="utf-8")
    assert zh.summary["findings"] == "检出 1 处疑似病灶，最大直径 14.1 像素，总面积 100 像素。"
    assert zh.summary["findings"] in page and NOTICE_ZH in page and NOTICE_EN in page
    assert "case&lt;b&gt;&amp;x.png" in page and "case<b>" not in page
    assert page.count("data:image/png;base64,") == 1 and "@font-face" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    rep = json.loads((zh.output_dir / "report.json").read_text(encoding="utf-8"))
    for key in ("schema", "case", "notice", "input", "model", "settings", "classes", "lesions", "summary", "outputs"):
        assert key in rep
    assert rep["summary"]["findings_en"] == "1 suspected lesion detected, largest diameter 14.1 px, total area 100 px."
    assert rep["settings"]["threshold"] == 0.5 and rep["classes"] == [{"index": 1, "name": "lesion", "role": "lesion"}]
    en_page = (en.output_dir / "report.html").read_text(encoding="utf-8")
    assert NOTICE_EN in en_page and en.summary["findings"] in en_page and 'lang="en"' in en_page
    empty = diagnosis.predict_case(bundle(normalization="unit"),
                                   save_png(tmp_path / "in" / "empty.png", np.zeros((20, 20))), tmp_path / "out", NO_FONT)
    assert empty.summary["findings"] == "未检出疑似病灶。" and empty.lesions == []


# ------------------------------------------------------------------------------------ checkpoints, CLI
def test_real_checkpoint_bundle_and_legacy_fallback(ckpt, tmp_path):
    b = diagnosis.load_model(ckpt, "cpu", "fp32")
    assert b.prep.patch_size == 32 and b.prep.normalization == "unit" and not b.warnings
    assert not b.model.training and "state_dict" not in b.info
    (tmp_path / "in").mkdir()
    res = diagnosis.predict_case(b, save_png(tmp_path / "in" / "x.png", np.full((24, 40), 90)), tmp_path / "out",
                                 NO_FONT)
    assert np.asarray(Image.open(res.files["mask"])).shape == (24, 40)
    assert res.report["model"]["architecture"].startswith("U-Net, 1→1 ch, base 8")
    legacy = tmp_path / "legacy.pth"
    save_checkpoint(legacy, UNet(base_channels=4), TrainConfig(image_size=32, base_channels=4), 3, {"dice": 0.9})
    lb = diagnosis.load_model(legacy, "cpu", "fp32")
    assert (lb.prep.normalization, lb.prep.patch_size, lb.prep.class_names) == ("unit", 32, ["lesion"])
    assert lb.warnings and "no preprocessing record" in lb.warnings[0]
    r = predict.latency(lb, 64, repeats=1, warmup=0)
    assert r["ms_median"] > 0 and r["tiles"] == 9  # 64 px, 32-px patch, 50 % overlap: 3 x 3 windows


def test_bad_checkpoints_are_clear_errors(tmp_path, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        diagnosis.load_model(garbage, "cpu")
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, foreign)
    with pytest.raises(CheckpointError, match="format"):
        diagnosis.load_model(foreign, "cpu")
    mismatched = tmp_path / "mismatch.pth"
    save_checkpoint(mismatched, UNet(base_channels=4), TrainConfig(), 1, {})
    ck = torch.load(mismatched, weights_only=True)
    ck["model_args"]["base_channels"] = 8
    torch.save(ck, mismatched)
    with pytest.raises(CheckpointError, match="do not match"):
        diagnosis.load_model(mismatched, "cpu")
    (tmp_path / "in").mkdir()
    img = save_png(tmp_path / "in" / "a.png", np.zeros((20, 20)))
    for ck_path in (garbage, foreign, mismatched, tmp_path / "missing.pth"):
        assert predict.main(["--checkpoint", str(ck_path), "--input", str(img), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("predict.py: error:") == 4 and "missing.pth" in err
    assert not (tmp_path / "o").exists()


def test_usage_errors_exit_2(ckpt, tmp_path, capsys):
    img = save_png(tmp_path / "a.png", np.zeros((20, 20)))
    ck = ["--checkpoint", str(ckpt)]
    assert predict.main(ck + ["--output-dir", str(tmp_path / "o")]) == 2            # no inputs
    assert predict.main(ck + ["--input", str(img)]) == 2                              # no output dir
    assert predict.main(ck + ["--input", str(img), "--output-dir", "o", "--threshold", "1.5"]) == 2
    assert predict.main(ck + ["--input", str(img), "--output-dir", "o", "--bogus"]) == 2
    assert predict.main(ck + ["--input", str(img), "--output-dir", "o", "--lang", "fr"]) == 2
    assert predict.main(ck + ["--input", str(img), "--output-dir", "o", "--roles", "tumour"]) == 2   # unknown role
    assert predict.main(ck + ["--input", str(img), "--output-dir", "o", "--roles", "organ,lesion"]) == 2  # 1 class
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no inputs" in err and "--threshold" in err and "--roles" in err
    (tmp_path / "in").mkdir()
    organ = save_png(tmp_path / "in" / "b.png", np.full((20, 20), 200))
    assert predict.main(ck + ["--input", str(organ), "--output-dir", str(tmp_path / "o"), "--roles", "organ",
                              "--no-progress"]) == 0
    rep = json.loads((tmp_path / "o" / "b" / "report.json").read_text(encoding="utf-8"))
    assert rep["classes"][0]["role"] == "organ" and rep["summary"]["has_lesion_class"] is False
    assert predict.main(["--help"]) == 0
    assert "default: 0.5" in capsys.readouterr().out


def test_batch_continues_past_bad_inputs(ckpt, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    good = save_png(inp / "good.png", np.random.default_rng(0).integers(0, 255, (32, 32)))
    corrupt = inp / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    unsupported = inp / "notes.txt"
    unsupported.write_text("hello")
    hashes = {p: sha(p) for p in (good, corrupt, unsupported)}
    out = tmp_path / "out"
    code = predict.main(["--checkpoint", str(ckpt), "--input", str(good), str(corrupt), str(unsupported),
                         str(tmp_path / "missing.png"), "--output-dir", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    assert {p.name for p in (out / "good").iterdir()} == {"mask.png", "overlay.png", "report.json", "report.html"}
    assert not (out / "corrupt").exists() and not (out / "notes").exists()
    failed = captured.err.split("Failed (3):")[1]
    for name in ("corrupt.png", "notes.txt", "missing.png"):
        assert name in failed
    assert "Traceback" not in captured.err and "1 of 4 input(s) succeeded" in captured.out
    batch = json.loads((out / "batch_summary.json").read_text(encoding="utf-8"))
    assert len(batch["succeeded"]) == 1 and len(batch["failed"]) == 3
    assert all(sha(p) == h for p, h in hashes.items())
    # all good -> 0; folder input expands to its supported files only
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(good), "--output-dir", str(out),
                         "--no-progress", "--lang", "en"]) == 0


def test_never_writes_into_input_folder_unless_allowed(ckpt, tmp_path, capsys):
    inp = tmp_path / "scans"
    inp.mkdir()
    img = save_png(inp / "a.png", np.zeros((20, 20)))
    before, img_hash = sha(inp), sha(img)
    for out in (inp, inp / "results"):
        assert predict.main(["--checkpoint", str(ckpt), "--input", str(inp), "--output-dir", str(out),
                             "--no-progress"]) == 2
    assert "--allow-input-dir" in capsys.readouterr().err and sha(inp) == before
    assert sorted(p.name for p in inp.iterdir()) == ["a.png"]
    with pytest.raises(InputError, match="allow-input-dir"):
        diagnosis.predict_case(bundle(), img, inp / "results")
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(inp), "--output-dir", str(inp / "results"),
                         "--no-progress", "--allow-input-dir"]) == 0
    assert (inp / "results" / "a" / "mask.png").is_file()
    assert sorted(p.name for p in inp.iterdir()) == ["a.png", "results"] and sha(img) == img_hash


def test_expand_inputs_folders_series_and_names(tmp_path):
    root = tmp_path / "batch"
    root.mkdir()
    save_png(root / "a.png", np.zeros((20, 20)))
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "a.jpg")
    (root / "readme.txt").write_text("x")
    (root / ".hidden.png").write_bytes(b"")
    write_series(root / "SERIES", np.zeros((2, 8, 8), np.uint16))
    (root / "other").mkdir()
    (tmp_path / "empty").mkdir()
    cases, failures = predict.expand_inputs([root, root / "a.png", tmp_path / "empty", tmp_path / "nope.nii.gz"])
    assert [c.name for c in cases] == ["SERIES", "a.jpg", "a.png"]
    assert [Path(p).name for p, _ in failures] == ["empty", "nope.nii.gz"]
    assert predict.unique_case_names(cases) == ["SERIES", "a", "a-2"]
    series, _ = predict.expand_inputs([root / "SERIES"])
    assert series == [root / "SERIES"]
    assert diagnosis.case_stem("x/brain.nii.gz") == "brain" and diagnosis.case_stem("y/scan.dcm") == "scan"


# ------------------------------------------------------------------------------ agreement with training
def test_prediction_reproduces_training_dice(trained_model, tmp_path):
    cfg, summary = trained_model.config, trained_model.summary  # trained in fp32: exact agreement is expected
    assert 0.2 < summary["dice"] < 1.0  # a model that finds some lesions and misses some: a real comparison
    data = data_gen.generate_dataset(cfg.num_samples, cfg.image_size, cfg.seed, cfg.difficulty)
    test_idx = split_indices(len(data), cfg.val_fraction, cfg.test_fraction, cfg.seed)["test"]
    truth = data.labels("lesion")
    b = diagnosis.load_model(cfg.checkpoint, "cpu", "fp32")
    exact, from_png = [], []
    for i in test_idx:  # in memory: the exact float images training evaluated
        seg = diagnosis.segment(b, data.images[i] * 255.0, meta2d((32, 32), known=False),
                                Settings(fill_holes=False, keep_largest_organ=False))
        exact.append(per_case_scores(seg.labels[None], truth[i][None])["dice"][0])
    assert np.mean(exact) == pytest.approx(summary["dice"], abs=1e-6)
    (tmp_path / "png").mkdir()
    for i in test_idx[:3]:  # through 8-bit PNG files and the CLI path: quantisation allows a small tolerance
        src = save_png(tmp_path / "png" / f"t{i}.png", np.rint(data.images[i] * 255))
        res = diagnosis.predict_case(b, src, tmp_path / "pred", Settings(fill_holes=False, embed_font=False))
        from_png.append(per_case_scores(res.labels[None], truth[i][None])["dice"][0])
    assert np.mean(from_png) == pytest.approx(np.mean([exact[k] for k in range(3)]), abs=0.02)


# ------------------------------------------------------------------------------------------- real data
@needs_data
@pytest.mark.realdata
def test_real_kvasir_jpeg_and_hippocampus_nifti(tmp_path):
    jpg = min((DATA / "kvasir_seg" / "Kvasir-SEG" / "images").glob("*.jpg"))
    nii = DATA / "msd_hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    h_jpg, h_nii = sha(jpg), sha(nii)
    r1 = diagnosis.predict_case(bundle(normalization="unit", patch_size=64), jpg, tmp_path, NO_FONT)
    w, h = Image.open(jpg).size
    assert np.asarray(Image.open(r1.files["mask"])).shape == (h, w)
    r2 = diagnosis.predict_case(bundle(normalization="zscore", patch_size=32), nii, tmp_path, NO_FONT)
    np.testing.assert_allclose(nib.load(str(r2.files["mask"])).affine, nib.load(str(nii)).affine, atol=1e-6)
    assert sha(jpg) == h_jpg and sha(nii) == h_nii

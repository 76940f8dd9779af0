"""Tests for medio.py: small generated fixtures for every format, plus optional real-data checks."""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import medio
from errors import InputError
from scan_fixtures import ct_series, ct_slice, oblique_affine

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
_skip_no_data = pytest.mark.skipif(not DATA.exists(), reason=f"real data not found at {DATA}")


def needs_data(test):
    """Mark a test as using ../shared/data and skip it when the data is absent."""
    return pytest.mark.realdata(_skip_no_data(test))


# ----------------------------------------------------------------------------------------------- helpers
def sha(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(sha(p).encode() for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raises_input_error(fn, *names: str) -> str:
    """Call fn, expect one InputError with a one-line message that contains every name."""
    with pytest.raises(InputError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for name in names:
        assert name in msg, (name, msg)
    return msg


def save_nifti(path: Path, data_ijk: np.ndarray, affine: np.ndarray | None = None) -> Path:
    img = nib.Nifti1Image(data_ijk, oblique_affine() if affine is None else affine)
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=2)
    nib.save(img, str(path))
    return path


def zip_folders(zip_path: Path, folders: dict[str, Path]) -> Path:
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcdir, folder in folders.items():
            zf.writestr(arcdir + "/", b"")  # explicit directory entry, like the IRCAD zips
            for f in sorted(folder.iterdir()):
                zf.write(f, f"{arcdir}/{f.name}")
    return zip_path


# -------------------------------------------------------------------------------------------------- NIfTI
def test_nifti_roundtrip_anisotropic_affine(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # (i, j, k)
    src = save_nifti(tmp_path / "img.nii.gz", data)
    before = sha(src)

    arr, meta = medio.read_image(src)
    assert arr.shape == (6, 5, 4) and meta.shape == (6, 5, 4) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, data.transpose(2, 1, 0))
    assert meta.format == "nifti" and meta.spacing_known and meta.channels == 1
    np.testing.assert_allclose(meta.spacing, (2.5, 1.0, 0.8), rtol=1e-6)
    np.testing.assert_allclose(meta.affine, oblique_affine(), atol=1e-6)
    # LPS origin in array order: RAS (12.5, -30, 7.25) -> LPS (-12.5, 30, 7.25) -> (7.25, 30, -12.5)
    np.testing.assert_allclose(meta.origin, (7.25, 30.0, -12.5), atol=1e-5)
    assert medio.voxel_volume_ml(meta) == pytest.approx(2.5 * 1.0 * 0.8 / 1000)
    assert medio.pixel_area_mm2(meta) == pytest.approx(0.8)

    mask = (arr % 3).astype(np.uint8)
    out = medio.write_mask(mask, meta, tmp_path / "out" / "pred.nii.gz")
    back = nib.load(str(out))
    assert np.allclose(back.affine, nib.load(str(src)).affine)
    assert back.get_data_dtype() == np.uint8
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 2
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), mask.transpose(2, 1, 0))
    labels, mmeta = medio.read_mask(out, reference=meta)
    np.testing.assert_array_equal(labels, mask)
    assert mmeta.extra["labels"] == [0, 1, 2]
    assert sha(src) == before
    assert not [p for p in out.parent.iterdir() if p.name != "pred.nii.gz"]  # no temp files left


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_nifti_on_disk_dtypes_read_as_float32(tmp_path, dtype):
    data = np.random.default_rng(1).integers(0, 200, size=(3, 4, 5)).astype(dtype)
    arr, _ = medio.read_image(save_nifti(tmp_path / "x.nii", data))
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(arr, data.T.astype(np.float32))


def test_nifti_float64_labels_become_uint8(tmp_path):
    data = np.random.default_rng(2).integers(0, 3, size=(4, 4, 3)).astype(np.float64)
    labels, meta = medio.read_mask(save_nifti(tmp_path / "lab.nii.gz", data))
    assert labels.dtype == np.uint8 and meta.shape == (3, 4, 4)
    np.testing.assert_array_equal(labels, data.T)


def test_nifti_4d(tmp_path):
    arr, meta = medio.read_image(save_nifti(tmp_path / "single.nii.gz", np.ones((3, 4, 5, 1), np.float32)))
    assert arr.shape == (5, 4, 3)
    data = np.random.default_rng(0).random((3, 4, 5, 2)).astype(np.float32)
    path = save_nifti(tmp_path / "multi.nii.gz", data)  # MSD BrainTumour-style: channels on the last axis
    arr, meta = medio.read_image(path)
    assert arr.shape == (5, 4, 3, 2) and meta.shape == (5, 4, 3) and meta.channels == 2
    assert np.array_equal(arr[..., 1], data[..., 1].T)
    msg = raises_input_error(lambda: medio.read_mask(path), "multi.nii.gz")  # a mask is one volume
    assert "expected 2D or 3D" in msg
    series = save_nifti(tmp_path / "fmri.nii.gz", np.ones((3, 4, 5, 40), np.float32))  # a time series
    assert "at most 16 channels" in raises_input_error(lambda: medio.read_image(series), "fmri.nii.gz")


def test_nifti_2d_mask_written_as_nifti(tmp_path):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    src = save_nifti(tmp_path / "slice.nii.gz", data, np.diag([0.5, 0.7, 1, 1]))
    arr, meta = medio.read_image(src)
    assert arr.shape == (4, 3) and meta.spacing == pytest.approx((0.7, 0.5))
    assert medio.output_suffix(meta) == ".nii.gz"
    out = medio.write_mask(arr > 5, meta, tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(medio.read_mask(out)[0], arr > 5)


def test_nifti_nan_and_bad_labels_rejected(tmp_path):
    data = np.zeros((3, 3, 3), np.float32)
    data[1, 1, 1] = np.nan
    raises_input_error(lambda: medio.read_image(save_nifti(tmp_path / "nan.nii.gz", data)), "nan.nii.gz", "NaN")
    raises_input_error(lambda: medio.read_mask(tmp_path / "nan.nii.gz"), "nan.nii.gz")
    frac = np.full((3, 3, 3), 0.5, np.float32)
    raises_input_error(lambda: medio.read_mask(save_nifti(tmp_path / "frac.nii.gz", frac)), "frac.nii.gz", "0.5")
    neg = np.full((3, 3, 3), -1, np.int16)
    raises_input_error(lambda: medio.read_mask(save_nifti(tmp_path / "neg.nii.gz", neg)), "neg.nii.gz", "negative")
    big = np.arange(27, dtype=np.int16).reshape(3, 3, 3) * 20
    raises_input_error(lambda: medio.read_mask(save_nifti(tmp_path / "big.nii.gz", big)), "big.nii.gz", "520")


def test_write_probability_nifti(tmp_path):
    src = save_nifti(tmp_path / "img.nii.gz", np.zeros((4, 5, 6), np.float32))
    _, meta = medio.read_image(src)
    prob = np.linspace(0, 1, 120, dtype=np.float32).reshape(meta.shape)
    out = medio.write_probability(prob, meta, tmp_path / "prob.nii.gz")
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.float32 and np.allclose(back.affine, oblique_affine())
    np.testing.assert_allclose(np.asanyarray(back.dataobj).T, prob)
    raises_input_error(lambda: medio.write_probability(prob * 2, meta, tmp_path / "bad.nii.gz"), "bad.nii.gz")


def test_meta_to_dict_is_plain_and_round_trips(tmp_path):
    torch = pytest.importorskip("torch")
    _, meta = medio.read_image(save_nifti(tmp_path / "img.nii.gz", np.zeros((2, 3, 4), np.uint8)))
    d = meta.to_dict()
    assert json.loads(json.dumps(d)) == d
    buf = io.BytesIO()
    torch.save({"meta": d}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["meta"] == d
    again = medio.ImageMeta.from_dict(d)
    assert again == meta
    out = medio.write_mask(np.ones(meta.shape, np.uint8), again, tmp_path / "m.nii.gz")
    assert np.allclose(nib.load(str(out)).affine, oblique_affine())


# -------------------------------------------------------------------------------------------------- DICOM
CORONAL = (1, 0, 0, 0, 0, -1)


@pytest.mark.parametrize("iop", [(1, 0, 0, 0, 1, 0), CORONAL])
def test_dicom_series_sorted_hu_spacing_affine(tmp_path, iop):
    vol, uid, start = ct_series(tmp_path / "series", iop=iop)
    assert sorted(p.name for p in (tmp_path / "series").iterdir())[0] == "image_0"  # no extensions
    before = sha(tmp_path / "series")

    arr, meta = medio.read_image(tmp_path / "series")
    assert arr.shape == (5, 6, 7) and arr.dtype == np.float32 and meta.format == "dicom"
    np.testing.assert_array_equal(arr, vol.astype(np.float32) - 1024)  # sorted by position, HU
    assert meta.spacing == pytest.approx((2.5, 0.7, 0.6))
    assert meta.origin == pytest.approx(tuple(start[::-1]))
    assert meta.extra["series_uid"] == uid and meta.extra["rescale_intercept"] == -1024
    # affine: voxel (i=x, j=y, k=z) -> RAS; LPS = IPP + i*dx*row + j*dy*col + k*dz*normal
    affine = np.asarray(meta.affine)
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    for i, j, k in [(0, 0, 0), (6, 5, 4), (3, 2, 1)]:
        lps = start + i * 0.6 * row + j * 0.7 * col + k * 2.5 * np.cross(row, col)
        np.testing.assert_allclose(affine @ [i, j, k, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-6)
    assert medio.voxel_volume_ml(meta) == pytest.approx(2.5 * 0.7 * 0.6 / 1000)

    out = medio.write_mask((arr > 0).astype(np.uint8), meta, tmp_path / "mask.nii.gz")
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj).transpose(2, 1, 0), arr > 0)
    assert sha(tmp_path / "series") == before


def test_dicom_mask_written_as_nifti_matches_simpleitk_geometry(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    _, _, start = ct_series(tmp_path / "series", iop=CORONAL)
    arr, meta = medio.read_image(tmp_path / "series")
    img = sitk.ReadImage(str(medio.write_mask(np.zeros(meta.shape, np.uint8), meta, tmp_path / "m.nii.gz")))
    np.testing.assert_allclose(img.GetOrigin(), start, atol=1e-4)  # ITK reports LPS = IPP of first slice
    np.testing.assert_allclose(img.GetSpacing(), meta.spacing[::-1], atol=1e-5)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3))[::-1, ::-1], meta.direction, atol=1e-5)


def test_dicom_zip_read_in_memory_equals_folder(tmp_path):
    ct_series(tmp_path / "series")
    arr, meta = medio.read_image(tmp_path / "series")
    archive = zip_folders(tmp_path / "series.zip", {"PATIENT_DICOM": tmp_path / "series"})
    listing = sorted(p.name for p in tmp_path.iterdir())
    zarr, zmeta = medio.read_image(archive)
    np.testing.assert_array_equal(zarr, arr)
    assert zmeta.spacing == meta.spacing and zmeta.affine == meta.affine
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # nothing extracted


def test_dicom_zip_with_several_folders_needs_series(tmp_path):
    liver = (np.arange(4 * 6 * 7).reshape(4, 6, 7) % 2 * 255).astype(np.uint8)
    ct_series(tmp_path / "liver", n=4, values=liver, bits=8)
    ct_series(tmp_path / "spleen", n=4, values=np.zeros_like(liver), bits=8)
    archive = zip_folders(tmp_path / "MASKS_DICOM.zip", {"MASKS_DICOM/liver": tmp_path / "liver",
                                                         "MASKS_DICOM/spleen": tmp_path / "spleen"})
    msg = raises_input_error(lambda: medio.read_mask(archive), "MASKS_DICOM.zip", "MASKS_DICOM/liver", "series")
    assert "MASKS_DICOM/spleen" in msg
    for series in ("liver", "MASKS_DICOM/liver", "MASKS_DICOM/liver/"):
        labels, _ = medio.read_mask(archive, series=series)
        np.testing.assert_array_equal(labels, liver // 255)  # {0, 255} -> {0, 1}
    assert medio.read_mask(archive, series="spleen")[0].sum() == 0
    raises_input_error(lambda: medio.read_mask(archive, series="kidney"), "MASKS_DICOM.zip", "kidney")


def test_dicom_two_series_in_one_folder(tmp_path):
    folder = tmp_path / "mixed"
    big, big_uid, _ = ct_series(folder, n=5, prefix="a", seed=1, description="big")
    small, small_uid, _ = ct_series(folder, n=3, prefix="b", seed=2, description="small")
    arr, meta = medio.read_image(folder)
    assert arr.shape == (5, 6, 7) and meta.extra["series_uid"] == big_uid
    for series in (small_uid, "small"):
        arr, meta = medio.read_image(folder, series=series)
        np.testing.assert_array_equal(arr, small.astype(np.float32) - 1024)
        assert meta.extra["series_uid"] == small_uid
    raises_input_error(lambda: medio.read_image(folder, series="nope"), "mixed", "nope")


def test_dicom_single_file_is_2d(tmp_path):
    vol, _, start = ct_series(tmp_path / "s", n=1)
    arr, meta = medio.read_image(tmp_path / "s" / "image_0")
    assert arr.shape == (6, 7) and meta.shape == (6, 7) and meta.format == "dicom"
    np.testing.assert_array_equal(arr, vol[0].astype(np.float32) - 1024)
    assert meta.spacing == pytest.approx((0.7, 0.6)) and meta.spacing_known and meta.affine is None
    assert medio.pixel_area_mm2(meta) == pytest.approx(0.42) and medio.voxel_volume_ml(meta) is None
    assert medio.output_suffix(meta) == ".png"
    # the same file with a .dcm name, and a one-slice folder (always 3D)
    (tmp_path / "one.dcm").write_bytes((tmp_path / "s" / "image_0").read_bytes())
    assert medio.read_image(tmp_path / "one.dcm")[0].shape == (6, 7)
    assert medio.read_image(tmp_path / "s")[0].shape == (1, 6, 7)
    assert medio.detect_format(tmp_path / "s" / "image_0") == "dicom"
    assert medio.is_dicom_file(tmp_path / "s" / "image_0") and not medio.is_dicom_file(tmp_path / "nothing")


def test_dicom_inconsistent_slices_rejected(tmp_path):
    _, uid, _ = ct_series(tmp_path / "bad", n=3)
    ct_slice(tmp_path / "bad" / "odd", np.zeros((8, 8), np.uint16), position=(0, 0, 50), uid=uid, instance=9)
    raises_input_error(lambda: medio.read_image(tmp_path / "bad"), "bad", "different sizes")
    ct_series(tmp_path / "dup", n=2, gap=0.0)
    raises_input_error(lambda: medio.read_image(tmp_path / "dup"), "dup", "share a position")
    ct_series(tmp_path / "cut", n=3, shape=(32, 32))
    raw = (tmp_path / "cut" / "image_1").read_bytes()
    (tmp_path / "cut" / "image_1").write_bytes(raw[: len(raw) - 700])  # truncated pixel data
    raises_input_error(lambda: medio.read_image(tmp_path / "cut"), "image_1")


# ------------------------------------------------------------------------------------------- 2D rasters
def test_png_grayscale_and_rgb_variants(tmp_path):
    gray = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    Image.fromarray(gray).save(tmp_path / "g.png")
    arr, meta = medio.read_image(tmp_path / "g.png")
    assert arr.shape == (20, 30) and arr.dtype == np.float32 and arr.max() == gray.max()  # not rescaled
    assert meta.format == "png" and not meta.spacing_known and meta.spacing == (1.0, 1.0)
    assert medio.pixel_area_mm2(meta) is None and medio.voxel_volume_ml(meta) is None
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "grey_rgb.png")
    assert medio.read_image(tmp_path / "grey_rgb.png")[0].shape == (20, 30)
    rgba = np.dstack([gray, gray // 2, 255 - gray, np.full_like(gray, 7)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    arr, meta = medio.read_image(tmp_path / "rgba.png")
    assert arr.shape == (20, 30, 3) and meta.channels == 3 and meta.shape == (20, 30)
    np.testing.assert_array_equal(arr, rgba[..., :3])
    Image.fromarray(gray).save(tmp_path / "g.bmp")
    arr, meta = medio.read_image(tmp_path / "g.bmp")
    assert meta.format == "bmp" and np.array_equal(arr, gray)


def test_rgb_jpeg_and_tiff(tmp_path):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 30
    Image.fromarray(rgb).save(tmp_path / "c.JPG", quality=95)
    arr, meta = medio.read_image(tmp_path / "c.JPG")
    assert arr.shape == (16, 24, 3) and meta.format == "jpeg" and np.abs(arr - rgb).max() < 8
    Image.fromarray(rgb).save(tmp_path / "c.tif")
    arr, meta = medio.read_image(tmp_path / "c.tif")
    assert meta.format == "tiff" and np.array_equal(arr, rgb)


def test_multipage_tiff_is_a_volume(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    stack = np.random.default_rng(3).integers(0, 3, size=(4, 9, 10)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "stack.tiff", stack, photometric="minisblack")
    arr, meta = medio.read_image(tmp_path / "stack.tiff")
    assert arr.shape == (4, 9, 10) and not meta.spacing_known
    labels, _ = medio.read_mask(tmp_path / "stack.tiff")
    np.testing.assert_array_equal(labels, stack)
    out = medio.write_mask(labels, meta, tmp_path / "stack_mask.nii.gz")  # 3D -> NIfTI
    np.testing.assert_array_equal(medio.read_mask(out)[0], stack)


def test_palette_gif_mask_uses_indices(tmp_path):
    idx = np.zeros((12, 14), np.uint8)
    idx[3:8, 2:9] = 1
    im = Image.fromarray(idx, "P")
    im.putpalette([4, 2, 4, 252, 254, 252] + [0] * 762)  # like DRIVE's 2nd_manual
    im.save(tmp_path / "manual2.gif")
    labels, meta = medio.read_mask(tmp_path / "manual2.gif")
    assert meta.format == "gif" and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, idx)


def test_binary_png_mask_and_16bit_masks(tmp_path):
    m = np.zeros((10, 11), np.uint8)
    m[2:5, 3:9] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    np.testing.assert_array_equal(medio.read_mask(tmp_path / "m.png")[0], m // 255)
    Image.fromarray((m // 255 * 2).astype(np.uint16)).save(tmp_path / "lab16.png")
    assert set(np.unique(medio.read_mask(tmp_path / "lab16.png")[0])) == {0, 2}
    Image.fromarray((m // 255).astype(np.uint16) * 65535).save(tmp_path / "bin16.png")
    np.testing.assert_array_equal(medio.read_mask(tmp_path / "bin16.png")[0], m // 255)
    Image.fromarray(np.stack([m, m, m // 2], -1)).save(tmp_path / "colour.png")
    raises_input_error(lambda: medio.read_mask(tmp_path / "colour.png"), "colour.png", "colour channels")


def test_noisy_jpeg_mask_is_thresholded(tmp_path):
    yy, xx = np.mgrid[:64, :64]
    truth = ((yy - 30) ** 2 + (xx - 34) ** 2 < 300).astype(np.uint8)
    Image.fromarray(np.stack([truth * 255] * 3, -1)).save(tmp_path / "mask.jpg", quality=60)
    labels, _ = medio.read_mask(tmp_path / "mask.jpg")
    assert set(np.unique(labels)) == {0, 1}
    assert (labels != truth).mean() < 0.01


def test_2d_write_mask_and_probability(tmp_path):
    src = tmp_path / "img.png"
    Image.fromarray(np.full((8, 9, 3), (10, 20, 30), np.uint8)).save(src)
    before = sha(src)
    _, meta = medio.read_image(src)
    binary = np.zeros(meta.shape, bool)
    binary[2:6, 1:4] = True
    out = medio.write_mask(binary, meta, tmp_path / "pred" / "img_mask.png")
    assert set(np.unique(np.asarray(Image.open(out)))) == {0, 255}  # visible on disk
    np.testing.assert_array_equal(medio.read_mask(out, reference=meta)[0], binary)
    multi = binary.astype(np.uint8) * 2
    multi[0, 0] = 1
    out = medio.write_mask(multi, meta, tmp_path / "multi.png")
    np.testing.assert_array_equal(medio.read_mask(out)[0], multi)
    prob = np.linspace(0, 1, 72).reshape(meta.shape)
    out = medio.write_probability(prob, meta, tmp_path / "prob.png")
    stored = np.asarray(Image.open(out))
    assert stored.dtype == np.uint8 and stored.min() == 0 and stored.max() == 255
    assert sha(src) == before
    raises_input_error(lambda: medio.write_mask(binary, meta, tmp_path / "x.nii.gz"), "x.nii.gz", ".png")
    raises_input_error(lambda: medio.write_mask(binary[:4], meta, tmp_path / "x.png"), "x.png", "shape")
    raises_input_error(lambda: medio.write_mask(binary.astype(int) * 300, meta, tmp_path / "x.png"), "x.png", "300")


# ------------------------------------------------------------------------------------------ NRRD / MHA
@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_simpleitk_formats_spacing_order(tmp_path, suffix):
    sitk = pytest.importorskip("SimpleITK")
    data = np.random.default_rng(4).integers(0, 3, size=(3, 4, 5)).astype(np.int16)  # (Z, Y, X)
    img = sitk.GetImageFromArray(data)
    img.SetSpacing((0.5, 0.7, 2.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection([c, -s, 0, s, c, 0, 0, 0, 1])
    src = tmp_path / f"vol{suffix}"
    sitk.WriteImage(img, str(src))
    before = sha(src)

    arr, meta = medio.read_image(src)
    np.testing.assert_array_equal(arr, data)
    assert meta.format == {".nrrd": "nrrd", ".mha": "mha"}[suffix]
    assert meta.spacing == pytest.approx((2.0, 0.7, 0.5)) and meta.origin == pytest.approx((3.0, 2.0, 1.0))
    labels, _ = medio.read_mask(src, reference=meta)
    np.testing.assert_array_equal(labels, data)

    back = sitk.ReadImage(str(medio.write_mask(labels, meta, tmp_path / "m.nii.gz")))
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), data)
    assert sha(src) == before


# ------------------------------------------------------------------------------------------------ errors
def test_unknown_missing_and_empty(tmp_path):
    (tmp_path / "notes.xyz").write_text("hello")
    msg = raises_input_error(lambda: medio.read_image(tmp_path / "notes.xyz"), "notes.xyz", "'.xyz'")
    assert ".nii.gz" in msg
    raises_input_error(lambda: medio.read_image(tmp_path / "missing.nii.gz"), "missing.nii.gz", "no such")
    raises_input_error(lambda: medio.read_mask(tmp_path / "missing.png"), "missing.png")
    (tmp_path / "empty").mkdir()
    raises_input_error(lambda: medio.read_image(tmp_path / "empty"), "empty", "empty")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("not dicom")
    raises_input_error(lambda: medio.read_image(tmp_path / "docs"), "docs", "no DICOM")
    raises_input_error(lambda: medio.detect_format(tmp_path / "notes.xyz"), "notes.xyz")


def test_truncated_nifti(tmp_path):
    data = np.random.default_rng(5).random((20, 20, 20)).astype(np.float32)
    path = save_nifti(tmp_path / "trunc.nii.gz", data)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    raises_input_error(lambda: medio.read_image(path), "trunc.nii.gz")
    raises_input_error(lambda: medio.read_mask(path), "trunc.nii.gz")
    path.write_bytes(b"")
    raises_input_error(lambda: medio.read_image(path), "trunc.nii.gz")


@pytest.mark.parametrize("name", ["junk.dcm", "junk.png", "junk.jpg", "junk.gif", "junk.tif", "junk.bmp",
                                  "junk.nii", "junk.nrrd", "junk.mha", "junk.zip"])
def test_garbage_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(6).bytes(300))
    raises_input_error(lambda: medio.read_image(path), name)
    raises_input_error(lambda: medio.read_mask(path), name)


def test_truncated_png_and_zip(tmp_path):
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (64, 64), np.uint8)).save(tmp_path / "t.png")
    raw = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(raw[: len(raw) // 2])
    raises_input_error(lambda: medio.read_image(tmp_path / "t.png"), "t.png")
    (tmp_path / "notes.zip").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "notes.zip", "w") as zf:
        zf.writestr("a/readme.txt", "no dicom here")
    raises_input_error(lambda: medio.read_image(tmp_path / "notes.zip"), "notes.zip", "no DICOM")


def test_series_only_for_dicom(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    raises_input_error(lambda: medio.read_image(tmp_path / "a.png", series="liver"), "a.png", "series")


def test_check_pair_mismatch(tmp_path):
    img = save_nifti(tmp_path / "imagesTr_x.nii.gz", np.zeros((35, 51, 36), np.float32))
    lab = save_nifti(tmp_path / "labelsTr_x.nii.gz", np.zeros((35, 51, 35), np.uint8))
    _, imeta = medio.read_image(img)
    msg = raises_input_error(lambda: medio.read_mask(lab, reference=imeta), "labelsTr_x.nii.gz",
                             "imagesTr_x.nii.gz", "(35, 51, 35)", "(36, 51, 35)")
    assert msg.startswith("mask ")
    _, lmeta = medio.read_mask(lab)
    raises_input_error(lambda: medio.check_pair(imeta, lmeta), "labelsTr_x.nii.gz", "imagesTr_x.nii.gz")
    other = save_nifti(tmp_path / "fine.nii.gz", np.zeros((35, 51, 36), np.uint8), np.diag([1, 1, 1, 1.0]))
    _, ometa = medio.read_mask(other)
    raises_input_error(lambda: medio.check_pair(imeta, ometa), "fine.nii.gz", "spacing")
    ometa.spacing_known = False
    medio.check_pair(imeta, ometa)  # unknown spacing is not compared


def test_check_pair_compares_direction_and_origin(tmp_path):
    """Same shape and spacing, but a mirrored axis or a shifted origin: the labels would not lie on the image."""
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    data = np.zeros((6, 7, 5), np.float32)
    _, imeta = medio.read_image(save_nifti(tmp_path / "img.nii.gz", data, affine))
    mirrored = affine.copy()
    mirrored[0, 0], mirrored[0, 3] = -0.8, 4.0
    shifted = affine.copy()
    shifted[:3, 3] = [0.0, 1.5, 0.0]
    nearly = affine.copy()
    nearly[:3, 3] = [0.001, 0.0, 0.0]  # a rounding difference, not a shift
    for name, aff, words in (("mirrored", mirrored, ("direction", "mirrored")), ("shifted", shifted, ("origin",))):
        path = save_nifti(tmp_path / f"{name}.nii.gz", data.astype(np.uint8), aff)
        raises_input_error(lambda: medio.read_mask(path, reference=imeta), f"{name}.nii.gz", "img.nii.gz", *words)
    medio.read_mask(save_nifti(tmp_path / "nearly.nii.gz", data.astype(np.uint8), nearly), reference=imeta)


def test_write_refuses_to_overwrite_input(tmp_path):
    src = save_nifti(tmp_path / "case.nii.gz", np.zeros((3, 4, 5), np.uint8))
    before = sha(src)
    labels, meta = medio.read_mask(src)
    raises_input_error(lambda: medio.write_mask(labels, meta, src), "case.nii.gz", "overwrite")
    raises_input_error(lambda: medio.write_mask(labels, meta, tmp_path / "." / "case.nii.gz"), "overwrite")
    raises_input_error(lambda: medio.write_probability(labels * 0.5, meta, src), "overwrite")
    raises_input_error(lambda: medio.write_mask(labels, meta, tmp_path / "case.png"), "case.png", ".nii.gz")
    assert sha(src) == before


def test_supported_suffixes_and_detect(tmp_path):
    assert {".nii", ".nii.gz", ".dcm", ".zip", ".png", ".jpg", ".tif", ".gif", ".bmp", ".nrrd",
            ".mha"} <= set(medio.SUPPORTED_SUFFIXES)
    path = save_nifti(tmp_path / "UPPER.NII.GZ", np.zeros((2, 2, 2), np.uint8))
    assert medio.detect_format(path) == "nifti"
    assert medio.read_image(path)[0].shape == (2, 2, 2)


# ------------------------------------------------------------------------------------- real data (optional)
@needs_data
def test_real_hippocampus():
    image, imeta = medio.read_image(DATA / "msd_hippocampus/imagesTr/hippocampus_190.nii.gz")
    labels, lmeta = medio.read_mask(DATA / "msd_hippocampus/labelsTr/hippocampus_190.nii.gz", reference=imeta)
    assert image.dtype == np.float32 and image.shape == labels.shape == (35, 52, 37)
    assert set(np.unique(labels)) == {0, 1, 2} and imeta.spacing == (1.0, 1.0, 1.0)


@needs_data
def test_real_drive():
    root = DATA / "drive/DRIVE/test"
    image, meta = medio.read_image(root / "images/01_test.tif")
    assert image.shape == (584, 565, 3) and meta.channels == 3
    for rel in ("1st_manual/01_manual1.gif", "2nd_manual/01_manual2.gif", "mask/01_test_mask.gif"):
        labels, _ = medio.read_mask(root / rel, reference=meta)
        assert set(np.unique(labels)) == {0, 1}, rel
    vessels = medio.read_mask(root / "1st_manual/01_manual1.gif")[0].mean()
    assert 0.05 < vessels < 0.15


@needs_data
def test_real_kvasir():
    root = DATA / "kvasir_seg/Kvasir-SEG"
    name = sorted(p.name for p in (root / "images").glob("*.jpg"))[0]
    image, meta = medio.read_image(root / "images" / name)
    labels, _ = medio.read_mask(root / "masks" / name, reference=meta)
    assert image.ndim == 3 and set(np.unique(labels)) == {0, 1}


@needs_data
def test_real_ircadb_series_and_liver_mask():
    root = DATA / "ircadb01_patient1/3Dircadb1.1"
    ct, meta = medio.read_image(root / "PATIENT_DICOM")
    assert ct.shape == (129, 512, 512) and meta.format == "dicom"
    assert meta.spacing == pytest.approx((1.6, 0.57, 0.57), rel=1e-3)
    assert ct.min() >= -1024 and ct.max() <= 1023
    liver, lmeta = medio.read_mask(root / "MASKS_DICOM.zip", series="liver", reference=meta)
    assert int(liver.sum()) == 2_865_131 and set(np.unique(liver)) == {0, 1}
    assert int((liver.sum(axis=(1, 2)) > 0).sum()) == 98
    ml = liver.sum() * medio.voxel_volume_ml(lmeta)
    assert ml == pytest.approx(2_865_131 * 1.6 * 0.57 * 0.57 / 1000, rel=1e-4)

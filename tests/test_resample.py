"""resample: nnU-Net-style resampling (volumes kept, classes kept, separate slice axis), target spacing rule,
non-zero crop round trip, and the speed of a CT-sized resample."""
from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

import resample as R


def ellipsoid(spacing, radii, extent=48.0, center=(23.3, 24.1, 22.7)) -> np.ndarray:
    """uint8 mask of an ellipsoid (radii in mm) sampled at voxel centres on a grid of ``spacing`` mm."""
    shape = [round(extent / s) for s in spacing]
    grid = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
    return (sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1).astype(np.uint8)


def smooth_image(shape, seed=0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(shape)
    img = ndi.gaussian_filter(noise, 3)
    return ((img - img.min()) / np.ptp(img))[None].astype(np.float32)


# ---------------------------------------------------------------------------------------------- geometry
def test_needs_separate_z_and_new_shape():
    assert R.needs_separate_z((1.0, 1.0, 1.0)) is None
    assert R.needs_separate_z((3.0, 1.0, 1.0)) is None  # exactly 3x is not "more than"
    assert R.needs_separate_z((3.1, 1.0, 1.0)) == 0
    assert R.needs_separate_z((0.8, 5.0, 0.8)) == 1
    assert R.needs_separate_z((0.25, 1.25, 1.25)) is None  # two coarse axes: no single slice axis
    assert R.separate_axis((1.0, 1.0, 1.0), (5.0, 1.0, 1.0)) == 0  # the target decides when the source is isotropic
    assert R.new_shape((10, 100, 101), (3.0, 0.8, 0.8), (1.0, 1.0, 1.0)) == (30, 80, 81)
    assert R.new_shape((1, 2, 3), (1.0, 1.0, 1.0), (10.0, 10.0, 10.0)) == (1, 1, 1)


def test_target_spacing_median_and_anisotropic_rule():
    iso = [(1.0, 0.9, 0.9), (1.2, 1.0, 1.0), (0.8, 0.8, 0.8), (1.1, 1.1, 1.1)]
    assert R.target_spacing(iso) == pytest.approx((1.05, 0.95, 0.95))
    # thick slices, few of them: the slice axis takes the 10th percentile (5 mm), the others the median
    aniso = [(10.0, 1.5, 1.5)] * 6 + [(5.0, 1.4, 1.4)] * 4
    few_slices = [(12, 256, 256)] * 10
    assert R.target_spacing(aniso, few_slices) == pytest.approx((5.0, 1.5, 1.5))
    assert R.target_spacing(aniso) == pytest.approx((5.0, 1.5, 1.5))  # without shapes: spacing rule alone
    # anisotropic spacing but as many slices as in-plane voxels: the median stays
    assert R.target_spacing(aniso, [(300, 256, 256)] * 10) == pytest.approx((10.0, 1.5, 1.5))
    # the 10th percentile would be finer than the in-plane spacing: clamped just above it
    mixed = [(6.0, 1.0, 1.0)] * 8 + [(0.5, 1.0, 1.0)] * 2
    assert R.target_spacing(mixed, [(20, 256, 256)] * 10)[0] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError):
        R.target_spacing([])


# ---------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("spacing,target", [
    ((3.0, 0.8, 0.8), (1.0, 1.0, 1.0)),   # 3.75x anisotropic: slice axis nearest
    ((2.0, 0.8, 0.8), (1.0, 1.0, 1.0)),   # linear on all axes
    ((5.0, 0.9, 0.9), (2.0, 0.7, 0.7)),   # 5 mm slices
], ids=["3mm", "2mm-no-separate-z", "5mm"])
@pytest.mark.parametrize("radii", [(12.0, 12.0, 12.0), (18.0, 13.0, 10.0)], ids=["sphere", "ellipsoid"])
def test_label_volume_kept_there_and_back(spacing, target, radii):
    """Voxel count x voxel volume within 2 % after resampling and after the way back. (Objects only a few voxels
    across, or spanning few thick slices, move more: linear-then-argmax and nearest slices are approximations.)"""
    mask = ellipsoid(spacing, radii)
    v0 = mask.sum() * np.prod(spacing)
    there = R.resample_labels(mask, spacing, target)
    assert there.dtype == np.uint8 and there.shape == R.new_shape(mask.shape, spacing, target)
    back = R.resample_labels(there, target, spacing, out_shape=mask.shape)
    assert back.shape == mask.shape
    assert there.sum() * np.prod(target) == pytest.approx(v0, rel=0.02)
    assert back.sum() * np.prod(spacing) == pytest.approx(v0, rel=0.02)
    assert (back == mask).mean() > 0.98


def test_nested_classes_kept():
    spacing, target = (3.0, 0.8, 0.8), (1.0, 1.0, 1.0)
    outer, inner = ellipsoid(spacing, (16.0, 14.0, 12.0)), ellipsoid(spacing, (8.0, 7.0, 6.0))
    labels = outer + inner  # 0 outside, 1 in the shell, 2 in the core
    out = R.resample_labels(labels, spacing, target)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 1, 2}
    for c in (1, 2):
        assert (out >= c).sum() * np.prod(target) == pytest.approx((labels >= c).sum() * np.prod(spacing), rel=0.03)
    core = np.argwhere(out == 2)
    assert ndi.binary_erosion(out >= 1)[tuple(core.T)].all()  # the core stays inside the shell
    assert np.array_equal(R.resample_labels(labels, spacing, spacing), labels)
    assert np.array_equal(R.resample_labels(np.full((4, 5, 6), 3, np.uint8), spacing, target),
                          np.full(R.new_shape((4, 5, 6), spacing, target), 3))


# ---------------------------------------------------------------------------------------------- images
def test_resample_image_identity_returns_input():
    img = smooth_image((8, 9, 10))
    assert R.resample_image(img, (1.0, 2.0, 3.0), (1.0, 2.0, 3.0)) is img
    assert R.resample_image(img, (1.0, 1.0, 1.0), (1.01, 1.0, 1.0)) is img  # same shape after rounding


def test_resample_image_matches_scipy_zoom():
    """Separable float32 passes = one 3D scipy zoom (spline, edges extended, voxel centres aligned)."""
    img = np.random.default_rng(1).random((2, 11, 17, 13)).astype(np.float32)
    for order in (1, 3):
        out = R.resample_image(img, (1.0, 1.0, 1.0), (0.7, 1.3, 0.9), order=order)
        for c in range(2):
            ref = ndi.zoom(img[c].astype(np.float64), np.divide(out.shape[1:], img.shape[1:]), order=order,
                           mode="nearest", grid_mode=True)
            assert out.dtype == np.float32 and np.abs(out[c] - ref).max() < 1e-5


def test_resample_image_separate_z_copies_slices():
    """Along a much coarser axis slices are copied (nearest), never blended into each other."""
    img = np.random.default_rng(2).random((1, 8, 20, 20)).astype(np.float32)
    out = R.resample_image(img, (5.0, 1.0, 1.0), (2.0, 0.8, 0.8))
    assert out.shape == (1, 20, 25, 25)
    in_plane = R.resample_image(img, (5.0, 1.0, 1.0), (5.0, 0.8, 0.8))[0]
    for s in out[0]:
        assert any(np.array_equal(s, t) for t in in_plane)
    assert len({int(np.argmin([np.abs(s - t).max() for t in in_plane])) for s in out[0]}) == 8


@pytest.mark.parametrize("spacing,target", [((2.0, 0.8, 0.8), (1.0, 1.0, 1.0)), ((5.0, 0.9, 0.9), (1.5, 1.2, 1.2)),
                                            ((1.0, 1.0, 1.0), (1.3, 1.6, 0.7))])
def test_resample_image_keeps_mean(spacing, target):
    img = smooth_image((24, 40, 36))
    out = R.resample_image(img, spacing, target)
    assert out.mean() == pytest.approx(img.mean(), rel=0.01)


def test_resample_image_ct_size_is_fast():
    img = np.random.default_rng(0).random((1, 200, 512, 512), dtype=np.float32)
    t = time.perf_counter()
    out = R.resample_image(img, (2.5, 0.7, 0.7), (2.5, 1.05, 1.05))
    elapsed = time.perf_counter() - t
    print(f"512x512x200 float32 -> {out.shape[1:]}: {elapsed:.2f} s")
    assert out.shape == (1, 200, 341, 341) and out.dtype == np.float32
    assert elapsed < 30


# ---------------------------------------------------------------------------------------------- probabilities
def test_resample_probabilities_linear_path_matches_scipy_and_sums_to_one():
    rng = np.random.default_rng(3)
    p = rng.random((3, 10, 14, 12)).astype(np.float32)
    p /= p.sum(0, keepdims=True)
    shape = (13, 9, 20)
    out = R.resample_probabilities(p, shape)
    assert out.shape == (3, *shape) and out.dtype == np.float32
    ref = ndi.zoom(p[1].astype(np.float64), np.divide(shape, p.shape[1:]), order=1, mode="nearest", grid_mode=True)
    assert np.abs(out[1] - ref).max() < 1e-5
    assert np.allclose(out.sum(0), 1, atol=1e-5)
    # the same from a torch tensor; no separate axis for nearly isotropic spacings
    assert np.allclose(R.resample_probabilities(torch.from_numpy(p), shape, (1.0, 1.0, 1.0), (1.2, 1.1, 1.0)), out)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_resample_probabilities_separate_axis_copies_slices(axis):
    rng = np.random.default_rng(4)
    p = rng.random((2, 6, 7, 8)).astype(np.float32)
    p /= p.sum(0, keepdims=True)
    shape = [15, 11, 13]
    shape[axis] = (6, 7, 8)[axis] * 2 + 1
    out = R.resample_probabilities(p, tuple(shape), axis=axis)
    assert out.shape == (2, *shape) and np.allclose(out.sum(0), 1, atol=1e-5)
    # every output slice along the axis is an in-plane (linear) resample of one input slice
    plane = [shape[a] for a in range(3) if a != axis]
    slices = [np.take(p, i, axis=1 + axis) for i in range(p.shape[1 + axis])]
    resized = [torch.nn.functional.interpolate(torch.from_numpy(s)[None], size=plane, mode="bilinear",
                                               align_corners=False)[0].numpy() for s in slices]
    for j in range(shape[axis]):
        o = np.take(out, j, axis=1 + axis)
        assert min(np.abs(o - r).max() for r in resized) < 1e-5
    # the spacing pair picks the same axis
    spacing = [1.0, 1.0, 1.0]
    spacing[axis] = 5.0
    out_spacing = [s * n / m for s, n, m in zip(spacing, p.shape[1:], shape)]
    assert np.allclose(R.resample_probabilities(p, tuple(shape), tuple(spacing), tuple(out_spacing)), out)


def test_resample_probabilities_argument_checks():
    p = np.ones((2, 4, 4, 4), np.float32) / 2
    with pytest.raises(ValueError, match="both"):
        R.resample_probabilities(p, (4, 8, 8), (3.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        R.resample_probabilities(p[0], (4, 8, 8))
    same = R.resample_probabilities(p, (4, 4, 4))
    assert np.array_equal(same, p)


def test_probabilities_back_to_labels_round_trip():
    """Labels at the network's spacing as one-hot probabilities, resampled back, agree with the original labels."""
    spacing, net = (4.0, 0.9, 0.9), (1.5, 1.0, 1.0)
    labels = ellipsoid(spacing, (16.0, 12.0, 10.0)) + ellipsoid(spacing, (8.0, 6.0, 5.0))
    at_net = R.resample_labels(labels, spacing, net)
    onehot = np.stack([at_net == c for c in range(3)]).astype(np.float32)
    back = R.resample_probabilities(onehot, labels.shape, net, spacing).argmax(0)
    assert (back == labels).mean() > 0.98


# ---------------------------------------------------------------------------------------------- cropping
def test_nonzero_bbox_crop_uncrop_round_trip():
    img = np.zeros((2, 20, 30, 25), np.float32)
    img[0, 3:9, 5:20, 4:10] = 1.0
    img[1, 12, 7, 21] = -2.0  # another channel extends the box
    bbox = R.nonzero_bbox(img)
    assert bbox == (slice(3, 13), slice(5, 20), slice(4, 22))
    crop = R.crop_to_bbox(img, bbox)
    assert crop.shape == (2, 10, 15, 18)
    assert np.array_equal(R.uncrop(crop, bbox, img.shape[1:]), img)
    labels = np.zeros(img.shape[1:], np.uint8)
    labels[15, 25, 2] = 1  # an annotation outside the non-zero region is kept inside the crop
    box2 = R.nonzero_bbox(img, labels)
    assert box2 == (slice(3, 16), slice(5, 26), slice(2, 22))
    assert np.array_equal(R.uncrop(R.crop_to_bbox(labels, box2), box2, labels.shape), labels)
    # probabilities: background 1 outside the box
    probs = np.zeros((2, *crop.shape[1:]), np.float32)
    full = R.uncrop(probs, bbox, img.shape[1:], fill=(1.0, 0.0))
    assert full.shape == (2, 20, 30, 25) and full[0, 0, 0, 0] == 1 and full[1, 0, 0, 0] == 0
    assert not full[:, 3:13, 5:20, 4:22].any()
    # all zero: the whole volume
    assert R.nonzero_bbox(np.zeros((1, 4, 5, 6))) == (slice(0, 4), slice(0, 5), slice(0, 6))


def test_nonzero_mask_fills_holes_like_scipy():
    rng = np.random.default_rng(5)
    for _ in range(5):
        img = (rng.random((1, 12, 14, 13)) > 0.45).astype(np.float32)
        img[0, 4:8, 4:8, 4:8] = 1
        img[0, 5:7, 5:7, 5:7] = 0  # an enclosed hole
        mask = R.nonzero_mask(img)
        assert np.array_equal(mask, ndi.binary_fill_holes(img[0] != 0))
        assert mask[5, 5, 5]

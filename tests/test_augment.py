"""augment.Augmenter: the 2D path reproduces the 2D-only implementation draw for draw; the 3D path keeps labels
integer, is seeded, flips and rotates image and labels together, changes only intensities of the image, and is
fast on one thread."""
from __future__ import annotations

import itertools
import time

import pytest
import torch

from augment import Augmenter

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------ 2D
def _batch_2d(seed: int, n: int = 4, c: int = 1, h: int = 24, w: int = 20, classes: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g) * 3 - 1
    y = (x[:, 0] * classes / 3 + 0.5).clamp(0, classes - 1).to(torch.uint8)
    return x, y


CONFIGS_2D = [
    {},
    {"elastic": 0.05},
    {"p_spatial": 1.0, "rotate_deg": 30.0, "scale": (0.8, 1.2)},
    {"rotate_deg": 0, "scale": (1.0, 1.0)},
    {"intensity": 0.0},
    {"flip": False, "p_spatial": 0.0},
]


#: (config index, seed, channels) -> per consecutive batch (sum of the images, sum of their squares, sum of the
#: labels), recorded from the 2D-only implementation before 3D support: a changed draw order changes them
EXPECTED_2D = {
    (0, 0, 1): [(731.8871, 1153.3146, 1182), (876.9695, 1850.4285, 1221)],
    (0, 0, 3): [(886.3971, 1916.1869, 519), (702.3048, 1636.3971, 457)],
    (0, 7, 1): [(914.8906, 1703.5742, 1235), (822.3484, 1154.4134, 1227)],
    (0, 7, 3): [(998.745, 1656.0449, 524), (1207.1389, 1819.6482, 554)],
    (1, 0, 1): [(712.0866, 1012.348, 1206), (736.9772, 1168.0428, 1196)],
    (1, 0, 3): [(877.6264, 1890.8953, 496), (1247.387, 1832.7764, 547)],
    (1, 7, 1): [(856.8042, 1600.2188, 1214), (783.3127, 1229.2717, 1216)],
    (1, 7, 3): [(804.1296, 1647.6943, 509), (1016.4945, 1442.295, 528)],
    (2, 0, 1): [(564.8148, 1265.1283, 1113), (585.5449, 1237.0458, 1108)],
    (2, 0, 3): [(255.6462, 1736.04, 432), (223.6176, 1768.7525, 396)],
    (2, 7, 1): [(553.3855, 1286.4513, 1076), (688.1931, 1163.8993, 1154)],
    (2, 7, 3): [(696.3125, 1629.9542, 479), (1132.2836, 1478.1708, 553)],
    (3, 0, 1): [(949.958, 1803.9699, 1287), (1005.5709, 1810.744, 1287)],
    (3, 0, 3): [(1129.0421, 2419.1444, 554), (1145.3106, 2573.7233, 554)],
    (3, 7, 1): [(979.5078, 1869.6107, 1296), (920.4025, 2037.0479, 1296)],
    (3, 7, 3): [(1233.9888, 2758.159, 569), (1319.5193, 2782.7834, 569)],
    (4, 0, 1): [(730.7523, 1092.8975, 1182), (822.4582, 1322.4315, 1230)],
    (4, 0, 3): [(943.8956, 1851.3764, 519), (1125.2848, 2151.1315, 527)],
    (4, 7, 1): [(864.1614, 1577.3357, 1235), (795.7849, 1563.7387, 1203)],
    (4, 7, 3): [(944.2246, 1654.4093, 524), (1102.8035, 2076.337, 531)],
    (5, 0, 1): [(941.2525, 1982.3353, 1287), (1027.0135, 2021.9842, 1287)],
    (5, 0, 3): [(1335.2526, 2534.2261, 554), (1359.5171, 2411.9022, 554)],
    (5, 7, 1): [(1042.4955, 1957.9663, 1296), (1051.3051, 2033.5245, 1296)],
    (5, 7, 3): [(1274.0001, 2551.7637, 569), (1266.2636, 2452.2371, 569)],
}


@pytest.mark.parametrize("index", range(len(CONFIGS_2D)), ids=lambda i: ",".join(CONFIGS_2D[i]) or "default")
def test_2d_outputs_equal_the_2d_only_implementation(index):
    for seed in (0, 7):
        for shape in ((4, 1, 24, 20), (3, 3, 17, 17)):
            x, y = _batch_2d(seed, *shape, classes=3)
            aug = Augmenter(seed=seed, **CONFIGS_2D[index])
            for want in EXPECTED_2D[(index, seed, shape[1])]:  # consecutive batches continue the same random stream
                a, b = aug(x, y)
                got = (float(a.double().sum()), float((a.double() ** 2).sum()), int(b.int().sum()))
                assert got[:2] == pytest.approx(want[:2], rel=1e-5) and got[2] == want[2] and b.dtype == y.dtype
            aug.reseed(seed)
            assert torch.equal(aug(x, y)[1], Augmenter(seed=seed, **CONFIGS_2D[index])(x, y)[1])


def test_2d_inputs_not_modified_and_gamma_off_by_default():
    x, y = _batch_2d(0)
    x0, y0 = x.clone(), y.clone()
    Augmenter(seed=0, elastic=0.05)(x, y)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert Augmenter().gamma is None
    # opt-in gamma works on 2D batches too (drawn after the brightness/contrast jitter)
    a, b = Augmenter(seed=0, gamma=(0.7, 1.5), p_gamma=1.0)(x, y)
    ra, rb = Augmenter(seed=0)(x, y)
    assert torch.equal(b, rb) and not torch.allclose(a, ra)


# ------------------------------------------------------------------------------------------------------ 3D
def _batch_3d(seed: int = 0, n: int = 2, shape=(20, 28, 24)):
    """A smooth image with a labelled blob (class 1) containing a smaller one (class 2)."""
    g = torch.Generator().manual_seed(seed)
    d, h, w = shape
    zz, yy, xx = torch.meshgrid(*(torch.linspace(-1, 1, k) for k in shape), indexing="ij")
    r = torch.sqrt((zz / 0.6) ** 2 + (yy / 0.5) ** 2 + (xx / 0.4) ** 2)
    y = ((r < 1).to(torch.uint8) + (r < 0.5).to(torch.uint8))[None].repeat(n, 1, 1, 1)
    x = (y.float() + 0.1 * torch.randn(n, d, h, w, generator=g))[:, None]
    return x, y


def test_3d_shapes_dtypes_and_integer_labels():
    x, y = _batch_3d()
    x0, y0 = x.clone(), y.clone()
    a, b = Augmenter(seed=3, p_spatial=1.0)(x, y)
    assert a.shape == x.shape and b.shape == y.shape and a.dtype == torch.float32 and b.dtype == torch.uint8
    assert set(b.unique().tolist()) <= {0, 1, 2} and set(b.unique().tolist()) >= {0, 1, 2}
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs untouched
    assert not torch.equal(a, x)


def test_3d_seeded_and_reseed_restarts():
    x, y = _batch_3d()
    aug1, aug2 = Augmenter(seed=5, gamma=(0.7, 1.5), p_gamma=0.5), Augmenter(seed=5, gamma=(0.7, 1.5), p_gamma=0.5)
    first = aug1(x, y)
    assert all(torch.equal(p, q) for p, q in zip(first, aug2(x, y)))
    second = aug1(x, y)
    assert not torch.equal(first[0], second[0])  # the stream moves on
    aug1.reseed(5)
    assert all(torch.equal(p, q) for p, q in zip(first, aug1(x, y)))
    other = Augmenter(seed=6, gamma=(0.7, 1.5), p_gamma=0.5)(x, y)
    assert not torch.equal(first[0], other[0])


def test_3d_flips_are_flips():
    """p_spatial=0, no intensity: every item is one of the 8 flips of the input, the same for image and labels,
    and over a batch several different combinations occur."""
    x, y = _batch_3d(n=16)
    x[:, :, 0, 0, 0] += 5  # a marker: the blob alone is symmetric under some flips
    aug = Augmenter(seed=0, p_spatial=0.0, intensity=0.0)
    a, b = aug(x, y)
    seen = set()
    for i in range(len(x)):
        combos = [c for k in range(4) for c in itertools.combinations((0, 1, 2), k)
                  if torch.equal(a[i], x[i].flip([d + 1 for d in c]))]
        assert len(combos) == 1, f"item {i} is not a flip of its input"
        assert torch.equal(b[i], y[i].flip(list(combos[0])))
        seen.add(combos[0])
    assert len(seen) >= 4


def test_3d_identity_when_nothing_is_drawn():
    x, y = _batch_3d()
    a, b = Augmenter(flip=False, p_spatial=1.0, rotate_deg=0.0, scale=(1.0, 1.0), intensity=0.0)(x, y)
    assert torch.allclose(a, x, atol=1e-5) and torch.equal(b, y)


@pytest.mark.parametrize("in_plane_only", [False, True])
def test_3d_rotation_and_scale_keep_foreground_roughly(in_plane_only):
    x, y = _batch_3d(n=6, shape=(24, 32, 28))
    aug = Augmenter(seed=1, flip=False, p_spatial=1.0, rotate_deg=20.0, scale=(0.85, 1.15), intensity=0.0,
                    in_plane_only=in_plane_only)
    a, b = aug(x, y)
    moved = 0
    for i in range(len(x)):
        for c in (1, 2):
            ratio = (b[i] >= c).sum().item() / (y[i] >= c).sum().item()
            assert 0.5 < ratio < 2.0, (i, c, ratio)
        # the image moves with the labels: the labelled region is where the image is bright
        assert a[i][0][b[i] == 2].mean() > a[i][0][b[i] == 0].mean() + 1.0
        moved += not torch.equal(b[i], y[i])
        assert not torch.allclose(a[i], x[i], atol=1e-3)  # every item is transformed (p_spatial=1)
    assert moved >= len(x) // 2  # a 1-degree turn may leave the nearest-neighbour labels as they were
    if in_plane_only:  # rotation about the slice axis and in-plane zoom: the slice extent of the blob is kept
        for i in range(len(x)):
            assert torch.equal(b[i].flatten(1).any(1), y[i].flatten(1).any(1))


def test_3d_rotation_of_a_non_cubic_patch_is_rigid():
    """A rotation in voxel units (not in affine_grid's normalised coordinates): a ball stays a ball on a patch
    whose axes have different lengths."""
    d, h, w = 24, 48, 32
    zz, yy, xx = torch.meshgrid(torch.arange(d) - (d - 1) / 2, torch.arange(h) - (h - 1) / 2,
                                torch.arange(w) - (w - 1) / 2, indexing="ij")
    y = ((zz ** 2 + yy ** 2 + xx ** 2) <= 9.0 ** 2).to(torch.uint8)[None].repeat(4, 1, 1, 1)
    x = y[:, None].float()
    _, b = Augmenter(seed=2, flip=False, p_spatial=1.0, rotate_deg=40.0, scale=(1.0, 1.0), intensity=0.0)(x, y)

    def extents(m: torch.Tensor) -> list[int]:
        return [int(m.flatten(1).any(1).sum()) for m in (m, m.transpose(0, 1), m.transpose(0, 2))]

    for i in range(4):
        assert not torch.equal(b[i], y[i])
        assert abs(b[i].sum().item() / y[i].sum().item() - 1) < 0.03
        # a ball stays a ball: same extent along every axis (a rotation in normalised coordinates would shear
        # it into an ellipsoid on this 24 x 48 x 32 patch)
        assert all(abs(e - 19) <= 1 for e in extents(b[i])), extents(b[i])


def test_3d_intensity_changes_only_the_image():
    x, y = _batch_3d(n=4)
    a, b = Augmenter(seed=0, flip=False, p_spatial=0.0, intensity=0.2, gamma=(0.7, 1.5), p_gamma=1.0)(x, y)
    assert torch.equal(b, y) and not torch.equal(a, x)
    # per item an increasing map of intensities: the order of voxel values is kept
    for i in range(len(x)):
        order = x[i].flatten().argsort()
        assert (a[i].flatten()[order].diff() >= -1e-5).all()


def test_gamma_keeps_mean_and_std():
    x, y = _batch_3d(n=3)
    aug = Augmenter(seed=0, flip=False, p_spatial=0.0, intensity=0.0, gamma=(0.5, 0.6), p_gamma=1.0)
    a, _ = aug(x, y)
    dims = (1, 2, 3, 4)
    assert not torch.allclose(a, x, atol=1e-3)
    assert torch.allclose(a.mean(dims), x.mean(dims), atol=1e-4) and torch.allclose(a.std(dims), x.std(dims), atol=1e-4)


def test_3d_refuses_elastic_and_bad_shapes():
    x, y = _batch_3d()
    with pytest.raises(ValueError, match="2D-only"):
        Augmenter(elastic=0.05)(x, y)
    with pytest.raises(ValueError):
        Augmenter()(x, y[:, 0])
    with pytest.raises(ValueError):
        Augmenter()(x, y[:, :, :-1])


def test_3d_speed_one_thread():
    x = torch.randn(2, 1, 40, 56, 40)
    y = (x[:, 0] > 1).to(torch.uint8)
    aug = Augmenter(seed=0, p_spatial=1.0, gamma=(0.7, 1.5), p_gamma=1.0)
    aug(x, y)  # warm-up
    times = []
    for _ in range(5):
        t = time.perf_counter()
        aug(x, y)
        times.append(time.perf_counter() - t)
    print(f"3D augmentation, 2 x 1 x 40x56x40, one thread: {min(times) * 1000:.1f} ms")
    assert min(times) < 0.1

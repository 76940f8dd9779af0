"""augment.Augmenter: the 2D path reproduces the 2D-only implementation draw for draw; the 3D path keeps labels
integer, is seeded, flips and rotates image and labels together, changes only intensities of the image, and is
fast on one thread."""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from augment import Augmenter

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ frozen 2D reference (do not edit)
@dataclass
class FrozenAugmenter2D:
    """augment.Augmenter as of commit a5c082b (2D only), verbatim: the reference the 2D path must reproduce."""

    seed: int = 0
    flip: bool = True
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    intensity: float = 0.1
    elastic: float = 0.0  # displacement amplitude as a fraction of the image size; 0 = off
    p_spatial: float = 0.7

    def __post_init__(self) -> None:
        self.gen = torch.Generator().manual_seed(self.seed)

    def reseed(self, seed: int) -> None:
        """Restart the random stream (the training loop does this every epoch, so resuming is exact)."""
        self.gen.manual_seed(seed)

    def _u(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=self.gen) * (hi - lo) + lo

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = images.shape
        x, y = images.float(), labels
        if self.flip:
            fh = torch.rand(n, generator=self.gen) < 0.5
            fv = torch.rand(n, generator=self.gen) < 0.5
            x = torch.where(fh[:, None, None, None], x.flip(-1), x)
            y = torch.where(fh[:, None, None], y.flip(-1), y)
            x = torch.where(fv[:, None, None, None], x.flip(-2), x)
            y = torch.where(fv[:, None, None], y.flip(-2), y)
        spatial = torch.rand(n, generator=self.gen) < self.p_spatial
        if spatial.any() and (self.rotate_deg or self.scale != (1.0, 1.0) or self.elastic):
            angle = self._u(n, -self.rotate_deg, self.rotate_deg) * math.pi / 180 * spatial
            s = torch.where(spatial, self._u(n, *self.scale), torch.ones(n))
            cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
            theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
            grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
            if self.elastic:
                coarse = torch.randn(n, 2, 4, 4, generator=self.gen) * self.elastic * spatial[:, None, None, None]
                grid = grid + F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
            fill = x.amin(dim=(1, 2, 3), keepdim=True)
            x = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
            y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0].to(labels.dtype)
        if self.intensity:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            contrast = self._u(n, 1 - self.intensity, 1 + self.intensity).view(n, 1, 1, 1)
            std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
            shift = self._u(n, -self.intensity, self.intensity).view(n, 1, 1, 1) * std
            x = (x - mean) * contrast + mean + shift
        return x.contiguous(), y.contiguous()


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


@pytest.mark.parametrize("config", CONFIGS_2D, ids=lambda c: ",".join(c) or "default")
def test_2d_outputs_identical_to_the_2d_only_implementation(config):
    for seed in (0, 1, 7, 1234):
        for shape in ((4, 1, 24, 20), (3, 3, 17, 17)):
            x, y = _batch_2d(seed, *shape, classes=3)
            new, old = Augmenter(seed=seed, **config), FrozenAugmenter2D(seed=seed, **config)
            for _ in range(2):  # consecutive batches continue the same random stream
                a, b = new(x, y)
                ra, rb = old(x, y)
                assert torch.equal(a, ra) and torch.equal(b, rb) and a.dtype == ra.dtype and b.dtype == rb.dtype
            new.reseed(99), old.reseed(99)
            assert all(torch.equal(p, q) for p, q in zip(new(x, y), old(x, y)))


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

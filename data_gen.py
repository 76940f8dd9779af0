"""Synthetic CT-like images: an ellipse "organ" with an irregular "lesion" inside it.

Two presets:

* ``seed``      - the original post's generator (noisy background, rotated ellipse organ, lesion =
  union of 6 jittered circles clipped to the organ, brighter lesion, vertical brightness gradient).
  A global intensity threshold solves it (lesions are always much brighter than everything else).
* ``realistic`` - the same anatomy made hard the way real scans are: lesion contrast that overlaps the
  organ (hypo- or hyper-dense, small delta), partial-volume blur, heavier noise, a smooth
  multiplicative bias field, some images without a lesion and some with several small lesions.

Every sample ``i`` of a dataset is drawn from its own ``numpy.random.Generator`` spawned from
``SeedSequence(seed)``, so sample ``i`` depends only on ``(seed, i, size, difficulty)``: the global
NumPy RNG is never touched and growing ``num_samples`` keeps the earlier samples unchanged.
All pixel work is vectorised (no per-pixel Python loops). :func:`synthetic_volume` grows a ``seed`` sample into
a coherent 3D volume (the demo page's bundled volume example).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

DIFFICULTIES = ("seed", "realistic")

#: A lesion smaller than this fraction of the image area triggers the compact-blob fallback.
#: 0.0025 reproduces the post's "fewer than 10 pixels" at 64x64 and scales with image size.
MIN_LESION_FRACTION = 0.0025


@dataclass
class SyntheticData:
    """A stack of synthetic samples.

    images:  (N, H, W) float32 in [0, 1]
    lesions: (N, H, W) uint8 {0, 1}  - the segmentation target
    organs:  (N, H, W) uint8 {0, 1}  - the organ (for the organ + lesion multi-class mode)
    """

    images: np.ndarray
    lesions: np.ndarray
    organs: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def labels(self, mode: str = "lesion") -> np.ndarray:
        """Label map for training: ``lesion`` -> {0,1}; ``organ+lesion`` -> 0 bg, 1 organ, 2 lesion."""
        if mode == "lesion":
            return self.lesions
        if mode == "organ+lesion":
            return np.where(self.lesions > 0, 2, self.organs).astype(np.uint8)
        raise ValueError(f"unknown label mode {mode!r} (expected 'lesion' or 'organ+lesion')")


def min_lesion_pixels(h: int, w: int) -> int:
    """Smallest acceptable lesion, in pixels, for an ``h`` x ``w`` image (10 px at 64x64)."""
    return max(4, int(round(MIN_LESION_FRACTION * h * w)))


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.ogrid[:h, :w]
    return y.astype(np.float32), x.astype(np.float32)


def random_ellipse(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Rotated filled ellipse (the organ). Returns (bool mask, (cy, cx), (semi-axis x, semi-axis y))."""
    cy, cx = int(rng.integers(h // 4, 3 * h // 4)), int(rng.integers(w // 4, 3 * w // 4))
    ax, ay = int(rng.integers(h // 8, h // 4)), int(rng.integers(w // 8, w // 4))
    angle = rng.uniform(0, np.pi)
    y, x = _grid(h, w)
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    x_rot = cos_a * (x - cx) + sin_a * (y - cy)
    y_rot = -sin_a * (x - cx) + cos_a * (y - cy)
    return (x_rot / ax) ** 2 + (y_rot / ay) ** 2 <= 1.0, (cy, cx), (ax, ay)


def circles_union(h: int, w: int, cy: np.ndarray, cx: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Union of discs with centres (cy, cx) and radii r (1-D arrays), in one broadcast."""
    y, x = _grid(h, w)
    inside = (x[None] - cx[:, None, None]) ** 2 + (y[None] - cy[:, None, None]) ** 2 <= (r[:, None, None] ** 2)
    return inside.any(axis=0)


def random_irregular(rng: np.random.Generator, h: int, w: int, num_overlap: int = 6,
                     centre: tuple[int, int] | None = None, scale: float = 1.0) -> np.ndarray:
    """The post's lesion: ``num_overlap`` jittered circles around a centre (bool mask)."""
    if centre is None:
        centre = (int(rng.integers(h // 3, 2 * h // 3)), int(rng.integers(w // 3, 2 * w // 3)))
    jy, jx = max(1, int(h // 10 * scale)), max(1, int(w // 10 * scale))
    cy = centre[0] + rng.integers(-jy, jy, size=num_overlap)
    cx = centre[1] + rng.integers(-jx, jx, size=num_overlap)
    r_lo, r_hi = max(1, int(h // 18 * scale)), max(2, int(h // 10 * scale))
    r = rng.integers(r_lo, max(r_lo + 1, r_hi), size=num_overlap)
    return circles_union(h, w, cy.astype(np.float32), cx.astype(np.float32), r.astype(np.float32))


def compact_blob(rng: np.random.Generator, organ: np.ndarray, centre: tuple[int, int],
                 axes: tuple[int, int], min_pixels: int) -> np.ndarray:
    """Fallback lesion: a disc at the organ centre, large enough and clipped to the organ.

    The post fell back to a 15 % random speckle of organ pixels, which is not a lesion at all.
    The organ centre lies at least ``min(axes)`` pixels from the organ boundary, so a disc of
    radius ``0.6 * min(axes)`` stays (almost) entirely inside the organ and is one compact blob.
    """
    h, w = organ.shape
    r_min = np.sqrt(min_pixels / np.pi) + 1.0
    r_max = max(r_min, 0.6 * min(axes))
    r = rng.uniform(r_min, r_max)
    disc = circles_union(h, w, np.array([centre[0]], np.float32), np.array([centre[1]], np.float32),
                         np.array([r], np.float32))
    return disc & organ


def _smooth_field(rng: np.random.Generator, h: int, w: int, strength: float) -> np.ndarray:
    """Low-frequency multiplicative bias field, 1 +/- ``strength``, from a random 2nd-order polynomial."""
    y, x = _grid(h, w)
    y, x = 2 * y / max(h - 1, 1) - 1, 2 * x / max(w - 1, 1) - 1
    c = rng.normal(0, 1, 5)
    field = c[0] * x + c[1] * y + c[2] * x * y + c[3] * x ** 2 + c[4] * y ** 2
    field = field / (np.abs(field).max() + 1e-6)
    return (1.0 + strength * field).astype(np.float32)


def generate_sample(rng: np.random.Generator, h: int, w: int | None = None,
                    difficulty: str = "seed") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic image. Returns (image float32 in [0,1], lesion uint8, organ uint8)."""
    w = h if w is None else w
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r} (expected one of {DIFFICULTIES})")
    realistic = difficulty == "realistic"
    image = rng.normal(0.08, 0.03, (h, w)).astype(np.float32)
    organ, centre, axes = random_ellipse(rng, h, w)
    organ_intensity = rng.uniform(0.3, 0.5)
    image[organ] = organ_intensity + rng.normal(0, 0.03, int(organ.sum())).astype(np.float32)
    min_px = min_lesion_pixels(h, w)

    if not realistic:
        lesion = random_irregular(rng, h, w) & organ
        if lesion.sum() < min_px:
            lesion = compact_blob(rng, organ, centre, axes, min_px)
        image[lesion] = rng.uniform(0.7, 0.9) + rng.normal(0, 0.02, int(lesion.sum())).astype(np.float32)
        image = image + np.linspace(0, 0.06, h, dtype=np.float32)[:, None]
        return np.clip(image, 0, 1), lesion.astype(np.uint8), organ.astype(np.uint8)

    # realistic: 15 % no lesion, 25 % several small lesions, otherwise one irregular lesion
    u = rng.random()
    n_lesions = 0 if u < 0.15 else (int(rng.integers(2, 5)) if u < 0.40 else 1)
    lesion = np.zeros((h, w), bool)
    organ_idx = np.flatnonzero(organ)
    for k in range(n_lesions):
        if n_lesions == 1:
            blob = random_irregular(rng, h, w) & organ
        else:  # small lesions scattered over the organ
            c = np.unravel_index(organ_idx[rng.integers(len(organ_idx))], (h, w))
            blob = random_irregular(rng, h, w, num_overlap=3, centre=(int(c[0]), int(c[1])), scale=0.45) & organ
        if blob.sum() < min_px:
            blob = compact_blob(rng, organ, centre, axes, min_px) if k == 0 else np.zeros_like(blob)
        lesion |= blob
    # lesion contrast overlapping the organ: hypo- or hyper-dense by a small, random amount
    delta = rng.choice([-1.0, 1.0]) * rng.uniform(0.10, 0.25)
    image[lesion] = organ_intensity + delta + rng.normal(0, 0.03, int(lesion.sum())).astype(np.float32)
    image = ndimage.gaussian_filter(image, sigma=rng.uniform(0.5, 1.0) * h / 64)  # partial volume
    image = image * _smooth_field(rng, h, w, strength=rng.uniform(0.1, 0.3))
    image = image + rng.normal(0, rng.uniform(0.03, 0.06), (h, w)).astype(np.float32)
    image = image + np.linspace(0, 0.06, h, dtype=np.float32)[:, None]
    return np.clip(image, 0, 1).astype(np.float32), lesion.astype(np.uint8), organ.astype(np.uint8)


def generate_dataset(num_samples: int, image_size: int = 64, seed: int = 42,
                     difficulty: str = "seed") -> SyntheticData:
    """``num_samples`` images of ``image_size`` x ``image_size``; deterministic per ``seed``."""
    if num_samples < 1 or image_size < 16:
        raise ValueError(f"need num_samples >= 1 and image_size >= 16, got {num_samples} and {image_size}")
    children = np.random.SeedSequence(seed).spawn(num_samples)
    samples = [generate_sample(np.random.default_rng(s), image_size, image_size, difficulty) for s in children]
    images, lesions, organs = (np.stack(a) for a in zip(*samples))
    return SyntheticData(images.astype(np.float32), lesions, organs)


def _scaled_mask(mask: np.ndarray, factor: float, centre: tuple[float, float]) -> np.ndarray:
    """``mask`` shrunk by ``factor`` about ``centre`` (nearest neighbour)."""
    if factor < 0.08:
        return np.zeros_like(mask, bool)
    c = np.asarray(centre, float)
    out = ndimage.affine_transform(mask.astype(np.float32), np.eye(2) / factor, offset=c - c / factor, order=1)
    return out > 0.5


def synthetic_volume(size: int, seed: int, n_slices: int = 16, slice_mm: float = 1.5,
                     pixel_mm: float = 0.8) -> np.ndarray:
    """A coherent synthetic volume (Z, Y, X) in [0, 1]: the ``seed`` preset's organ grown into an ellipsoid-like
    body that shrinks towards both ends, with its bright lesion as a roughly round blob in the middle slices
    (intensities and noise as in the ``seed`` preset). The demo page bundles one as its volume example."""
    rng = np.random.default_rng(seed)
    _, lesion, organ = generate_sample(rng, size, size, "seed")
    organ_c = tuple(np.argwhere(organ).mean(0))
    lesion_c = tuple(np.argwhere(lesion).mean(0)) if lesion.any() else organ_c
    lesion_half = max(1.5, math.sqrt(lesion.sum() / math.pi) * pixel_mm / slice_mm)  # in slices: about round
    organ_level, lesion_level = rng.uniform(0.3, 0.5), rng.uniform(0.7, 0.9)
    zc = (n_slices - 1) / 2
    vol = np.empty((n_slices, size, size), np.float32)
    for z in range(n_slices):
        t_org, t_les = (z - zc) / (zc + 1.0), (z - zc) / lesion_half
        org = _scaled_mask(organ, math.sqrt(max(0.0, 1 - t_org * t_org)), organ_c)
        les = _scaled_mask(lesion, math.sqrt(max(0.0, 1 - t_les * t_les)), lesion_c) & org
        sl = rng.normal(0.08, 0.03, (size, size)).astype(np.float32)
        sl[org] = organ_level + rng.normal(0, 0.03, int(org.sum()))
        sl[les] = lesion_level + rng.normal(0, 0.02, int(les.sum()))
        vol[z] = sl + np.linspace(0, 0.06, size, dtype=np.float32)[:, None]
    return np.clip(vol, 0, 1)


def two_channel_case(rng: np.random.Generator, shape: tuple[int, int, int],
                     spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), parts: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A two-channel volume ((Z, Y, X, 2) float32) whose lesion only the two channels together show.

    Each channel holds one bright ellipsoid (its own "sequence" sees its own structure) on noise; the lesion
    (label 1) is where the two overlap, so neither channel alone can place it. Sizes are in mm, so the same
    anatomy comes out on any ``spacing`` (e.g. 5 mm slices). ``parts``: label 1 = first ellipsoid only,
    2 = the overlap, 3 = second only (nested regions for region-based training: ``1+2+3`` contains ``2``).
    """
    z, y, x = (np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing))
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    extent = np.array([n * s for n, s in zip(shape, spacing)], np.float32)
    centre = extent / 2 + rng.uniform(-0.1, 0.1, 3) * extent
    radius = extent * rng.uniform(0.22, 0.3, 3)
    shift = rng.normal(size=3)
    shift *= 0.6 * radius / np.linalg.norm(shift)  # the two ellipsoids overlap over a good part of their volume

    def ellipsoid(c: np.ndarray) -> np.ndarray:
        return ((zz - c[0]) / radius[0]) ** 2 + ((yy - c[1]) / radius[1]) ** 2 + ((xx - c[2]) / radius[2]) ** 2 <= 1

    a, b = ellipsoid(centre - shift / 2), ellipsoid(centre + shift / 2)
    image = rng.normal(0.1, 0.05, (*shape, 2)).astype(np.float32)
    image[..., 0][a] += rng.uniform(0.6, 0.9)
    image[..., 1][b] += rng.uniform(0.6, 0.9)
    if parts:
        return image, (a & ~b) * np.uint8(1) + (a & b) * np.uint8(2) + (b & ~a) * np.uint8(3)
    return image, (a & b).astype(np.uint8)


def write_two_channel_dataset(root, n_cases: int, shape: tuple[int, int, int] = (20, 20, 20),
                              spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), seed: int = 0,
                              parts: bool = False) -> None:
    """nnU-Net's raw layout of :func:`two_channel_case` volumes: ``imagesTr/case_NNN_0000.nii.gz`` (channel A),
    ``case_NNN_0001.nii.gz`` (channel B), ``labelsTr/case_NNN.nii.gz`` and a ``dataset.json`` naming both."""
    import json
    from pathlib import Path

    import nibabel as nib

    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing[::-1], 1.0])  # NIfTI (i, j, k) = (x, y, z)
    for i, s in enumerate(np.random.SeedSequence(seed).spawn(n_cases)):
        image, labels = two_channel_case(np.random.default_rng(s), shape, spacing, parts)
        for c in range(2):
            nib.save(nib.Nifti1Image(np.ascontiguousarray(image[..., c].T), affine), str(root / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz"))
        nib.save(nib.Nifti1Image(np.ascontiguousarray(labels.T), affine), str(root / "labelsTr" / f"case_{i:03d}.nii.gz"))
    doc = {"name": "two-channel synthetic", "channel_names": {"0": "A", "1": "B"},
           "labels": {"background": 0, "a_only": 1, "overlap": 2, "b_only": 3} if parts else {"background": 0, "lesion": 1},
           "numTraining": n_cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")

"""The network configuration derived from the data: target spacing, 3D patch size and pooling per level.

Rules (nnU-Net's, scaled to a laptop CPU; see docs/plan.md):

* target spacing: :func:`resample.target_spacing` (the median spacing; the 10th percentile on an axis that is
  much coarser than the others);
* patch: the median case shape at the target spacing, shrunk (largest axis first) until it fits a voxel budget
  a CPU trains in reasonable time, then rounded up to what the pooling needs;
* pooling: each of the four levels halves an axis only while its spacing is at most twice the finest one and
  the feature map stays at least 4 voxels long; otherwise that axis keeps its size on that level.
"""
from __future__ import annotations

import math

import numpy as np

#: voxels of one 3D training patch: 48^3 ~ 110k; a CPU trains a base-32 3D U-Net at a few patches per second
PATCH_VOXELS_3D = 48 ** 3
LEVELS = 4
MIN_FEATURE_MAP = 4


def pooling(patch: list[int], spacing: list[float]) -> list[list[int]]:
    """Pooling factors (1 or 2 per axis) of the four levels for ``patch`` voxels at ``spacing`` mm."""
    size, sp = list(map(float, patch)), list(map(float, spacing))
    levels = []
    for _ in range(LEVELS):
        finest = min(sp)
        f = [2 if s <= 2 * finest and n / 2 >= MIN_FEATURE_MAP else 1 for s, n in zip(sp, size)]
        levels.append(f)
        size = [n / k for n, k in zip(size, f)]
        sp = [s * k for s, k in zip(sp, f)]
    return levels


def fit_patch(patch: list[int], pools: list[list[int]]) -> list[int]:
    """``patch`` rounded up on each axis to a multiple of that axis's total pooling factor."""
    total = [math.prod(level[a] for level in pools) for a in range(len(patch))]
    return [int(math.ceil(n / t) * t) for n, t in zip(patch, total)]


def patch_3d(median_shape: list[int], spacing: list[float], budget: int = PATCH_VOXELS_3D) -> tuple[list[int], list[list[int]]]:
    """The 3D patch and pooling for cases of ``median_shape`` voxels at the target ``spacing``.

    Starts from the median shape (a patch that covers the typical case) and shrinks its physically largest axis
    by 10 % at a time until it fits ``budget`` voxels, then rounds up to the pooling's multiples.
    """
    patch = [max(8, int(n)) for n in median_shape]
    while math.prod(patch) > budget:
        mm = [n * s for n, s in zip(patch, spacing)]
        a = int(np.argmax(mm))
        patch[a] = max(8, int(patch[a] * 0.9))
        if all(n == 8 for n in patch):
            break
    pools = pooling(patch, spacing)
    return fit_patch(patch, pools), pools

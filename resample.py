"""Resampling and cropping of 3D volumes as nnU-Net does them, fast enough for a 2-core CPU.

Conventions: a volume is ``(Z, Y, X)``; a network input is ``(C, Z, Y, X)`` float32; labels are ``(Z, Y, X)``
uint8 class indices; spacings are in mm in array axis order ``(dz, dy, dx)``.

* Images: spline interpolation of ``order`` (3 by default), edges extended (``mode="nearest"``), voxel centres
  aligned (the physical extent is kept, as ``skimage.transform.resize`` does).
* Labels: one-hot, each class linearly interpolated, then the class with the largest value per voxel.
* Probabilities: linear.
* When one axis is much coarser than the others (:func:`separate_axis`), that axis is resampled with nearest
  neighbour instead, so thick slices are copied, not blended into each other (nnU-Net's "separate z").

Resampling is separable, so it is done one axis at a time. A spline pass along an axis is one matrix product
with the exact linear map ``scipy.ndimage.zoom`` applies along that axis (obtained by zooming the identity), in
float32: the same values as a 3D ``scipy.ndimage.zoom`` (to ~1e-6) at a fraction of the time and without its
float64 copy of the volume. Linear passes use ``torch.nn.functional.interpolate``.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

#: an axis whose spacing is more than this many times the finest one is resampled separately (nearest)
ANISOTROPY_THRESHOLD = 3.0


# ------------------------------------------------------------------------------------------ geometry rules
def needs_separate_z(spacing: Sequence[float]) -> int | None:
    """The axis whose spacing is more than ``ANISOTROPY_THRESHOLD`` times the finest one, else None.

    None too when two axes share the coarsest spacing (e.g. (0.25, 1.25, 1.25)): there is no single slice axis.
    """
    sp = np.asarray(spacing, dtype=float)
    if sp.max() <= ANISOTROPY_THRESHOLD * sp.min():
        return None
    coarsest = np.flatnonzero(sp == sp.max())
    return int(coarsest[0]) if len(coarsest) == 1 else None


def separate_axis(spacing: Sequence[float], target_spacing: Sequence[float]) -> int | None:
    """The axis resampled with nearest neighbour when going from ``spacing`` to ``target_spacing`` (nnU-Net's
    rule: the source spacing decides if it is anisotropic, otherwise the target spacing), or None."""
    axis = needs_separate_z(spacing)
    return axis if axis is not None else needs_separate_z(target_spacing)


def new_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, ...]:
    """The shape of a ``shape`` volume at ``spacing`` once resampled to ``target_spacing`` (rounded, at least 1)."""
    if not len(shape) == len(spacing) == len(target_spacing):
        raise ValueError(f"shape {tuple(shape)}, spacing {tuple(spacing)} and target spacing "
                         f"{tuple(target_spacing)} must have the same length")
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target_spacing))


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]] | None = None) -> tuple[float, ...]:
    """The dataset's target spacing (nnU-Net's ``determine_fullres_target_spacing``).

    Rule: the median spacing per axis. Exception, for anisotropic datasets: if the median's coarsest axis is more
    than ``ANISOTROPY_THRESHOLD`` times coarser than every other axis (> 3x the largest of the others) *and* its
    median size in voxels times 3 is below the smallest median size of the other axes (few thick slices), that
    axis takes the 10th percentile of its spacings instead (but not finer than the other axes): the median of a
    dataset with 10 mm and 5 mm slices would interpolate the 5 mm cases badly.
    ``shapes`` are the cases' shapes (after cropping, as nnU-Net uses them); without them only the spacing
    condition is checked.
    """
    sp = np.asarray(spacings, dtype=float)
    if sp.ndim != 2 or len(sp) == 0 or sp.shape[1] < 2:
        raise ValueError(f"expected one spacing per case with 2+ axes each, got an array of shape {sp.shape}")
    target = np.median(sp, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    coarse_other = max(target[a] for a in others)
    anisotropic = target[worst] > ANISOTROPY_THRESHOLD * coarse_other
    if anisotropic and shapes is not None:
        size = np.median(np.asarray(shapes, dtype=float), axis=0)
        anisotropic = size[worst] * ANISOTROPY_THRESHOLD < min(size[a] for a in others)
    if anisotropic:
        # the small epsilon keeps the axis strictly the coarsest, so the slice axis stays identifiable
        target[worst] = max(float(np.percentile(sp[:, worst], 10)), coarse_other + 1e-5)
    return tuple(float(v) for v in target)


# ---------------------------------------------------------------------------------------------- kernels
@functools.lru_cache(maxsize=64)
def _zoom_matrix(n_in: int, n_out: int, order: int) -> torch.Tensor:
    """(n_out, n_in) float32 ``M`` with ``M @ v == scipy.ndimage.zoom(v, n_out / n_in, order=order,
    mode="nearest", grid_mode=True)`` for any 1D ``v``: column i is the response to a unit impulse at i."""
    m = ndi.zoom(np.eye(n_in), (n_out / n_in, 1.0), order=order, mode="nearest", grid_mode=True)
    if m.shape != (n_out, n_in):  # zoom rounds n_in * factor; cannot differ by float error, but be sure
        raise RuntimeError(f"zoom matrix {m.shape} != {(n_out, n_in)}")
    # The spline prefilter leaves ~1e-30 tails: as float32 they are denormals, which slow a matmul 10-20x.
    m[np.abs(m) < 1e-7] = 0.0
    return torch.from_numpy(m.astype(np.float32))


@functools.lru_cache(maxsize=64)
def _nearest_index(n_in: int, n_out: int) -> torch.Tensor:
    """Source index of each output position for nearest-neighbour resampling (voxel centres aligned)."""
    return _zoom_matrix(n_in, n_out, 0).argmax(dim=1)


def _resample_axis(x: torch.Tensor, axis: int, n_out: int, order: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Resample float32 ``x`` along ``axis`` to ``n_out`` samples with a spline of ``order`` (0 = nearest)."""
    n_in = x.shape[axis]
    shape = (*x.shape[:axis], n_out, *x.shape[axis + 1:])
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    if order == 0:
        return torch.index_select(x, axis, _nearest_index(n_in, n_out).to(x.device), out=out)
    m = _zoom_matrix(n_in, n_out, order).to(x.device)
    pre, post = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
    x3, o3 = x.reshape(pre, n_in, post), out.view(pre, n_out, post)
    # Plain 2D products wherever the layout allows; a middle axis is done block by block rather than through a
    # broadcast batched product, which could materialise copies of the matrix or the data.
    if post == 1:
        torch.mm(x3[:, :, 0], m.T, out=o3[:, :, 0])
    elif pre == 1:
        torch.mm(m, x3[0], out=o3[0])
    else:
        for i in range(pre):
            torch.mm(m, x3[i], out=o3[i])
    return out


def _resample_volume(x: torch.Tensor, shape: tuple[int, ...], orders: Sequence[int],
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Separable resampling of a float32 (Z, Y, X) tensor to ``shape``, axis ``a`` with spline order ``orders[a]``."""
    axes = [a for a in range(x.ndim) if x.shape[a] != shape[a]]
    # Shrinking axes first: every later pass then works on fewer voxels.
    axes.sort(key=lambda a: shape[a] / x.shape[a])
    if not axes:
        return out.copy_(x) if out is not None else x
    for i, a in enumerate(axes):
        x = _resample_axis(x, a, shape[a], orders[a], out if i == len(axes) - 1 else None)
    return x


def _linear(x: torch.Tensor, shape: tuple[int, int, int], axis: int | None) -> torch.Tensor:
    """(K, Z, Y, X) float -> (K, *shape): linear, except nearest along ``axis`` (None: linear everywhere).

    Nearest along one axis commutes with linear interpolation along the others, so slices are picked before
    the linear pass when that axis shrinks and after it when it grows: the linear pass sees fewer voxels.
    """
    pick = axis is not None and x.shape[1 + axis] != shape[axis]
    if pick and shape[axis] < x.shape[1 + axis]:
        x = x.index_select(1 + axis, _nearest_index(x.shape[1 + axis], shape[axis]).to(x.device))
        pick = False
    size = list(shape)
    if axis is not None:
        size[axis] = x.shape[1 + axis]  # the linear pass leaves this axis alone
    if tuple(x.shape[1:]) != tuple(size):
        if axis == 0:  # slices as channels: a 2D pass, half the work of a trilinear one
            x = F.interpolate(x, size=size[1:], mode="bilinear", align_corners=False)
        else:  # an axis kept at its size by trilinear is an exact identity (weights 1 and 0)
            x = F.interpolate(x[None], size=size, mode="trilinear", align_corners=False)[0]
    if pick:
        x = x.index_select(1 + axis, _nearest_index(x.shape[1 + axis], shape[axis]).to(x.device))
    return x


def _float_tensor(a: np.ndarray) -> torch.Tensor:
    """A float32 CPU tensor over ``a`` (no copy when it already is contiguous writable float32)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not a.flags.writeable:  # torch warns on read-only memory (e.g. a memory-mapped file)
        a = a.copy()
    return torch.from_numpy(a)


def _shape3(shape: Sequence[int]) -> tuple[int, int, int]:
    out = tuple(int(n) for n in shape)
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"expected a 3D shape of positive sizes, got {tuple(shape)}")
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- resampling
def resample_image(image: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float], order: int = 3,
                   *, out_shape: Sequence[int] | None = None) -> np.ndarray:
    """(C, Z, Y, X) image at ``spacing`` -> float32 (C, Z', Y', X') at ``target_spacing``.

    Spline of ``order`` per channel (edges extended, voxel centres aligned); along a much coarser axis
    (:func:`separate_axis`) nearest neighbour instead, so slices are not smeared into each other. ``out_shape``
    overrides the computed shape (e.g. to return exactly to an earlier grid). Returns ``image`` itself when the
    shape does not change. Memory: the output plus about two single-channel float32 intermediates.
    """
    if image.ndim != 4:
        raise ValueError(f"expected a (C, Z, Y, X) image, got shape {image.shape}")
    if not 0 <= order <= 5:
        raise ValueError(f"spline order must be 0..5, got {order}")
    shape = _shape3(out_shape) if out_shape is not None else new_shape(image.shape[1:], spacing, target_spacing)
    if shape == tuple(image.shape[1:]):
        return image
    axis = separate_axis(spacing, target_spacing)
    orders = [0 if a == axis else order for a in range(3)]
    out = np.empty((image.shape[0], *shape), dtype=np.float32)
    for c in range(image.shape[0]):
        _resample_volume(_float_tensor(image[c]), shape, orders, out=torch.from_numpy(out[c]))
    return out


def resample_labels(labels: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float], *,
                    out_shape: Sequence[int] | None = None) -> np.ndarray:
    """(Z, Y, X) class indices at ``spacing`` -> uint8 (Z', Y', X') at ``target_spacing``.

    Each class's binary mask is interpolated linearly (nearest along a much coarser axis) and every voxel takes
    the class with the largest value, background included; a tie goes to the higher class, as in nnU-Net (which
    sets a class wherever its value is >= 0.5, later classes overwriting). Memory: one float mask in,
    one out, a running maximum and the uint8 result -- never a (K, Z, Y, X) array. ``out_shape`` overrides the
    computed shape. Returns ``labels`` (as uint8) when the shape does not change.
    """
    if labels.ndim != 3:
        raise ValueError(f"expected (Z, Y, X) labels, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    shape = _shape3(out_shape) if out_shape is not None else new_shape(labels.shape, spacing, target_spacing)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"labels must be classes 0..255, got values {labels.min()}..{labels.max()}")
    lab8 = np.ascontiguousarray(labels, dtype=np.uint8)
    if shape == tuple(labels.shape):
        return lab8
    classes = np.flatnonzero(np.bincount(lab8.ravel(), minlength=1))
    if len(classes) == 1:
        return np.full(shape, classes[0], dtype=np.uint8)
    axis = separate_axis(spacing, target_spacing)
    lab = torch.from_numpy(lab8 if lab8.flags.writeable else lab8.copy())
    if axis is not None and shape[axis] < lab.shape[axis]:
        # nearest along that axis commutes with the in-plane interpolation: pick the slices once, up front
        lab = lab.index_select(axis, _nearest_index(lab.shape[axis], shape[axis]))
    best = arg = None
    for c in classes:
        v = _linear((lab == int(c)).float()[None], shape, axis)[0]
        if best is None:
            best, arg = v, torch.full(shape, int(c), dtype=torch.uint8)
        else:
            # >=: exact 0.5 ties are common on boundaries (e.g. 1 mm -> 0.8 mm); giving them to the background
            # would shrink every object by a few percent per resampling
            arg.masked_fill_(v >= best, int(c))
            torch.maximum(best, v, out=best)
    return arg.numpy()


def resample_probabilities(probs: np.ndarray | torch.Tensor, out_shape: Sequence[int],
                           spacing: Sequence[float] | None = None, out_spacing: Sequence[float] | None = None, *,
                           axis: int | None = None) -> np.ndarray:
    """(K, Z, Y, X) probabilities -> float32 (K, *out_shape), e.g. from the network's grid back to the case's.

    Linear; nearest along the separately handled axis, given either as the spacing pair (``spacing`` of
    ``probs`` and ``out_spacing`` of the output: :func:`separate_axis` decides) or directly as ``axis``
    (neither: linear everywhere). Linear resampling keeps probabilities summing to 1. A torch tensor is
    resampled on its own device. Memory: the input and the output (plus one intermediate on the separate path).
    """
    if spacing is not None or out_spacing is not None:
        if spacing is None or out_spacing is None:
            raise ValueError("pass both spacing (of probs) and out_spacing (of the output), or axis")
        if axis is not None:
            raise ValueError("pass the spacing pair or axis, not both")
        axis = separate_axis(spacing, out_spacing)
    if axis is not None and axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    if probs.ndim != 4:
        raise ValueError(f"expected (K, Z, Y, X) probabilities, got shape {tuple(probs.shape)}")
    shape = _shape3(out_shape)
    t = probs.float() if isinstance(probs, torch.Tensor) else _float_tensor(probs)
    if tuple(t.shape[1:]) != shape:
        t = _linear(t, shape, axis)
    return t.cpu().numpy()


# ---------------------------------------------------------------------------------------------- cropping
def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """Where any channel of a (C, *spatial) image is non-zero, holes filled (nnU-Net's ``create_nonzero_mask``).

    Holes are the background components (face-connected, as ``binary_fill_holes`` counts them) that do not
    touch the border: one labelling pass instead of the iterated dilation of ``binary_fill_holes``.
    """
    mask = np.any(image != 0, axis=0)
    comps, n = ndi.label(~mask)
    if n == 0:
        return mask
    border = np.zeros(n + 1, dtype=bool)
    for a in range(comps.ndim):
        for edge in (0, -1):
            border[np.take(comps, edge, axis=a)] = True
    border[0] = True  # label 0 is the mask itself
    return ~border[comps] | mask


def nonzero_bbox(image: np.ndarray, labels: np.ndarray | None = None) -> tuple[slice, ...]:
    """Bounding box (one slice per spatial axis) of the voxels where any channel of the (C, Z, Y, X) image is
    non-zero, and of the labelled voxels when ``labels`` is given (so a crop never cuts an annotation); the whole
    volume when everything is zero. Filling holes (as :func:`nonzero_mask` does) cannot change a bounding box,
    so it is skipped here."""
    mask = np.zeros(image.shape[1:], dtype=bool)
    for c in range(image.shape[0]):  # channel by channel: one boolean volume, not a (C, ...) one
        mask |= image[c] != 0
    if labels is not None:
        if labels.shape != mask.shape:
            raise ValueError(f"labels {labels.shape} do not match the image's spatial shape {mask.shape}")
        mask |= labels != 0
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    bbox = []
    for a in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(b for b in range(mask.ndim) if b != a)))
        bbox.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(bbox)


def crop_to_bbox(array: np.ndarray, bbox: Sequence[slice]) -> np.ndarray:
    """``array`` ((C, Z, Y, X) or (Z, Y, X)) cut to ``bbox`` on its trailing spatial axes (a view, not a copy)."""
    if array.ndim < len(bbox):
        raise ValueError(f"array of shape {array.shape} has fewer axes than the box {tuple(bbox)}")
    return array[(Ellipsis, *bbox)]


def uncrop(array: np.ndarray, bbox: Sequence[slice], full_shape: Sequence[int],
           fill: float | Sequence[float] = 0) -> np.ndarray:
    """Paste a cropped ``array`` ((C, z, y, x) or (z, y, x)) back into a new array of spatial shape ``full_shape``
    at ``bbox``; elsewhere ``fill``: a scalar, or one value per leading channel (probabilities: 1 for the
    background channel, 0 for the others)."""
    nsp = len(bbox)
    lead = tuple(array.shape[:array.ndim - nsp])
    spatial = tuple(int(n) for n in full_shape)[-nsp:]
    expected = tuple(s.stop - s.start for s in bbox)
    if tuple(array.shape[-nsp:]) != expected:
        raise ValueError(f"array of spatial shape {array.shape[-nsp:]} does not fit the box {tuple(bbox)}")
    if any(s.stop > n for s, n in zip(bbox, spatial)):
        raise ValueError(f"box {tuple(bbox)} exceeds the full shape {spatial}")
    out = np.empty((*lead, *spatial), dtype=array.dtype)
    fill_arr = np.asarray(fill, dtype=array.dtype)
    if fill_arr.ndim == 0:
        out.fill(fill_arr)
    else:
        if len(lead) != 1 or fill_arr.shape != (lead[0],):
            raise ValueError(f"one fill value per channel needs {lead[0] if lead else 0} values, got {fill_arr.shape}")
        out[...] = fill_arr.reshape(-1, *([1] * nsp))
    out[(Ellipsis, *bbox)] = array
    return out

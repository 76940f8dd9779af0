"""Whole-case inference: rescale, pad, sliding window with Gaussian-weighted overlap blending, undo.

Used by training-time evaluation on real data and by ``predict.py``, so the score a training run
reports is the score prediction reproduces.
"""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from errors import ConfigError
from model import UNet
from preprocess import (PreparedVolume, Preprocessing, class_mask, pad_to, pad_value, prepare_volume, resize_planes, scaled_size,
                        to_planes)
from runtime import autocast, channels_last as to_channels_last


def gaussian_weight(patch: int, sigma_scale: float = 1 / 8) -> torch.Tensor:
    """(patch, patch) importance map, highest in the centre (nnU-Net's blending weights)."""
    c = (patch - 1) / 2
    g = torch.exp(-((torch.arange(patch) - c) ** 2) / (2 * (patch * sigma_scale) ** 2))
    w = g[:, None] * g[None, :]
    return (w / w.max()).clamp_min(1e-3)


def tile_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Start offsets of windows of ``patch`` covering ``length`` (>= patch) with at least ``overlap``."""
    if length <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    n = math.ceil((length - patch) / step) + 1
    return [round(i * (length - patch) / (n - 1)) for i in range(n)]


#: windows one case may take; more (a huge image with a tiny patch and a high overlap) is a hang in effect
MAX_WINDOWS = 200_000


def probs_from_logits(logits: torch.Tensor, regions: bool = False) -> torch.Tensor:
    """(N, C, *spatial) logits -> probabilities: sigmoid for C == 1 and for regions, softmax otherwise."""
    logits = logits.float()
    return torch.sigmoid(logits) if regions or logits.size(1) == 1 else torch.softmax(logits, dim=1)


def probs_to_labels(probs: np.ndarray | torch.Tensor, threshold: float = 0.5, regions: bool = False) -> np.ndarray:
    """(Z, C, H, W) probabilities -> (Z, H, W) uint8: classes (threshold for C == 1, argmax otherwise), or for
    regions the bit masks of every region above the threshold (see :func:`preprocess.class_mask`)."""
    p = torch.as_tensor(probs)
    if regions:
        bits = torch.zeros(p[:, 0].shape, dtype=torch.uint8)
        for r in range(p.size(1)):
            bits |= (p[:, r] > threshold).to(torch.uint8) << r
        return bits.numpy()
    out = (p[:, 0] > threshold) if p.size(1) == 1 else p.argmax(dim=1)
    return out.to(torch.uint8).numpy()


def check_window_count(n: int, shape: tuple[int, ...], patch, overlap: float) -> None:
    """Refuse a case whose sliding window would take more than :data:`MAX_WINDOWS` windows."""
    if n > MAX_WINDOWS:
        raise ConfigError(f"a {'x'.join(map(str, shape))} image with {patch} patches at overlap {overlap:g} needs {n} "
                          f"windows (expected at most {MAX_WINDOWS}): lower --overlap")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask (full connectivity: 8 in 2D, 26 in 3D); empty stays empty."""
    comp, n = ndimage.label(mask, np.ones((3,) * mask.ndim, bool))
    if n <= 1:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    return comp == int(np.argmax(sizes))


def keep_largest(labels: np.ndarray, classes, regions: bool = False) -> np.ndarray:
    """Class map with only the largest component of each class in ``classes`` (1-based); the rest becomes
    background (for region bit masks: leaves that region)."""
    out = np.array(labels, copy=True)
    for k in classes:
        m = class_mask(out, k, regions)
        if m.any():
            drop = m & ~largest_component(m)
            if regions:
                out[drop] &= np.uint8(~(1 << (k - 1)) & 0xFF)
            else:
                out[drop] = 0
    return out


def largest_classes(class_names: list[str], postprocessing: dict | None) -> list[int]:
    """Classes (1-based) that a ``postprocessing`` record (from training, see ``experiments``) reduces to
    their largest component."""
    names = (postprocessing or {}).get("largest_component") or []
    return [k for k, n in enumerate(class_names, 1) if n in names]


@torch.inference_mode()
def predict_planes(model: UNet, planes: np.ndarray, prep: Preprocessing, device: torch.device | str = "cpu",
                   precision: str = "fp32", overlap: float = 0.5, batch_size: int = 8,
                   channels_last: bool = False, mirror: bool | None = None) -> np.ndarray:
    """Probabilities (Z, C_out, H, W) float32 at the planes' original resolution.

    mirror: average over the 4 flips of each window (None = ``prep.mirror_tta``; training-time
    validation passes False for speed).

    planes: (Z, C, H, W) normalised input (see :func:`preprocess.to_planes`). Each plane is resized by
    ``prep.resize_long_side``, padded to at least ``prep.patch_size`` with the case minimum, tiled by
    overlapping windows, blended with Gaussian weights, cropped and resized back.
    """
    device = torch.device(device)
    model.eval()
    z, _, h, w = planes.shape
    p = prep.patch_size
    x = resize_planes(torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32)), scaled_size(h, w, prep))
    x, pads = pad_to(x, p, p, value=pad_value(x))
    hp, wp = x.shape[-2:]
    weight = gaussian_weight(p)
    tiles = [(i, y0, x0) for i in range(z) for y0 in tile_starts(hp, p, overlap) for x0 in tile_starts(wp, p, overlap)]
    check_window_count(len(tiles), (z, h, w), p, overlap)
    acc = norm = None
    for b in range(0, len(tiles), batch_size):
        chunk = tiles[b:b + batch_size]
        batch = torch.stack([x[i, :, y0:y0 + p, x0:x0 + p] for i, y0, x0 in chunk]).to(device)
        if channels_last:
            batch = to_channels_last(batch)
        with autocast(device, precision):
            prob = probs_from_logits(model(batch), prep.regions)
            if prep.mirror_tta if mirror is None else mirror:
                for dims in ((3,), (2,), (2, 3)):
                    prob += probs_from_logits(model(batch.flip(dims)), prep.regions).flip(dims)
                prob /= 4
            prob = prob.cpu()
        if acc is None:
            acc = torch.zeros(z, prob.size(1), hp, wp)
            norm = torch.zeros(z, 1, hp, wp)
        for (i, y0, x0), pr in zip(chunk, prob):
            acc[i, :, y0:y0 + p, x0:x0 + p] += pr * weight
            norm[i, :, y0:y0 + p, x0:x0 + p] += weight
    acc /= norm  # in place: on a whole CT the accumulator is the largest array of the run
    del norm
    probs = resize_planes(acc[:, :, pads[0]:hp - pads[1], pads[2]:wp - pads[3]], (h, w))
    return np.ascontiguousarray(probs.clamp_(0, 1).numpy(), dtype=np.float32)


# ------------------------------------------------------------------------------------------------ 3D
def gaussian_weight_3d(patch: tuple[int, int, int], sigma_scale: float = 1 / 8) -> list[torch.Tensor]:
    """The 3D blending weight as three 1D factors (its outer product is the weight): separable, so the sum of
    the weights over all windows is the product of three 1D sums and needs no volume of its own."""
    out = []
    for n in patch:
        c = (n - 1) / 2
        g = torch.exp(-((torch.arange(n) - c) ** 2) / (2 * (n * sigma_scale) ** 2))
        out.append((g / g.max()).clamp_min(0.1))  # the product's minimum is 1e-3, as in 2D
    return out


@torch.inference_mode()
def predict_volume(model: UNet, volume: np.ndarray, patch: tuple[int, int, int], device: torch.device | str = "cpu",
                   precision: str = "fp32", overlap: float = 0.5, batch_size: int = 2, channels_last: bool = False,
                   mirror: bool = False, regions: bool = False) -> np.ndarray:
    """Probabilities (C_out, Z, Y, X) float32 of a normalised (C, Z, Y, X) volume at the network's resolution.

    Sliding 3D windows of ``patch`` with Gaussian-weighted blending; the volume is padded (with its minimum) to
    at least the patch and cropped back. Windows are streamed in batches into one float accumulator, so memory
    is one output-sized array plus a batch of windows. ``mirror``: average over the 8 flips of each window.
    """
    device = torch.device(device)
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    shape = tuple(x.shape[1:])
    pads = [max(0, p - s) for p, s in zip(patch, shape)]
    if any(pads):
        spec = []
        for d in reversed(pads):  # F.pad lists the last axis first
            spec += [d // 2, d - d // 2]
        x = F.pad(x[None], spec, value=float(x.min()))[0]
    full = tuple(x.shape[1:])
    starts = [tile_starts(n, p, overlap) for n, p in zip(full, patch)]
    tiles = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    check_window_count(len(tiles), shape, "x".join(map(str, patch)), overlap)
    wz, wy, wx = gaussian_weight_3d(patch)
    weight = wz[:, None, None] * wy[None, :, None] * wx[None, None, :]
    flips = [d for k in range(4) for d in combinations((2, 3, 4), k)] if mirror else [()]
    acc = None
    for i in range(0, len(tiles), batch_size):
        chunk = tiles[i:i + batch_size]
        batch = torch.stack([x[:, a:a + patch[0], b:b + patch[1], c:c + patch[2]] for a, b, c in chunk]).to(device)
        if channels_last:
            batch = to_channels_last(batch)
        prob = 0
        with autocast(device, precision):
            for d in flips:
                out = probs_from_logits(model(batch.flip(d) if d else batch), regions)
                prob = prob + (out.flip(d) if d else out)
        prob = (prob / len(flips)).float().cpu()
        if acc is None:
            acc = torch.zeros((prob.size(1), *full))
        for (a, b, c), pr in zip(chunk, prob):
            acc[:, a:a + patch[0], b:b + patch[1], c:c + patch[2]] += pr * weight
    norm = [torch.zeros(n) for n in full]
    for axis, (w, n) in enumerate(zip((wz, wy, wx), patch)):
        for s0 in starts[axis]:
            norm[axis][s0:s0 + n] += w
    acc /= norm[0][:, None, None] * norm[1][None, :, None] * norm[2][None, None, :]
    lo = [d // 2 for d in pads]
    acc = acc[:, lo[0]:lo[0] + shape[0], lo[1]:lo[1] + shape[1], lo[2]:lo[2] + shape[2]]
    return acc.clamp_(0, 1).numpy()


def restore_volume(probs: np.ndarray, prepared: PreparedVolume, regions: bool = False) -> np.ndarray:
    """Network-resolution probabilities (K, Z', Y', X') -> (K, Z, Y, X) on the case's original grid: resampled
    back to the crop's shape (linear; nearest along a much coarser slice axis) and pasted into the full volume
    (outside the crop: background)."""
    import resample

    back = resample.resample_probabilities(probs, prepared.cropped_shape, prepared.target_spacing, prepared.spacing)
    fill = np.zeros((back.shape[0],), np.float32)
    if back.shape[0] > 1 and not regions:
        fill[0] = 1.0  # softmax: everything outside the non-zero box is background
    return resample.uncrop(back, prepared.bbox, prepared.shape, fill)


def predict_prepared(model: UNet, prepared: np.ndarray | PreparedVolume, prep: Preprocessing,
                     device: torch.device | str = "cpu", precision: str = "fp32", overlap: float = 0.5,
                     batch_size: int = 8, channels_last: bool = False, mirror: bool | None = None) -> np.ndarray:
    """Probabilities (Z, C_out, H, W) on the original grid of a case prepared for ``prep``'s network: planes
    ((Z, C, H, W) from :func:`preprocess.to_planes`) for a 2D model, a :class:`preprocess.PreparedVolume` for 3D."""
    mirror = prep.mirror_tta if mirror is None else mirror
    if prep.dim == 2:
        return predict_planes(model, prepared, prep, device, precision, overlap, batch_size, channels_last, mirror)
    net = predict_volume(model, prepared.volume, tuple(prep.patch), device, precision, overlap,
                         max(1, batch_size // 4), channels_last, mirror, prep.regions)
    return np.moveaxis(restore_volume(net, prepared, prep.regions), 0, 1)


def predict_image(model: UNet, image: np.ndarray, meta, prep: Preprocessing, **kwargs) -> np.ndarray:
    """The one whole-image inference path (training-time evaluation and ``predict.py`` alike): normalise, prepare
    for the network's dimension, predict, map back. Returns (Z, C_out, H, W) probabilities (Z = 1 for 2D)."""
    if prep.dim == 3:
        if len(meta.shape) != 3:
            raise ConfigError(f"{meta.path}: a 3D model needs a volume, got a {len(meta.shape)}D image")
        prepared = prepare_volume(image, meta.spacing, prep)
    else:
        prepared = to_planes(image, len(meta.shape), prep)
    return predict_prepared(model, prepared, prep, **kwargs)

"""Whole-case inference: rescale, pad, sliding window with Gaussian-weighted overlap blending, undo.

Used by training-time evaluation on real data and by ``predict.py``, so the score a training run
reports is the score prediction reproduces.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from model import UNet
from preprocess import Preprocessing, pad_to, pad_value, resize_planes, scaled_size
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


def probs_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) logits -> probabilities: sigmoid for C == 1, softmax otherwise."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.size(1) == 1 else torch.softmax(logits, dim=1)


def probs_to_labels(probs: np.ndarray | torch.Tensor, threshold: float = 0.5) -> np.ndarray:
    """(Z, C, H, W) probabilities -> (Z, H, W) uint8 classes (threshold for C == 1, argmax otherwise)."""
    p = torch.as_tensor(probs)
    out = (p[:, 0] > threshold) if p.size(1) == 1 else p.argmax(dim=1)
    return out.to(torch.uint8).numpy()


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask (full connectivity: 8 in 2D, 26 in 3D); empty stays empty."""
    comp, n = ndimage.label(mask, np.ones((3,) * mask.ndim, bool))
    if n <= 1:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    return comp == int(np.argmax(sizes))


def keep_largest(labels: np.ndarray, classes) -> np.ndarray:
    """Class map with only the largest component of each class in ``classes`` (1-based); the rest becomes background."""
    out = np.array(labels, copy=True)
    for k in classes:
        m = out == k
        if m.any():
            out[m & ~largest_component(m)] = 0
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
    acc = norm = None
    for b in range(0, len(tiles), batch_size):
        chunk = tiles[b:b + batch_size]
        batch = torch.stack([x[i, :, y0:y0 + p, x0:x0 + p] for i, y0, x0 in chunk]).to(device)
        if channels_last:
            batch = to_channels_last(batch)
        with autocast(device, precision):
            prob = probs_from_logits(model(batch))
            if prep.mirror_tta if mirror is None else mirror:
                for dims in ((3,), (2,), (2, 3)):
                    prob += probs_from_logits(model(batch.flip(dims))).flip(dims)
                prob /= 4
            prob = prob.cpu()
        if acc is None:
            acc = torch.zeros(z, prob.size(1), hp, wp)
            norm = torch.zeros(z, 1, hp, wp)
        for (i, y0, x0), pr in zip(chunk, prob):
            acc[i, :, y0:y0 + p, x0:x0 + p] += pr * weight
            norm[i, :, y0:y0 + p, x0:x0 + p] += weight
    probs = acc / norm
    probs = probs[:, :, pads[0]:hp - pads[1], pads[2]:wp - pads[3]]
    probs = resize_planes(probs, (h, w))
    return probs.clamp_(0, 1).numpy().astype(np.float32)

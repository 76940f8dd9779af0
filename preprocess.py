"""Preprocessing shared by training and inference: intensities, channels, labels, scale, padding.

Every case, 2D image or 3D volume, becomes a *stack of planes*: images ``(Z, C, H, W)`` float32
and labels ``(Z, H, W)`` uint8 (a 2D image is ``Z = 1``; a volume is sliced along its first axis).
The :class:`Preprocessing` record travels inside each checkpoint, so prediction applies exactly
the steps training used, read from the model file alone.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from errors import ConfigError, InputError

#: CT windows as (level, width) in HU (Radiopaedia's usual values).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0), "liver": (30.0, 150.0), "lung": (-600.0, 1500.0), "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0), "mediastinum": (50.0, 350.0),
}
NORMALIZATIONS = ("none", "window", "zscore", "percentile", "unit")


@dataclass
class Preprocessing:
    """How raw arrays become network input, and how labels become classes.

    normalization:    none | window (CT, HU) | zscore (MRI) | percentile (0.5-99.5 % -> [0, 1]) | unit (/255)
    window:           (level, width) in HU for ``window``
    in_channels:      1 (RGB converted to luminance) or 3 (grey repeated)
    resize_long_side: rescale each plane so its longer side has this many pixels (None = native size);
                      predictions are resized back, so metrics are at the original resolution
    patch_size:       square network input; larger planes are tiled by a sliding window
    class_values:     class k (1-based) = union of these source label values; ``None`` = any foreground
    class_names:      one name per foreground class
    mirror_tta:       predict each window also flipped left-right, up-down and both, and average the
                      four probability maps (nnU-Net's mirroring; 4x the inference time)
    """

    normalization: str = "none"
    window: list[float] | None = None
    in_channels: int = 1
    resize_long_side: int | None = None
    patch_size: int = 64
    class_values: list[list[int]] | None = None
    class_names: list[str] = field(default_factory=lambda: ["lesion"])
    mirror_tta: bool = False

    @property
    def n_classes(self) -> int:
        """Number of foreground classes."""
        return len(self.class_names)

    @property
    def model_out_channels(self) -> int:
        """1 sigmoid logit for one class, else softmax logits incl. background."""
        return 1 if self.n_classes == 1 else self.n_classes + 1

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that no model could use (a checkpoint's record is checked
        once, at load, instead of failing on every input later)."""
        def finite(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization {self.normalization!r}, expected one of {', '.join(NORMALIZATIONS)}")
        if self.window is not None and not (isinstance(self.window, list) and len(self.window) == 2
                                            and all(finite(v) for v in self.window) and self.window[1] > 0):
            raise ValueError(f"window {self.window!r}, expected [level, width] with width > 0")
        if not isinstance(self.in_channels, int) or not 1 <= self.in_channels <= 64:
            raise ValueError(f"in_channels {self.in_channels!r}, expected an integer in 1..64")
        if not isinstance(self.patch_size, int) or isinstance(self.patch_size, bool) or not 16 <= self.patch_size <= 4096:
            raise ValueError(f"patch_size {self.patch_size!r}, expected an integer in 16..4096")
        if self.resize_long_side is not None and (not isinstance(self.resize_long_side, int)
                                                  or not 16 <= self.resize_long_side <= 8192):
            raise ValueError(f"resize_long_side {self.resize_long_side!r}, expected None or an integer in 16..8192")
        if (not isinstance(self.class_names, list) or not self.class_names
                or not all(isinstance(n, str) and n.strip() for n in self.class_names)):
            raise ValueError(f"class_names {self.class_names!r}, expected a non-empty list of names")
        if self.class_values is not None and (
                not isinstance(self.class_values, list) or len(self.class_values) != len(self.class_names)
                or not all(isinstance(g, list) and g and all(isinstance(v, int) and 0 < v < 256 for v in g)
                           for g in self.class_values)):
            raise ValueError(f"class_values {self.class_values!r}, expected one list of label values 1..255 per class")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def parse_window(text: str) -> list[float]:
    """``'liver'`` or ``'60,400'`` (level, width) -> [level, width]."""
    if text in WINDOW_PRESETS:
        return list(WINDOW_PRESETS[text])
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--window {text!r}: expected a preset ({', '.join(WINDOW_PRESETS)}) or LEVEL,WIDTH in HU") from None
    if width <= 0:
        raise ConfigError(f"--window {text!r}: the width must be > 0")
    return [level, width]


def parse_labels(text: str | None, names: dict[str, int] | None = None) -> tuple[list[list[int]] | None, list[str]]:
    """``--labels`` -> (class_values, class_names).

    ``None`` -> binary, any non-zero value. ``'1,2'`` -> two classes. ``'1+2'`` -> one class merging
    values 1 and 2. Names from ``dataset.json`` work too: ``'anterior,posterior'``, and a group can
    be named explicitly: ``'anterior=1,posterior=2'`` or ``'hippocampus=1+2'``.
    """
    if not text:
        return None, ["foreground"]
    names = names or {}
    inverse = {v: k for k, v in names.items()}
    values, labels = [], []
    for group in text.split(","):
        given_name, _, group = group.rpartition("=")
        parts = [p.strip() for p in group.split("+") if p.strip()]
        vals = []
        for p in parts:
            if p in names:
                vals.append(int(names[p]))
            elif p.lstrip("-").isdigit():
                vals.append(int(p))
            else:
                known = ", ".join(f"{k}={v}" for k, v in names.items()) or "none"
                raise ConfigError(f"--labels {text!r}: unknown label {p!r} (expected integers or names; known: {known})")
        if not vals or any(v <= 0 or v > 255 for v in vals):
            raise ConfigError(f"--labels {text!r}: label values must be in 1..255")
        values.append(vals)
        labels.append(given_name.strip() or "+".join(inverse.get(v, str(v)) for v in vals))
    return values, labels


# -------------------------------------------------------------------------------- intensities
def normalize(image: np.ndarray, prep: Preprocessing, channel_axis: int | None = None) -> np.ndarray:
    """Intensity normalisation of one whole case (statistics over the whole case, per channel)."""
    x = np.asarray(image, dtype=np.float32)
    mode = prep.normalization
    if mode == "none":
        return x
    if mode == "unit":
        return x / 255.0
    if mode == "window":
        level, width = prep.window or WINDOW_PRESETS["abdomen"]
        return np.clip((x - (level - width / 2)) / width, 0.0, 1.0)
    axes = tuple(i for i in range(x.ndim) if i != (channel_axis % x.ndim if channel_axis is not None else -99))
    if mode == "zscore":
        mean, std = x.mean(axis=axes, keepdims=True), x.std(axis=axes, keepdims=True)
        return (x - mean) / np.maximum(std, 1e-6)
    if mode == "percentile":
        lo, hi = np.percentile(x, 0.5, axis=axes, keepdims=True), np.percentile(x, 99.5, axis=axes, keepdims=True)
        return np.clip((x - lo) / np.maximum(hi - lo, 1e-6), 0.0, 1.0)
    raise ConfigError(f"unknown normalization {mode!r} (expected one of {NORMALIZATIONS})")


def to_planes(image: np.ndarray, ndim_spatial: int, prep: Preprocessing) -> np.ndarray:
    """Normalised image -> (Z, C, H, W) float32 with ``prep.in_channels`` channels.

    ``ndim_spatial`` is 2 for images ((H, W) or (H, W, 3)) and 3 for volumes ((Z, H, W)).
    RGB into a 1-channel model: ITU-R BT.601 luminance. Grey into a 3-channel model: repeated.
    """
    x = np.asarray(image, dtype=np.float32)
    rgb = x.ndim == ndim_spatial + 1 and x.shape[-1] == 3
    x = normalize(x, prep, channel_axis=-1 if rgb else None)
    if rgb:
        x = np.moveaxis(x, -1, -3)  # (..., 3, H, W)
        if prep.in_channels == 1:
            x = (0.299 * x[..., 0, :, :] + 0.587 * x[..., 1, :, :] + 0.114 * x[..., 2, :, :])[..., None, :, :]
    else:
        x = x[..., None, :, :]
        if prep.in_channels == 3:
            x = np.repeat(x, 3, axis=-3)
    if ndim_spatial == 2:
        x = x[None]
    if x.ndim != 4:
        raise InputError(f"cannot turn an array of shape {image.shape} into planes (expected 2D, RGB 2D or 3D)")
    return np.ascontiguousarray(x, dtype=np.float32)


def to_classes(mask: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Source label values -> class indices 0..K (uint8) by ``prep.class_values``."""
    m = np.asarray(mask)
    if prep.class_values is None:
        return (m > 0).astype(np.uint8)
    out = np.zeros(m.shape, np.uint8)
    for k, vals in enumerate(prep.class_values, start=1):
        out[np.isin(m, vals)] = k
    return out


# -------------------------------------------------------------------------------- geometry
def scaled_size(h: int, w: int, prep: Preprocessing) -> tuple[int, int]:
    """Plane size after ``resize_long_side`` (unchanged when None)."""
    if not prep.resize_long_side:
        return h, w
    s = prep.resize_long_side / max(h, w)
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


def resize_planes(x: torch.Tensor, size: tuple[int, int], labels: bool = False) -> torch.Tensor:
    """Resize (N, C, H, W) images (bilinear, antialiased when shrinking) or (N, H, W) labels (nearest)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if labels:
        return F.interpolate(x[:, None].float(), size=size, mode="nearest")[:, 0].to(x.dtype)
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=shrink)


def pad_to(x: torch.Tensor, min_h: int, min_w: int, value: float = 0.0) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad the last two dims symmetrically to at least (min_h, min_w). Returns (padded, (top, bottom, left, right))."""
    h, w = x.shape[-2:]
    dh, dw = max(0, min_h - h), max(0, min_w - w)
    pads = (dh // 2, dh - dh // 2, dw // 2, dw - dw // 2)
    if dh or dw:
        x = F.pad(x, (pads[2], pads[3], pads[0], pads[1]), value=value)
    return x, pads


def pad_value(planes: np.ndarray | torch.Tensor) -> float:
    """Value used to pad images: the case's minimum (air / background after normalisation)."""
    return float(planes.min())

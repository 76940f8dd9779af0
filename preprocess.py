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
    mirror_tta:       predict each window also flipped along every axis and average the probability maps
                      (nnU-Net's mirroring; 4x the inference time in 2D, 8x in 3D)
    channels:         per input channel ``{"name", "normalization", "window"}`` (multi-channel scans, e.g. MRI
                      sequences or a CT next to an MRI); ``None``: ``normalization`` for every channel
    zscore_nonzero:   z-score statistics over the non-zero voxels only, and zero stays zero (brain MRI whose
                      background is 0: the background would otherwise dominate the statistics)
    regions:          ``class_values`` are overlapping regions (BraTS: whole tumour contains tumour core contains
                      enhancing tumour): one sigmoid output per region, labels stored as bit masks
                      (bit k-1 set = inside region k)
    dim:              2 (planes; a volume is predicted slice by slice) or 3 (whole volumes)
    spacing:          3D: the target spacing (dz, dy, dx) in mm every case is resampled to
    patch:            3D: the patch (pz, py, px) in voxels at the target spacing
    pool:             3D: the network's pooling factors per level and axis (``model.UNetArgs.pool``)
    crop_nonzero:     3D: crop each case to the box of its non-zero voxels before everything else (nnU-Net)
    """

    normalization: str = "none"
    window: list[float] | None = None
    in_channels: int = 1
    resize_long_side: int | None = None
    patch_size: int = 64
    class_values: list[list[int]] | None = None
    class_names: list[str] = field(default_factory=lambda: ["lesion"])
    mirror_tta: bool = False
    channels: list[dict] | None = None
    zscore_nonzero: bool = False
    regions: bool = False
    dim: int = 2
    spacing: list[float] | None = None
    patch: list[int] | None = None
    pool: list[list[int]] | None = None
    crop_nonzero: bool = False

    @property
    def n_classes(self) -> int:
        """Number of foreground classes."""
        return len(self.class_names)

    @property
    def model_out_channels(self) -> int:
        """1 sigmoid logit for one class, one sigmoid per region, else softmax logits incl. background."""
        return self.n_classes if self.regions or self.n_classes == 1 else self.n_classes + 1

    @property
    def channel_names(self) -> list[str] | None:
        """The input channels' names (from ``dataset.json``), when the model was trained on named channels."""
        return [str(c.get("name") or k) for k, c in enumerate(self.channels)] if self.channels else None

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
        if self.regions and (self.class_values is None or len(self.class_values) > 8):
            raise ValueError("regions need class_values, at most 8 (labels are 8-bit masks)")
        if self.channels is not None and (
                not isinstance(self.channels, list) or len(self.channels) != self.in_channels
                or not all(isinstance(c, dict) and c.get("normalization") in NORMALIZATIONS for c in self.channels)):
            raise ValueError(f"channels {str(self.channels)[:120]}, expected one {{'normalization': ...}} per input channel")
        if self.dim not in (2, 3):
            raise ValueError(f"dim {self.dim!r}, expected 2 or 3")
        if self.dim == 3:
            for name, lo, hi in (("spacing", 1e-3, 1e3), ("patch", 4, 1024)):
                v = getattr(self, name)
                if not (isinstance(v, list) and len(v) == 3 and all(finite(x) and lo <= x <= hi for x in v)):
                    raise ValueError(f"{name} {v!r}, expected 3 numbers in [{lo:g}, {hi:g}] for a 3D model")

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
    if not (math.isfinite(level) and math.isfinite(width) and width > 0):
        raise ConfigError(f"--window {text!r}: expected a finite level and a finite width > 0 in HU (LEVEL,WIDTH)")
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
def _normalize_one(x: np.ndarray, mode: str, window, axes, nonzero: bool) -> np.ndarray:
    if mode == "none":
        return x
    if mode == "unit":
        return x / 255.0
    if mode == "window":
        level, width = window or WINDOW_PRESETS["abdomen"]
        return np.clip((x - (level - width / 2)) / width, 0.0, 1.0)
    if mode == "zscore":
        if nonzero:  # statistics of the body only; the zero background stays zero
            inside = x != 0
            vals = x[inside] if inside.any() else x.ravel()
            out = (x - vals.mean()) / max(float(vals.std()), 1e-6)
            return np.where(inside, out, 0.0).astype(np.float32)
        mean, std = x.mean(axis=axes, keepdims=True), x.std(axis=axes, keepdims=True)
        return (x - mean) / np.maximum(std, 1e-6)
    if mode == "percentile":
        lo, hi = np.percentile(x, 0.5, axis=axes, keepdims=True), np.percentile(x, 99.5, axis=axes, keepdims=True)
        return np.clip((x - lo) / np.maximum(hi - lo, 1e-6), 0.0, 1.0)
    raise ConfigError(f"unknown normalization {mode!r} (expected one of {NORMALIZATIONS})")


def normalize(image: np.ndarray, prep: Preprocessing, channel_axis: int | None = None) -> np.ndarray:
    """Intensity normalisation of one whole case (statistics over the whole case, per channel).

    With ``prep.channels`` each channel (along ``channel_axis``) has its own normalisation; otherwise
    ``prep.normalization`` applies to all of them.
    """
    x = np.asarray(image, dtype=np.float32)
    if prep.channels and channel_axis is not None:
        parts = [_normalize_one(np.take(x, c, axis=channel_axis), spec["normalization"], spec.get("window"), None,
                                prep.zscore_nonzero) for c, spec in enumerate(prep.channels)]
        return np.stack(parts, axis=channel_axis).astype(np.float32, copy=False)
    if prep.channels:  # one channel, no channel axis
        spec = prep.channels[0]
        return _normalize_one(x, spec["normalization"], spec.get("window"), None, prep.zscore_nonzero)
    axes = tuple(i for i in range(x.ndim) if i != (channel_axis % x.ndim if channel_axis is not None else -99))
    return _normalize_one(x, prep.normalization, prep.window, axes, prep.zscore_nonzero)


def _channels_first(image: np.ndarray, ndim_spatial: int, prep: Preprocessing) -> np.ndarray:
    """Normalised (C, *spatial) float32 with ``prep.in_channels`` channels from a grey, RGB or multi-channel
    (channel-last) array. RGB into a 1-channel model: ITU-R BT.601 luminance; grey into a 3-channel model: repeated.
    """
    x = np.asarray(image, dtype=np.float32)
    has_channels = x.ndim == ndim_spatial + 1
    if x.ndim not in (ndim_spatial, ndim_spatial + 1):
        raise InputError(f"cannot use an array of shape {image.shape} (expected {ndim_spatial}D, optionally with "
                         "channels last)")
    n = x.shape[-1] if has_channels else 1
    if n not in (1, 3, prep.in_channels) or (n != prep.in_channels and prep.channels):
        names = f" ({', '.join(prep.channel_names)})" if prep.channel_names else ""
        raise InputError(f"the image has {n} channels but the model takes {prep.in_channels}{names}")
    x = normalize(x, prep, channel_axis=-1 if has_channels else None)
    x = np.moveaxis(x, -1, 0) if has_channels else x[None]
    if n == 3 and prep.in_channels == 1:
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    elif n == 1 and prep.in_channels == 3:
        x = np.repeat(x, 3, axis=0)
    return x


def to_planes(image: np.ndarray, ndim_spatial: int, prep: Preprocessing) -> np.ndarray:
    """Normalised image -> (Z, C, H, W) float32 planes with ``prep.in_channels`` channels (a 2D image is Z = 1;
    a volume is sliced along its first axis). ``ndim_spatial`` is 2 for images ((H, W), (H, W, C)) and 3 for
    volumes ((Z, H, W), (Z, H, W, C))."""
    x = _channels_first(image, ndim_spatial, prep)
    x = x[None] if ndim_spatial == 2 else np.moveaxis(x, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def to_volume(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Normalised volume -> (C, Z, Y, X) float32 with ``prep.in_channels`` channels (the 3D network's input)."""
    return np.ascontiguousarray(_channels_first(image, 3, prep), dtype=np.float32)


def to_classes(mask: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Source label values -> class indices 0..K (uint8) by ``prep.class_values``; for regions, bit masks
    (bit k-1 set where the value is one of region k's)."""
    m = np.asarray(mask)
    if prep.class_values is None:
        return (m > 0).astype(np.uint8)
    out = np.zeros(m.shape, np.uint8)
    for k, vals in enumerate(prep.class_values, start=1):
        if prep.regions:
            out |= np.isin(m, vals).astype(np.uint8) << (k - 1)
        else:
            out[np.isin(m, vals)] = k
    return out


def class_mask(labels: np.ndarray, k: int, regions: bool = False) -> np.ndarray:
    """Boolean mask of class (or region) ``k`` (1-based) in a label array from :func:`to_classes`."""
    labels = np.asarray(labels)
    return ((labels >> (k - 1)) & 1).astype(bool) if regions else labels == k


def regions_to_labels(bits: np.ndarray, n_regions: int) -> np.ndarray:
    """Region bit masks -> one label map where each voxel takes the last region (in ``--labels`` order) that holds it:
    for nested regions listed outside-in (whole tumour, core, enhancing) that is the innermost one."""
    out = np.zeros(np.shape(bits), np.uint8)
    for k in range(1, n_regions + 1):
        out[class_mask(bits, k, True)] = k
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


# ---------------------------------------------------------------------------------------------- 3D volumes
@dataclass
class PreparedVolume:
    """A case as the 3D network sees it, and what is needed to map predictions back to the original grid."""

    volume: np.ndarray                   # (C, Z', Y', X') normalised, cropped, at the target spacing
    labels: np.ndarray | None            # (Z', Y', X') classes on the same grid (training cases)
    bbox: tuple[slice, slice, slice]     # the crop, in the original grid
    cropped_shape: tuple[int, int, int]  # the crop's shape before resampling
    shape: tuple[int, int, int]          # the original spatial shape
    spacing: tuple[float, float, float]  # the original spacing
    target_spacing: tuple[float, float, float]  # the network's spacing


def prepare_volume(image: np.ndarray, spacing, prep: Preprocessing, labels: np.ndarray | None = None) -> PreparedVolume:
    """nnU-Net's order: crop to the non-zero box (``prep.crop_nonzero``), normalise (statistics of the crop), then
    resample to ``prep.spacing`` (images third order, labels through one-hot; a much coarser slice axis nearest)."""
    import resample

    x = np.asarray(image, dtype=np.float32)
    channels_last = x.ndim == 4
    raw = np.moveaxis(x, -1, 0) if channels_last else x[None]
    shape = tuple(int(n) for n in raw.shape[1:])
    bbox = resample.nonzero_bbox(raw, labels) if prep.crop_nonzero else tuple(slice(0, n) for n in shape)
    cropped = raw[(slice(None), *bbox)]
    vol = to_volume(np.moveaxis(cropped, 0, -1) if channels_last else cropped[0], prep)
    target = tuple(float(v) for v in prep.spacing)
    vol = resample.resample_image(vol, tuple(spacing), target)
    lab = None
    if labels is not None:
        lab = resample.resample_labels(np.asarray(labels)[bbox], tuple(spacing), target)
    return PreparedVolume(np.ascontiguousarray(vol, dtype=np.float32), lab, bbox, tuple(cropped.shape[1:]), shape,
                          tuple(float(v) for v in spacing), target)

"""A dataset's fingerprint: what the plan (``plan.py``) needs to know about the data, computed once and cached.

Per case: shape, spacing, channels, format and modality; per channel, intensity percentiles inside the
foreground; per label value, voxel counts, connected objects and their typical thickness. The fingerprint is
written to ``fingerprint.json`` in the output folder and reused while the dataset's file list, sizes and
modification times stay the same (nnU-Net's ``dataset_fingerprint.json``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

import medio
from fileio import write_json_atomic

log = logging.getLogger("run")

FORMAT = "medseg-fingerprint/1"
#: intensity samples kept per case and channel (enough for stable percentiles, bounded memory)
SAMPLES_PER_CASE = 10_000
PHOTO_FORMATS = ("png", "jpeg", "bmp", "tiff", "gif")


@dataclass
class CaseFingerprint:
    """One case: geometry, the values its mask holds, and its objects."""

    case: str
    shape: list[int]
    spacing: list[float]
    spacing_known: bool
    channels: int
    format: str
    modality: str
    label_voxels: dict[str, int] = field(default_factory=dict)      # label value -> voxels
    objects: dict[str, int] = field(default_factory=dict)           # label value -> connected components
    thickness_px: dict[str, float] = field(default_factory=dict)    # label value -> median in-plane half-thickness
    zero_fraction: float = 0.0                                      # share of exactly-zero image voxels


@dataclass
class Fingerprint:
    """The dataset: every case, and the foreground intensity statistics per channel."""

    key: str
    layout: str
    channel_names: list[str]
    label_names: dict[str, int]
    cases: list[CaseFingerprint]
    intensity: list[dict[str, float]]  # per channel: p00_5, p50, p99_5, mean, std (inside the foreground)
    format: str = FORMAT

    # ---------------------------------------------------------------- summaries the plan reads
    def median(self, attr: str) -> list[float]:
        """Per-axis median of ``shape`` or ``spacing`` over the cases."""
        rows = [getattr(c, attr) for c in self.cases]
        return [float(np.median([r[a] for r in rows])) for a in range(len(rows[0]))]

    @property
    def is_volume(self) -> bool:
        return all(len(c.shape) == 3 for c in self.cases)

    @property
    def is_photo(self) -> bool:
        return all(c.format in PHOTO_FORMATS for c in self.cases)

    @property
    def label_values(self) -> list[int]:
        """Every non-zero label value some mask holds."""
        return sorted({int(v) for c in self.cases for v in c.label_voxels if int(v) > 0})

    def foreground_share(self) -> float:
        """Median share of a case's voxels that are foreground (any label)."""
        return float(np.median([sum(n for v, n in c.label_voxels.items() if int(v) > 0) / max(1, int(np.prod(c.shape)))
                                for c in self.cases]))

    def thickness(self) -> float:
        """Median in-plane half-thickness (pixels) of the foreground objects over cases and labels."""
        vals = [t for c in self.cases for t in c.thickness_px.values() if t > 0]
        return float(np.median(vals)) if vals else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Fingerprint":
        cases = [CaseFingerprint(**c) for c in d["cases"]]
        return cls(**{**d, "cases": cases})


def dataset_key(paths: list[Path]) -> str:
    """A hash of the dataset's file list with each file's size and modification time (any change recomputes)."""
    h = hashlib.sha256()
    for p in sorted(set(paths), key=str):
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _thickness(mask: np.ndarray) -> float:
    """Median half-thickness of ``mask``'s objects in pixels: the in-plane distance from a foreground pixel to the
    background, at the objects' medial pixels (thin vessels ~1-2, organs and polyps tens)."""
    planes = mask if mask.ndim == 3 else mask[None]
    vals = []
    for plane in planes[:: max(1, len(planes) // 16)]:  # a sample of slices is enough
        if plane.any():
            edt = ndimage.distance_transform_edt(plane)
            ridge = (edt == ndimage.maximum_filter(edt, size=3)) & plane
            vals.append(edt[ridge])
    return float(np.median(np.concatenate(vals))) if vals else 0.0


def case_fingerprint(ref, image: np.ndarray, meta: medio.ImageMeta, mask: np.ndarray, modality: str,
                     rng: np.random.Generator) -> tuple[CaseFingerprint, list[np.ndarray]]:
    """The fingerprint of one case, and per channel a sample of its foreground intensities."""
    values, counts = np.unique(mask, return_counts=True)
    labels = {str(int(v)): int(n) for v, n in zip(values, counts)}
    objects, thickness = {}, {}
    for v in values:
        if v == 0:
            continue
        m = mask == v
        objects[str(int(v))] = int(ndimage.label(m, np.ones((3,) * m.ndim, bool))[1])
        thickness[str(int(v))] = _thickness(m)
    chans = image.reshape(*meta.shape, -1)
    fg = mask > 0
    samples = []
    for c in range(chans.shape[-1]):
        x = chans[..., c][fg] if fg.any() else chans[..., c].ravel()
        samples.append(rng.choice(x, min(SAMPLES_PER_CASE, x.size), replace=False) if x.size else x)
    fp = CaseFingerprint(ref.case_id, list(meta.shape), [float(s) for s in meta.spacing], bool(meta.spacing_known),
                         int(meta.channels), meta.format, modality, labels, objects, thickness,
                         float(np.mean(chans == 0)))
    return fp, samples


def compute(spec, refs: list, read_case) -> Fingerprint:
    """Read every case once (``read_case(ref) -> (image, meta, mask)``) and summarise it."""
    rng = np.random.default_rng(0)
    cases, samples = [], []
    names = spec.channel_names
    for ref in refs:
        image, meta, mask = read_case(ref)
        modality = names[0] if names else str(meta.extra.get("modality") or "")
        fp, s = case_fingerprint(ref, image, meta, mask, modality, rng)
        cases.append(fp)
        samples.append(s)
    intensity = []
    for c in range(max(fp.channels for fp in cases)):
        x = np.concatenate([s[c] for s in samples if len(s) > c]).astype(np.float64)
        p = np.percentile(x, [0.5, 50, 99.5]) if x.size else [0.0, 0.0, 0.0]
        intensity.append({"p00_5": float(p[0]), "p50": float(p[1]), "p99_5": float(p[2]),
                          "mean": float(x.mean()) if x.size else 0.0, "std": float(x.std()) if x.size else 0.0})
    files = [p for r in refs for p in (r.channels or [r.image]) + [r.mask] if p is not None]
    return Fingerprint(dataset_key(files), spec.layout, list(names), dict(spec.label_names), cases, intensity)


def load_or_compute(spec, refs: list, read_case, out_dir: Path) -> Fingerprint:
    """The cached ``out_dir/fingerprint.json`` when its key matches the dataset's files, else a new one (written)."""
    path = Path(out_dir) / "fingerprint.json"
    files = [p for r in refs for p in (r.channels or [r.image]) + [r.mask] if p is not None]
    key = dataset_key(files)
    if path.is_file():
        try:
            cached = Fingerprint.from_dict(json.loads(path.read_text(encoding="utf-8")))
            if cached.key == key and cached.format == FORMAT:
                log.info("数据指纹: 使用缓存 %s", path)
                return cached
        except (OSError, ValueError, TypeError, KeyError):
            pass  # unreadable or from another version: recompute
    fp = compute(spec, refs, read_case)
    write_json_atomic(path, fp.to_dict())
    return fp

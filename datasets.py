"""Real datasets: layout detection, a dataset check that lists every problem, loading, patch sampling.

Layouts detected from ``--data DIR`` (a single sub-folder is descended into):

* **MSD / nnU-Net raw**: ``imagesTr/`` + ``labelsTr/`` (+ optional ``dataset.json`` whose ``labels``
  map names to values, either ``{"1": "Anterior"}`` (MSD) or ``{"Anterior": 1}`` (nnU-Net v2));
  nnU-Net's ``_0000`` channel suffix is ignored when matching.
* **Paired folders**: ``images/`` + a mask folder (``masks/``, ``labels/``, ``1st_manual/``, ``manual/``,
  ``gt/``, ``groundtruth/``, ``annotations/``), matched by file stem after dropping suffixes such as
  ``_mask``, ``_manual1``, ``_training``, ``_test``, else by case number. A ``mask/`` folder next to
  ``1st_manual/`` is a field-of-view (region of interest) mask, as in DRIVE. Sub-folders named
  ``training``/``train`` and ``test`` (and ``val``) each holding such a pair give an official split.
* **DICOM series + mask series** (3D-IRCADb): folders holding ``PATIENT_DICOM`` (folder or zip) and
  ``MASKS_DICOM`` (folder or zip of one series per structure); ``--labels liver`` picks structures.

``--images-dir`` / ``--masks-dir`` name the folders explicitly when detection cannot decide.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

import medio
from errors import InputError
from preprocess import PreparedVolume, Preprocessing, class_mask, pad_value, prepare_volume, to_classes, to_planes

log = logging.getLogger(__name__)

MASK_DIR_NAMES = ("masks", "labels", "1st_manual", "manual", "gt", "groundtruth", "annotations", "segmentations", "label")
IMAGE_DIR_NAMES = ("images", "image", "imgs", "img")
ROI_DIR_NAMES = ("fov", "roi")  # plus "mask" when a 1st_manual folder holds the labels
SPLIT_DIR_NAMES = {"training": "train", "train": "train", "test": "test", "testing": "test", "val": "val", "validation": "val"}
_STRIP = re.compile(r"(_0000|_mask|_masks|_manual\d*|_training|_test|_seg|_segmentation|_label|_labels|_gt)+$", re.I)
_CHANNEL = re.compile(r"^(.+)_(\d{4})$")  # nnU-Net: <case>_0000, <case>_0001, ... one file per channel


@dataclass
class CaseRef:
    """Where one case's files are; ``mask_series`` lists structure groups for DICOM mask series."""

    case_id: str
    image: Path
    mask: Path | None
    roi: Path | None = None
    split: str | None = None  # official split from the layout, if any
    mask_series: list[list[str]] | None = None
    channels: list[Path | None] | None = None  # nnU-Net's one file per channel (None = that channel is missing)


@dataclass
class DatasetSpec:
    root: Path
    layout: str
    cases: list[CaseRef]
    label_names: dict[str, int] = field(default_factory=dict)
    structures: list[str] = field(default_factory=list)  # DICOM mask series available
    channel_names: list[str] = field(default_factory=list)  # dataset.json's channel_names / MSD modality, in order


@dataclass
class LoadedCase:
    """One case as planes: images (Z, C, H, W) float32 normalised, labels (Z, H, W) classes, roi (Z, H, W) bool."""

    ref: CaseRef
    planes: np.ndarray
    labels: np.ndarray
    roi: np.ndarray | None
    meta: medio.ImageMeta
    is_volume: bool
    mask_values: tuple[int, ...] = ()  # the label values the stored mask holds (before mapping to classes)
    volume: PreparedVolume | None = None  # 3D models: the case at the target spacing (planes is then None)


# ------------------------------------------------------------------------------------ discovery
def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (p.is_file() or p.is_dir()))


def _stem(path: Path) -> str:
    """File name without its image suffix (.nii.gz too)."""
    name = path.name
    for suf in sorted(medio.SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def case_key(path: Path) -> str:
    """File name without suffixes (.nii.gz too) and without mask/channel suffixes, lower-case."""
    return _STRIP.sub("", _stem(path)).lower()


def _number(key: str) -> str | None:
    m = re.search(r"\d+", key)
    return str(int(m.group())) if m else None


def _pair(images: list[Path], masks: list[Path], where: Path) -> list[tuple[Path, Path | None]]:
    by_key = {case_key(m): m for m in masks}
    by_num: dict[str, Path] = {}
    for m in masks:
        n = _number(case_key(m))
        if n is not None:
            by_num.setdefault(n, m)
    out = []
    for img in images:
        k = case_key(img)
        out.append((img, by_key.get(k) or by_num.get(_number(k) or "")))
    return out


def _sub(folder: Path, names) -> Path | None:
    lower = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    return next((lower[n] for n in names if n in lower), None)


def _paired_cases(folder: Path, split: str | None, images_dir: Path | None = None,
                  masks_dir: Path | None = None) -> list[CaseRef] | None:
    img_dir = images_dir or _sub(folder, IMAGE_DIR_NAMES)
    msk_dir = masks_dir or _sub(folder, MASK_DIR_NAMES)
    if img_dir is None or msk_dir is None:
        return None
    roi_dir = _sub(folder, ROI_DIR_NAMES) or (_sub(folder, ("mask",)) if msk_dir.name.lower() != "mask" else None)
    images = [p for p in _files(img_dir) if p.is_file()]
    pairs = _pair(images, [p for p in _files(msk_dir) if p.is_file()], msk_dir)
    rois = dict(_pair(images, [p for p in _files(roi_dir) if p.is_file()], roi_dir)) if roi_dir else {}
    return [CaseRef(case_key(i), i, m, rois.get(i), split) for i, m in pairs]


def _dataset_json_labels(root: Path) -> dict[str, int]:
    path = root / "dataset.json"
    doc = _dataset_json(root)
    if doc is None:
        return {}
    labels = doc.get("labels", {}) if isinstance(doc, dict) else None
    if not isinstance(labels, dict):
        found = type(doc).__name__ if not isinstance(doc, dict) else f"'labels' as a {type(labels).__name__}"
        raise InputError(f"{path}: found {found}, expected a JSON object whose 'labels' maps values to names "
                         '(MSD: {"1": "Anterior"}) or names to values (nnU-Net v2: {"Anterior": 1})')
    out = {}
    for k, v in labels.items():
        if str(k).lstrip("-").isdigit():  # MSD: {"1": "Anterior"}
            out[str(v).lower()] = int(k)
        elif isinstance(v, int):  # nnU-Net v2: {"Anterior": 1}
            out[str(k).lower()] = v
    return {k: v for k, v in out.items() if v != 0}


def _dataset_json(root: Path) -> object:
    """``root/dataset.json`` parsed (None when there is none); invalid JSON is a clear InputError."""
    path = root / "dataset.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not valid JSON ({' '.join(str(exc).split())}; expected nnU-Net's / MSD's "
                         "dataset.json)") from None


def _dataset_json_channels(root: Path) -> list[str]:
    """The channel (modality) names of ``dataset.json``, in channel order: nnU-Net v2's ``channel_names`` or MSD's
    ``modality`` (``{"0": "FLAIR", "1": "T1w"}``); empty without a dataset.json or either key."""
    path = root / "dataset.json"
    doc = _dataset_json(root)
    names = doc.get("channel_names", doc.get("modality")) if isinstance(doc, dict) else None
    if names is None:
        return []
    if not isinstance(names, dict) or not all(str(k).isdigit() for k in names):
        raise InputError(f"{path}: 'channel_names' / 'modality' is {str(names)[:80]!r}, expected an object "
                         'mapping channel indices to names ({"0": "T1", "1": "T2"})')
    return [str(names[k]) for k in sorted(names, key=int)]


def _channel_of(path: Path) -> tuple[str, int] | None:
    """(case id, channel index) of an nnU-Net channel file ``<case>_000N.<suffix>``, else None."""
    m = _CHANNEL.match(_stem(path))
    return (m.group(1).lower(), int(m.group(2))) if m else None


def _channel_cases(images: list[Path], masks: list[Path], n_declared: int) -> list[CaseRef]:
    """nnU-Net's one-file-per-channel layout: channel files grouped into one case by their case id (the name
    without ``_000N``). A missing channel stays ``None`` for the dataset check to list."""
    groups: dict[str, dict[int, Path]] = {}
    for p in images:
        case, channel = _channel_of(p) or (case_key(p), 0)
        groups.setdefault(case, {})[channel] = p
    n = max(n_declared, *(max(g) + 1 for g in groups.values())) if groups else n_declared
    by_key = {case_key(m): m for m in masks}
    return [CaseRef(case, files.get(0) or next(iter(files.values())), by_key.get(case),
                    channels=[files.get(c) for c in range(n)]) for case, files in sorted(groups.items())]


def _dicom_case(folder: Path) -> CaseRef | None:
    img = next((p for p in (folder / "PATIENT_DICOM", folder / "PATIENT_DICOM.zip") if p.exists()), None)
    msk = next((p for p in (folder / "MASKS_DICOM", folder / "MASKS_DICOM.zip") if p.exists()), None)
    if img is None or msk is None:
        return None
    return CaseRef(folder.name, img, msk)


def _dicom_structures(mask_src: Path) -> list[str]:
    if mask_src.is_dir():
        return sorted(p.name for p in mask_src.iterdir() if p.is_dir())
    import zipfile
    with zipfile.ZipFile(mask_src) as zf:
        return sorted({Path(n).parent.name for n in zf.namelist() if not n.endswith("/") and Path(n).parent.name})


def discover(data_dir: str | Path, images_dir: str | Path | None = None, masks_dir: str | Path | None = None) -> DatasetSpec:
    """Find the layout and the cases of a dataset folder (see the module docstring); with ``images_dir`` and
    ``masks_dir`` (``--data`` then optional) those two folders are paired as they are."""
    if images_dir or masks_dir:
        if not (images_dir and masks_dir):
            raise InputError(f"{images_dir or masks_dir}: give both --images-dir and --masks-dir (or neither)")
        for flag, folder in (("--images-dir", images_dir), ("--masks-dir", masks_dir)):
            if not Path(folder).is_dir():
                raise InputError(f"{folder}: {flag} folder not found (expected a folder of image / mask files)")
        root = Path(data_dir) if data_dir else Path(images_dir).parent
        cases = _paired_cases(root, None, Path(images_dir), Path(masks_dir))
        return DatasetSpec(root, "paired (explicit)", cases or [])
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder not found (expected a folder with imagesTr/+labelsTr/, images/+masks/ "
                         "or PATIENT_DICOM+MASKS_DICOM)")
    while True:
        children = [p for p in _files(root) if p.is_dir()]
        files = [p for p in _files(root) if p.is_file() and not p.name.endswith(".md")]
        names = {p.name.lower() for p in children}
        if "imagestr" in names and "labelstr" in names:
            sub = {p.name.lower(): p for p in children}
            images = [p for p in _files(sub["imagestr"]) if p.is_file()]
            channels = _dataset_json_channels(root)
            labels = [p for p in _files(sub["labelstr"]) if p.is_file()]
            if len(channels) > 1 or (images and all(_channel_of(p) for p in images)):
                cases = _channel_cases(images, labels, max(1, len(channels)))
            else:
                cases = [CaseRef(case_key(i), i, m) for i, m in _pair(images, labels, sub["labelstr"])]
            return DatasetSpec(root, "msd", cases, _dataset_json_labels(root), channel_names=channels)
        dicom = [c for c in ([_dicom_case(root)] + [_dicom_case(p) for p in children]) if c]
        if dicom:
            return DatasetSpec(root, "dicom+masks", dicom, structures=_dicom_structures(dicom[0].mask))
        splits = {SPLIT_DIR_NAMES[p.name.lower()]: p for p in children if p.name.lower() in SPLIT_DIR_NAMES}
        split_cases = [c for s, p in splits.items() for c in (_paired_cases(p, s) or [])]
        if split_cases:
            return DatasetSpec(root, "paired (official split)", split_cases)
        cases = _paired_cases(root, None)
        if cases is not None:
            return DatasetSpec(root, "paired", cases)
        if len(children) == 1 and not files:
            root = children[0]
            continue
        raise InputError(f"{Path(data_dir)}: no known dataset layout (expected imagesTr/+labelsTr/, images/+masks/, "
                         "PATIENT_DICOM+MASKS_DICOM, or --images-dir/--masks-dir)")


# -------------------------------------------------------------------------------------- loading
def resolve_dicom_labels(spec: DatasetSpec, labels: str | None) -> list[list[str]]:
    """``--labels liver`` or ``livertumor01+livertumor02,liver`` -> structure groups of a DICOM mask layout."""
    if not labels:
        raise InputError(f"{spec.root}: DICOM mask series need --labels naming structures "
                         f"(available: {', '.join(spec.structures)})")
    groups = [[s.strip() for s in g.split("+") if s.strip()] for g in labels.split(",")]
    unknown = [s for g in groups for s in g if s not in spec.structures]
    if unknown:
        raise InputError(f"{spec.root}: unknown structure(s) {', '.join(unknown)} (available: {', '.join(spec.structures)})")
    return groups


def read_case_image(ref: CaseRef) -> tuple[np.ndarray, medio.ImageMeta]:
    """A case's image: its channel files stacked (channels last) when it has several, else its one file."""
    if ref.channels and len(ref.channels) > 1:
        return medio.read_channels(ref.channels, ref.case_id)
    return medio.read_image(ref.image)


def read_case_mask(ref: CaseRef, meta: medio.ImageMeta) -> np.ndarray:
    """A case's stored label values on the image's grid (DICOM mask series: structure group k as value k)."""
    if ref.mask is None:
        raise InputError(f"{ref.image}: no matching mask found")
    if not ref.mask_series:
        return medio.read_mask(ref.mask, reference=meta)[0]
    values = np.zeros(meta.shape, np.uint8)
    for k, group in enumerate(ref.mask_series, start=1):
        for structure in group:
            values[medio.read_mask(ref.mask, series=structure, reference=meta)[0] > 0] = k
    return values


def load_case(ref: CaseRef, prep: Preprocessing) -> LoadedCase:
    """Read, check and preprocess one case. Raises InputError naming the file on any problem."""
    image, meta = read_case_image(ref)
    is_volume = len(meta.shape) == 3
    if ref.mask is None:
        raise InputError(f"{ref.image}: no matching mask found")
    if ref.mask_series:  # DICOM: one mask series per structure, merged into classes
        classes = np.zeros(meta.shape, np.uint8)
        for k, group in enumerate(ref.mask_series, start=1):
            for structure in group:
                m, mmeta = medio.read_mask(ref.mask, series=structure, reference=meta)
                classes[m > 0] = k
        values = tuple(int(v) for v in np.unique(classes))
    else:
        mask, mask_meta = medio.read_mask(ref.mask, reference=meta)
        classes = to_classes(mask, prep)
        values = tuple(mask_meta.extra.get("labels", ()))
    roi = None
    if ref.roi is not None:
        r, _ = medio.read_mask(ref.roi, reference=meta)
        roi = (r > 0)[None] if not is_volume else r > 0
    labels = classes if is_volume else classes[None]
    if prep.dim == 3:
        if not is_volume:
            raise InputError(f"{ref.image}: a {len(meta.shape)}D image cannot train a 3D model (expected volumes; "
                             "use --dim 2)")
        return LoadedCase(ref, None, labels.astype(np.uint8), roi, meta, True, values,
                          prepare_volume(image, meta.spacing, prep, classes))
    try:
        planes = to_planes(image, 3 if is_volume else 2, prep)
    except InputError as exc:
        raise InputError(f"{ref.image}: {exc} (expected --in-channels 0, or the image's own channel count)") from None
    return LoadedCase(ref, planes, labels.astype(np.uint8), roi, meta, is_volume, values)


def load_cases(refs: list[CaseRef], prep: Preprocessing, declared: dict[str, int] | None = None) -> list[LoadedCase]:
    """Load every case; collect every problem and fail once listing them all (nnU-Net's dataset check).

    Problems include, besides unreadable or mismatched files: mask values that ``dataset.json`` does not
    declare (``declared``: name -> value), and classes that no mask of the dataset holds (training on an
    empty target would report a perfect but meaningless Dice).
    """
    loaded, problems = [], []
    allowed = {0, *declared.values()} if declared else None
    for ref in refs:
        try:
            case = load_case(ref, prep)
            loaded.append(case)
        except InputError as exc:
            problems.append(str(exc))
            continue
        if allowed is not None and not ref.mask_series and set(case.mask_values) - allowed:
            problems.append(f"{ref.mask}: mask holds label value(s) {sorted(set(case.mask_values) - allowed)} that "
                            f"dataset.json does not declare (declared: {sorted(allowed)})")
    bad_cases = len(problems)
    if loaded and not problems:
        problems += _absent_classes(loaded, prep)
    if problems:
        shown = "\n  - ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        what = (f"{bad_cases} of {len(refs)} cases have problems" if bad_cases
                else f"{len(problems)} problem(s) across the {len(refs)} cases")
        raise InputError(f"dataset check failed: {what}:\n  - {shown}{more}")
    return loaded


def _absent_classes(cases: list[LoadedCase], prep: Preprocessing) -> list[str]:
    """One problem per class that no case's mask holds, naming the values the masks do hold."""
    present = {k for k in range(1, prep.n_classes + 1) if any(class_mask(c.labels, k, prep.regions).any() for c in cases)}
    found = sorted({v for c in cases for v in c.mask_values if v})
    where = f"{cases[0].ref.mask.parent if cases[0].ref.mask else cases[0].ref.image.parent}"
    missing = []
    for k, name in enumerate(prep.class_names, start=1):
        if k not in present:
            wanted = prep.class_values[k - 1] if prep.class_values else "any non-zero value"
            missing.append(f"{where}: class {name!r} (label value(s) {wanted}) occurs in no mask of the {len(cases)} "
                           f"case(s); the masks hold the values {found or 'none (every mask is empty)'}; expected "
                           f"--labels to name values the masks hold")
    return missing


def split_cases(refs: list[CaseRef], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Per-case (per-patient) split: official test/val from the layout if present, else seeded random."""
    rng = np.random.default_rng(seed)
    official = {r.case_id: r.split for r in refs if r.split}
    ids = [r.case_id for r in refs]
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    pool = [i for i in ids if official.get(i) in (None, "train")]
    out["test"] = [i for i in ids if official.get(i) == "test"]
    out["val"] = [i for i in ids if official.get(i) == "val"]
    pool = list(rng.permutation(pool)) if pool else []
    if not out["test"]:
        n_test = max(1, int(round(len(ids) * test_fraction))) if test_fraction > 0 and len(pool) > 2 else 0
        out["test"], pool = pool[:n_test], pool[n_test:]
    if not out["val"]:
        n_val = max(1, int(round((len(pool) + len(out["test"])) * val_fraction))) if val_fraction > 0 and len(pool) > 1 else 0
        out["val"], pool = pool[:n_val], pool[n_val:]
    out["train"] = pool
    return {k: sorted(str(i) for i in v) for k, v in out.items()}


# ------------------------------------------------------------------------------- patch sampling
class _Patches(Dataset):
    """What both patch samplers share: ``length`` crops per epoch, each decided by (seed, epoch, index) alone, fetched
    a batch at a time. Subclasses implement ``_crop(i) -> (image crop, label crop)``."""

    length: int
    epoch: int

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def _crop(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._crop(i)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        crops = [self._crop(i) for i in idx]
        return (torch.from_numpy(np.stack([c[0] for c in crops])), torch.from_numpy(np.stack([c[1] for c in crops])))


class PatchDataset(_Patches):
    """Random ``patch`` x ``patch`` crops of 2D planes, foreground-oversampled, deterministic per (seed, epoch, index).

    With probability ``fg_prob`` a crop is centred on a random foreground pixel of a random plane that
    has foreground; otherwise plane and position are uniform. Planes smaller than the patch are padded
    (images with their case minimum, labels with 0) once, up front. Picklable (no lambdas).
    """

    def __init__(self, planes: list[np.ndarray], labels: list[np.ndarray], patch: int, length: int,
                 fg_prob: float = 0.5, seed: int = 0, pad_values: list[float] | None = None):
        self.patch, self.length, self.fg_prob, self.seed, self.epoch = patch, length, fg_prob, seed, 0
        self.planes, self.labels = [], []
        for i, (x, y) in enumerate(zip(planes, labels)):
            xt, pads = _pad_np(x, patch, pad_values[i] if pad_values else float(x.min()))
            yt, _ = _pad_np(y[None], patch, 0)
            self.planes.append(xt)
            self.labels.append(yt[0])
        self.fg_planes = [i for i, y in enumerate(self.labels) if y.any()]
        self.fg_coords = {i: np.flatnonzero(self.labels[i]) for i in self.fg_planes}


    def _crop(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng((self.seed, self.epoch, i))
        p = self.patch
        if self.fg_planes and rng.random() < self.fg_prob:
            k = self.fg_planes[rng.integers(len(self.fg_planes))]
            h, w = self.labels[k].shape
            cy, cx = divmod(int(self.fg_coords[k][rng.integers(len(self.fg_coords[k]))]), w)
            y0 = int(np.clip(cy - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, h - p))
            x0 = int(np.clip(cx - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, w - p))
        else:
            k = int(rng.integers(len(self.planes)))
            h, w = self.labels[k].shape
            y0, x0 = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
        return self.planes[k][:, y0:y0 + p, x0:x0 + p], self.labels[k][y0:y0 + p, x0:x0 + p]


def _pad_np(x: np.ndarray, patch: int, value: float) -> tuple[np.ndarray, tuple[int, int]]:
    h, w = x.shape[-2:]
    dh, dw = max(0, patch - h), max(0, patch - w)
    if dh or dw:
        x = np.pad(x, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)), constant_values=value)
    return x, (dh, dw)


def training_planes(cases: list[LoadedCase], prep: Preprocessing) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
    """All planes of ``cases`` at training scale (``resize_long_side``), with each case's pad value."""
    from preprocess import resize_planes, scaled_size

    planes, labels, pads = [], [], []
    for c in cases:
        z, _, h, w = c.planes.shape
        size = scaled_size(h, w, prep)
        x = resize_planes(torch.from_numpy(c.planes), size).numpy()
        y = resize_planes(torch.from_numpy(c.labels), size, labels=True).numpy()
        v = pad_value(c.planes)
        for k in range(z):
            planes.append(x[k])
            labels.append(y[k])
            pads.append(v)
    return planes, labels, pads


class PatchDataset3D(_Patches):
    """Random 3D patches of prepared volumes, deterministic per (seed, epoch, index).

    With probability ``fg_prob`` a patch is centred (with a jitter of a quarter patch) on a voxel of a class drawn
    uniformly among the classes (regions) present, so small classes are seen as often as large ones (nnU-Net's
    class-balanced oversampling); otherwise case and position are uniform. Volumes smaller than the patch are
    padded once, up front (images with their minimum, labels with 0).
    """

    MAX_COORDS = 20_000  # foreground voxels remembered per case and class (a sample is enough to centre patches)

    def __init__(self, volumes: list[np.ndarray], labels: list[np.ndarray], patch: tuple[int, int, int], length: int,
                 fg_prob: float = 0.33, seed: int = 0, n_classes: int = 1, regions: bool = False):
        self.patch, self.length, self.fg_prob, self.seed, self.epoch = tuple(patch), length, fg_prob, seed, 0
        self.volumes, self.labels = [], []
        for x, y in zip(volumes, labels):
            pads = [(d // 2, d - d // 2) for d in (max(0, p - s) for p, s in zip(self.patch, y.shape))]
            self.volumes.append(np.pad(x, [(0, 0), *pads], constant_values=float(x.min())) if any(map(sum, pads)) else x)
            self.labels.append(np.pad(y, pads) if any(map(sum, pads)) else y)
        rng = np.random.default_rng(seed)
        self.coords: dict[int, list[tuple[int, np.ndarray]]] = {}
        for i, y in enumerate(self.labels):
            for k in range(1, n_classes + 1):
                idx = np.flatnonzero(class_mask(y, k, regions))
                if len(idx):
                    if len(idx) > self.MAX_COORDS:
                        idx = rng.choice(idx, self.MAX_COORDS, replace=False)
                    self.coords.setdefault(k, []).append((i, idx))


    def _crop(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng((self.seed, self.epoch, i))
        p = self.patch
        if self.coords and rng.random() < self.fg_prob:
            k = sorted(self.coords)[rng.integers(len(self.coords))]
            case, idx = self.coords[k][rng.integers(len(self.coords[k]))]
            shape = self.labels[case].shape
            centre = np.unravel_index(int(idx[rng.integers(len(idx))]), shape)
            start = [int(np.clip(c - n // 2 + rng.integers(-(n // 4), n // 4 + 1), 0, s - n))
                     for c, n, s in zip(centre, p, shape)]
        else:
            case = int(rng.integers(len(self.volumes)))
            shape = self.labels[case].shape
            start = [int(rng.integers(0, s - n + 1)) for s, n in zip(shape, p)]
        box = tuple(slice(s, s + n) for s, n in zip(start, p))
        return self.volumes[case][(slice(None), *box)], self.labels[case][box]



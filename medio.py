"""Medical image I/O: one reader/writer contract for NIfTI, DICOM, NRRD/MetaImage and 2D raster images.

Reading
    ``read_image(path)`` -> ``(array, ImageMeta)`` and ``read_mask(path)`` -> ``(labels, ImageMeta)``.

    * 3D volumes are returned as ``(Z, Y, X)`` (slice axis first), 2D images as ``(H, W)``, or
      ``(H, W, 3)`` for colour images whose channels differ. Images are float32 with their stored values
      (HU for CT after RescaleSlope/Intercept, 0..255 for 8-bit pictures; nothing is normalised).
      Masks are uint8 label arrays of the same spatial shape; a mask stored as 0/255 (or 0/max) becomes
      0/1, palette images give their palette indices, JPEG masks are thresholded at > 127.
    * A single DICOM file is a 2D image ``(H, W)``; a DICOM folder or ``.zip`` is always a 3D series
      ``(Z, Y, X)``, even with one slice. Zips are read in memory and never extracted.

Geometry in :class:`ImageMeta`
    * ``spacing`` (mm) is in ARRAY AXIS ORDER, e.g. ``(dz, dy, dx)`` for a volume, ``(dy, dx)`` in 2D.
    * ``origin`` and ``direction`` use ITK/DICOM patient coordinates (LPS) and are, like SimpleITK's, fully
      reversed into array order: ``origin = (z, y, x)`` of the first voxel and ``direction[r][c]`` is the
      world component ``r`` (z, y, x order) of the unit vector along array axis ``c``.
    * ``affine`` is a NIfTI-style 4x4 RAS affine mapping voxel ``(i, j, k) = (x, y, z)`` index, i.e.
      ``array[k, j, i]``, to world millimetres. For DICOM it is built from the first sorted slice as
      ``diag(-1, -1, 1, 1) @ [[row*dx, col*dy, normal*dz, IPP], [0, 0, 0, 1]]`` (LPS -> RAS), where
      ``row``/``col`` are ImageOrientationPatient's two cosines and ``normal = row x col``. It is
      what :func:`write_mask` writes for 3D inputs. Plain 2D images have ``affine=None`` and
      ``spacing_known=False`` (spacing 1.0 assumed).

Writing
    :func:`write_mask` / :func:`write_probability` write NIfTI (``.nii.gz``) for NIfTI and 3D inputs, with the
    input's affine (and NIfTI qform/sform codes), and PNG for other 2D inputs. Writes are atomic and
    never overwrite the input file.

Every user-caused problem raises :class:`errors.InputError` with a one-line message naming the file.
"""
from __future__ import annotations

import io
import logging
import math
import os
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from errors import InputError

log = logging.getLogger(__name__)

_SUFFIX_FORMATS = {
    ".nii": "nifti", ".nii.gz": "nifti", ".dcm": "dicom", ".zip": "dicom",
    ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".bmp": "bmp", ".tif": "tiff", ".tiff": "tiff",
    ".gif": "gif", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha", ".mhd": "mha",
}
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(_SUFFIX_FORMATS)
_RASTER_FORMATS = {"png", "jpeg", "bmp", "tiff", "gif"}
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
_LABEL_TOL = 1e-3        # how far a float mask value may be from an integer
_LOSSY_CHANNEL_TOL = 32  # max channel difference still "grey" in a JPEG mask


@dataclass
class ImageMeta:
    """Where an array came from and how it sits in space (see the module docstring for conventions)."""

    path: str
    format: str
    shape: tuple[int, ...]               # spatial shape, no channel axis
    spacing: tuple[float, ...]           # mm, array axis order
    origin: tuple[float, ...]            # LPS, array axis order
    direction: tuple[tuple[float, ...], ...]
    affine: list[list[float]] | None = None  # 4x4 RAS, (i, j, k) = (x, y, z) index
    spacing_known: bool = True
    channels: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON / ``torch.load(weights_only=True)``-safe representation."""
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageMeta:
        """Inverse of :meth:`to_dict`."""
        d = dict(data)
        for key in ("shape", "spacing", "origin"):
            d[key] = tuple(d[key])
        d["direction"] = tuple(tuple(row) for row in d["direction"])
        return cls(**d)


def json_safe(obj: Any) -> Any:
    """Plain JSON values: NumPy / torch scalars and arrays converted, NaN and infinities -> None, other objects
    (paths, ...) -> str. Used for image metadata and for predict.py's reports."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # np.ndarray, np.generic, torch.Tensor
        return json_safe(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def _oneline(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ----------------------------------------------------------------------------------------------- detection
def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is a file carrying the DICOM ``DICM`` marker at byte 128."""
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def detect_format(path: str | os.PathLike) -> str:
    """Format name of an existing file or folder: by suffix, DICOM folder, or DICOM preamble."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        if any(f.is_file() for f in p.rglob("*")):
            return "dicom"
        raise InputError(f"{p}: folder is empty (expected a DICOM series folder)")
    fmt = _SUFFIX_FORMATS.get(_suffix(p))
    if fmt is None and is_dicom_file(p):
        fmt = "dicom"
    if fmt is None:
        raise InputError(f"{p}: unsupported file type '{_suffix(p) or '(no extension)'}' "
                         f"(expected one of {', '.join(SUPPORTED_SUFFIXES)}, a DICOM file or a DICOM folder)")
    return fmt


# ------------------------------------------------------------------------------------------------ geometry
def _geometry(ras_affine: np.ndarray, ndim: int) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
    """Array-order LPS origin and direction from a 4x4 RAS affine (2D: the in-plane part)."""
    lps = _LPS_RAS @ ras_affine
    m = lps[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    d = (m / np.where(norms > 0, norms, 1.0))[::-1, ::-1][3 - ndim:, 3 - ndim:]
    origin = lps[:3, 3][::-1][3 - ndim:]
    return tuple(map(float, origin)), tuple(tuple(map(float, r)) for r in d)


def _meta(path: Path, fmt: str, spacing, affine: np.ndarray | None, ndim: int, *,
          store_affine: bool = True, **kw) -> ImageMeta:
    """Meta with origin/direction derived from ``affine`` (identity when None); shape is set by _read."""
    if affine is None:
        origin, direction = (0.0,) * ndim, tuple(tuple(float(i == j) for j in range(ndim)) for i in range(ndim))
    else:
        origin, direction = _geometry(affine, ndim)
    return ImageMeta(path=str(path), format=fmt, shape=(), spacing=tuple(float(s) for s in spacing),
                     origin=origin, direction=direction,
                     affine=affine.tolist() if affine is not None and store_affine else None, **kw)


# ------------------------------------------------------------------------------------------------- readers
def _read_nifti(path: Path, fmt: str, series: str | None, mask: bool) -> tuple[np.ndarray, ImageMeta]:
    import nibabel as nib

    img = nib.load(str(path), mmap=False)
    shape = tuple(img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        raise InputError(f"{path}: NIfTI image has shape {tuple(img.shape)} (expected 2D or 3D, "
                         f"or 4D with a single volume)")
    data = np.asanyarray(img.dataobj) if mask else img.get_fdata(dtype=np.float32)
    data = data.reshape(shape).T  # (i, j, k) -> (k, j, i)
    hdr = img.header
    ndim = len(shape)
    extra = {"nifti": {
        "qform": hdr.get_qform().tolist(), "qform_code": int(hdr["qform_code"]),
        "sform": hdr.get_sform().tolist(), "sform_code": int(hdr["sform_code"]),
        "xyzt_units": int(hdr["xyzt_units"]), "dtype": str(img.get_data_dtype())}}
    zooms = hdr.get_zooms()[:ndim][::-1]
    return data, _meta(path, fmt, zooms, np.asarray(img.affine, dtype=float), ndim, extra=extra)


def _read_sitk(path: Path, fmt: str, series: str | None, mask: bool) -> tuple[np.ndarray, ImageMeta]:
    try:
        import SimpleITK as sitk
    except ImportError as exc:  # pragma: no cover - SimpleITK is in requirements.txt
        raise InputError(f"{path}: reading {fmt.upper()} needs SimpleITK (pip install SimpleITK)") from exc
    img = sitk.ReadImage(str(path))
    ndim, channels = img.GetDimension(), img.GetNumberOfComponentsPerPixel()
    if ndim not in (2, 3):
        raise InputError(f"{path}: {fmt.upper()} image has {ndim} dimensions (expected 2D or 3D)")
    arr = sitk.GetArrayFromImage(img)  # already (Z, Y, X[, C])
    if channels == 1 and arr.ndim == ndim + 1:
        arr = arr[..., 0]
    spacing = img.GetSpacing()[::-1]
    if ndim == 3:
        lps = np.eye(4)
        lps[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
        lps[:3, 3] = img.GetOrigin()
        meta = _meta(path, fmt, spacing, _LPS_RAS @ lps, 3, channels=channels)
    else:
        meta = _meta(path, fmt, spacing, None, 2, channels=channels)
        meta.origin = tuple(img.GetOrigin()[::-1])
        meta.direction = tuple(map(tuple, np.asarray(img.GetDirection()).reshape(2, 2)[::-1, ::-1].tolist()))
    return arr, meta


def _read_raster(path: Path, fmt: str, series: str | None, mask: bool) -> tuple[np.ndarray, ImageMeta]:
    from PIL import Image

    arr = None
    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > 1 and fmt != "tiff":
                log.warning("%s: %d frames, using the first", path, frames)
            if frames == 1 or fmt != "tiff":
                im.load()
                arr = _pil_to_array(im, mask)
    except Exception:
        if fmt != "tiff":
            raise
    if arr is None:  # multi-page or exotic TIFF
        import tifffile

        arr = np.asarray(tifffile.imread(path))
    rgb = arr.ndim >= 3 and arr.shape[-1] in (3, 4) and arr.ndim - 1 in (2, 3)
    if arr.ndim - rgb not in (2, 3):
        raise InputError(f"{path}: image array has shape {arr.shape} (expected 2D, RGB or a 3D stack)")
    ndim = arr.ndim - rgb
    return arr, _meta(path, fmt, (1.0,) * ndim, None, ndim, spacing_known=False,
                      channels=arr.shape[-1] if rgb else 1)


def _pil_to_array(im, mask: bool) -> np.ndarray:
    mode = im.mode
    if mode in ("L", "I", "F") or mode.startswith("I;16") or (mask and mode in ("1", "P")):
        return np.asarray(im)  # palette masks: indices are the labels
    if mode == "1":
        return np.asarray(im.convert("L"))
    if mode in ("LA", "PA"):
        return np.asarray(im)[..., 0] if mask else np.asarray(im.convert("RGBA"))[..., :3]
    return np.asarray(im.convert("RGBA" if mode == "P" else "RGB"))[..., :3]


# ----- DICOM
def _dcmread(src, name: str):
    import pydicom

    try:
        ds = pydicom.dcmread(src, force=True)
    except Exception as exc:
        raise InputError(f"{name}: cannot read DICOM file ({type(exc).__name__}: {_oneline(exc)})") from exc
    if "PixelData" not in ds:
        raise InputError(f"{name}: DICOM file has no pixel data (expected an image slice)")
    return ds


def _match_folder(folder: str, series: str) -> bool:
    s = series.strip("/")
    return folder == s or folder.endswith("/" + s) or folder.rsplit("/", 1)[-1] == s


def _dicom_items(path: Path, series: str | None) -> tuple[list[tuple[str, Any]], bool]:
    """Datasets (name, dataset) of the chosen folder of a DICOM folder or zip; and whether ``series``
    was used to choose that folder."""
    if path.is_dir():
        files = [f for f in sorted(path.rglob("*")) if f.is_file()
                 and (f.suffix.lower() == ".dcm" or is_dicom_file(f))]
        groups: dict[str, list] = defaultdict(list)
        for f in files:
            groups[f.parent.relative_to(path).as_posix()].append(f)
        folder, used = _pick_folder(path, groups, series)
        return [(str(f), _dcmread(f, str(f))) for f in groups[folder]], used
    with zipfile.ZipFile(path) as zf:
        groups = defaultdict(list)
        for info in zf.infolist():
            name = info.filename
            if info.is_dir() or name.startswith("__MACOSX/"):
                continue
            if name.lower().endswith(".dcm") or zf.open(info).read(132)[128:132] == b"DICM":
                groups[name.rsplit("/", 1)[0] if "/" in name else "."].append(name)
        folder, used = _pick_folder(path, groups, series)
        return [(f"{path}:{n}", _dcmread(io.BytesIO(zf.read(n)), f"{path}:{n}")) for n in groups[folder]], used


def _pick_folder(path: Path, groups: dict[str, list], series: str | None) -> tuple[str, bool]:
    if not groups:
        raise InputError(f"{path}: no DICOM files found (expected DICOM slices with a 'DICM' preamble or .dcm)")
    if series is not None:
        hits = [g for g in groups if _match_folder(g, series)]
        if len(hits) == 1:
            return hits[0], True
    if len(groups) == 1:
        return next(iter(groups)), False
    if series is None:
        raise InputError(f"{path}: holds DICOM files in {len(groups)} folders, pass series= one of: "
                         f"{', '.join(sorted(groups))}")
    raise InputError(f"{path}: series '{series}' matches {'several' if hits else 'no'} folders "
                     f"(available: {', '.join(sorted(groups))})")


def _pick_series(path: Path, items: list, series: str | None, used: bool) -> list:
    by_uid: dict[str, list] = defaultdict(list)
    for item in items:
        by_uid[str(item[1].get("SeriesInstanceUID", ""))].append(item)
    if series is not None:
        for uid, group in by_uid.items():
            if series in (uid, str(group[0][1].get("SeriesDescription", ""))):
                return group
        if not used:
            raise InputError(f"{path}: no DICOM series or folder matches series='{series}' "
                             f"(available series UIDs: {', '.join(by_uid)})")
    uid, group = max(by_uid.items(), key=lambda kv: len(kv[1]))
    if len(by_uid) > 1:
        log.info("%s: %d DICOM series, using the largest %s (%d slices); others: %s", path, len(by_uid),
                 uid, len(group), ", ".join(f"{u} ({len(g)})" for u, g in by_uid.items() if u != uid))
    return group


def _dicom_affine(ds, dz: float) -> np.ndarray:
    iop = np.asarray(ds.get("ImageOrientationPatient") or [1, 0, 0, 0, 1, 0], dtype=float)
    dy, dx = (float(v) for v in (ds.get("PixelSpacing") or [1.0, 1.0]))
    row, col = iop[:3], iop[3:]
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * dx, col * dy, np.cross(row, col) * dz
    lps[:3, 3] = np.asarray(ds.get("ImagePositionPatient") or [0, 0, 0], dtype=float)
    return _LPS_RAS @ lps


def _pixels(name: str, ds, mask: bool) -> np.ndarray:
    """Pixels of one dataset: raw for masks, RescaleSlope/Intercept applied (float32) for images."""
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise InputError(f"{name}: cannot decode DICOM pixel data ({type(exc).__name__}: {_oneline(exc)})") from exc
    if mask:
        return arr
    slope, inter = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return arr.astype(np.float32) * np.float32(slope) + np.float32(inter)


def _dicom_extra(ds, **kw) -> dict[str, Any]:
    extra = {key: str(ds.get(tag, "")) for key, tag in (
        ("modality", "Modality"), ("series_uid", "SeriesInstanceUID"), ("series_description", "SeriesDescription"))}
    extra.update(rescale_slope=float(ds.get("RescaleSlope", 1) or 1),
                 rescale_intercept=float(ds.get("RescaleIntercept", 0) or 0), **kw)
    return extra


def _read_dicom(path: Path, fmt: str, series: str | None, mask: bool) -> tuple[np.ndarray, ImageMeta]:
    if path.is_file() and _suffix(path) != ".zip":
        if series is not None:
            raise InputError(f"{path}: series='{series}' given for a single DICOM file (expected a folder or zip)")
        ds = _dcmread(path, str(path))
        arr = _pixels(str(path), ds, mask)
        spp = int(ds.get("SamplesPerPixel", 1))
        if arr.ndim - (spp > 1) != 2:
            raise InputError(f"{path}: DICOM file holds {arr.shape} pixels (expected one 2D frame; "
                             f"multi-frame files are not supported)")
        spacing = ds.get("PixelSpacing") or [1.0, 1.0]
        return arr, _meta(path, fmt, spacing, _dicom_affine(ds, 1.0), 2, store_affine=False,
                          spacing_known="PixelSpacing" in ds, channels=spp, extra=_dicom_extra(ds))

    items, used = _dicom_items(path, series)
    return _stack_series(path, fmt, _pick_series(path, items, series, used), mask)


def dicom_series_datasets(path: str | os.PathLike, series: str | None = None) -> list:
    """The chosen series' full pydicom datasets (pixel data included) of a DICOM folder or zip, in exactly
    the slice order :func:`read_image` / :func:`read_mask` stack them into ``(Z, Y, X)``; ``series`` as there."""
    p = Path(path)
    if detect_format(p) != "dicom" or (p.is_file() and _suffix(p) != ".zip"):
        raise InputError(f"{p}: expected a DICOM series folder or .zip (got a single {detect_format(p)} file)")
    try:
        items, used = _dicom_items(p, series)
        items, _, _ = _sort_series(p, _pick_series(p, items, series, used))
    except (InputError, MemoryError):
        raise
    except Exception as exc:
        raise InputError(f"{p}: cannot read DICOM series ({type(exc).__name__}: {_oneline(exc)})") from exc
    return [ds for _, ds in items]


def _sort_series(path: Path, items: list) -> tuple[list, np.ndarray, bool]:
    """Sort slices along the slice normal (or by InstanceNumber): (sorted items, gaps between neighbours,
    whether positions were used). Raises InputError for mixed slice sizes or shared positions."""
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in items}
    if len(sizes) > 1:
        raise InputError(f"{path}: DICOM slices have different sizes {sorted(sizes)} (expected one Rows x Columns)")
    positional = all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for _, ds in items)
    if positional:
        iop = np.asarray(items[0][1].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        keys = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))) for _, ds in items]
    else:
        log.warning("%s: slices lack position/orientation, sorting by InstanceNumber", path)
        keys = [float(ds.get("InstanceNumber", 0) or 0) for _, ds in items]
    order = np.argsort(keys, kind="stable")
    items, gaps = [items[i] for i in order], np.diff(np.asarray(keys)[order])
    first = items[0][1]
    if np.any(np.abs(gaps) < 1e-4):
        raise InputError(f"{path}: {int(np.sum(np.abs(gaps) < 1e-4)) + 1} DICOM slices share a position "
                         f"(expected one slice per position in series {first.get('SeriesInstanceUID', '?')})")
    return items, gaps, positional


def _stack_series(path: Path, fmt: str, items: list, mask: bool) -> tuple[np.ndarray, ImageMeta]:
    """Sort slices (:func:`_sort_series`) and stack them into (Z, Y, X)."""
    items, gaps, positional = _sort_series(path, items)
    first = items[0][1]
    if positional and len(gaps):
        dz = float(np.median(gaps))
        if np.ptp(gaps) > 0.01 * dz:
            log.warning("%s: uneven slice gaps %.3f..%.3f mm, using the median %.3f", path, gaps.min(), gaps.max(), dz)
    else:
        dz = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    channels = int(first.get("SamplesPerPixel", 1))
    arr = np.stack([_pixels(name, ds, mask) for name, ds in items])
    if arr.ndim != 3 + (channels > 1):
        raise InputError(f"{path}: DICOM slices hold {arr.shape[1:]} pixels each (expected single-frame 2D slices)")
    dy, dx = (float(v) for v in (first.get("PixelSpacing") or [1.0, 1.0]))
    return arr, _meta(path, fmt, (dz, dy, dx), _dicom_affine(first, dz), 3, spacing_known="PixelSpacing" in first,
                      channels=channels, extra=_dicom_extra(first, n_slices=len(items)))


_READERS: dict[str, Callable[..., tuple[np.ndarray, ImageMeta]]] = {
    "nifti": _read_nifti, "dicom": _read_dicom, "nrrd": _read_sitk, "mha": _read_sitk,
    **{f: _read_raster for f in _RASTER_FORMATS},
}


def _read(path: str | os.PathLike, series: str | None, mask: bool) -> tuple[np.ndarray, ImageMeta]:
    p = Path(path)
    fmt = detect_format(p)
    if series is not None and fmt != "dicom":
        raise InputError(f"{p}: series='{series}' only applies to DICOM folders/zips (this is {fmt})")
    what = "mask" if mask else "image"
    try:
        arr, meta = _READERS[fmt](p, fmt, series, mask)
        arr = np.asarray(arr)
        if meta.channels > 1:
            arr = _collapse_channels(arr, p, mask=mask, lossy=fmt == "jpeg")
    except (InputError, MemoryError):
        raise
    except Exception as exc:
        raise InputError(f"{p}: cannot read {fmt} {what} ({type(exc).__name__}: {_oneline(exc)})") from exc
    meta.channels = 3 if arr.ndim == len(meta.spacing) + 1 else 1
    meta.shape = tuple(int(s) for s in arr.shape[:len(meta.spacing)])
    if arr.size == 0:
        raise InputError(f"{p}: {what} is empty (shape {arr.shape})")
    return np.ascontiguousarray(arr), meta


def _collapse_channels(arr: np.ndarray, path: Path, *, mask: bool, lossy: bool) -> np.ndarray:
    """Drop alpha; return one channel when R, G and B agree (within JPEG noise for lossy masks)."""
    if arr.shape[-1] < 3:  # grey (+ alpha)
        return arr[..., 0]
    rgb = arr[..., :3]
    diff = float(max(np.abs(rgb[..., c].astype(np.float64) - rgb[..., 0]).max() for c in (1, 2)))
    if diff <= (_LOSSY_CHANNEL_TOL if mask and lossy else 0):
        return rgb[..., 0]
    if mask:
        raise InputError(f"{path}: mask has 3 different colour channels (max difference {diff:g}; "
                         f"expected a grayscale, palette or 3-identical-channel label image)")
    return rgb


def _to_labels(arr: np.ndarray, name: str, lossy: bool = False, binarize: bool = True) -> np.ndarray:
    """uint8 labels from a stored mask: 0/255 (or 0/max) -> 0/1 if ``binarize``, JPEG thresholded at > 127."""
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InputError(f"{name}: mask contains NaN or infinite values (expected integer labels)")
        rounded = np.rint(arr)
        err = np.abs(arr - rounded)
        if not lossy and err.max() > _LABEL_TOL:
            bad = arr.flat[int(np.argmax(err))]
            raise InputError(f"{name}: mask has non-integer value {bad:g} (expected integer labels 0..255)")
        arr = rounded
    elif arr.dtype.kind not in "iu":
        raise InputError(f"{name}: mask has unsupported dtype {arr.dtype} (expected integer labels)")
    if lossy:
        return (arr > 127).astype(np.uint8)
    lo, hi = arr.min(), arr.max()
    if lo < 0:
        raise InputError(f"{name}: mask has negative label {lo:g} (expected labels 0..255)")
    if hi >= 255 and binarize:
        nonzero = arr != 0
        if np.all(arr[nonzero] == hi):  # binary stored as 0/255, 0/65535, ...
            return nonzero.astype(np.uint8)
    if hi > 255:
        raise InputError(f"{name}: mask has label {hi:g} (expected labels 0..255 or a binary 0/max mask)")
    return arr.astype(np.uint8)


# -------------------------------------------------------------------------------------------- public read
def read_image(path: str | os.PathLike, *, series: str | None = None) -> tuple[np.ndarray, ImageMeta]:
    """Read an image as float32 ``(Z, Y, X)``, ``(H, W)`` or ``(H, W, 3)`` with its :class:`ImageMeta`.

    ``series`` picks a folder inside a DICOM zip/folder (full path or last component), a
    SeriesInstanceUID or a SeriesDescription; by default the series with the most slices is used.
    """
    arr, meta = _read(path, series, mask=False)
    arr = arr.astype(np.float32, copy=False)
    bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise InputError(f"{meta.path}: image contains {bad} NaN or infinite values (expected finite numbers)")
    return arr, meta


def read_mask(path: str | os.PathLike, *, series: str | None = None,
              reference: ImageMeta | None = None) -> tuple[np.ndarray, ImageMeta]:
    """Read a label mask as uint8 of the image's spatial shape; check it against ``reference`` if given."""
    arr, meta = _read(path, series, mask=True)
    labels = _to_labels(arr, meta.path, lossy=meta.format == "jpeg")
    meta.extra["labels"] = [int(v) for v in np.flatnonzero(np.bincount(labels.ravel(), minlength=1))]
    if reference is not None:
        check_pair(reference, meta)
    return labels, meta


def check_pair(image_meta: ImageMeta, mask_meta: ImageMeta) -> None:
    """Raise InputError unless the mask's spatial shape (and spacing, when both known) match the image's."""
    if tuple(mask_meta.shape) != tuple(image_meta.shape):
        raise InputError(f"mask {mask_meta.path} has shape {tuple(mask_meta.shape)} but image "
                         f"{image_meta.path} has shape {tuple(image_meta.shape)}")
    if image_meta.spacing_known and mask_meta.spacing_known and not np.allclose(
            mask_meta.spacing, image_meta.spacing, rtol=1e-3, atol=0):
        raise InputError(f"mask {mask_meta.path} has spacing {_fmt_tuple(mask_meta.spacing)} mm but image "
                         f"{image_meta.path} has spacing {_fmt_tuple(image_meta.spacing)} mm")


def _fmt_tuple(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def voxel_volume_ml(meta: ImageMeta) -> float | None:
    """Volume of one voxel in mL for 3D images with known spacing, else None."""
    if len(meta.spacing) != 3 or not meta.spacing_known:
        return None
    return float(np.prod(meta.spacing)) / 1000.0


def pixel_area_mm2(meta: ImageMeta) -> float | None:
    """In-plane pixel area (last two axes) in mm^2, or None when the spacing is unknown."""
    if not meta.spacing_known:
        return None
    return float(meta.spacing[-1] * meta.spacing[-2])


# ------------------------------------------------------------------------------------------------- writers
def output_suffix(meta: ImageMeta) -> str:
    """Suffix :func:`write_mask` writes for this input: ``.nii.gz`` (NIfTI or 3D) or ``.png``."""
    return ".nii.gz" if meta.format == "nifti" or len(meta.shape) == 3 else ".png"


def _check_out(array: np.ndarray, meta: ImageMeta, out_path: str | os.PathLike, what: str) -> Path:
    out = Path(out_path)
    want = output_suffix(meta)
    if _suffix(out) not in ((".nii.gz", ".nii") if want == ".nii.gz" else (".png",)):
        raise InputError(f"{out}: {what} for {meta.format} input {meta.path} must be written as {want} "
                         f"(got '{_suffix(out) or out.name}')")
    if out.resolve() == Path(meta.path).resolve():
        raise InputError(f"{out}: refusing to overwrite the input file {meta.path}")
    if out.is_dir():
        raise InputError(f"{out}: is a folder (expected a file path for the {what})")
    if tuple(array.shape) != tuple(meta.shape):
        raise InputError(f"{out}: {what} has shape {array.shape} but input {meta.path} has shape {tuple(meta.shape)}")
    return out


def atomic_write(out: Path, suffix: str, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` into a temporary file beside ``out``, then rename it to ``out``: a reader never sees a
    half-written file and a failed write leaves whatever ``out`` held before."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _write_nifti(data: np.ndarray, meta: ImageMeta, out: Path) -> Path:
    import nibabel as nib

    if meta.affine is not None:
        affine = np.asarray(meta.affine, dtype=float)
    else:  # e.g. a multi-page TIFF: axis-aligned, spacing only
        affine = np.diag([*meta.spacing[::-1], *([1.0] * (4 - len(meta.spacing)))])
    info = meta.extra.get("nifti") or {}
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.T.shape)
    hdr.set_data_dtype(data.dtype)
    hdr.set_qform(np.asarray(info.get("qform", affine)), int(info.get("qform_code", 1)))
    hdr.set_sform(np.asarray(info.get("sform", affine)), int(info.get("sform_code", 1)))
    hdr["xyzt_units"] = info.get("xyzt_units", 2)  # 2 = mm
    if np.allclose(hdr.get_best_affine(), affine, atol=1e-6):
        img = nib.Nifti1Image(np.ascontiguousarray(data.T), hdr.get_best_affine(), header=hdr)
    else:  # the stored codes would not reproduce the affine: write the affine itself
        img = nib.Nifti1Image(np.ascontiguousarray(data.T), affine)
    suffix = ".nii.gz" if _suffix(out) == ".nii.gz" else ".nii"
    return atomic_write(out, suffix, lambda tmp: nib.save(img, tmp))


def _write_png(data: np.ndarray, out: Path) -> Path:
    from PIL import Image

    return atomic_write(out, ".png", lambda tmp: Image.fromarray(data).save(tmp, format="PNG"))


def write_mask(mask: np.ndarray, meta: ImageMeta, out_path: str | os.PathLike) -> Path:
    """Write a label mask for the image described by ``meta``: NIfTI uint8 with the input's affine and
    qform/sform codes for NIfTI/3D inputs, PNG for 2D (binary as 0/255, multi-label as label values)."""
    mask = np.asarray(mask)
    out = _check_out(mask, meta, out_path, "mask")
    labels = _to_labels(mask, str(out), binarize=False)
    if output_suffix(meta) == ".nii.gz":
        return _write_nifti(labels, meta, out)
    binary = labels.max(initial=0) <= 1
    return _write_png((labels * 255 if binary else labels).astype(np.uint8), out)


def write_probability(prob: np.ndarray, meta: ImageMeta, out_path: str | os.PathLike) -> Path:
    """Write a probability map in [0, 1]: NIfTI float32 for NIfTI/3D inputs, 8-bit PNG (0..255) for 2D."""
    prob = np.asarray(prob, dtype=np.float32)
    out = _check_out(prob, meta, out_path, "probability map")
    if not np.isfinite(prob).all() or prob.min() < -1e-6 or prob.max() > 1 + 1e-6:
        raise InputError(f"{out}: probabilities must be finite and within [0, 1]")
    prob = np.clip(prob, 0.0, 1.0)
    if output_suffix(meta) == ".nii.gz":
        return _write_nifti(prob, meta, out)
    return _write_png(np.rint(prob * 255).astype(np.uint8), out)

"""Medical image I/O: one reader/writer contract for NIfTI, DICOM, NRRD/MetaImage and 2D raster images.

Reading
    ``read_image(path)`` -> ``(array, ImageMeta)`` and ``read_mask(path)`` -> ``(labels, ImageMeta)``.

    * 3D volumes are returned as ``(Z, Y, X)`` (slice axis first), 2D images as ``(H, W)``, or
      ``(H, W, 3)`` for colour images whose channels differ; a 4D NIfTI whose last axis holds the channels of
      one scan (MSD's BrainTumour, Prostate) as ``(Z, Y, X, C)`` (``meta.channels = C``). Images are float32 with their stored values
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

Safety (through :mod:`fileio`)
    Nothing is opened before :func:`detect_format` has refused FIFOs, sockets, devices, symlink loops and dangling
    symlinks. Sizes that headers claim (NIfTI, DICOM, MetaImage / NRRD, PNG / TIFF) are checked against half of
    the machine's memory before any voxel is read; zips are checked from their central directory (member count,
    unpacked size, compression ratio, encryption) and members are read with a bound. Data files named inside a
    header (MetaImage ``ElementDataFile``, NRRD ``data file``) are read only from the header's own folder; DICOMDIR
    indexes and Analyze ``.hdr/.img`` pairs are refused.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import fileio
from errors import InputError, oneline
from fileio import atomic_write, json_safe

log = logging.getLogger(__name__)

_SUFFIX_FORMATS = {
    ".nii": "nifti", ".nii.gz": "nifti", ".dcm": "dicom", ".zip": "dicom",
    ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".bmp": "bmp", ".tif": "tiff", ".tiff": "tiff",
    ".gif": "gif", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha", ".mhd": "mha",
}
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(_SUFFIX_FORMATS)
_RASTER_FORMATS = {"png", "jpeg", "bmp", "tiff", "gif"}
FORMAT_NAMES = {"nifti": "NIfTI", "dicom": "DICOM", "png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF",
                 "gif": "GIF", "nrrd": "NRRD", "mha": "MetaImage"}
# Two-file formats whose header names a second file; refused rather than resolved (see detect_format).
_PAIR_SUFFIXES = (".hdr", ".img", ".hdr.gz", ".img.gz")
DICOMDIR_UID = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage: a DICOMDIR index
MAX_CHANNELS = 16  # a 4D NIfTI with more volumes on its last axis is a time series, not the channels of one scan
_MAX_NIFTI_OFFSET = 256 << 20  # bytes before NIfTI data (header extensions); more is skipped by decompressing
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
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


def one_line_errors(fn):
    """Make every InputError of a public reader one printable line: a file name with a newline or other
    control character (possible on Linux, and in zip member names) would otherwise split the message."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            text = fileio.printable(str(exc))
            if text != str(exc):
                raise InputError(text) from exc
            raise
    return wrapper


# ----------------------------------------------------------------------------------------------- detection
def file_suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is a regular file carrying the DICOM ``DICM`` marker at byte 128 (a FIFO or device
    is never opened in a blocking way: see :func:`fileio.open_regular`)."""
    try:
        return fileio.read_head(path, 132)[128:132] == b"DICM"
    except (OSError, ValueError):
        return False


@one_line_errors
def detect_format(path: str | os.PathLike) -> str:
    """Format name of an existing file or folder: by suffix, DICOM folder, or DICOM preamble.

    Refuses, before anything is opened, what is not a regular file or folder (FIFO, socket, device,
    symlink loop, dangling symlink), folders named like image files, and two-file Analyze pairs."""
    p = fileio.require_regular_file(path, folder_ok=True)
    sfx = file_suffix(p)
    if p.is_dir():
        if sfx in _SUFFIX_FORMATS and sfx != ".dcm":
            raise InputError(f"{p}: is a folder, not a {sfx} file (expected a {sfx} file, or a DICOM series "
                             f"folder)")
        if any(f.is_file() for f in p.rglob("*")):
            return "dicom"
        raise InputError(f"{p}: folder is empty (expected a DICOM series folder)")
    name = p.name.lower()
    if any(name.endswith(s) for s in _PAIR_SUFFIXES):
        raise InputError(f"{p}: Analyze / NIfTI-pair .hdr + .img files are not supported: the header names a "
                         f"second file (expected a single .nii or .nii.gz file; convert the pair, e.g. "
                         f"nibabel.save(nibabel.load('x.hdr'), 'x.nii.gz'))")
    fmt = _SUFFIX_FORMATS.get(sfx)
    if fmt is None and is_dicom_file(p):
        fmt = "dicom"
    if fmt is None:
        raise InputError(f"{p}: unsupported file type '{file_suffix(p) or '(no extension)'}' "
                         f"(expected one of {', '.join(SUPPORTED_SUFFIXES)}, a DICOM file or a DICOM folder)")
    return fmt


# ------------------------------------------------------------------------------------------------ geometry
def _geometry(ras_affine: np.ndarray, ndim: int) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
    """Array-order LPS origin and direction from a 4x4 RAS affine (2D: the in-plane part)."""
    lps = LPS_RAS @ ras_affine
    m = lps[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    d = (m / np.where(norms > 0, norms, 1.0))[::-1, ::-1][3 - ndim:, 3 - ndim:]
    origin = lps[:3, 3][::-1][3 - ndim:]
    return tuple(map(float, origin)), tuple(tuple(map(float, r)) for r in d)


def make_meta(path: Path, fmt: str, spacing, affine: np.ndarray | None, ndim: int, *,
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
def _nifti_header(path: Path):
    """The NIfTI-1/2 header of ``path`` parsed from its first bytes only: no extension and no voxel is read, so
    its claims (shape, data type, spacing, data offset) can be checked before nibabel reads anything."""
    import gzip

    import nibabel as nib

    fd = fileio.open_regular(path)
    with os.fdopen(fd, "rb") as raw:
        head = raw.read(2)
        raw.seek(0)
        try:
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                    block = gz.read(540)  # bounded: never inflates more than the header
            else:
                block = raw.read(540)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise InputError(f"{path}: cannot decompress ({type(exc).__name__}: {oneline(exc, 200)}; expected an "
                             f"intact .nii.gz)") from None
    sizes = {int.from_bytes(block[:4], order) for order in ("little", "big")} if len(block) >= 4 else set()
    klass, nbytes = (nib.Nifti1Header, 348) if 348 in sizes else (nib.Nifti2Header, 540) if 540 in sizes else (None, 0)
    if klass is None or len(block) < nbytes:
        raise InputError(f"{path}: not a NIfTI file ({len(block)} bytes read, no NIfTI header size field 348 or "
                         f"540 at the start; expected a .nii or .nii.gz image)")
    try:
        return klass(binaryblock=block[:nbytes], check=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad header
        raise InputError(f"{path}: NIfTI header cannot be parsed ({oneline(exc, 200)}; expected a valid NIfTI-1/2 "
                         f"header)") from None


def _check_nifti_header(path: Path, hdr, mask: bool) -> tuple[int, ...]:
    """The spatial shape the header claims, after refusing what nibabel would read blindly or choke on."""
    try:
        full = tuple(int(d) for d in hdr.get_data_shape())
        dtype = np.dtype(hdr.get_data_dtype())
        offset = float(hdr["vox_offset"])
    except Exception as exc:  # noqa: BLE001 - dim[0] out of range, unknown datatype code, ...
        raise InputError(f"{path}: NIfTI header is invalid ({oneline(exc, 200)}; expected a valid dim, datatype and "
                         f"vox_offset)") from None
    shape = full
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    channels = len(shape) == 4 and not mask and 2 <= shape[3] <= MAX_CHANNELS  # MSD: the 4th axis holds the channels
    if len(shape) not in (2, 3) and not channels:
        expected = "2D or 3D, or 4D with a single volume" if mask else \
            f"2D or 3D, or 4D with at most {MAX_CHANNELS} channels on the last axis"
        raise InputError(f"{path}: NIfTI {'mask' if mask else 'image'} has shape {full} (expected {expected})")
    if not math.isfinite(offset) or not 0 <= offset <= _MAX_NIFTI_OFFSET:
        raise InputError(f"{path}: NIfTI header puts the image data at byte {offset:g} (expected a finite offset "
                         f"below {fileio.format_bytes(_MAX_NIFTI_OFFSET)})")
    # get_fdata makes float32 from any stored type; a mask keeps its type (scaled masks become float64)
    itemsize = dtype.itemsize if mask else max(dtype.itemsize, 4)
    fileio.check_array_size(path, shape, itemsize, "NIfTI header",
                            dtype_name="float32" if itemsize == 4 and not mask else str(dtype))
    pixdim = [float(v) for v in np.asarray(hdr["pixdim"], dtype=np.float64)[1:min(len(shape), 3) + 1]]
    if not all(math.isfinite(v) and v > 0 for v in pixdim):
        raise InputError(f"{path}: NIfTI header has an invalid voxel spacing ({', '.join(f'{v:g}' for v in pixdim)}) "
                         f"mm (expected finite positive values)")
    return shape


def _read_nifti(path: Path, fmt: str, series: str | None, mask: bool) -> tuple[np.ndarray, ImageMeta]:
    import nibabel as nib

    shape = _check_nifti_header(path, _nifti_header(path), mask)  # before nibabel reads anything
    img = nib.load(str(path), mmap=False)
    if tuple(img.shape)[:len(shape)] != shape:  # nibabel parsed the same bytes: a mismatch means a changed file
        raise InputError(f"{path}: NIfTI file changed while being read (expected a file that stays put)")
    if not np.isfinite(np.asarray(img.affine, dtype=float)).all():
        raise InputError(f"{path}: NIfTI header has a non-finite qform/sform orientation (expected finite numbers)")
    data = np.asanyarray(img.dataobj) if mask else img.get_fdata(dtype=np.float32)
    ndim = min(len(shape), 3)
    # (i, j, k) -> (k, j, i); channels, when the file has them, stay last: (k, j, i, c)
    data = data.reshape(shape).T if len(shape) == ndim else data.reshape(shape).transpose(2, 1, 0, 3)
    hdr = img.header
    extra = {"nifti": {
        "qform": hdr.get_qform().tolist(), "qform_code": int(hdr["qform_code"]),
        "sform": hdr.get_sform().tolist(), "sform_code": int(hdr["sform_code"]),
        "xyzt_units": int(hdr["xyzt_units"]), "dtype": str(img.get_data_dtype())}}
    zooms = hdr.get_zooms()[:ndim][::-1]
    return data, make_meta(path, fmt, zooms, np.asarray(img.affine, dtype=float), ndim, extra=extra)


def _read_raster(path: Path, fmt: str, series: str | None, mask: bool) -> tuple[np.ndarray, ImageMeta]:
    from PIL import Image

    arr = None
    try:
        with Image.open(path) as im:  # lazy: only the header is parsed here
            w, h = im.size
            fileio.check_array_size(path, (h, w, len(im.getbands())), 4, f"{FORMAT_NAMES[fmt]} header",
                                    dtype_name="float32")
            frames = getattr(im, "n_frames", 1)
            if frames > 1 and fmt != "tiff":
                log.warning("%s: %d frames, using the first", path, frames)
            if frames == 1 or fmt != "tiff":
                im.load()
                arr = _pil_to_array(im, mask)
    except InputError:
        raise
    except Exception:
        if fmt != "tiff":
            raise
    if arr is None:  # multi-page or exotic TIFF
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.series[0]
            fileio.check_array_size(path, page.shape, max(np.dtype(page.dtype).itemsize, 4), "TIFF header",
                                    dtype_name="float32" if np.dtype(page.dtype).itemsize <= 4 else None)
            arr = np.asarray(page.asarray())
    rgb = arr.ndim >= 3 and arr.shape[-1] in (3, 4) and arr.ndim - 1 in (2, 3)
    if arr.ndim - rgb not in (2, 3):
        raise InputError(f"{path}: image array has shape {arr.shape} (expected 2D, RGB or a 3D stack)")
    ndim = arr.ndim - rgb
    return arr, make_meta(path, fmt, (1.0,) * ndim, None, ndim, spacing_known=False,
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


def _read_dicom(path: Path, fmt: str, series: str | None, mask: bool) -> tuple[np.ndarray, ImageMeta]:
    import dicom_io  # pydicom is imported only for DICOM inputs

    return dicom_io.read_dicom(path, fmt, series, mask)


def _read_sitk(path: Path, fmt: str, series: str | None, mask: bool) -> tuple[np.ndarray, ImageMeta]:
    import sitk_io  # SimpleITK is imported only for NRRD / MetaImage inputs

    return sitk_io.read_sitk(path, fmt, series, mask)


_READERS: dict[str, Callable[..., tuple[np.ndarray, ImageMeta]]] = {
    "nifti": _read_nifti, "dicom": _read_dicom, "nrrd": _read_sitk, "mha": _read_sitk,
    **{f: _read_raster for f in _RASTER_FORMATS},
}


def _read(path: str | os.PathLike, series: str | None, mask: bool) -> tuple[np.ndarray, ImageMeta]:
    p = Path(path)
    fmt = detect_format(p)  # refuses FIFOs, devices, symlink loops, ... before anything opens the path
    if series is not None and fmt != "dicom":
        raise InputError(f"{p}: series='{series}' only applies to DICOM folders/zips (this is {fmt})")
    what = "mask" if mask else "image"
    if p.is_file() and p.stat().st_size == 0:
        raise InputError(f"{p}: file is empty (0 bytes; expected a {FORMAT_NAMES[fmt]} {what})")
    try:
        arr, meta = _READERS[fmt](p, fmt, series, mask)
        arr = np.asarray(arr)
        if meta.channels > 1 and fmt != "nifti":  # colour pictures; a NIfTI's channels are separate scans
            arr = _collapse_channels(arr, p, mask=mask, lossy=fmt == "jpeg")
    except (InputError, MemoryError):
        raise
    except Exception as exc:
        raise InputError(f"{p}: cannot read {fmt} {what} ({type(exc).__name__}: {oneline(exc, 200)}; expected a "
                         f"valid {FORMAT_NAMES[fmt]} file)") from exc
    meta.channels = int(arr.shape[-1]) if arr.ndim == len(meta.spacing) + 1 else 1
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
@one_line_errors
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


@one_line_errors
def read_meta(path: str | os.PathLike) -> ImageMeta:
    """The :class:`ImageMeta` of an image without its pixels where the format allows (NIfTI: the header only),
    e.g. to plan a 3D network from every case's shape and spacing before loading any of them."""
    p = Path(path)
    if detect_format(p) != "nifti":
        return read_image(p)[1]
    import nibabel as nib

    shape = _check_nifti_header(p, _nifti_header(p), False)
    try:
        img = nib.load(str(p))  # lazy: reads the header, not the data
        zooms, affine = img.header.get_zooms(), np.asarray(img.affine, dtype=float)
    except Exception as exc:  # noqa: BLE001 - whatever nibabel raises on a header it cannot parse
        raise InputError(f"{p}: cannot read the NIfTI header ({type(exc).__name__}: {oneline(exc, 200)}; expected a valid "
                         "NIfTI file)") from None
    ndim = min(len(shape), 3)
    meta = make_meta(p, "nifti", zooms[:ndim][::-1], affine, ndim)
    meta.shape = tuple(int(n) for n in shape[:ndim][::-1])
    meta.channels = int(shape[3]) if len(shape) == 4 else 1
    return meta


def read_channels(paths: list[str | os.PathLike | None], case: str = "case") -> tuple[np.ndarray, ImageMeta]:
    """Read the channel files of one case (nnU-Net's ``case_0000``, ``case_0001``, ...) as one channel-last array
    ``(*spatial, C)`` with the first file's :class:`ImageMeta` (``channels = C``). Every channel must lie on the
    first one's grid (:func:`check_pair`); a missing one (``None``) is named."""
    missing = [c for c, p in enumerate(paths) if p is None]
    if missing:
        present = next((Path(p) for p in paths if p is not None), None)
        where = f"{present.parent}/" if present else ""
        raise InputError(f"{where}{case}: channel file(s) {', '.join(f'{case}_{c:04d}' for c in missing)} missing "
                         f"(expected {len(paths)} channels, one file each)")
    arrays, first = [], None
    for p in paths:
        arr, meta = read_image(p)
        if meta.channels > 1:
            raise InputError(f"{p}: a channel file holds {meta.channels} channels itself (expected one per file)")
        if first is None:
            first = meta
        else:
            check_pair(first, meta, what="channel")
        arrays.append(arr)
    first.channels = len(arrays)
    return np.stack(arrays, axis=-1), first


@one_line_errors
def read_mask(path: str | os.PathLike, *, series: str | None = None,
              reference: ImageMeta | None = None) -> tuple[np.ndarray, ImageMeta]:
    """Read a label mask as uint8 of the image's spatial shape; check it against ``reference`` if given."""
    arr, meta = _read(path, series, mask=True)
    labels = _to_labels(arr, meta.path, lossy=meta.format == "jpeg")
    meta.extra["labels"] = [int(v) for v in np.flatnonzero(np.bincount(labels.ravel(), minlength=1))]
    if reference is not None:
        check_pair(reference, meta)
    return labels, meta


#: how far a mask's geometry may be from its image's: direction cosines, and origin as a share of the finest spacing
DIRECTION_TOL = 1e-3
ORIGIN_TOL = 0.05


def check_pair(image_meta: ImageMeta, mask_meta: ImageMeta, what: str = "mask") -> None:
    """Raise InputError unless the ``what`` (a mask, another channel) lies on the image's grid: same spatial shape
    and, when both carry a geometry, the same spacing, direction and origin (within a tolerance), as nnU-Net's
    dataset check compares them. A mirrored axis or a shifted origin would otherwise train on misaligned labels."""
    a, b = image_meta, mask_meta
    if tuple(b.shape) != tuple(a.shape):
        raise InputError(f"{what} {b.path} has shape {tuple(b.shape)} but image {a.path} has shape {tuple(a.shape)}")
    if not (a.spacing_known and b.spacing_known):
        return
    if not np.allclose(b.spacing, a.spacing, rtol=1e-3, atol=0):
        raise InputError(f"{what} {b.path} has spacing {_fmt_tuple(b.spacing)} mm but image {a.path} has spacing "
                         f"{_fmt_tuple(a.spacing)} mm")
    if a.affine is None or b.affine is None:  # single DICOM slices, plain pictures: no full geometry to compare
        return
    if not np.allclose(np.asarray(b.direction), np.asarray(a.direction), atol=DIRECTION_TOL, rtol=0):
        raise InputError(f"{what} {b.path} has direction {_fmt_rows(b.direction)} but image {a.path} has "
                         f"{_fmt_rows(a.direction)} (expected the same axes: is one of them mirrored or rotated?)")
    tol = ORIGIN_TOL * min(a.spacing)
    if not np.allclose(b.origin, a.origin, atol=tol, rtol=0):
        raise InputError(f"{what} {b.path} has origin {_fmt_tuple(b.origin)} mm but image {a.path} has "
                         f"{_fmt_tuple(a.origin)} mm (expected them within {tol:.3g} mm)")


def _fmt_rows(rows) -> str:
    return "[" + ", ".join(_fmt_tuple(r) for r in rows) + "]"


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
    if file_suffix(out) not in ((".nii.gz", ".nii") if want == ".nii.gz" else (".png",)):
        raise InputError(f"{out}: {what} for {meta.format} input {meta.path} must be written as {want} "
                         f"(got '{file_suffix(out) or out.name}')")
    if out.resolve() == Path(meta.path).resolve():
        raise InputError(f"{out}: refusing to overwrite the input file {meta.path}")
    if out.is_dir():
        raise InputError(f"{out}: is a folder (expected a file path for the {what})")
    if tuple(array.shape) != tuple(meta.shape):
        raise InputError(f"{out}: {what} has shape {array.shape} but input {meta.path} has shape {tuple(meta.shape)}")
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
    suffix = ".nii.gz" if file_suffix(out) == ".nii.gz" else ".nii"
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

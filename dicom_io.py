"""DICOM reading for :mod:`medio`: a single slice, or a series from a folder or a zip (slices sorted along the
slice normal, RescaleSlope/Intercept applied, the series chosen by folder, UID or description).

Part of medio's one reader contract: callers use ``medio.read_image`` / ``read_mask``; this module holds the
DICOM specifics (and :func:`dicom_series_datasets`, the sorted datasets a DICOM SEG / RTSTRUCT must reference).
"""
from __future__ import annotations

import io
import logging
import math
import os
import shlex
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

import fileio
from errors import InputError, oneline
from medio import DICOMDIR_UID, LPS_RAS, ImageMeta, detect_format, file_suffix, is_dicom_file, make_meta, one_line_errors

log = logging.getLogger("medio")


_NOT_DICOM = "not a DICOM file (no DICM preamble and no DICOM header could be parsed); expected a DICOM image slice"
# Elements every image slice carries; a "dataset" without any of them, and without a preamble, is pydicom's
# force=True reading of some other file (text, a PNG renamed .dcm, ...)
_DICOM_CORE = ("SOPClassUID", "SOPInstanceUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID", "Rows",
               "Columns", "PixelData")


def _dcmread(src, name: str):
    import pydicom

    try:
        ds = pydicom.dcmread(src, force=True)
    except Exception as exc:
        if isinstance(src, io.BytesIO):
            src.seek(0)
        head = src.read(132) if isinstance(src, io.BytesIO) else fileio.read_head(src, 132)
        if head[128:132] != b"DICM":
            raise InputError(f"{name}: {_NOT_DICOM}") from exc
        raise InputError(f"{name}: cannot read DICOM file ({type(exc).__name__}: {oneline(exc, 200)}; "
                         f"expected an intact DICOM file)") from exc
    meta = getattr(ds, "file_meta", None)
    if str((meta or {}).get("MediaStorageSOPClassUID", "")) == DICOMDIR_UID or "DirectoryRecordSequence" in ds:
        raise InputError(f"{name}: is a DICOMDIR index, not an image: pass the series folder instead "
                         f"(expected a DICOM image file, a series folder or a .zip)")
    if getattr(ds, "preamble", None) is None and not meta and not any(k in ds for k in _DICOM_CORE):
        raise InputError(f"{name}: {_NOT_DICOM}")
    if "PixelData" not in ds:
        raise InputError(f"{name}: DICOM file has no pixel data (expected an image slice)")
    return ds


def _dicom_text(ds, keyword: str) -> str:
    """An element's value as stored (``0\\0``, ``abc``), for messages; works for values pydicom cannot parse."""
    try:
        elem = ds.get_item(keyword)
        value = elem.value
    except Exception:  # noqa: BLE001
        return "?"
    if isinstance(value, bytes):
        return fileio.printable(value.decode("latin-1").strip(" \0"))[:80]
    if not isinstance(value, str) and hasattr(value, "__iter__"):  # MultiValue, list
        return fileio.printable("\\".join(str(v) for v in value))[:80]
    return fileio.printable(str(value))[:80]


def _pixel_spacing(ds, name: str) -> tuple[tuple[float, float], bool]:
    """``((dy, dx), known)`` from PixelSpacing; absent or empty -> ``((1, 1), False)``; zero, negative, NaN,
    infinite, a wrong count or unparsable text -> InputError (a wrong spacing silently corrupts volumes)."""
    if "PixelSpacing" not in ds:
        return (1.0, 1.0), False
    try:
        raw = ds.PixelSpacing  # a MultiValue of DS, one DS, or None / "" when stored empty
        items = [] if raw is None or raw == "" else [raw] if isinstance(raw, (str, bytes, int, float)) else list(raw)
        if not items:
            return (1.0, 1.0), False
        values = [float(v) for v in items]
    except Exception:  # noqa: BLE001 - pydicom raises various errors for malformed DS text
        values = []
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"{name}: DICOM PixelSpacing is '{_dicom_text(ds, 'PixelSpacing')}' (expected two finite "
                         f"positive numbers in mm, e.g. 0.7\\0.7)")
    return (values[0], values[1]), True


def _slice_spacing(ds, name: str) -> float:
    """SpacingBetweenSlices, else SliceThickness, else 1 mm: the slice step when positions cannot give it."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        if keyword not in ds:
            continue
        try:
            raw = ds.get(keyword)
            value = float(raw) if raw not in (None, "") else 0.0
        except Exception:  # noqa: BLE001
            value = math.nan
        if not math.isfinite(value):
            raise InputError(f"{name}: DICOM {keyword} is '{_dicom_text(ds, keyword)}' (expected a finite number "
                             f"in mm)")
        if value:
            return abs(value)  # some scanners store a negative SpacingBetweenSlices; only the step matters here
    return 1.0


def _check_dicom_size(name: str, ds, n_slices: int = 1) -> None:
    """Refuse empty images and ones whose header claims more pixels than fit in memory, before decoding."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{name}: DICOM Rows / Columns / NumberOfFrames are not integers ({oneline(exc, 200)}; "
                         f"expected an image header)") from None
    if rows <= 0 or cols <= 0 or frames <= 0 or spp <= 0:
        raise InputError(f"{name}: DICOM header has Rows x Columns = {rows} x {cols}, {frames} frame(s), {spp} "
                         f"sample(s) per pixel (expected a non-empty image)")
    fileio.check_array_size(name, (n_slices * frames, rows, cols) + ((spp,) if spp > 1 else ()), 4,
                            "DICOM header", dtype_name="float32")


def _match_folder(folder: str, series: str) -> bool:
    s = series.strip("/")
    return folder == s or folder.endswith("/" + s) or folder.rsplit("/", 1)[-1] == s


def _dicom_items(path: Path, series: str | None) -> tuple[list[tuple[str, Any]], bool]:
    """Datasets (name, dataset) of the chosen folder of a DICOM folder or zip; and whether ``series``
    was used to choose that folder."""
    if path.is_dir():
        base = path.resolve()
        groups: dict[str, list] = defaultdict(list)
        for f in sorted(path.rglob("*")):
            if not f.is_file() or f.name.upper() == "DICOMDIR":  # FIFOs, sockets, devices: never opened
                continue
            if base not in f.resolve().parents:  # only files inside the folder the user gave are read
                raise InputError(f"{path}: holds '{f.relative_to(path).as_posix()}', a symlink that leads "
                                 f"outside the folder (expected the DICOM files themselves inside it)")
            if f.suffix.lower() == ".dcm" or is_dicom_file(f):
                groups[f.parent.relative_to(path).as_posix()].append(f)
        folder, used = _pick_folder(path, groups, series)
        return [(str(f), _dcmread(f, str(f))) for f in groups[folder]], used
    with fileio.open_zip(path) as zf:  # central-directory limits checked before anything is inflated
        groups = defaultdict(list)
        for info in zf.infolist():
            name = info.filename
            if info.is_dir() or name.startswith("__MACOSX/") or name.rsplit("/", 1)[-1].upper() == "DICOMDIR":
                continue
            if name.lower().endswith(".dcm") or fileio.read_zip_head(zf, info, 132)[128:132] == b"DICM":
                groups[name.rsplit("/", 1)[0] if "/" in name else "."].append(info)
        folder, used = _pick_folder(path, groups, series)
        return [(f"{path}:{i.filename}", _dcmread(io.BytesIO(fileio.read_zip_member(zf, i)), f"{path}:{i.filename}"))
                for i in groups[folder]], used


def _pick_folder(path: Path, groups: dict[str, list], series: str | None) -> tuple[str, bool]:
    if not groups:
        raise InputError(f"{path}: no DICOM files found (expected DICOM slices with a 'DICM' preamble or .dcm)")
    if series is not None:
        hits = [g for g in groups if _match_folder(g, series)]
        if len(hits) == 1:
            return hits[0], True
    if len(groups) == 1:
        return next(iter(groups)), False
    folders, choices = _series_choices(groups)
    if series is None:
        raise InputError(f"{path}: holds {len(groups)} DICOM series (folders {folders}): choose one with "
                         f"{choices} (series= in Python; expected a single series)")
    raise InputError(f"{path}: series '{series}' matches {'several' if hits else 'no'} folders "
                     f"(folders {folders}; choose one with {choices})")


def _series_choices(groups: dict[str, list], shown: int = 8) -> tuple[str, str]:
    """(``"a/, b/"``, ``"--series a or --series b"``) for a message: each folder by its last component where
    that is unique, else by its full path; long lists are cut."""
    names = sorted(groups)
    last = [n.rsplit("/", 1)[-1] for n in names]
    short = [b if last.count(b) == 1 else n for n, b in zip(names, last)]
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    folders = ", ".join(f"{n}/" for n in names[:shown]) + more
    choices = " or ".join(f"--series {shlex.quote(c)}" for c in short[:shown]) + (" or ..." if more else "")
    return folders, choices


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


def _dicom_affine(ds, dz: float, spacing: tuple[float, float] | None = None) -> np.ndarray:
    iop = np.asarray(ds.get("ImageOrientationPatient") or [1, 0, 0, 0, 1, 0], dtype=float)
    dy, dx = spacing if spacing is not None else (float(v) for v in (ds.get("PixelSpacing") or [1.0, 1.0]))
    row, col = iop[:3], iop[3:]
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * dx, col * dy, np.cross(row, col) * dz
    lps[:3, 3] = np.asarray(ds.get("ImagePositionPatient") or [0, 0, 0], dtype=float)
    return LPS_RAS @ lps


def _pixels(name: str, ds, mask: bool) -> np.ndarray:
    """Pixels of one dataset: raw for masks, RescaleSlope/Intercept applied (float32) for images."""
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise InputError(f"{name}: cannot decode DICOM pixel data ({type(exc).__name__}: {oneline(exc, 200)})") from exc
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


def read_dicom(path: Path, fmt: str, series: str | None, mask: bool) -> tuple[np.ndarray, ImageMeta]:
    if path.is_file() and file_suffix(path) != ".zip":
        if series is not None:
            raise InputError(f"{path}: series='{series}' given for a single DICOM file (expected a folder or zip)")
        ds = _dcmread(path, str(path))
        spacing, known = _pixel_spacing(ds, str(path))
        _check_dicom_size(str(path), ds)
        arr = _pixels(str(path), ds, mask)
        spp = int(ds.get("SamplesPerPixel", 1))
        if arr.ndim - (spp > 1) != 2:
            raise InputError(f"{path}: DICOM file holds {arr.shape} pixels (expected one 2D frame; "
                             f"multi-frame files are not supported)")
        return arr, make_meta(path, fmt, spacing, _dicom_affine(ds, 1.0, spacing), 2, store_affine=False,
                          spacing_known=known, channels=spp, extra=_dicom_extra(ds))

    items, used = _dicom_items(path, series)
    return _stack_series(path, fmt, _pick_series(path, items, series, used), mask)


@one_line_errors
def dicom_series_datasets(path: str | os.PathLike, series: str | None = None) -> list:
    """The chosen series' full pydicom datasets (pixel data included) of a DICOM folder or zip, in exactly
    the slice order :func:`read_image` / :func:`read_mask` stack them into ``(Z, Y, X)``; ``series`` as there."""
    p = Path(path)
    if detect_format(p) != "dicom" or (p.is_file() and file_suffix(p) != ".zip"):
        raise InputError(f"{p}: expected a DICOM series folder or .zip (got a single {detect_format(p)} file)")
    try:
        items, used = _dicom_items(p, series)
        items, _, _ = _sort_series(p, _pick_series(p, items, series, used))
    except (InputError, MemoryError):
        raise
    except Exception as exc:
        raise InputError(f"{p}: cannot read DICOM series ({type(exc).__name__}: {oneline(exc, 200)})") from exc
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
        dz = _slice_spacing(first, items[0][0])
    (dy, dx), known = _pixel_spacing(first, items[0][0])
    channels = int(first.get("SamplesPerPixel", 1))
    _check_dicom_size(str(path), first, len(items))  # all slices share Rows x Columns (_sort_series)
    arr = np.stack([_pixels(name, ds, mask) for name, ds in items])
    if arr.ndim != 3 + (channels > 1):
        raise InputError(f"{path}: DICOM slices hold {arr.shape[1:]} pixels each (expected single-frame 2D slices)")
    return arr, make_meta(path, fmt, (dz, dy, dx), _dicom_affine(first, dz, (dy, dx)), 3, spacing_known=known,
                      channels=channels, extra=_dicom_extra(first, n_slices=len(items)))



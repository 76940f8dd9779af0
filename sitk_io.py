"""NRRD and MetaImage reading for :mod:`medio` (through SimpleITK), with the safety rule for their detached
headers: every data file a header names (MetaImage ``ElementDataFile``, NRRD ``data file``, lists and patterns
included) is resolved inside the header's own folder before SimpleITK may open anything.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import numpy as np

import fileio
from errors import InputError
from medio import FORMAT_NAMES, LPS_RAS, ImageMeta, make_meta

log = logging.getLogger("medio")

_HEADER_WINDOW = 1 << 20  # the part of a text header (MetaImage, NRRD) that is parsed for data-file names
_MAX_DATA_FILES = 10_000  # data files one detached header may name


# ----- formats whose text header may name other files (MetaImage ElementDataFile, NRRD data file)
_DATA_FILE_KEYS = {"mha": ("elementdatafile",), "nrrd": ("datafile",)}
_PRINTF_INT = re.compile(r"%[-+ #0]*\d*(?:\.\d+)?(?:hh|h|ll|l|j|z|t|q|L)?([diuoxX])")


def _header_data_files(path: Path, fmt: str) -> list[tuple[str, bool]]:
    """Every data-file name the MetaImage / NRRD header of ``path`` could make SimpleITK open, as
    ``(name, primary)``; ``primary`` marks the plain single-file form, whose file must exist.

    Parsed more broadly than MetaIO / teem do (both line-ending conventions, any case, every line of the
    first MiB, each reading of an ambiguous value), so that a name the library would follow is never missed;
    a header that does not end within that MiB is refused."""
    head = fileio.read_head(path, _HEADER_WINDOW + 1)
    window = head[:_HEADER_WINDOW]
    text = window.decode("latin-1")
    names: list[tuple[str, bool]] = []
    found = listed = False
    for lines in (text.split("\n"), re.split(r"\r\n|\r|\n", text)):
        lines = [line.rstrip("\r") for line in lines]
        for i, line in enumerate(lines):
            m = re.match(r"\s*([^:=]*?)\s*(?::=|[:=])\s*(.*?)\s*$", line)
            if not m or re.sub(r"[\s_\-]", "", m.group(1)).lower() not in _DATA_FILE_KEYS[fmt]:
                continue
            found = True
            listed = listed or m.group(2).upper().startswith("LIST")
            names.extend(_data_file_value(path, m.group(2), lines[i + 1:]))
    if len(head) > _HEADER_WINDOW:  # the file goes on past what was parsed: the header must have ended
        # MetaIO stops at ElementDataFile, teem at the first blank line; a LIST runs to the end of the file
        ended = (b"\n\n" in window or b"\r\n\r\n" in window) if fmt == "nrrd" else found
        if listed or not ended:
            raise InputError(f"{path}: {FORMAT_NAMES[fmt]} header {'file list ' if listed else ''}is longer than "
                             f"{fileio.format_bytes(_HEADER_WINDOW)} (expected a short text header)")
    return names


def _data_file_value(path: Path, value: str, rest: list[str]) -> list[tuple[str, bool]]:
    """Names one ``ElementDataFile`` / ``data file`` value can stand for: LOCAL (none), one file, ``LIST``
    (the following lines) or a printf pattern ``name%03d.raw first last step``."""
    tokens = value.split()
    if not tokens or value.upper() == "LOCAL":
        return []
    if tokens[0].upper().startswith("LIST"):
        return [(line.strip(), False) for line in rest if line.strip()]
    names = [(value, "%" not in value)]
    if len(tokens) > 1:
        names.append((tokens[0], False))
    if "%" in value:
        names.extend((n, False) for n in _expand_pattern(path, tokens))
    return names


def _c_to_py(m: re.Match) -> str:
    """A C printf integer conversion as a Python one: no length modifier, %i / %u -> %d."""
    spec = re.sub(r"(?:hh|h|ll|l|j|z|t|q|L)(?=[diuoxX]$)", "", m.group(0))
    return spec[:-1] + ("d" if spec[-1] in "iu" else spec[-1])


def _expand_pattern(path: Path, tokens: list[str]) -> list[str]:
    """File names of a ``pattern first last step`` data-file form (MetaIO / teem), bounded in number."""
    pattern = tokens[0]
    if len(_PRINTF_INT.findall(pattern)) != 1 or pattern.replace("%%", "").count("%") != 1:
        raise InputError(f"{path}: header names data files by the pattern '{fileio.printable(pattern)}' "
                         f"(expected one integer field such as %03d)")
    try:
        first, last = int(tokens[1]), int(tokens[2])
        step = int(tokens[3]) if len(tokens) > 3 else 1
        if step == 0:
            raise ValueError
        numbers = range(first, last + (1 if step > 0 else -1), step)
    except (IndexError, ValueError):
        raise InputError(f"{path}: header names data files by '{fileio.printable(' '.join(tokens))}' (expected "
                         f"'pattern first last step' with integers)") from None
    if len(numbers) > _MAX_DATA_FILES:
        raise InputError(f"{path}: header names {len(numbers):,} data files (expected at most {_MAX_DATA_FILES:,})")
    py = _PRINTF_INT.sub(_c_to_py, pattern)
    return [py % n for n in numbers]


def _check_data_files(path: Path, fmt: str) -> None:
    """Refuse a header that names a data file outside its own folder (``/etc/passwd``, ``../secret.raw``, a
    symlink leading out) or a missing one -- BEFORE SimpleITK, which would follow any name, sees it."""
    folder = path.parent
    for name, primary in _header_data_files(path, fmt):
        target = fileio.resolve_inside(folder, name, path)
        if primary and not target.exists():
            raise InputError(f"{path}: header names the data file '{fileio.printable(name)}', which is missing "
                             f"(expected it beside the header in {folder.resolve().name or folder}/)")
        problem = fileio.file_problem(target) if os.path.lexists(target) else None
        if problem:  # e.g. a FIFO beside the header, which would hang SimpleITK
            raise InputError(f"{path}: header names the data file '{fileio.printable(name)}', which {problem}")


_SITK_IO = {"nrrd": "NrrdImageIO", "mha": "MetaImageIO"}


def read_sitk(path: Path, fmt: str, series: str | None, mask: bool) -> tuple[np.ndarray, ImageMeta]:
    try:
        import SimpleITK as sitk
    except ImportError as exc:  # pragma: no cover - SimpleITK is in requirements.txt
        raise InputError(f"{path}: reading {fmt.upper()} needs SimpleITK (pip install SimpleITK)") from exc
    _check_data_files(path, fmt)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(_SITK_IO[fmt])  # only this format's reader: no other ITK reader may claim the file
    reader.ReadImageInformation()  # the header only
    ndim, channels = reader.GetDimension(), reader.GetNumberOfComponents()
    if ndim not in (2, 3):
        raise InputError(f"{path}: {fmt.upper()} image has {ndim} dimensions (expected 2D or 3D)")
    bits = re.findall(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelID()))
    itemsize = int(bits[0]) // 8 if bits else 8
    itemsize *= 2 if "complex" in sitk.GetPixelIDValueAsString(reader.GetPixelID()) else 1
    fileio.check_array_size(path, tuple(reader.GetSize())[::-1] + ((channels,) if channels > 1 else ()),
                            max(itemsize, 4), f"{FORMAT_NAMES[fmt]} header", dtype_name="float32" if itemsize <= 4
                            else None)
    spacing = tuple(float(v) for v in reader.GetSpacing())
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise InputError(f"{path}: {FORMAT_NAMES[fmt]} header has an invalid voxel spacing "
                         f"({', '.join(f'{v:g}' for v in spacing[::-1])}) mm (expected finite positive values)")
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img)  # already (Z, Y, X[, C])
    if channels == 1 and arr.ndim == ndim + 1:
        arr = arr[..., 0]
    spacing = img.GetSpacing()[::-1]
    if ndim == 3:
        lps = np.eye(4)
        lps[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
        lps[:3, 3] = img.GetOrigin()
        meta = make_meta(path, fmt, spacing, LPS_RAS @ lps, 3, channels=channels)
    else:
        meta = make_meta(path, fmt, spacing, None, 2, channels=channels)
        meta.origin = tuple(img.GetOrigin()[::-1])
        meta.direction = tuple(map(tuple, np.asarray(img.GetDirection()).reshape(2, 2)[::-1, ::-1].tolist()))
    return arr, meta

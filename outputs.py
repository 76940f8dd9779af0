"""Results other software can open: a case's mask as DICOM SEG / RTSTRUCT over its source series, and a batch's
``cohort.csv`` (one row per input, for a spreadsheet or pandas).

DICOM outputs (``predict.py --output-type dicom-seg,rtstruct``)
    ``seg.dcm`` (highdicom) and ``rtstruct.dcm`` (rt-utils) reference the source series the mask was predicted
    from (``dicom_export``). With ``--anonymize`` both carry no PS3.15 Basic Profile identifiers and reference
    the source's UIDs as remapped by one ``dicom_export.UIDMap`` per case; the anonymized source series is written
    to ``series/`` beside them, so a viewer can show the SEG over it.

cohort.csv
    One row per input, in the order the inputs were given (a folder: its cases in name order), with the columns
    ``case_id, source_path, shape, spacing_mm``, one amount per class whose name states its unit
    (``<class>_volume_ml`` for volumes with a known spacing, ``<class>_area_mm2`` for 2D images with one,
    ``<class>_voxels`` / ``<class>_pixels`` otherwise: only the units that occur in the batch get a column),
    ``lesion_count``, ``largest_lesion_diameter_mm`` (``_px`` where the spacing is unknown),
    ``mean_foreground_probability`` (mean probability of the segmented voxels' classes) and ``status`` ("ok" or
    the input's one-line error). Column names are English whatever ``--lang`` says. Region models: one amount per
    region.

Research software, not a medical device.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fileio import write_text_atomic

#: --output-type values; the mask (PNG / NIfTI) is always written, the DICOM ones are added on request
OUTPUT_TYPES = ("mask", "dicom-seg", "rtstruct")
DICOM_OUTPUTS = {"dicom-seg": ("dicom_seg", "seg.dcm"), "rtstruct": ("rtstruct", "rtstruct.dcm")}
SERIES_FOLDER = "series"  # the anonymized source series, beside an anonymized SEG / RTSTRUCT
RT_UTILS_HINT = "writing RTSTRUCT needs rt-utils: pip install rt-utils opencv-python-headless"


# ============================================================================================ DICOM files
def write_dicom_files(labels: np.ndarray, source: str | os.PathLike, class_names: Sequence[str], roles: Sequence[str],
                      out_dir: str | os.PathLike, output_types: Collection[str], *, series: str | None = None,
                      anonymize: bool = False, uid_map: Any = None) -> dict[str, Path]:
    """``seg.dcm`` and / or ``rtstruct.dcm`` of ``labels`` (one class per voxel, medio's slice order) over the DICOM
    series ``source`` (``series`` picks one of several), as ``output_types`` asks; with ``anonymize`` de-identified
    through ``uid_map`` (one ``dicom_export.UIDMap`` per case; a random one when None), plus the anonymized series
    in ``series/``. Returns key -> path (``dicom_seg``, ``rtstruct``, ``series``); nothing for other types."""
    import dicom_export

    wanted = [t for t in OUTPUT_TYPES if t in output_types and t in DICOM_OUTPUTS]
    if not wanted:
        return {}
    out_dir = Path(out_dir)
    sources = dicom_export.source_datasets(source, series=series)
    if anonymize and uid_map is None:
        uid_map = dicom_export.UIDMap()
    names = [str(n) for n in class_names]
    files: dict[str, Path] = {}
    for kind in wanted:
        key, fname = DICOM_OUTPUTS[kind]
        if kind == "dicom-seg":
            files[key] = dicom_export.write_seg(labels, sources, names, out_dir / fname, roles=list(roles),
                                                anonymize=anonymize, uid_map=uid_map)
        else:
            files[key] = dicom_export.write_rtstruct(labels, sources, names, out_dir / fname, anonymize=anonymize,
                                                     uid_map=uid_map)
    if anonymize:
        anonymous = dicom_export.anonymized_sources(sources, uid_map)
        files["series"] = replace_folder(out_dir / SERIES_FOLDER, lambda tmp: dicom_export.write_series(anonymous, tmp))
    return files


def replace_folder(folder: Path, fill: Callable[[Path], Any]) -> Path:
    """``fill(tmp)`` a new folder beside ``folder``, then swap it in: a viewer never sees half a series, and a
    failed write leaves the previous folder as it was."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    old = None
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0o700; outputs are as readable as any other
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return folder


# ============================================================================================== cohort
_UNITS = ("volume_ml", "area_mm2", "voxels", "pixels")  # column order of one class's amounts


def _num(value: Any, digits: int = 6) -> str:
    """A number for the table ('' for None): ``digits`` significant digits, integers as they are."""
    if value is None:
        return ""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return f"{float(value):.{digits}g}"


def _amount(structure: dict, report: dict) -> tuple[str, Any]:
    """(unit, value) of one structure: mL / mm² with a known spacing, else the voxel / pixel count."""
    known, volume = report["input"]["spacing_known"], report["summary"]["is_volume"]
    if known:
        unit = "volume_ml" if volume else "area_mm2"
    else:
        unit = "voxels" if volume else "pixels"
    return unit, structure.get(unit)


def class_column(name: str, unit: str) -> str:
    """The column of one class's amount, its unit in the name (``liver_volume_ml``)."""
    return f"{'_'.join(str(name).split())}_{unit}"


def case_row(case: str, source: str, report: dict) -> dict[str, str]:
    """The row of a case that succeeded, from its ``report.json`` dictionary."""
    inp, summary = report["input"], report["summary"]
    row = {"case_id": case, "source_path": source, "shape": "x".join(str(v) for v in inp["shape"]),
           "spacing_mm": "x".join(_num(v, 4) for v in inp["spacing_mm"]) if inp["spacing_known"] else "",
           "lesion_count": str(summary["n_lesions"]) if summary.get("has_lesion_class", True) else "",
           "mean_foreground_probability": _num(summary.get("mean_foreground_probability"), 4), "status": "ok"}
    for s in summary["structures"]:
        unit, value = _amount(s, report)
        row[class_column(s["class"], unit)] = _num(value)
    if summary.get("max_diameter_mm") is not None:
        row["largest_lesion_diameter_mm"] = _num(summary["max_diameter_mm"], 4)
    elif summary.get("max_diameter_px") is not None:
        row["largest_lesion_diameter_px"] = _num(summary["max_diameter_px"], 4)
    return row


def failure_row(case: str, source: str, message: str) -> dict[str, str]:
    """The row of an input that failed: its error in ``status``, the rest empty."""
    return {"case_id": case, "source_path": source, "status": message}


def cohort_columns(rows: list[dict[str, str]], class_names: Sequence[str]) -> list[str]:
    """The table's columns: fixed ones, then each class's amounts in the units that occur in ``rows``."""
    present = {k for r in rows for k in r}
    amounts = [class_column(n, u) for n in class_names for u in _UNITS if class_column(n, u) in present]
    diameters = ["largest_lesion_diameter_mm"] + (["largest_lesion_diameter_px"]
                                                  if "largest_lesion_diameter_px" in present else [])
    return (["case_id", "source_path", "shape", "spacing_mm"] + amounts + ["lesion_count"] + diameters
            + ["mean_foreground_probability", "status"])


def write_cohort(path: str | os.PathLike, rows: list[dict[str, str]], class_names: Sequence[str]) -> Path:
    """Write ``cohort.csv`` (columns: :func:`cohort_columns`; rows in the given order) atomically, UTF-8."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cohort_columns(rows, class_names), restval="", lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buf.getvalue())

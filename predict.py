"""Assisted diagnosis: turn scans into a mask, an overlay figure and a readable report.

    python predict.py --checkpoint best_unet.pth --input PATH [PATH ...] --output-dir DIR \\
        [--threshold 0.5] [--min-lesion-size SIZE] [--device auto] [--lang zh|en]
    python predict.py --checkpoint best_unet.pth --benchmark      # ms per 256x256 / 512x512 slice

Each PATH is an image file (PNG/JPEG/BMP/TIFF/GIF), a NIfTI / NRRD / MHA volume, a DICOM file, a
DICOM series folder or ``.zip``, or a folder of such inputs (non-recursive; a sub-folder that holds
DICOM files is one series). The model and everything it needs (intensity window / normalisation,
channels, patch size, class names) come from the checkpoint alone.

Per input, ``DIR/<input stem>/`` receives

* ``mask.nii.gz`` (NIfTI and 3D inputs, with the input's affine) or ``mask.png`` (2D images) and,
  with ``--save-probability``, ``probability[_<class>].nii.gz|png``;
* ``overlay.png``: outlines on the image (volumes: the largest-lesion slice plus a montage of the
  slices with lesions);
* ``report.json``: every lesion (connected component) with its size, maximum diameter, centroid,
  slice, bounding box and probabilities; organ volumes and lesion burden for multi-class models;
* ``report.html``: a self-contained page for a doctor (images embedded, findings sentence, lesion
  table, model and settings) with the notice that this is research software, not a medical device.

Classes and post-processing (documented rules)
    Each class of the checkpoint gets a *role* from its name: names with a lesion word (lesion,
    tumour, polyp, nodule, ...) are **lesions**; organ / anatomy words (liver, kidney, hippocampus,
    anterior, ...) are **organs**; vessel words are **tubular** structures. A single class with
    neither kind of word is a lesion class; with several classes and no lesion word, the last class
    is the lesion class if no class has an organ word either (``--roles organ,organ`` overrides this, e.g.
    for an MSD hippocampus model whose classes are just "1" and "2"). Lesion classes: holes filled, then
    components smaller than ``--min-lesion-size`` removed. Organ classes: the largest connected
    component kept, holes filled. Tubular classes: left as predicted. Holes are filled per slice
    (in-plane) for volumes and only ever claim background pixels. Connectivity is full (8 in 2D,
    26 in 3D), as in ``metrics.lesion_detection``.

Units
    ``--min-lesion-size`` is in mm² for 2D images with a known pixel spacing, mm³ for volumes with a
    known spacing, otherwise pixels / voxels. Areas are mm² (2D), volumes mL (3D); without a known
    spacing both are pixel / voxel counts. The maximum diameter is the largest distance between two
    points of the lesion's outline (pixel corners), in mm: a 4 x 6 px rectangle at 0.5 x 0.8 mm
    measures sqrt(2.0² + 4.8²) = 5.2 mm. Slice indices are 0-based along the first array axis.

Batch behaviour and exit codes
    One bad input (missing, unreadable, unsupported, wrong channels) gets a one-line error naming it
    and the batch goes on; a summary lists the failures. Exit code 0 = every input succeeded, 1 = at
    least one failed, 2 = usage error (no inputs, bad option, missing / corrupt / foreign checkpoint,
    or an output folder inside an input's folder without ``--allow-input-dir``). Inputs are only read.

Research software, not a medical device: never use it for diagnosis.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import sys
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Collection

import numpy as np
import torch
from scipy import ndimage

import medio
import report as report_mod
from errors import CheckpointError, ConfigError, InputError, MedSegError
from inference import largest_classes, largest_component, predict_planes, probs_to_labels, tile_starts
from model import fold_batchnorm
from preprocess import WINDOW_PRESETS, Preprocessing, scaled_size, to_planes
from checkpoint import load_checkpoint
from runtime import PRECISIONS, resolve_precision, select_device

log = logging.getLogger("predict")

REPORT_SCHEMA = "medseg-predict-report/1"
NOTICE = report_mod.NOTICE
RASTER_FORMATS = ("png", "jpeg", "bmp", "tiff", "gif")

LESION_WORDS = ("lesion", "tumor", "tumour", "cancer", "polyp", "nodule", "mass", "metasta", "cyst", "carcinoma",
                "病灶", "肿瘤", "结节", "息肉", "癌")
ORGAN_WORDS = ("organ", "liver", "kidney", "spleen", "pancrea", "lung", "heart", "brain", "prostate", "bladder",
               "stomach", "gallbladder", "colon", "bone", "muscle", "hippocamp", "anterior", "posterior", "optic",
               "disc", "cup", "skin", "breast", "thyroid", "肝", "肾", "脾", "胰", "肺", "心", "脑", "海马", "器官")
TUBULAR_WORDS = ("vessel", "artery", "vein", "aorta", "airway", "血管", "动脉", "静脉", "气道")
ROLES = ("lesion", "organ", "tubular")


# ============================================================================ model bundle
@dataclass
class ModelBundle:
    """A ready-to-run model: network in eval mode + the preprocessing it was trained with + checkpoint facts."""

    model: torch.nn.Module
    prep: Preprocessing
    info: dict = field(default_factory=dict)  # the checkpoint without its weights
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    channels_last: bool = True
    checkpoint: str | None = None
    warnings: list[str] = field(default_factory=list)


def preprocessing_from_checkpoint(ckpt: dict, path: str | os.PathLike = "checkpoint") -> tuple[Preprocessing, list[str]]:
    """The checkpoint's :class:`Preprocessing`; older checkpoints without one get the synthetic default
    (8-bit images / 255, patch = training image size) and a warning."""
    args = ckpt.get("model_args") or {}
    if isinstance(ckpt.get("preprocessing"), dict):
        try:
            return Preprocessing.from_dict(ckpt["preprocessing"]), []
        except TypeError as exc:
            raise CheckpointError(f"{path}: unreadable 'preprocessing' record ({exc})") from None
    n_classes = int(args.get("n_classes", 1))
    names = ["lesion"] if n_classes == 1 else [f"class {k}" for k in range(1, n_classes)]
    prep = Preprocessing(normalization="unit", in_channels=int(args.get("n_channels", 1)),
                         patch_size=int((ckpt.get("config") or {}).get("image_size", 64)), class_names=names)
    warning = (f"{Path(path).name}: no preprocessing record in the checkpoint (older version); assuming 8-bit "
               f"images scaled by 1/255 and {prep.patch_size}-px patches as in synthetic training")
    return prep, [warning]


def load_model(checkpoint: str | os.PathLike, device: str | torch.device = "auto", precision: str = "auto",
               channels_last: bool = True) -> ModelBundle:
    """Load a medseg checkpoint (weights only, never pickled code) into a :class:`ModelBundle`.

    Raises :class:`errors.CheckpointError` for a missing, corrupt, foreign or inconsistent checkpoint and
    :class:`errors.ConfigError` for an unavailable device / precision.
    """
    dev = device if isinstance(device, torch.device) else select_device(str(device))
    prec = resolve_precision(precision, dev)
    model, ckpt = load_checkpoint(checkpoint, dev)
    prep, warnings = preprocessing_from_checkpoint(ckpt, checkpoint)
    args = ckpt.get("model_args") or {}
    if int(args.get("n_channels", prep.in_channels)) != prep.in_channels:
        raise CheckpointError(f"{checkpoint}: the network takes {args.get('n_channels')} input channels but its "
                              f"preprocessing record says {prep.in_channels}")
    if int(args.get("n_classes", prep.model_out_channels)) != prep.model_out_channels:
        raise CheckpointError(f"{checkpoint}: the network has {args.get('n_classes')} outputs but its preprocessing "
                              f"record names {prep.n_classes} class(es) ({', '.join(prep.class_names)})")
    model = fold_batchnorm(model)  # inference only: Conv+BN as one conv, ~10 % faster, same outputs
    if channels_last:
        model.to(memory_format=torch.channels_last)
    info = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return ModelBundle(model=model.eval(), prep=prep, info=info, device=dev, precision=prec,
                       channels_last=channels_last, checkpoint=str(checkpoint), warnings=warnings)


def class_roles(class_names: list[str]) -> list[str]:
    """Role of each class by name: 'lesion', 'organ' or 'tubular' (rules in the module docstring)."""
    def has(name: str, words) -> bool:
        n = str(name).lower()
        return any(w in n for w in words)

    roles = ["lesion" if has(n, LESION_WORDS) else "tubular" if has(n, TUBULAR_WORDS)
             else "organ" if has(n, ORGAN_WORDS) else "" for n in class_names]
    if len(roles) == 1:
        return [roles[0] or "lesion"]
    if "lesion" not in roles and all(r == "" for r in roles):
        roles[-1] = "lesion"
    return [r or "organ" for r in roles]


def describe_model(bundle: ModelBundle, lang: str = "en") -> dict:
    """JSON-safe model facts for the report (architecture, training scores, preprocessing)."""
    info, prep = bundle.info, bundle.prep
    args = info.get("model_args") or {}
    params = sum(p.numel() for p in bundle.model.parameters())
    if args:
        arch = (f"U-Net, {args.get('n_channels')}→{args.get('n_classes')} ch, base {args.get('base_channels')}, "
                f"{'bilinear' if args.get('bilinear', True) else 'transposed-conv'} up-sampling, {params:,} params")
    else:
        arch = f"{type(bundle.model).__name__}, {params:,} params"
    cfg = info.get("config") or {}
    metrics = info.get("metrics") or {}
    test = info.get("test_metrics") or {}
    data = cfg.get("data") or (f"synthetic ({cfg.get('difficulty')})" if cfg.get("difficulty") else None)
    training = {"val_dice": metrics.get("dice"), "epoch": info.get("epoch"), "data": data,
                "test_dice": test.get("dice") if isinstance(test, dict) else None}
    return {"checkpoint": Path(bundle.checkpoint).name if bundle.checkpoint else None,
            "checkpoint_path": str(bundle.checkpoint) if bundle.checkpoint else None,
            "format": info.get("format"), "architecture": arch, "model_args": args, "parameters": params,
            "training": training, "preprocessing": prep.to_dict(), "preprocessing_text": preprocessing_text(prep, lang),
            "device": str(bundle.device), "precision": bundle.precision}


def preprocessing_text(prep: Preprocessing, lang: str = "en") -> str:
    zh = lang == "zh"
    norm = {"window": "CT 窗 L{:g}/W{:g} HU" if zh else "CT window L{:g}/W{:g} HU",
            "zscore": "z-score 标准化（逐例）" if zh else "z-score per case",
            "percentile": "0.5–99.5 百分位 → [0, 1]" if zh else "0.5–99.5 percentile → [0, 1]",
            "unit": "8 位灰度 / 255" if zh else "8-bit / 255", "none": "原始强度" if zh else "raw intensities"}
    text = norm.get(prep.normalization, prep.normalization)
    if prep.normalization == "window":
        level, width = prep.window or (40.0, 400.0)
        text = text.format(level, width)
    parts = [text, f"{prep.in_channels} {'通道' if zh else 'channel(s)'}",
             f"{'切块' if zh else 'patch'} {prep.patch_size} px"]
    if prep.resize_long_side:
        parts.append(f"{'长边缩放至' if zh else 'long side resized to'} {prep.resize_long_side} px")
    parts.append(("类别: " if zh else "classes: ") + ", ".join(prep.class_names))
    return "; ".join(parts)


# ============================================================================ inputs and outputs
_NON_DICOM_SUFFIXES = {s for s in medio.SUPPORTED_SUFFIXES if s not in (".dcm", ".zip")} | {
    ".txt", ".md", ".json", ".csv", ".pdf", ".xml", ".html", ".py"}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_series_dir(folder: Path) -> bool:
    """True when ``folder`` directly holds DICOM files (``.dcm`` or files with the DICM preamble)."""
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return False
    for f in children:
        if not f.is_file() or f.name.startswith("."):
            continue
        sfx = _suffix(f)
        if sfx == ".dcm" or (sfx not in _NON_DICOM_SUFFIXES and medio.is_dicom_file(f)):
            return True
    return False


def _supported_file(f: Path) -> bool:
    return _suffix(f) in medio.SUPPORTED_SUFFIXES or (_suffix(f) not in _NON_DICOM_SUFFIXES and medio.is_dicom_file(f))


def expand_inputs(paths: list[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Input arguments -> (cases, failures).

    A file is one case (unsupported types fail later, with the reader's message). A folder that holds
    DICOM files is one DICOM series; any other folder contributes its supported files and its DICOM
    series sub-folders (not recursive). Missing paths and folders with nothing to read are failures
    ``(path, one-line message)``. Duplicates (same resolved path) are dropped.
    """
    cases: list[Path] = []
    failures: list[tuple[str, str]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            failures.append((str(raw), f"{raw}: no such file or folder"))
        elif p.is_dir():
            if is_series_dir(p):
                cases.append(p)
                continue
            found = [c for c in sorted(p.iterdir()) if not c.name.startswith(".") and
                     ((c.is_file() and _supported_file(c)) or (c.is_dir() and is_series_dir(c)))]
            if not found:
                msg = (f"{raw}: folder holds no supported image, volume or DICOM series "
                       f"(expected {', '.join(medio.SUPPORTED_SUFFIXES)} files or DICOM folders)")
                failures.append((str(raw), msg))
            cases.extend(found)
        else:
            cases.append(p)
    seen, unique = set(), []
    for c in cases:
        key = c.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique, failures


def case_stem(path: str | os.PathLike) -> str:
    """Output folder name of an input: its name without the image suffix (``a.nii.gz`` -> ``a``)."""
    p = Path(path)
    name = p.name
    sfx = _suffix(p)
    if sfx in medio.SUPPORTED_SUFFIXES and len(name) > len(sfx):
        name = name[: -len(sfx)]
    name = re.sub(r"[\x00-\x1f<>:\"|?*\\/]", "_", name).strip(" .") or "case"
    return name


def unique_case_names(paths: list[Path]) -> list[str]:
    """Case stems, made unique (case-insensitively) with ``-2``, ``-3``, ... suffixes."""
    used: set[str] = set()
    names = []
    for p in paths:
        base = name = case_stem(p)
        k = 2
        while name.lower() in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name.lower())
        names.append(name)
    return names


def check_output_location(inputs: list[Path], output_dir: str | os.PathLike, allow_input_dir: bool = False) -> None:
    """Refuse an output folder that is, or lies inside, the folder holding an input (or a series folder itself),
    unless ``allow_input_dir``. Raises :class:`errors.InputError`."""
    if allow_input_dir:
        return
    out = Path(output_dir).resolve()
    for p in inputs:
        if not p.exists():
            continue
        home = p.resolve().parent
        if out == home or home in out.parents:
            raise InputError(f"{output_dir}: output folder is inside the folder {home} that holds the input {p}; "
                             f"choose another --output-dir or pass --allow-input-dir")


def _atomic_write(path: Path, data: bytes) -> Path:
    return medio.atomic_write(path, ".tmp", lambda tmp: Path(tmp).write_bytes(data))


json_safe = medio.json_safe  # re-exported: the demo page and older callers use predict.json_safe


def dicom_header(path: Path) -> dict:
    """Patient / study facts from the first DICOM file of a file, folder or zip ({} when unreadable)."""
    import pydicom

    try:
        if path.is_dir():
            first = next(f for f in sorted(path.rglob("*")) if f.is_file() and
                         (f.suffix.lower() == ".dcm" or medio.is_dicom_file(f)))
            ds = pydicom.dcmread(first, stop_before_pixels=True, force=True)
        elif _suffix(path) == ".zip":
            with zipfile.ZipFile(path) as zf:
                name = next(i.filename for i in zf.infolist() if not i.is_dir() and (
                    i.filename.lower().endswith(".dcm") or zf.open(i).read(132)[128:132] == b"DICM"))
                ds = pydicom.dcmread(io.BytesIO(zf.read(name)), stop_before_pixels=True, force=True)
        else:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - patient facts are optional
        return {}

    def get(tag: str) -> str | None:
        v = ds.get(tag)
        v = str(v).strip() if v is not None else ""
        return v or None

    date = get("StudyDate")
    if date and len(date) == 8 and date.isdigit():
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    name = get("PatientName")
    out = {"name": " ".join(name.replace("^", " ").split()) if name else None, "id": get("PatientID"), "sex": get("PatientSex"), "age": get("PatientAge"),
           "study_date": date, "study_description": get("StudyDescription")}
    return {k: v for k, v in out.items() if v}


# ============================================================================ segmentation
@dataclass
class Segmentation:
    """In-memory result of :func:`segment` (arrays in the input's spatial shape)."""

    labels: np.ndarray       # post-processed classes, meta.shape, uint8
    raw_labels: np.ndarray   # thresholded / argmax classes before post-processing
    probs: np.ndarray        # (Z, C_out, H, W) float32, Z = 1 for 2D
    roles: list[str]
    seconds: float


def check_image(image: np.ndarray, meta: medio.ImageMeta, prep: Preprocessing) -> None:
    """Refuse arrays the model cannot take (e.g. a 2- or 5-channel TIFF that the reader saw as a thin stack)."""
    name = meta.path
    if meta.format in RASTER_FORMATS and len(meta.shape) == 3 and meta.shape[-1] <= 8 < min(meta.shape[:2]):
        raise InputError(f"{name}: image has shape {tuple(image.shape)}, i.e. {meta.shape[-1]} colour channels "
                         f"(expected grey, RGB or RGBA for a {prep.in_channels}-channel model)")
    spatial = image.shape[:len(meta.shape)]
    extra = image.shape[len(meta.shape):]
    if extra not in ((), (3,)):
        raise InputError(f"{name}: image has shape {tuple(image.shape)} (expected grey or RGB)")
    if min(spatial) < 1:
        raise InputError(f"{name}: image is empty (shape {tuple(image.shape)})")


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Holes filled in 2D, per slice for volumes."""
    if mask.ndim == 2:
        return ndimage.binary_fill_holes(mask)
    out = mask.copy()
    for z in np.flatnonzero(mask.reshape(len(mask), -1).any(1)):
        out[z] = ndimage.binary_fill_holes(mask[z])
    return out


def size_unit(meta: medio.ImageMeta) -> tuple[str, float]:
    """Unit of ``--min-lesion-size`` for this input and the size of one pixel / voxel in it."""
    if len(meta.shape) == 3:
        return ("mm³", float(np.prod(meta.spacing))) if meta.spacing_known else ("voxels", 1.0)
    return ("mm²", float(medio.pixel_area_mm2(meta))) if meta.spacing_known else ("px", 1.0)


def postprocess(labels: np.ndarray, meta: medio.ImageMeta, roles: list[str], *, min_lesion_size: float | None = None,
                fill_holes: bool = True, keep_largest_organ: bool = True, largest: Collection[int] = ()) -> np.ndarray:
    """Clean a class map (rules in the module docstring): lesions first (fill holes, drop small components),
    then organs (largest component, fill holes). ``largest``: classes (1-based) reduced to their largest
    component whatever their role (the step training chose on validation, see ``experiments``).
    Never changes the shape; returns a new array."""
    out = np.array(labels, dtype=np.uint8, copy=True)
    structure = np.ones((3,) * out.ndim, bool)
    _, unit = size_unit(meta)
    order = [k for k, r in enumerate(roles, 1) if r == "lesion"] + [k for k, r in enumerate(roles, 1) if r == "organ"]
    order += [k for k in largest if k not in order]
    for k in order:
        m = out == k
        if not m.any():
            continue
        if (roles[k - 1] == "organ" and keep_largest_organ) or k in largest:
            keep = largest_component(m)
            out[m & ~keep] = 0
            m = keep
        if fill_holes:
            add = _fill_holes(m) & (out == 0)
            out[add] = k
            m |= add
        if roles[k - 1] == "lesion" and min_lesion_size:
            comp, n = ndimage.label(m, structure)
            if n:
                sizes = np.bincount(comp.ravel()).astype(np.float64) * unit
                small = sizes < float(min_lesion_size)
                small[0] = False
                out[small[comp]] = 0
    return out


def segment(bundle: ModelBundle, image: np.ndarray, meta: medio.ImageMeta, *, threshold: float = 0.5,
            min_lesion_size: float | None = None, fill_holes: bool = True, keep_largest_organ: bool = True,
            overlap: float = 0.5, batch_size: int = 16, roles: list[str] | None = None,
            learned_postprocess: bool = True) -> Segmentation:
    """The in-memory core of :func:`predict_case`: image array -> probabilities -> classes -> post-processing.

    Uses exactly the training-time path (``preprocess.to_planes`` + ``inference.predict_planes`` +
    ``inference.probs_to_labels``), so with post-processing off it reproduces training-time evaluation.
    ``learned_postprocess``: apply the largest-component step the training run chose on its validation
    cases (:func:`learned_largest`).
    """
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"threshold must be between 0 and 1 (got {threshold})")
    prep = bundle.prep
    check_image(image, meta, prep)
    is_volume = len(meta.shape) == 3
    t0 = time.perf_counter()
    planes = to_planes(image, 3 if is_volume else 2, prep)
    if planes.shape[1] != prep.in_channels:
        raise InputError(f"{meta.path}: image gives {planes.shape[1]} channels but the model takes {prep.in_channels}")
    probs = predict_planes(bundle.model, planes, prep, bundle.device, bundle.precision, overlap=overlap,
                           batch_size=batch_size, channels_last=bundle.channels_last)
    if probs.shape[1] != prep.model_out_channels:
        raise CheckpointError(f"{bundle.checkpoint or 'model'}: produced {probs.shape[1]} output channels, expected "
                              f"{prep.model_out_channels} for classes {prep.class_names}")
    raw = probs_to_labels(probs, threshold)
    raw = raw if is_volume else raw[0]
    roles = list(roles) if roles else class_roles(prep.class_names)
    if len(roles) != prep.n_classes or any(r not in ROLES for r in roles):
        raise ConfigError(f"roles {roles} do not fit the model's {prep.n_classes} class(es) (each one of {ROLES})")
    labels = postprocess(raw, meta, roles, min_lesion_size=min_lesion_size, fill_holes=fill_holes,
                         keep_largest_organ=keep_largest_organ,
                         largest=learned_largest(bundle) if learned_postprocess else ())
    return Segmentation(labels=labels, raw_labels=raw, probs=probs, roles=roles, seconds=time.perf_counter() - t0)


def settings_record(bundle: ModelBundle, meta: medio.ImageMeta, *, threshold: float = 0.5,
                    min_lesion_size: float | None = None, fill_holes: bool = True, keep_largest_organ: bool = True,
                    overlap: float = 0.5, learned_postprocess: bool = True) -> dict:
    """The report's ``settings``: how a mask was made from the network output (predict.py and the demo page)."""
    prep, multi = bundle.prep, bundle.prep.n_classes > 1
    return {"threshold": None if multi else float(threshold), "decision": "argmax" if multi else "sigmoid > threshold",
            "min_lesion_size": float(min_lesion_size or 0.0), "min_lesion_size_unit": size_unit(meta)[0],
            "fill_holes": bool(fill_holes), "fill_holes_mode": "per slice (2D)" if len(meta.shape) == 3 else "2D",
            "keep_largest_organ": bool(keep_largest_organ), "overlap": float(overlap),
            "mirror_tta": bool(prep.mirror_tta),
            "largest_component_classes": [prep.class_names[k - 1] for k in learned_largest(bundle)]
            if learned_postprocess else [],
            "connectivity": "full (8 in 2D, 26 in 3D)"}


def learned_largest(bundle: ModelBundle) -> list[int]:
    """Classes (1-based) the training run reduces to their largest component (``postprocessing`` in the checkpoint)."""
    return largest_classes(bundle.prep.class_names, bundle.info.get("postprocessing"))


def class_probability(probs: np.ndarray | None, k: int, shape: tuple[int, ...]) -> np.ndarray | None:
    """Probability map of class ``k`` (1-based) in the input's spatial ``shape``."""
    if probs is None:
        return None
    p = probs[:, 0] if probs.shape[1] == 1 else probs[:, k]
    return p.reshape(shape)


# ============================================================================ measurements
def _line_extremes(mask: np.ndarray) -> np.ndarray:
    """Index coordinates of the first and last foreground voxel of every line along the last axis: a small
    subset of the voxels that still holds every vertex of their convex hull."""
    has = mask.any(axis=-1)
    first = np.argmax(mask, axis=-1)
    last = mask.shape[-1] - 1 - np.argmax(mask[..., ::-1], axis=-1)
    lead = np.argwhere(has)
    pts = np.concatenate([np.c_[lead, first[has]], np.c_[lead, last[has]]])
    return np.unique(pts, axis=0).astype(np.float64)


def _hull_vertices(pts: np.ndarray) -> np.ndarray:
    """Vertices of the convex hull of ``pts`` (in the sub-space where they vary); all points when it is degenerate."""
    from scipy.spatial import ConvexHull, QhullError

    varying = np.flatnonzero(np.ptp(pts, axis=0) > 0)
    if len(varying) == 0:
        return pts[:1]
    sub = pts[:, varying]
    if len(varying) == 1:
        return pts[[int(np.argmin(sub[:, 0])), int(np.argmax(sub[:, 0]))]]
    if len(pts) <= len(varying) + 1:
        return pts
    try:
        return pts[ConvexHull(sub).vertices]
    except (QhullError, ValueError):  # e.g. collinear points in 2D: few of them
        return pts


def max_diameter(mask: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Maximum Feret diameter of ``mask`` as a union of voxels (boxes of size ``spacing``), in spacing units:
    the largest distance between two points of the segmented region, e.g. a 4 x 6 px rectangle at 0.5 x 0.8 mm
    gives hypot(2.0, 4.8) = 5.2 mm and a single pixel its diagonal.

    Exact: the farthest pair lies on voxel corners of the convex hull of the voxel centres, and for centres
    ``p, q`` the farthest corner pair is ``|| |p - q| + spacing ||``.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return 0.0
    s = np.asarray(spacing, np.float64)
    pts = _hull_vertices(_line_extremes(mask) * s)
    best = 0.0
    for i in range(0, len(pts), 512):
        d = np.abs(pts[i:i + 512, None, :] - pts[None, :, :]) + s
        best = max(best, float(np.sqrt((d * d).sum(-1)).max()))
    return best


def _measure(comp_sub: np.ndarray, offset: np.ndarray, meta: medio.ImageMeta, prob_sub: np.ndarray | None) -> dict:
    """Measurements of one component given as a boolean crop ``comp_sub`` at index ``offset``."""
    ndim = comp_sub.ndim
    known = meta.spacing_known
    spacing = tuple(float(s) for s in meta.spacing) if known else (1.0,) * ndim
    coords = np.argwhere(comp_sub)
    n = len(coords)
    centroid = coords.mean(axis=0) + offset
    lo, hi = offset, offset + np.asarray(comp_sub.shape) - 1
    extent_px = (hi - lo + 1).tolist()
    d_units = max_diameter(comp_sub, spacing)
    item: dict[str, Any] = {}
    if ndim == 3:
        item["voxels"] = int(n)
        vol_mm3 = n * float(np.prod(spacing)) if known else None
        item["volume_mm3"] = vol_mm3
        item["volume_ml"] = vol_mm3 / 1000.0 if vol_mm3 is not None else None
        per_slice = comp_sub.reshape(len(comp_sub), -1).sum(1)
        item["slice_index"] = int(offset[0] + int(np.argmax(per_slice)))
        item["slice_range"] = [int(lo[0]), int(hi[0])]
        axial = max(max_diameter(comp_sub[z], spacing[1:]) for z in np.flatnonzero(per_slice))
        item["axial_diameter_mm" if known else "axial_diameter_px"] = axial
    else:
        item["pixels"] = int(n)
        item["area_mm2"] = n * spacing[0] * spacing[1] if known else None
    item["max_diameter_mm"] = d_units if known else None
    if not known:
        item["max_diameter_px"] = d_units
    item["centroid_index"] = [round(float(c), 2) for c in centroid]
    if ndim == 3 and meta.affine is not None:
        z, y, x = centroid
        world = np.asarray(meta.affine, float) @ np.array([x, y, z, 1.0])
        item["centroid_world_mm"] = [round(float(v), 2) for v in world[:3]]  # RAS, NIfTI convention
    elif known:
        item["centroid_mm"] = [round(float(c * s), 2) for c, s in zip(centroid, spacing)]
    item["bbox_min"] = [int(v) for v in lo]
    item["bbox_max"] = [int(v) for v in hi]
    item["extent_px"] = [int(v) for v in extent_px]
    item["extent_mm"] = [round(e * s, 2) for e, s in zip(extent_px, spacing)] if known else None
    if prob_sub is not None:
        vals = prob_sub[comp_sub]
        item["mean_probability"] = round(float(vals.mean()), 4)
        item["max_probability"] = round(float(vals.max()), 4)
    else:
        item["mean_probability"] = item["max_probability"] = None
    return item


def analyze_with_ids(labels: np.ndarray, probs: np.ndarray | None, meta: medio.ImageMeta, prep: Preprocessing,
                     roles: list[str] | None = None) -> tuple[dict, np.ndarray]:
    """:func:`analyze_mask` plus the lesion id map (each lesion voxel = its ``id``) the overlays are drawn from."""
    labels = np.asarray(labels)
    shape = tuple(int(s) for s in meta.shape)
    if labels.shape != shape:
        raise InputError(f"{meta.path}: label map has shape {labels.shape} but the image has {shape}")
    roles = roles or class_roles(prep.class_names)
    if len(roles) != prep.n_classes:
        raise ConfigError(f"{len(roles)} roles given for {prep.n_classes} classes")
    is_volume = len(shape) == 3
    known = meta.spacing_known
    structure = np.ones((3,) * labels.ndim, bool)
    unit_size = float(np.prod(meta.spacing)) if known else None  # mm^3 per voxel or mm^2 per pixel
    count_key = "voxels" if is_volume else "pixels"
    pending, structures, comps = [], [], {}
    for k, (name, role) in enumerate(zip(prep.class_names, roles), start=1):
        m = labels == k
        n = int(m.sum())
        comp, ncomp = ndimage.label(m, structure) if n else (None, 0)
        st = {"class": name, "class_index": k, "role": role, count_key: n, "components": int(ncomp)}
        if is_volume:
            st["volume_ml"] = n * unit_size / 1000.0 if known else None
        else:
            st["area_mm2"] = n * unit_size if known else None
        structures.append(st)
        if role != "lesion" or not ncomp:
            continue
        comps[k] = comp
        prob_k = class_probability(probs, k, shape)
        for c, sl in enumerate(ndimage.find_objects(comp), start=1):
            sub = comp[sl] == c
            offset = np.array([s.start for s in sl])
            item = _measure(sub, offset, meta, prob_k[sl] if prob_k is not None else None)
            pending.append((k, c, {"class": name, "class_index": k, **item}))
    pending.sort(key=lambda e: (-e[2][count_key], e[2]["bbox_min"], e[0]))
    id_map = np.zeros(shape, np.int32)
    lesions = []
    for i, (k, c, item) in enumerate(pending, start=1):
        id_map[comps[k] == c] = i
        lesions.append({"id": i, **item})

    lesion_n = sum(s[count_key] for s in structures if s["role"] == "lesion")
    organ_n = sum(s[count_key] for s in structures if s["role"] == "organ")
    has_lesion = "lesion" in roles
    summary: dict[str, Any] = {"is_volume": is_volume, "spacing_known": known, "has_lesion_class": has_lesion,
                               "n_lesions": len(lesions)}
    total = {count_key: lesion_n}
    if is_volume:
        total["volume_ml"] = lesion_n * unit_size / 1000.0 if known else None
    else:
        total["area_mm2"] = lesion_n * unit_size if known else None
    summary["lesion_total"] = total
    if lesions:
        biggest = max(lesions, key=lambda x: x.get("max_diameter_mm") or x.get("max_diameter_px") or 0.0)
        summary["max_diameter_mm"] = biggest.get("max_diameter_mm")
        if not known:
            summary["max_diameter_px"] = biggest.get("max_diameter_px")
        summary["max_diameter_lesion"] = biggest["id"]
        summary["largest_lesion"] = lesions[0]["id"]
    else:
        summary["max_diameter_mm"] = None
    summary["structures"] = structures
    if has_lesion and organ_n:
        summary["organ_" + ("volume_ml" if is_volume else "area_mm2")] = (
            organ_n * unit_size / (1000.0 if is_volume else 1.0) if known else None)
        summary["organ_" + count_key] = organ_n
        summary["lesion_burden_percent"] = 100.0 * lesion_n / (organ_n + lesion_n)
    else:
        summary["lesion_burden_percent"] = None
    return {"lesions": lesions, "summary": summary}, id_map


def analyze_mask(labels: np.ndarray, probs: np.ndarray | None, meta: medio.ImageMeta, prep: Preprocessing,
                 roles: list[str] | None = None) -> dict:
    """Measure a class map (pure function): ``{"lesions": [...], "summary": {...}}``.

    labels: classes 0..K in the image's spatial shape (``meta.shape``); probs: (Z, C_out, H, W) from
    :func:`inference.predict_planes` or None. Lesions are connected components (full connectivity) of
    the lesion-role classes, sorted by size (largest first, ``id`` 1..n). Units: see the module docstring.
    """
    return analyze_with_ids(labels, probs, meta, prep, roles)[0]


# ============================================================================ overlay figure
LESION_COLOUR = "#ff2d20"
LESION_COLOUR_RGB = "#00e5ff"
STRUCTURE_COLOURS = ("#22c55e", "#0ea5e9", "#eab308", "#a855f7", "#14b8a6", "#f97316")


def _class_colours(roles: list[str], rgb: bool = False) -> list[str]:
    """Lesions red on grey images, cyan on colour photographs (red on red mucosa would be unreadable)."""
    out, j = [], 0
    for r in roles:
        if r == "lesion":
            out.append(LESION_COLOUR_RGB if rgb else LESION_COLOUR)
        else:
            out.append(STRUCTURE_COLOURS[j % len(STRUCTURE_COLOURS)])
            j += 1
    return out


def display_image(image: np.ndarray, meta: medio.ImageMeta, prep: Preprocessing) -> np.ndarray:
    """The image scaled to [0, 1] for display: a CT window for CT (the model's, else abdomen 40/400 HU),
    colour photographs / 255, anything else a 0.5-99.5 % percentile stretch."""
    x = np.asarray(image, np.float32)
    rgb = x.ndim == len(meta.shape) + 1
    if rgb and x.max() <= 255 and x.min() >= 0:
        return np.clip(x / 255.0, 0, 1)
    ct = prep.normalization == "window" or str(meta.extra.get("modality") or "").upper() == "CT"
    if ct and not rgb and meta.format not in RASTER_FORMATS:  # HU: the model's window, else soft tissue 40/400
        level, width = prep.window if prep.normalization == "window" and prep.window else WINDOW_PRESETS["abdomen"]
        return np.clip((x - (level - width / 2)) / width, 0, 1)
    sample = x.ravel()[:: max(1, x.size // 2_000_000)]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(x.min()), float(x.max()) + 1e-6
    return np.clip((x - lo) / (hi - lo), 0, 1)


def display_transform(meta: medio.ImageMeta) -> tuple[bool, bool, bool]:
    """(transpose, flip_rows, flip_cols) that show a volume's slices in radiological convention from its direction
    cosines: patient right on the left, anterior (axial) or superior (coronal / sagittal) at the top."""
    if len(meta.shape) != 3 or meta.affine is None:
        return False, False, False
    d = np.asarray(meta.direction, float)  # d[r][c]: world (z, y, x) component r of array axis c, LPS
    vec = {a: d[:, a][::-1] for a in (1, 2)}  # (x, y, z) LPS of the row axis (1) and column axis (2)
    h = max((1, 2), key=lambda a: abs(vec[a][0]))
    target = 0  # horizontal: towards patient left (+x), i.e. patient right on the screen's left
    if abs(vec[h][0]) < 0.5:  # sagittal plane: horizontal is anterior -> posterior (+y)
        h = max((1, 2), key=lambda a: abs(vec[a][1]))
        target = 1
    v = 3 - h
    flip_h = vec[h][target] < 0
    dom = int(np.argmax(np.abs(vec[v])))
    flip_v = vec[v][dom] > 0 if dom == 2 else vec[v][dom] < 0  # top: superior (z) / anterior (y) / right (x)
    return h == 1, bool(flip_v), bool(flip_h)


def orient_slice(arr: np.ndarray, tf: tuple[bool, bool, bool]) -> np.ndarray:
    """Apply a :func:`display_transform` (transpose, flip rows, flip columns) to a 2D slice for display."""
    transpose, flip_rows, flip_cols = tf
    if transpose:
        arr = np.swapaxes(arr, 0, 1)
    if flip_rows:
        arr = arr[::-1]
    if flip_cols:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def _draw_panel(ax, img: np.ndarray, lab: np.ndarray | None, ids: np.ndarray | None, colours: list[str],
                aspect: float, small: bool = False) -> None:
    from matplotlib.colors import to_rgba

    ax.imshow(img, cmap=None if img.ndim == 3 else "gray", vmin=0, vmax=1, aspect=aspect, interpolation="antialiased")
    if lab is not None:
        for k, col in enumerate(colours, start=1):
            m = lab == k
            if not m.any():
                continue
            fill = np.zeros((*m.shape, 4), np.float32)
            fill[m] = to_rgba(col, 0.28)
            ax.imshow(fill, aspect=aspect, interpolation="nearest")
            ax.contour(m.astype(np.float32), levels=[0.5], colors=[col], linewidths=0.9 if small else 1.4)
    if ids is not None:
        present = [i for i in np.unique(ids) if i > 0][:20]
        h, w = ids.shape
        off = 0.015 * max(h, w) + 1.5
        for i in present:
            ys, xs = np.nonzero(ids == i)
            j = int(np.argmax(xs - ys))  # the lesion's top-right-most pixel
            x, y = min(float(xs[j]) + off, w - 1), max(float(ys[j]) - off, 0)
            ax.text(x, y, str(i), color="white", fontsize=7 if small else 9, ha="center",
                    va="center", bbox={"boxstyle": "circle,pad=0.25", "fc": "#d92d20", "ec": "white", "lw": 0.8})
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def render_overlay(image: np.ndarray, meta: medio.ImageMeta, labels: np.ndarray, id_map: np.ndarray, lesions: list[dict],
                   roles: list[str], prep: Preprocessing, lang: str = "zh", max_montage: int = 12) -> bytes:
    """PNG bytes of the overlay figure (2D: image | overlay; 3D: largest-lesion slice + montage)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    import visualize

    visualize.setup_chinese_font()
    zh = lang == "zh"
    disp = display_image(image, meta, prep)
    colours = _class_colours(roles, rgb=disp.ndim == len(meta.shape) + 1)
    is_volume = len(meta.shape) == 3
    spacing = meta.spacing if meta.spacing_known else (1.0,) * len(meta.shape)
    if not is_volume:
        h, w = meta.shape
        aspect = float(spacing[0] / spacing[1])
        panel_w = 5.6
        panel_h = float(np.clip(panel_w * h * aspect / w, 2.5, 8.0))
        fig, axes = plt.subplots(1, 2, figsize=(2 * panel_w, panel_h + 0.8), layout="constrained")
        _draw_panel(axes[0], disp, None, None, colours, aspect)
        axes[0].set_title("原始影像" if zh else "Image", fontsize=12)
        _draw_panel(axes[1], disp, labels, id_map, colours, aspect)
        axes[1].set_title("分割结果" if zh else "Segmentation", fontsize=12)
    else:
        tf = display_transform(meta)
        z_n = meta.shape[0]
        lesion_mask = np.isin(labels, [k for k, r in enumerate(roles, 1) if r == "lesion"])
        per_slice_lesion = lesion_mask.reshape(z_n, -1).sum(1)
        per_slice_any = (labels > 0).reshape(z_n, -1).sum(1)
        if lesions:
            key = int(lesions[0]["slice_index"])
            cands = np.flatnonzero(per_slice_lesion)
            title = (f"最大病灶（{lesions[0]['id']} 号）所在层面 z = {key}" if zh
                     else f"Largest lesion (#{lesions[0]['id']}), slice z = {key}")
        elif per_slice_any.any():
            key = int(np.argmax(per_slice_any))
            cands = np.flatnonzero(per_slice_any)
            title = f"分割面积最大层面 z = {key}" if zh else f"Slice with most segmented tissue, z = {key}"
        else:
            key = z_n // 2
            cands = np.arange(z_n)
            title = f"中间层面 z = {key}（未分割出结构）" if zh else f"Middle slice z = {key} (nothing segmented)"
        if len(cands) > max_montage:
            cands = cands[np.unique(np.linspace(0, len(cands) - 1, max_montage).round().astype(int))]
        montage = [int(z) for z in cands] if len(cands) > 1 else []
        row_sp, col_sp = (spacing[2], spacing[1]) if tf[0] else (spacing[1], spacing[2])
        aspect = float(row_sp / col_sp)
        first = orient_slice(disp[key], tf)
        hh, ww = first.shape[:2]
        ratio = float(np.clip(hh * aspect / ww, 0.3, 3.0))
        ncol = 4
        nrow = math.ceil(len(montage) / ncol)
        fig_w = 11.2
        top_h = fig_w / 2 * ratio
        cell_h = fig_w / ncol * ratio
        fig = plt.figure(figsize=(fig_w, top_h + nrow * (cell_h + 0.35) + 0.9), layout="constrained")
        gs = fig.add_gridspec(1 + nrow, ncol, height_ratios=[top_h + 0.35] + [cell_h + 0.35] * nrow)
        ax0, ax1 = fig.add_subplot(gs[0, 0:2]), fig.add_subplot(gs[0, 2:4])
        _draw_panel(ax0, first, None, None, colours, aspect)
        ax0.set_title(("原始影像 · " if zh else "Image · ") + f"z = {key}", fontsize=11)
        _draw_panel(ax1, first, orient_slice(labels[key], tf), orient_slice(id_map[key], tf), colours, aspect)
        ax1.set_title(title, fontsize=11)
        for j, z in enumerate(montage):
            ax = fig.add_subplot(gs[1 + j // ncol, j % ncol])
            _draw_panel(ax, orient_slice(disp[z], tf), orient_slice(labels[z], tf), orient_slice(id_map[z], tf), colours, aspect, small=True)
            ax.set_title(f"z = {z}" + (f" / {z_n}" if j == 0 else ""), fontsize=9)
    present = [k for k in range(1, len(roles) + 1) if (labels == k).any()]
    handles = [Patch(facecolor=colours[k - 1], edgecolor=colours[k - 1], alpha=0.7,
                     label=report_mod.class_label(prep.class_names[k - 1], lang)) for k in present]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buf.getvalue()


# ============================================================================ one case
@dataclass
class CaseResult:
    """What :func:`predict_case` wrote and found."""

    case: str
    input: Path
    output_dir: Path
    files: dict[str, Path]
    lesions: list[dict]
    summary: dict
    report: dict
    labels: np.ndarray = field(repr=False)
    probs: np.ndarray = field(repr=False)
    seconds: float = 0.0


def input_warnings(image: np.ndarray, meta: medio.ImageMeta, prep: Preprocessing, lang: str) -> list[str]:
    """Plausibility checks of input vs model (the prediction still runs)."""
    zh = lang == "zh"
    out = []
    modality = str(meta.extra.get("modality") or "").upper()
    if prep.normalization == "window" and (meta.format in RASTER_FORMATS or modality not in ("", "CT")):
        out.append("模型按 CT 窗宽窗位（HU）训练，但输入不是 CT 影像，结果可能无意义。" if zh else
                   "The model was trained on CT (HU window) but the input is not a CT scan; results may be meaningless.")
    lo, hi = float(image.min()), float(image.max())
    if prep.normalization == "unit" and (lo < -1 or hi > 255.5):
        out.append(f"模型按 8 位灰度图（0–255）训练，但输入强度范围为 [{lo:g}, {hi:g}]，结果可能无意义。" if zh else
                   f"The model expects 8-bit images (0–255) but the input ranges over [{lo:g}, {hi:g}]; results may be meaningless.")
    return out


def predict_case(model: ModelBundle | str | os.PathLike, input_path: str | os.PathLike, output_dir: str | os.PathLike, *,
                 threshold: float = 0.5, min_lesion_size: float | None = None, fill_holes: bool = True,
                 keep_largest_organ: bool = True, lang: str = "zh", device: str = "auto", precision: str = "auto",
                 save_probability: bool = False, allow_input_dir: bool = False, case_name: str | None = None,
                 overlap: float = 0.5, batch_size: int = 16, roles: list[str] | None = None,
                 embed_font: bool = True, learned_postprocess: bool = True) -> CaseResult:
    """Predict one input and write ``output_dir/<case_name or input stem>/``: mask, overlay.png, report.json,
    report.html (and the probability maps with ``save_probability``). See the module docstring for the rules.

    ``model`` is a :class:`ModelBundle` or a checkpoint path (then ``device`` / ``precision`` apply).
    Raises :class:`errors.MedSegError` subclasses with one-line messages naming the input.
    """
    t_start = time.perf_counter()
    lang = "en" if lang == "en" else "zh"
    bundle = model if isinstance(model, ModelBundle) else load_model(model, device, precision)
    prep = bundle.prep
    path = Path(input_path)
    name = case_name or case_stem(path)
    case_dir = Path(output_dir) / name
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    check_output_location([path], output_dir, allow_input_dir)
    check_output_location([path], case_dir, allow_input_dir)

    image, meta = medio.read_image(path)
    t_read = time.perf_counter() - t_start
    seg = segment(bundle, image, meta, threshold=threshold, min_lesion_size=min_lesion_size, fill_holes=fill_holes,
                  keep_largest_organ=keep_largest_organ, overlap=overlap, batch_size=batch_size, roles=roles,
                  learned_postprocess=learned_postprocess)
    t1 = time.perf_counter()
    analysis, id_map = analyze_with_ids(seg.labels, seg.probs, meta, prep, seg.roles)
    t_analyze = time.perf_counter() - t1

    files: dict[str, Path] = {}
    suffix = medio.output_suffix(meta)
    planned = [f"mask{suffix}", "overlay.png", "report.json", "report.html"]
    planned += [f"probability{'' if prep.n_classes == 1 else '_' + case_stem(Path(str(c)))}{suffix}" for c in prep.class_names]
    src = path.resolve()
    for fname in planned:  # even with allow_input_dir, never write over an input
        target = (case_dir / fname).resolve()
        if target == src or (src.is_dir() and src in target.parents and target.exists()):
            raise InputError(f"{path}: refusing to write {case_dir / fname} over the input (choose another --output-dir)")
    files["mask"] = medio.write_mask(seg.labels, meta, case_dir / f"mask{suffix}")
    if save_probability:
        for k, cname in enumerate(prep.class_names, start=1):
            stem = "probability" if prep.n_classes == 1 else f"probability_{case_stem(Path(str(cname)))}"
            files[stem] = medio.write_probability(class_probability(seg.probs, k, tuple(meta.shape)), meta,
                                                  case_dir / f"{stem}{suffix}")
    png = render_overlay(image, meta, seg.labels, id_map, analysis["lesions"], seg.roles, prep, lang)
    files["overlay"] = _atomic_write(case_dir / "overlay.png", png)

    inp = {"path": str(path), "name": path.name, "format": meta.format, "shape": list(meta.shape),
           "channels": meta.channels, "spacing_mm": list(meta.spacing), "spacing_known": meta.spacing_known,
           "affine": meta.affine, "modality": meta.extra.get("modality") or None,
           "series_description": meta.extra.get("series_description") or None}
    if meta.format == "dicom":
        inp["patient"] = dicom_header(path)
    warnings = list(bundle.warnings) + input_warnings(image, meta, prep, lang)
    rep: dict[str, Any] = {
        "schema": REPORT_SCHEMA, "case": name, "generated_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "language": lang, "notice": NOTICE[lang], "notice_zh": NOTICE["zh"], "notice_en": NOTICE["en"],
        "software": f"medseg predict.py · PyTorch {torch.__version__}",
        "input": inp, "model": describe_model(bundle, lang),
        "settings": settings_record(bundle, meta, threshold=threshold, min_lesion_size=min_lesion_size,
                                    fill_holes=fill_holes, keep_largest_organ=keep_largest_organ, overlap=overlap,
                                    learned_postprocess=learned_postprocess),
        "classes": [{"index": k, "name": n, "role": r} for k, (n, r) in enumerate(zip(prep.class_names, seg.roles), 1)],
        "lesions": analysis["lesions"], "summary": analysis["summary"],
        "outputs": {k: v.name for k, v in files.items()} | {"report_json": "report.json", "report_html": "report.html"},
        "timing": {"read_s": round(t_read, 3), "predict_s": round(seg.seconds, 3), "analyze_s": round(t_analyze, 3)},
        "warnings": warnings,
    }
    rep["summary"]["findings"] = report_mod.findings_sentence(rep, lang)
    rep["summary"]["findings_zh"] = report_mod.findings_sentence(rep, "zh")
    rep["summary"]["findings_en"] = report_mod.findings_sentence(rep, "en")
    rep["timing"]["total_s"] = round(time.perf_counter() - t_start, 3)
    rep = json_safe(rep)
    page = report_mod.render_html(rep, {"overlay": png}, lang, embed_font=embed_font)
    files["report_html"] = _atomic_write(case_dir / "report.html", page.encode("utf-8"))
    files["report_json"] = _atomic_write(case_dir / "report.json",
                                         json.dumps(rep, indent=2, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    return CaseResult(case=name, input=path, output_dir=case_dir, files=files, lesions=rep["lesions"],
                      summary=rep["summary"], report=rep, labels=seg.labels, probs=seg.probs,
                      seconds=time.perf_counter() - t_start)


# ============================================================================ latency
def latency(bundle: ModelBundle, size: int, repeats: int = 5, warmup: int = 1, overlap: float = 0.5,
            batch_size: int = 16) -> dict:
    """Milliseconds to predict one ``size`` x ``size`` slice with the full pipeline (sliding window, blending)."""
    prep = bundle.prep
    plane = np.random.default_rng(0).random((1, prep.in_channels, size, size), dtype=np.float32)
    h, w = scaled_size(size, size, prep)
    tiles = len(tile_starts(max(h, prep.patch_size), prep.patch_size, overlap)) * \
        len(tile_starts(max(w, prep.patch_size), prep.patch_size, overlap))
    def run() -> np.ndarray:
        return predict_planes(bundle.model, plane, prep, bundle.device, bundle.precision, overlap=overlap,
                              batch_size=batch_size, channels_last=bundle.channels_last)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(max(1, repeats)):
        if bundle.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if bundle.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000.0)
    return {"size": size, "ms_median": float(np.median(times)), "ms_min": float(min(times)), "repeats": len(times),
            "tiles": tiles, "patch": prep.patch_size, "overlap": overlap}


# ============================================================================ command line
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """States defaults, except for on/off flags and options without one (where '(default: True)' misleads)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="predict.py", formatter_class=_HelpFormatter,
        description="Segment scans with a trained U-Net and write a mask, an overlay and a report per input "
                    "(research software, not a medical device).",
        epilog="Exit codes: 0 all inputs succeeded, 1 some failed, 2 usage error.")
    p.add_argument("--checkpoint", default="best_unet.pth", help="trained model (python run.py writes best_unet.pth)")
    p.add_argument("--input", nargs="+", metavar="PATH", help="image / NIfTI / DICOM file, DICOM folder or zip, or a "
                   "folder of such inputs (required unless --benchmark)")
    p.add_argument("--output-dir", metavar="DIR", help="one sub-folder per input is written here (required unless --benchmark)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold of single-class models "
                   "(multi-class models use argmax)")
    p.add_argument("--min-lesion-size", type=float, default=0.0, metavar="SIZE",
                   help="remove lesions smaller than this: mm² (2D) / mm³ (3D) when the spacing is known, else px / voxels")
    p.add_argument("--no-fill-holes", dest="fill_holes", action="store_false", help="do not fill holes in lesions/organs (filled by default)")
    p.add_argument("--no-keep-largest-organ", dest="keep_largest_organ", action="store_false",
                   help="keep every organ component (default: only the largest)")
    p.add_argument("--no-postprocess", action="store_true", help="raw thresholded masks: no hole filling, no size "
                   "filter, no largest-component step (the network's output as is)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="auto = cuda > mps > cpu")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto = bf16 autocast where the hardware supports it, else fp32")
    p.add_argument("--lang", default="zh", choices=("zh", "en"), help="language of the report and figure labels")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap for images larger than the patch")
    p.add_argument("--batch-size", type=int, default=16, help="sliding-window tiles per forward pass")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch (0 = PyTorch's default, one per "
                   "core; 1 is much faster on a machine busy with other jobs)")
    p.add_argument("--roles", default=None, metavar="R1,R2,...", help="override the role of each class: lesion, "
                   "organ or tubular, comma-separated in class order (default: from the class names, see the docs)")
    p.add_argument("--save-probability", action="store_true", help="also write the probability map(s)")
    p.add_argument("--allow-input-dir", action="store_true", help="allow --output-dir inside an input's folder")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of unexpected errors")
    b = p.add_argument_group("latency benchmark")
    b.add_argument("--benchmark", action="store_true", help="print ms per slice for --benchmark-sizes and exit")
    b.add_argument("--benchmark-sizes", type=int, nargs="+", default=[256, 512], metavar="N", help="square slice sizes")
    b.add_argument("--repeats", type=int, default=5, help="timed repeats per size (median reported)")
    return p


def _oneline(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _failure(path: Path | str, exc: BaseException) -> str:
    msg = _oneline(exc)
    if not isinstance(exc, MedSegError):
        msg = f"unexpected {type(exc).__name__}: {msg}"
    return msg if str(path) in msg else f"{path}: {msg}"


def run_benchmark(bundle: ModelBundle, sizes: list[int], repeats: int, overlap: float, batch_size: int) -> list[dict]:
    print(f"Latency per slice on {bundle.device} ({bundle.precision}, {torch.get_num_threads()} thread(s)), "
          f"{Path(bundle.checkpoint or 'model').name}: {describe_model(bundle)['architecture']}; "
          f"patch {bundle.prep.patch_size}, overlap {overlap}")
    rows = []
    for s in sizes:
        r = latency(bundle, s, repeats=repeats, warmup=2, overlap=overlap, batch_size=batch_size)
        rows.append(r)
        print(f"  {s}x{s}: {r['ms_median']:.1f} ms (median of {r['repeats']}, min {r['ms_min']:.1f} ms; "
              f"{r['tiles']} tiles of {r['patch']}x{r['patch']})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # INFO chatter of fontTools/matplotlib stays off

    def usage(msg: str) -> int:
        parser.print_usage(sys.stderr)
        print(f"predict.py: error: {msg}", file=sys.stderr)
        return 2

    if not args.benchmark and not args.input:
        return usage("no inputs: pass --input PATH [PATH ...]")
    if not args.benchmark and not args.output_dir:
        return usage("--output-dir is required")
    if not 0.0 < args.threshold < 1.0:
        return usage(f"--threshold must be between 0 and 1 (got {args.threshold})")
    if args.min_lesion_size < 0 or not math.isfinite(args.min_lesion_size):
        return usage(f"--min-lesion-size must be >= 0 (got {args.min_lesion_size})")
    if not 0.0 <= args.overlap < 1.0:
        return usage(f"--overlap must be in [0, 1) (got {args.overlap})")
    if args.batch_size < 1 or args.repeats < 1 or min(args.benchmark_sizes) < 1 or args.threads < 0:
        return usage("--batch-size, --repeats and --benchmark-sizes must be >= 1, --threads >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    roles = None
    if args.roles:
        roles = [r.strip().lower() for r in args.roles.split(",")]
        if any(r not in ROLES for r in roles):
            return usage(f"--roles {args.roles!r}: each role must be one of {', '.join(ROLES)}")
    if args.no_postprocess:
        args.fill_holes = args.keep_largest_organ = False
        args.min_lesion_size = 0.0
    try:
        bundle = load_model(args.checkpoint, args.device, args.precision)
    except MedSegError as exc:
        print(f"predict.py: error: {_oneline(exc)}", file=sys.stderr)
        return 2
    if roles is not None and len(roles) != bundle.prep.n_classes:
        return usage(f"--roles gives {len(roles)} role(s) but the model has {bundle.prep.n_classes} class(es): "
                     f"{', '.join(bundle.prep.class_names)}")
    if args.benchmark:
        run_benchmark(bundle, args.benchmark_sizes, args.repeats, args.overlap, args.batch_size)
        return 0

    inputs, failures = expand_inputs(args.input)
    out_dir = Path(args.output_dir)
    try:
        check_output_location(inputs, out_dir, args.allow_input_dir)
    except InputError as exc:
        return usage(_oneline(exc))
    for w in bundle.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for _, msg in failures:
        print(f"error: {msg}", file=sys.stderr)
    from tqdm.auto import tqdm

    names = unique_case_names(inputs)
    done: list[dict] = []
    total = len(inputs) + len(failures)
    with tqdm(list(zip(inputs, names)), desc="predict", unit="case", disable=not args.progress, file=sys.stderr) as bar:
        for path, name in bar:
            bar.set_postfix_str(path.name[:30])
            try:
                res = predict_case(bundle, path, out_dir, threshold=args.threshold, min_lesion_size=args.min_lesion_size,
                                   fill_holes=args.fill_holes, keep_largest_organ=args.keep_largest_organ,
                                   lang=args.lang, save_probability=args.save_probability,
                                   allow_input_dir=args.allow_input_dir, case_name=name, overlap=args.overlap,
                                   batch_size=args.batch_size, roles=roles,
                                   learned_postprocess=not args.no_postprocess)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad input never stops the batch
                msg = _failure(path, exc)
                failures.append((str(path), msg))
                tqdm.write(f"error: {msg}", file=sys.stderr)
                if args.verbose and not isinstance(exc, MedSegError):
                    traceback.print_exc()
                continue
            done.append({"input": str(path), "output": str(res.output_dir), "findings": res.summary["findings"],
                         "n_lesions": res.summary["n_lesions"], "seconds": round(res.seconds, 2)})
            tqdm.write(f"{path} -> {res.output_dir}{os.sep}  {res.summary['findings']} ({res.seconds:.1f} s)")
    batch = {"checkpoint": str(args.checkpoint), "succeeded": done,
             "failed": [{"input": p, "error": m} for p, m in failures], "notice": NOTICE[args.lang]}
    if done or failures:
        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(out_dir / "batch_summary.json",
                      json.dumps(json_safe(batch), indent=2, ensure_ascii=False).encode("utf-8"))
    print(f"Done: {len(done)} of {total} input(s) succeeded, {len(failures)} failed. Outputs in {out_dir}{os.sep}")
    if failures:
        print(f"Failed ({len(failures)}):", file=sys.stderr)
        for _, msg in failures:
            print(f"  {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

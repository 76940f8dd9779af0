"""The diagnosis core: one input -> segmentation -> post-processing -> lesion measurements -> report -> files.

``predict.py`` (command line) and ``app.py`` (demo page) both go through this module, so a case gives the same
mask, measurements and ``report.json`` from either. The model and everything it needs (intensity window /
normalisation, channels, patch size, class names, 2D or 3D) come from the checkpoint alone (:func:`load_model`;
a ``.pth`` checkpoint or an ``.onnx`` file written by ``export.py``). Every model -- 2D or 3D, one channel or
several, exclusive classes or nested regions -- is run by ``inference.predict_image``, the whole-image path
training-time evaluation uses.

Region models (``prep.regions``: one sigmoid per region, e.g. whole tumour > core > enhancing) give region bit
masks; the written mask holds one label per voxel, the innermost (last-listed) region holding it
(``preprocess.regions_to_labels``), while the report measures every region on its own (``measure``).

Post-processing (documented rules)
    Each class has a role (:mod:`roles`). Lesion classes: holes filled, then components smaller than the
    minimum lesion size removed. Organ classes: the largest connected component kept, holes filled. Tubular
    classes: left as predicted. Holes are filled per slice (in-plane) for volumes and only ever claim
    background pixels. Connectivity is full (8 in 2D, 26 in 3D), as in ``metrics.lesion_detection``. The
    largest-component step a training run chose on its validation cases (stored in the checkpoint) is applied
    too unless ``learned_postprocess`` is off. Region models get the same rules per region, on its own bit
    (a hole of a region is filled with that region only). Units of sizes: see :mod:`measure`.

Research software, not a medical device: never use it for diagnosis.
"""
from __future__ import annotations

import io
import os
import re
import time
import zipfile
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

import medio
import report
from checkpoint import load_checkpoint, preprocessing_of
from display import RASTER_FORMATS, render_overlay, scan_channels
from errors import CheckpointError, ConfigError, InputError
from fileio import json_safe, write_bytes_atomic, write_json_atomic, write_text_atomic
from inference import largest_classes, largest_component, predict_image, probs_to_labels
from measure import analyze_with_ids, class_probability, size_unit
from model import fold_batchnorm
from preprocess import Preprocessing, class_mask, regions_to_labels
from roles import check_roles, class_roles
from runtime import resolve_precision, select_device, to_channels_last

REPORT_SCHEMA = "medseg-predict-report/1"
NOTICE = report.NOTICE


# ================================================================================================ model
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


def load_model(checkpoint: str | os.PathLike, device: str | torch.device = "auto", precision: str = "auto",
               channels_last: bool = True) -> ModelBundle:
    """Load a medseg checkpoint (weights only, never pickled code) or an ``.onnx`` file written by ``export.py``
    into a :class:`ModelBundle`.

    Raises :class:`errors.CheckpointError` for a missing, corrupt, foreign or inconsistent checkpoint and
    :class:`errors.ConfigError` for an unavailable device / precision (or onnxruntime missing for an ONNX file).
    """
    from export import is_onnx

    if is_onnx(checkpoint):
        return _load_onnx(checkpoint, device, precision)
    dev = device if isinstance(device, torch.device) else select_device(str(device))
    prec = resolve_precision(precision, dev)
    model, ckpt = load_checkpoint(checkpoint, dev)
    prep, warnings = preprocessing_of(ckpt, checkpoint)
    model = fold_batchnorm(model)  # inference only: each Conv+BN pair becomes one convolution, same outputs
    if channels_last:
        model = to_channels_last(model, int(ckpt["model_args"].get("dim", 2)))
    info = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return ModelBundle(model=model.eval(), prep=prep, info=info, device=dev, precision=prec,
                       channels_last=channels_last, checkpoint=str(checkpoint), warnings=warnings)


def _load_onnx(path: str | os.PathLike, device: str | torch.device, precision: str) -> ModelBundle:
    """An ONNX model: onnxruntime on the CPU in fp32 (its BatchNorm is folded at export; channels-last and
    autocast do not apply). An explicit other device / precision is named in a warning, not silently dropped."""
    from export import load_onnx

    net, info = load_onnx(path)  # threads 0: torch's count, i.e. predict.py's --threads
    prep, warnings = preprocessing_of(info, path)
    ignored = []
    if str(device) not in ("auto", "cpu"):
        ignored.append(f"--device {device}")
    if precision not in ("auto", "fp32"):
        ignored.append(f"--precision {precision}")
    if ignored:
        warnings.append(f"{Path(path).name}: ONNX models run on the CPU in fp32 (onnxruntime); "
                        f"{' and '.join(ignored)} ignored")
    return ModelBundle(model=net.eval(), prep=prep, info=info, device=torch.device("cpu"), precision="fp32",
                       channels_last=False, checkpoint=str(path), warnings=warnings)


def learned_largest(bundle: ModelBundle) -> list[int]:
    """Classes (1-based) the training run reduces to their largest component (``postprocessing`` in the checkpoint)."""
    return largest_classes(bundle.prep.class_names, bundle.info.get("postprocessing"))


def preprocessing_text(prep: Preprocessing, lang: str = "en") -> str:
    """The preprocessing in one readable line (window / normalisation, channels, patch, resize, classes)."""
    zh = lang == "zh"
    norm = {"window": "CT 窗 L{:g}/W{:g} HU" if zh else "CT window L{:g}/W{:g} HU",
            "zscore": "z-score 标准化（逐例）" if zh else "z-score per case",
            "percentile": "0.5–99.5 百分位 → [0, 1]" if zh else "0.5–99.5 percentile → [0, 1]",
            "unit": "8 位灰度 / 255" if zh else "8-bit / 255", "none": "原始强度" if zh else "raw intensities"}

    def one(mode: str, window) -> str:
        return norm.get(mode, mode).format(*(window or (40.0, 400.0))) if mode == "window" else norm.get(mode, mode)

    text = one(prep.normalization, prep.window)
    if prep.channels:  # per-channel normalisation: each channel by name
        text = ", ".join(f"{c.get('name') or k}: {one(c['normalization'], c.get('window'))}"
                         for k, c in enumerate(prep.channels))
    parts = [text, f"{prep.in_channels} {'通道' if zh else 'channel(s)'}"]
    if prep.dim == 3:
        sp = " × ".join(f"{v:g}" for v in prep.spacing or [])
        parts += [f"3D {'网络，体素间距' if zh else 'network, spacing'} {sp} mm",
                  f"{'切块' if zh else 'patch'} {' × '.join(map(str, prep.patch or []))} {'体素' if zh else 'voxels'}"]
    else:
        parts.append(f"{'切块' if zh else 'patch'} {prep.patch_size} px")
    if prep.resize_long_side:
        parts.append(f"{'长边缩放至' if zh else 'long side resized to'} {prep.resize_long_side} px")
    parts.append(("区域: " if zh else "regions: ") if prep.regions else ("类别: " if zh else "classes: "))
    parts[-1] += ", ".join(prep.class_names)
    return "; ".join(parts)


def describe_model(bundle: ModelBundle, lang: str = "en") -> dict:
    """JSON-safe model facts for the report (architecture, training scores, preprocessing)."""
    info, prep = bundle.info, bundle.prep
    args = info.get("model_args") or {}
    onnx = hasattr(bundle.model, "session")  # export.OnnxNet: its weights live in the graph, not in parameters()
    params = int(bundle.model.n_parameters) if onnx else sum(p.numel() for p in bundle.model.parameters())
    if args:
        arch = (f"{'3D ' if args.get('dim', 2) == 3 else ''}U-Net, {args.get('n_channels')}→{args.get('n_classes')} ch, "
                f"base {args.get('base_channels')}, "
                f"{'bilinear' if args.get('bilinear', True) else 'transposed-conv'} up-sampling, {params:,} params"
                + (" (ONNX, onnxruntime)" if onnx else ""))
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


# ============================================================================================= settings
@dataclass
class DiagnosisSettings:
    """How masks, measurements and files are made from the network's output: one record for predict.py's
    options and the page's controls (and the report's ``settings``)."""

    threshold: float = 0.5            # single-class models: probability > threshold (multi-class: argmax)
    min_lesion_size: float = 0.0      # lesions smaller than this are removed; unit from measure.size_unit
    fill_holes: bool = True
    keep_largest_organ: bool = True
    learned_postprocess: bool = True  # the largest-component step training chose on its validation cases
    roles: list[str] | None = None    # one per class; None: from the class names (roles.class_roles)
    overlap: float = 0.5              # sliding-window overlap for images larger than the patch
    batch_size: int = 16              # sliding-window tiles per forward pass
    lang: str = "zh"                  # report and figure language: "zh" or "en"
    save_probability: bool = False    # also write the probability map(s)
    embed_font: bool = True           # embed a CJK font subset in report.html (self-contained page)
    display_channel: int = 0          # the channel a multi-channel case is shown by in the figures

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be between 0 and 1 (got {self.threshold})")
        self.min_lesion_size = float(self.min_lesion_size or 0.0)
        self.lang = "en" if self.lang == "en" else "zh"


def settings_record(bundle: ModelBundle, meta: medio.ImageMeta, settings: DiagnosisSettings) -> dict:
    """The report's ``settings``: how a mask was made from the network output."""
    prep, argmax = bundle.prep, bundle.prep.n_classes > 1 and not bundle.prep.regions
    s = settings
    decision = ("sigmoid per region > threshold; mask = innermost region" if prep.regions
                else "argmax" if argmax else "sigmoid > threshold")
    return {"threshold": None if argmax else float(s.threshold), "decision": decision,
            "min_lesion_size": s.min_lesion_size, "min_lesion_size_unit": size_unit(meta)[0],
            "fill_holes": bool(s.fill_holes), "fill_holes_mode": "per slice (2D)" if len(meta.shape) == 3 else "2D",
            "keep_largest_organ": bool(s.keep_largest_organ), "overlap": float(s.overlap),
            "mirror_tta": bool(prep.mirror_tta),
            "largest_component_classes": [prep.class_names[k - 1] for k in learned_largest(bundle)]
            if s.learned_postprocess else [],
            "connectivity": "full (8 in 2D, 26 in 3D)"}


# ================================================================================== input checks
def check_image(image: np.ndarray, meta: medio.ImageMeta, prep: Preprocessing) -> None:
    """Refuse arrays the model cannot take: a 2D image for a 3D model, a case whose channel count is not the
    model's (naming both), a 2- or 5-channel TIFF that the reader saw as a thin stack."""
    name = meta.path
    if meta.format in RASTER_FORMATS and len(meta.shape) == 3 and meta.shape[-1] <= 8 < min(meta.shape[:2]):
        raise InputError(f"{name}: image has shape {tuple(image.shape)}, i.e. {meta.shape[-1]} colour channels "
                         f"(expected grey, RGB or RGBA for a {prep.in_channels}-channel model)")
    spatial = image.shape[:len(meta.shape)]
    if min(spatial) < 1:
        raise InputError(f"{name}: image is empty (shape {tuple(image.shape)})")
    if prep.dim == 3 and len(meta.shape) != 3:
        raise InputError(f"{name}: the model is a 3D network but the image is {len(meta.shape)}D (shape "
                         f"{tuple(image.shape)}); expected a volume (NIfTI, DICOM series, NRRD, MHA)")
    got = int(image.shape[-1]) if image.ndim == len(meta.shape) + 1 else 1
    want = scan_channels(prep)
    if want > 1 and got != want:
        names = f" ({', '.join(prep.channel_names)})" if prep.channel_names else ""
        raise InputError(f"{name}: the image has {got} channel{'' if got == 1 else 's'} but the model takes {want}"
                         f"{names}; pass all channel files of the case (<case>_0000, <case>_0001, ...) or one 4D NIfTI")
    if want == 1 and got not in (1, 3, prep.in_channels):
        expected = "grey or RGB" if prep.in_channels in (1, 3) else f"grey, RGB or {prep.in_channels} channels"
        raise InputError(f"{name}: the image has {got} channels, shape {tuple(image.shape)} (expected {expected})")


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


# ================================================================================ segmentation
@dataclass
class Segmentation:
    """In-memory result of :func:`segment` (arrays in the input's spatial shape)."""

    labels: np.ndarray       # post-processed classes, meta.shape, uint8 (regions: the innermost region)
    raw_labels: np.ndarray   # thresholded / argmax classes before post-processing
    probs: np.ndarray        # (Z, C_out, H, W) float32, Z = 1 for 2D
    roles: list[str]
    seconds: float
    bits: np.ndarray | None = None  # region models: post-processed region bit masks (preprocess.class_mask)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Holes filled in 2D, per slice for volumes."""
    if mask.ndim == 2:
        return ndimage.binary_fill_holes(mask)
    out = mask.copy()
    for z in np.flatnonzero(mask.reshape(len(mask), -1).any(1)):
        out[z] = ndimage.binary_fill_holes(mask[z])
    return out


def postprocess(labels: np.ndarray, meta: medio.ImageMeta, roles: list[str], *, min_lesion_size: float | None = None,
                fill_holes: bool = True, keep_largest_organ: bool = True, largest: Collection[int] = (),
                regions: bool = False) -> np.ndarray:
    """Clean a class map (rules in the module docstring): lesions first (fill holes, drop small components),
    then organs (largest component, fill holes). ``largest``: classes (1-based) reduced to their largest
    component whatever their role (the step training chose on validation, see ``experiments``). ``regions``:
    ``labels`` are region bit masks and each region is cleaned on its own bit. Never changes the shape;
    returns a new array."""
    out = np.array(labels, dtype=np.uint8, copy=True)
    structure = np.ones((3,) * out.ndim, bool)
    _, unit = size_unit(meta)
    order = [k for k, r in enumerate(roles, 1) if r == "lesion"] + [k for k, r in enumerate(roles, 1) if r == "organ"]
    order += [k for k in largest if k not in order]

    def assign(where: np.ndarray, k: int, on: bool) -> None:
        if regions:
            bit = np.uint8(1 << (k - 1))
            out[where] = (out[where] | bit) if on else (out[where] & ~bit)
        else:
            out[where] = k if on else 0

    for k in order:
        m = class_mask(out, k, regions)
        if not m.any():
            continue
        if (roles[k - 1] == "organ" and keep_largest_organ) or k in largest:
            keep = largest_component(m)
            assign(m & ~keep, k, False)
            m = keep
        if fill_holes:  # a class claims background only; a region claims its own bit only
            add = _fill_holes(m) & (~m if regions else out == 0)
            assign(add, k, True)
            m |= add
        if roles[k - 1] == "lesion" and min_lesion_size:
            comp, n = ndimage.label(m, structure)
            if n:
                sizes = np.bincount(comp.ravel()).astype(np.float64) * unit
                small = sizes < float(min_lesion_size)
                small[0] = False
                assign(small[comp], k, False)
    return out


def labels_from_probs(bundle: ModelBundle, probs: np.ndarray, meta: medio.ImageMeta, roles: list[str],
                      settings: DiagnosisSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(raw, post-processed) class maps in ``meta.shape`` from the network's probabilities, and for a region
    model the post-processed region bit masks (else None): everything after the forward pass, so the page can
    re-run it on cached probabilities."""
    prep = bundle.prep
    raw = probs_to_labels(probs, settings.threshold, prep.regions)
    raw = raw if len(meta.shape) == 3 else raw[0]
    post = postprocess(raw, meta, roles, min_lesion_size=settings.min_lesion_size, fill_holes=settings.fill_holes,
                       keep_largest_organ=settings.keep_largest_organ,
                       largest=learned_largest(bundle) if settings.learned_postprocess else (), regions=prep.regions)
    if prep.regions:
        return regions_to_labels(raw, prep.n_classes), regions_to_labels(post, prep.n_classes), post
    return raw, post, None


def segment(bundle: ModelBundle, image: np.ndarray, meta: medio.ImageMeta,
            settings: DiagnosisSettings | None = None) -> Segmentation:
    """Image array -> probabilities -> classes -> post-processing, in memory.

    Uses exactly the training-time path (``inference.predict_image`` + ``inference.probs_to_labels``) for 2D and
    3D models alike, so with post-processing off it reproduces training-time evaluation.
    """
    settings = settings or DiagnosisSettings()
    prep = bundle.prep
    check_image(image, meta, prep)
    roles = check_roles(list(settings.roles) if settings.roles else class_roles(prep.class_names), prep.n_classes)
    t0 = time.perf_counter()
    probs = predict_image(bundle.model, image, meta, prep, device=bundle.device, precision=bundle.precision,
                          overlap=settings.overlap, batch_size=settings.batch_size, channels_last=bundle.channels_last)
    if probs.shape[1] != prep.model_out_channels:
        raise CheckpointError(f"{bundle.checkpoint or 'model'}: produced {probs.shape[1]} output channels, expected "
                              f"{prep.model_out_channels} for classes {prep.class_names}")
    raw, labels, bits = labels_from_probs(bundle, probs, meta, roles, settings)
    return Segmentation(labels=labels, raw_labels=raw, probs=probs, roles=roles, seconds=time.perf_counter() - t0,
                        bits=bits)


# ================================================================================ one case in memory
@dataclass
class Diagnosis:
    """One analysed input in memory: everything its report and files are made from."""

    case: str                    # the report's "case": predict.py's output folder, the page's download prefix
    path: Path                   # the input that was read (DICOM patient facts are taken from it)
    shown_path: str              # the input as the report names it (the page: the file name, never a server path)
    image: np.ndarray = field(repr=False)
    meta: medio.ImageMeta = field(repr=False)
    settings: DiagnosisSettings
    probs: np.ndarray = field(repr=False)         # (Z, C_out, H, W): the one forward pass of this input
    roles: list[str]
    raw_labels: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    analysis: dict = field(repr=False)            # measure.analyze_mask's {"lesions", "summary"}
    id_map: np.ndarray = field(repr=False)        # lesion id per voxel (numbers in the figures)
    t_read: float = 0.0
    t_predict: float = 0.0
    t_analyze: float = 0.0
    started: float | None = None  # perf_counter() when the case began: the report's total time; None: sum of parts
    bits: np.ndarray | None = field(default=None, repr=False)  # region models: the region bit masks
    channel_files: list[str] = field(default_factory=list)     # a case read from one file per channel: those files


def diagnose(bundle: ModelBundle, image: np.ndarray, meta: medio.ImageMeta, settings: DiagnosisSettings, *,
             case: str, path: str | os.PathLike, shown_path: str | None = None, t_read: float = 0.0,
             started: float | None = None) -> Diagnosis:
    """Segment, post-process and measure one image (see :class:`Diagnosis` for the other arguments)."""
    seg = segment(bundle, image, meta, settings)
    t0 = time.perf_counter()
    analysis, id_map = analyze_with_ids(seg.bits if seg.bits is not None else seg.labels, seg.probs, meta,
                                        bundle.prep, seg.roles)
    return Diagnosis(case=case, path=Path(path), shown_path=str(path) if shown_path is None else shown_path,
                     image=image, meta=meta, settings=settings, probs=seg.probs, roles=seg.roles,
                     raw_labels=seg.raw_labels, labels=seg.labels, analysis=analysis, id_map=id_map, t_read=t_read,
                     t_predict=seg.seconds, t_analyze=time.perf_counter() - t0, started=started, bits=seg.bits)


def with_settings(bundle: ModelBundle, diag: Diagnosis, settings: DiagnosisSettings) -> Diagnosis:
    """``diag`` post-processed and measured again under new ``settings`` from its cached probabilities (no forward
    pass; the roles stay those of ``diag``)."""
    t0 = time.perf_counter()
    raw, labels, bits = labels_from_probs(bundle, diag.probs, diag.meta, diag.roles, settings)
    analysis, id_map = analyze_with_ids(bits if bits is not None else labels, diag.probs, diag.meta, bundle.prep,
                                        diag.roles)
    return replace(diag, settings=settings, raw_labels=raw, labels=labels, bits=bits, analysis=analysis,
                   id_map=id_map, t_analyze=time.perf_counter() - t0, started=None)


# ============================================================================== input names and places
def input_suffix(path: Path) -> str:
    """The lower-case suffix that names an input's type (``.nii.gz`` counts as one)."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def case_stem(path: str | os.PathLike) -> str:
    """Output folder name of an input: its name without the image suffix (``a.nii.gz`` -> ``a``)."""
    p = Path(path)
    name = p.name
    sfx = input_suffix(p)
    if sfx in medio.SUPPORTED_SUFFIXES and len(name) > len(sfx):
        name = name[: -len(sfx)]
    return re.sub(r"[\x00-\x1f<>:\"|?*\\/]", "_", name).strip(" .") or "case"


def check_output_location(inputs: list[Path | None], output_dir: str | os.PathLike, allow_input_dir: bool = False) -> None:
    """Refuse an output folder that is, or lies inside, the folder holding an input, unless ``allow_input_dir``;
    and always one inside an input folder that is a DICOM series (its next reading would take the outputs for
    slices). Raises :class:`errors.InputError`."""
    out = Path(output_dir).resolve()
    for p in inputs:
        if p is None or not p.exists():
            continue
        src = p.resolve()
        if src.is_dir() and (out == src or src in out.parents) and _holds_dicom(src):
            raise InputError(f"{output_dir}: output folder is inside the DICOM series folder {p} (expected a folder "
                             f"outside it: outputs there would join the series); choose another --output-dir")
        home = src.parent
        if not allow_input_dir and (out == home or home in out.parents):
            raise InputError(f"{output_dir}: output folder is inside the folder {home} that holds the input {p}; "
                             f"choose another --output-dir or pass --allow-input-dir")


def _holds_dicom(folder: Path) -> bool:
    """True when ``folder`` directly holds a DICOM file (``.dcm`` or the DICM preamble); hidden files skipped."""
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return False
    return any(f.is_file() and not f.name.startswith(".") and
               (f.suffix.lower() == ".dcm" or medio.is_dicom_file(f)) for f in children)


def _refuse_overwriting_input(path: Path, out_dir: Path, names: Collection[str]) -> None:
    """Even where writing beside an input is allowed, never write over the input itself."""
    src = path.resolve()
    for fname in names:
        target = (out_dir / fname).resolve()
        if target == src or (src.is_dir() and src in target.parents and target.exists()):
            raise InputError(f"{path}: refusing to write {out_dir / fname} over the input (choose another --output-dir)")


def _first_dicom(path: Path):
    """The header of the first DICOM file of a file, folder or zip (pixels not read)."""
    import pydicom

    if path.is_dir():
        first = next(f for f in sorted(path.rglob("*")) if f.is_file() and
                     (f.suffix.lower() == ".dcm" or medio.is_dicom_file(f)))
        return pydicom.dcmread(first, stop_before_pixels=True, force=True)
    if input_suffix(path) == ".zip":
        with zipfile.ZipFile(path) as zf:
            name = next(i.filename for i in zf.infolist() if not i.is_dir() and (
                i.filename.lower().endswith(".dcm") or zf.open(i).read(132)[128:132] == b"DICM"))
            return pydicom.dcmread(io.BytesIO(zf.read(name)), stop_before_pixels=True, force=True)
    return pydicom.dcmread(path, stop_before_pixels=True, force=True)


def dicom_header(path: Path) -> dict:
    """Patient / study facts from the first DICOM file of a file, folder or zip ({} when unreadable)."""
    try:
        ds = _first_dicom(path)
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
    out = {"name": " ".join(name.replace("^", " ").split()) if name else None, "id": get("PatientID"),
           "sex": get("PatientSex"), "age": get("PatientAge"), "study_date": date,
           "study_description": get("StudyDescription")}
    return {k: v for k, v in out.items() if v}


# ==================================================================================== report and files
def build_report(bundle: ModelBundle, diag: Diagnosis, outputs: dict[str, str], program: str = "predict.py",
                 anonymize: bool = False) -> dict:
    """The JSON-safe report of ``diag`` (schema :data:`REPORT_SCHEMA`); ``outputs`` names the case's files and
    ``program`` the tool that made it. ``anonymize``: no patient block, no series description and the input
    named by its case only (folder names of DICOM exports often hold the patient's name or ID)."""
    meta, prep, lang = diag.meta, bundle.prep, diag.settings.lang
    inp = {"path": diag.shown_path, "name": diag.path.name, "format": meta.format, "shape": list(meta.shape),
           "channels": meta.channels, "spacing_mm": list(meta.spacing), "spacing_known": meta.spacing_known,
           "affine": meta.affine, "modality": meta.extra.get("modality") or None,
           "series_description": meta.extra.get("series_description") or None}
    if prep.channel_names and meta.channels == len(prep.channel_names):
        inp["channel_names"] = list(prep.channel_names)
    if diag.channel_files:
        inp["channel_files"] = list(diag.channel_files)
    if anonymize:
        inp.update(path=diag.case, name=diag.case, series_description=None, anonymized=True)
        inp.pop("channel_files", None)
    elif meta.format == "dicom":
        inp["patient"] = dicom_header(diag.path)
    rep: dict[str, Any] = {
        "schema": REPORT_SCHEMA, "case": diag.case,
        "generated_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "language": lang, "notice": NOTICE[lang], "notice_zh": NOTICE["zh"], "notice_en": NOTICE["en"],
        "software": f"medseg {program} · PyTorch {torch.__version__}",
        "input": inp, "model": describe_model(bundle, lang), "settings": settings_record(bundle, meta, diag.settings),
        "classes": [{"index": k, "name": n, "role": r} for k, (n, r) in enumerate(zip(prep.class_names, diag.roles), 1)],
        "lesions": diag.analysis["lesions"], "summary": dict(diag.analysis["summary"]), "outputs": dict(outputs),
        "timing": {"read_s": round(diag.t_read, 3), "predict_s": round(diag.t_predict, 3),
                   "analyze_s": round(diag.t_analyze, 3)},
        "warnings": list(bundle.warnings) + input_warnings(diag.image, meta, prep, lang),
    }
    for key, lg in (("findings", lang), ("findings_zh", "zh"), ("findings_en", "en")):
        rep["summary"][key] = report.findings_sentence(rep, lg)
    total = (time.perf_counter() - diag.started if diag.started is not None
             else diag.t_read + diag.t_predict + diag.t_analyze)
    rep["timing"]["total_s"] = round(total, 3)
    return json_safe(rep)


def _file_names(prep: Preprocessing, meta: medio.ImageMeta, settings: DiagnosisSettings, prefix: str,
                overlay_file: bool) -> dict[str, str]:
    """Output key -> file name: the mask, the probability maps (when asked), the overlay figure, the reports."""
    suffix = medio.output_suffix(meta)
    names = {"mask": f"{prefix}mask{suffix}"}
    if settings.save_probability:
        for cname in prep.class_names:
            stem = "probability" if prep.n_classes == 1 else f"probability_{case_stem(Path(str(cname)))}"
            names[stem] = f"{prefix}{stem}{suffix}"
    if overlay_file:
        names["overlay"] = f"{prefix}overlay.png"
    return names | {"report_json": f"{prefix}report.json", "report_html": f"{prefix}report.html"}


def write_case_files(bundle: ModelBundle, diag: Diagnosis, out_dir: str | os.PathLike, *, prefix: str = "",
                     overlay_file: bool = True, program: str = "predict.py", more_outputs: dict[str, str] | None = None,
                     anonymize: bool = False) -> tuple[dict[str, Path], dict]:
    """Write ``diag``'s files into ``out_dir``, each atomically: ``<prefix>mask.nii.gz|png`` (NIfTI for NIfTI /
    DICOM / volumes, with the input's affine), ``<prefix>probability[_<class>]…`` with ``save_probability``,
    ``<prefix>overlay.png`` when ``overlay_file``, ``<prefix>report.html`` (the overlay embedded) and
    ``<prefix>report.json``. ``more_outputs`` (key -> file name, e.g. the DICOM files) are listed in the
    report's ``outputs``; ``anonymize`` as in :func:`build_report`. Returns (output key -> path, the report)."""
    out_dir = Path(out_dir)
    prep, meta = bundle.prep, diag.meta
    names = _file_names(prep, meta, diag.settings, prefix, overlay_file)
    for p in [diag.path, *map(Path, diag.channel_files)]:
        _refuse_overwriting_input(p, out_dir, names.values())
    files = {"mask": medio.write_mask(diag.labels, meta, out_dir / names["mask"])}
    for k, cname in enumerate(prep.class_names, start=1):
        stem = "probability" if prep.n_classes == 1 else f"probability_{case_stem(Path(str(cname)))}"
        if stem in names:
            files[stem] = medio.write_probability(class_probability(diag.probs, k, tuple(meta.shape), prep.regions),
                                                  meta, out_dir / names[stem])
    png = render_overlay(diag.image, meta, diag.labels, diag.id_map, diag.analysis["lesions"], diag.roles, prep,
                         diag.settings.lang, channel=diag.settings.display_channel)
    if overlay_file:
        files["overlay"] = write_bytes_atomic(out_dir / names["overlay"], png)
    rep = build_report(bundle, diag, names | dict(more_outputs or {}), program, anonymize)
    page = report.render_html(rep, {"overlay": png}, diag.settings.lang, embed_font=diag.settings.embed_font)
    files["report_html"] = write_text_atomic(out_dir / names["report_html"], page)
    files["report_json"] = write_json_atomic(out_dir / names["report_json"], rep)
    return files, rep


# ============================================================================================ one input
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


def read_case(paths: list[Path | None], name: str, series: str | None = None) -> tuple[np.ndarray, medio.ImageMeta]:
    """One case's image: a single input (``series`` picks a DICOM series), or the channel files of one case in
    channel order (``None`` = a missing channel, named in the error) stacked channel-last."""
    if len(paths) == 1 and paths[0] is not None:
        path = paths[0]
        if not path.exists():
            raise InputError(f"{path}: no such file or folder (expected an image, a volume or a DICOM input)")
        if series is not None and medio.detect_format(path) != "dicom":
            raise InputError(f"{path}: --series {series} applies to DICOM folders and zips only (this is "
                             f"{medio.detect_format(path)}; expected a DICOM input, or no --series)")
        return medio.read_image(path, series=series)
    for p in paths:
        if p is not None and not p.exists():
            raise InputError(f"{p}: no such file (channel file of case {name}; expected one file per channel)")
    try:
        return medio.read_channels(list(paths), name)
    except InputError as exc:
        if "expected" in str(exc):
            raise
        raise InputError(f"{exc} (expected the channel files of case {name} on one grid, one channel each)") from exc


def predict_case(model: ModelBundle | str | os.PathLike, input_path: str | os.PathLike | list,
                 output_dir: str | os.PathLike, settings: DiagnosisSettings | None = None, *,
                 case_name: str | None = None, allow_input_dir: bool = False, device: str = "auto",
                 precision: str = "auto", output_types: Collection[str] = ("mask",), series: str | None = None,
                 anonymize: bool = False, anonymize_salt: str | None = None) -> CaseResult:
    """Predict one input and write ``output_dir/<case_name or input stem>/``: mask, overlay.png, report.json,
    report.html (and the probability maps with ``settings.save_probability``; ``seg.dcm`` / ``rtstruct.dcm`` when
    ``output_types`` asks, which needs a DICOM input: see :func:`outputs.write_dicom_files`).

    ``input_path``: a file / folder / zip, or the list of one case's channel files in channel order. ``model`` is
    a :class:`ModelBundle` or a checkpoint path (then ``device`` / ``precision`` apply). ``series`` picks the
    series of a DICOM folder / zip holding several. ``anonymize``: DICOM outputs and reports without patient
    identifiers, UIDs remapped with ``anonymize_salt`` (random when None). Raises :class:`errors.MedSegError`
    subclasses with one-line messages naming the input.
    """
    import dicom_export
    from outputs import DICOM_OUTPUTS, write_dicom_files

    t_start = time.perf_counter()
    settings = settings or DiagnosisSettings()
    bundle = model if isinstance(model, ModelBundle) else load_model(model, device, precision)
    paths = [None if p is None else Path(p) for p in input_path] if isinstance(input_path, (list, tuple)) \
        else [Path(input_path)]
    first = next(p for p in paths if p is not None)
    name = case_name or case_stem(first)
    case_dir = Path(output_dir) / name
    check_output_location(paths, output_dir, allow_input_dir)
    check_output_location(paths, case_dir, allow_input_dir)
    image, meta = read_case(paths, name, series)
    for kind in output_types:  # before the forward pass: a SEG / RTSTRUCT must reference DICOM source images
        if kind in DICOM_OUTPUTS:
            dicom_export.require_dicom(meta, first, kind)
    diag = diagnose(bundle, image, meta, settings, case=name, path=first, t_read=time.perf_counter() - t_start,
                    started=t_start)
    if len(paths) > 1:
        diag = replace(diag, channel_files=[str(p) for p in paths])
    uid_map = dicom_export.UIDMap(anonymize_salt) if anonymize else None
    dicom_files = write_dicom_files(diag.labels, diag.path, bundle.prep.class_names, diag.roles, case_dir,
                                    output_types, series=series, anonymize=anonymize, uid_map=uid_map)
    shown = {k: (f"{p.name}/" if p.is_dir() else p.name) for k, p in dicom_files.items()}
    files, rep = write_case_files(bundle, diag, case_dir, more_outputs=shown, anonymize=anonymize)
    return CaseResult(case=name, input=first, output_dir=case_dir, files=files | dicom_files, lesions=rep["lesions"],
                      summary=rep["summary"], report=rep, labels=diag.labels, probs=diag.probs,
                      seconds=time.perf_counter() - t_start)

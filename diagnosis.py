"""The diagnosis core: one input -> segmentation -> post-processing -> lesion measurements -> report -> files.

``predict.py`` (command line) and ``app.py`` (demo page) both go through this module, so a case gives the same
mask, measurements and ``report.json`` from either. The model and everything it needs (intensity window /
normalisation, channels, patch size, class names) come from the checkpoint alone (:func:`load_model`).

Post-processing (documented rules)
    Each class has a role (:mod:`roles`). Lesion classes: holes filled, then components smaller than the
    minimum lesion size removed. Organ classes: the largest connected component kept, holes filled. Tubular
    classes: left as predicted. Holes are filled per slice (in-plane) for volumes and only ever claim
    background pixels. Connectivity is full (8 in 2D, 26 in 3D), as in ``metrics.lesion_detection``. The
    largest-component step a training run chose on its validation cases (stored in the checkpoint) is applied
    too unless ``learned_postprocess`` is off. Units of sizes: see :mod:`measure`.

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
from display import RASTER_FORMATS, render_overlay
from errors import CheckpointError, ConfigError, InputError
from fileio import json_safe, write_bytes_atomic, write_json_atomic, write_text_atomic
from inference import largest_classes, largest_component, predict_planes, probs_to_labels
from measure import analyze_with_ids, class_probability, size_unit
from model import fold_batchnorm
from preprocess import Preprocessing, to_planes
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
    """Load a medseg checkpoint (weights only, never pickled code) into a :class:`ModelBundle`.

    Raises :class:`errors.CheckpointError` for a missing, corrupt, foreign or inconsistent checkpoint and
    :class:`errors.ConfigError` for an unavailable device / precision.
    """
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

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be between 0 and 1 (got {self.threshold})")
        self.min_lesion_size = float(self.min_lesion_size or 0.0)
        self.lang = "en" if self.lang == "en" else "zh"


def settings_record(bundle: ModelBundle, meta: medio.ImageMeta, settings: DiagnosisSettings) -> dict:
    """The report's ``settings``: how a mask was made from the network output."""
    prep, multi = bundle.prep, bundle.prep.n_classes > 1
    s = settings
    return {"threshold": None if multi else float(s.threshold), "decision": "argmax" if multi else "sigmoid > threshold",
            "min_lesion_size": s.min_lesion_size, "min_lesion_size_unit": size_unit(meta)[0],
            "fill_holes": bool(s.fill_holes), "fill_holes_mode": "per slice (2D)" if len(meta.shape) == 3 else "2D",
            "keep_largest_organ": bool(s.keep_largest_organ), "overlap": float(s.overlap),
            "mirror_tta": bool(prep.mirror_tta),
            "largest_component_classes": [prep.class_names[k - 1] for k in learned_largest(bundle)]
            if s.learned_postprocess else [],
            "connectivity": "full (8 in 2D, 26 in 3D)"}


# ================================================================================== input checks
def check_image(image: np.ndarray, meta: medio.ImageMeta, prep: Preprocessing) -> None:
    """Refuse arrays the model cannot take (e.g. a 2- or 5-channel TIFF that the reader saw as a thin stack)."""
    name = meta.path
    if meta.format in RASTER_FORMATS and len(meta.shape) == 3 and meta.shape[-1] <= 8 < min(meta.shape[:2]):
        raise InputError(f"{name}: image has shape {tuple(image.shape)}, i.e. {meta.shape[-1]} colour channels "
                         f"(expected grey, RGB or RGBA for a {prep.in_channels}-channel model)")
    spatial = image.shape[:len(meta.shape)]
    extra = image.shape[len(meta.shape):]
    if extra not in ((), (3,), (prep.in_channels,)):
        expected = "grey or RGB" if prep.in_channels in (1, 3) else f"grey, RGB or {prep.in_channels} channels"
        raise InputError(f"{name}: image has shape {tuple(image.shape)} (expected {expected})")
    if min(spatial) < 1:
        raise InputError(f"{name}: image is empty (shape {tuple(image.shape)})")


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

    labels: np.ndarray       # post-processed classes, meta.shape, uint8
    raw_labels: np.ndarray   # thresholded / argmax classes before post-processing
    probs: np.ndarray        # (Z, C_out, H, W) float32, Z = 1 for 2D
    roles: list[str]
    seconds: float


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Holes filled in 2D, per slice for volumes."""
    if mask.ndim == 2:
        return ndimage.binary_fill_holes(mask)
    out = mask.copy()
    for z in np.flatnonzero(mask.reshape(len(mask), -1).any(1)):
        out[z] = ndimage.binary_fill_holes(mask[z])
    return out


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


def labels_from_probs(bundle: ModelBundle, probs: np.ndarray, meta: medio.ImageMeta, roles: list[str],
                      settings: DiagnosisSettings) -> tuple[np.ndarray, np.ndarray]:
    """(raw, post-processed) class maps in ``meta.shape`` from the network's probabilities: everything after
    the forward pass, so the page can re-run it on cached probabilities."""
    raw = probs_to_labels(probs, settings.threshold)
    raw = raw if len(meta.shape) == 3 else raw[0]
    labels = postprocess(raw, meta, roles, min_lesion_size=settings.min_lesion_size, fill_holes=settings.fill_holes,
                         keep_largest_organ=settings.keep_largest_organ,
                         largest=learned_largest(bundle) if settings.learned_postprocess else ())
    return raw, labels


def segment(bundle: ModelBundle, image: np.ndarray, meta: medio.ImageMeta,
            settings: DiagnosisSettings | None = None) -> Segmentation:
    """Image array -> probabilities -> classes -> post-processing, in memory.

    Uses exactly the training-time path (``preprocess.to_planes`` + ``inference.predict_planes`` +
    ``inference.probs_to_labels``), so with post-processing off it reproduces training-time evaluation.
    """
    settings = settings or DiagnosisSettings()
    prep = bundle.prep
    check_image(image, meta, prep)
    roles = check_roles(list(settings.roles) if settings.roles else class_roles(prep.class_names), prep.n_classes)
    t0 = time.perf_counter()
    planes = to_planes(image, 3 if len(meta.shape) == 3 else 2, prep)
    if planes.shape[1] != prep.in_channels:
        raise InputError(f"{meta.path}: image gives {planes.shape[1]} channels but the model takes {prep.in_channels}")
    probs = predict_planes(bundle.model, planes, prep, bundle.device, bundle.precision, overlap=settings.overlap,
                           batch_size=settings.batch_size, channels_last=bundle.channels_last)
    if probs.shape[1] != prep.model_out_channels:
        raise CheckpointError(f"{bundle.checkpoint or 'model'}: produced {probs.shape[1]} output channels, expected "
                              f"{prep.model_out_channels} for classes {prep.class_names}")
    raw, labels = labels_from_probs(bundle, probs, meta, roles, settings)
    return Segmentation(labels=labels, raw_labels=raw, probs=probs, roles=roles, seconds=time.perf_counter() - t0)


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


def diagnose(bundle: ModelBundle, image: np.ndarray, meta: medio.ImageMeta, settings: DiagnosisSettings, *,
             case: str, path: str | os.PathLike, shown_path: str | None = None, t_read: float = 0.0,
             started: float | None = None) -> Diagnosis:
    """Segment, post-process and measure one image (see :class:`Diagnosis` for the other arguments)."""
    seg = segment(bundle, image, meta, settings)
    t0 = time.perf_counter()
    analysis, id_map = analyze_with_ids(seg.labels, seg.probs, meta, bundle.prep, seg.roles)
    return Diagnosis(case=case, path=Path(path), shown_path=str(path) if shown_path is None else shown_path,
                     image=image, meta=meta, settings=settings, probs=seg.probs, roles=seg.roles,
                     raw_labels=seg.raw_labels, labels=seg.labels, analysis=analysis, id_map=id_map, t_read=t_read,
                     t_predict=seg.seconds, t_analyze=time.perf_counter() - t0, started=started)


def with_settings(bundle: ModelBundle, diag: Diagnosis, settings: DiagnosisSettings) -> Diagnosis:
    """``diag`` post-processed and measured again under new ``settings`` from its cached probabilities (no forward
    pass; the roles stay those of ``diag``)."""
    t0 = time.perf_counter()
    raw, labels = labels_from_probs(bundle, diag.probs, diag.meta, diag.roles, settings)
    analysis, id_map = analyze_with_ids(labels, diag.probs, diag.meta, bundle.prep, diag.roles)
    return replace(diag, settings=settings, raw_labels=raw, labels=labels, analysis=analysis, id_map=id_map,
                   t_analyze=time.perf_counter() - t0, started=None)


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
def build_report(bundle: ModelBundle, diag: Diagnosis, outputs: dict[str, str], program: str = "predict.py") -> dict:
    """The JSON-safe report of ``diag`` (schema :data:`REPORT_SCHEMA`); ``outputs`` names the case's files and
    ``program`` the tool that made it."""
    meta, prep, lang = diag.meta, bundle.prep, diag.settings.lang
    inp = {"path": diag.shown_path, "name": diag.path.name, "format": meta.format, "shape": list(meta.shape),
           "channels": meta.channels, "spacing_mm": list(meta.spacing), "spacing_known": meta.spacing_known,
           "affine": meta.affine, "modality": meta.extra.get("modality") or None,
           "series_description": meta.extra.get("series_description") or None}
    if meta.format == "dicom":
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
                     overlay_file: bool = True, program: str = "predict.py") -> tuple[dict[str, Path], dict]:
    """Write ``diag``'s files into ``out_dir``, each atomically: ``<prefix>mask.nii.gz|png`` (NIfTI for NIfTI /
    DICOM / volumes, with the input's affine), ``<prefix>probability[_<class>]…`` with ``save_probability``,
    ``<prefix>overlay.png`` when ``overlay_file``, ``<prefix>report.html`` (the overlay embedded) and
    ``<prefix>report.json``. Returns (output key -> path, the report)."""
    out_dir = Path(out_dir)
    prep, meta = bundle.prep, diag.meta
    names = _file_names(prep, meta, diag.settings, prefix, overlay_file)
    _refuse_overwriting_input(diag.path, out_dir, names.values())
    files = {"mask": medio.write_mask(diag.labels, meta, out_dir / names["mask"])}
    for k, cname in enumerate(prep.class_names, start=1):
        stem = "probability" if prep.n_classes == 1 else f"probability_{case_stem(Path(str(cname)))}"
        if stem in names:
            files[stem] = medio.write_probability(class_probability(diag.probs, k, tuple(meta.shape)), meta,
                                                  out_dir / names[stem])
    png = render_overlay(diag.image, meta, diag.labels, diag.id_map, diag.analysis["lesions"], diag.roles, prep,
                         diag.settings.lang)
    if overlay_file:
        files["overlay"] = write_bytes_atomic(out_dir / names["overlay"], png)
    rep = build_report(bundle, diag, names, program)
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


def predict_case(model: ModelBundle | str | os.PathLike, input_path: str | os.PathLike, output_dir: str | os.PathLike,
                 settings: DiagnosisSettings | None = None, *, case_name: str | None = None,
                 allow_input_dir: bool = False, device: str = "auto", precision: str = "auto") -> CaseResult:
    """Predict one input and write ``output_dir/<case_name or input stem>/``: mask, overlay.png, report.json,
    report.html (and the probability maps with ``settings.save_probability``).

    ``model`` is a :class:`ModelBundle` or a checkpoint path (then ``device`` / ``precision`` apply).
    Raises :class:`errors.MedSegError` subclasses with one-line messages naming the input.
    """
    t_start = time.perf_counter()
    settings = settings or DiagnosisSettings()
    bundle = model if isinstance(model, ModelBundle) else load_model(model, device, precision)
    path = Path(input_path)
    name = case_name or case_stem(path)
    case_dir = Path(output_dir) / name
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    check_output_location([path], output_dir, allow_input_dir)
    check_output_location([path], case_dir, allow_input_dir)
    image, meta = medio.read_image(path)
    diag = diagnose(bundle, image, meta, settings, case=name, path=path, t_read=time.perf_counter() - t_start,
                    started=t_start)
    files, rep = write_case_files(bundle, diag, case_dir)
    return CaseResult(case=name, input=path, output_dir=case_dir, files=files, lesions=rep["lesions"],
                      summary=rep["summary"], report=rep, labels=diag.labels, probs=diag.probs,
                      seconds=time.perf_counter() - t_start)

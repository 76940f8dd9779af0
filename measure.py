"""Lesion measurements of a class map: size, maximum diameter, centroid, slice, bounding box, probabilities.

Lesions are the connected components (full connectivity: 8 in 2D, 26 in 3D, as in
``metrics.lesion_detection``) of the lesion-role classes (:mod:`roles`), numbered by size, largest first.

Units
    Areas are mm² (2D), volumes mL (3D); without a known spacing both are pixel / voxel counts. The maximum
    diameter is the largest distance between two points of the lesion's outline (pixel corners), in mm: a
    4 x 6 px rectangle at 0.5 x 0.8 mm measures sqrt(2.0² + 4.8²) = 5.2 mm. Slice indices are 0-based along
    the first array axis. A minimum lesion size is in mm² for 2D images with a known pixel spacing, mm³ for
    volumes with a known spacing, otherwise pixels / voxels (:func:`size_unit`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

import medio
from errors import InputError
from preprocess import Preprocessing, class_mask, regions_to_labels
from roles import check_roles, class_roles


def size_unit(meta: medio.ImageMeta) -> tuple[str, float]:
    """Unit of a minimum lesion size for this input and the size of one pixel / voxel in it."""
    if len(meta.shape) == 3:
        return ("mm³", float(np.prod(meta.spacing))) if meta.spacing_known else ("voxels", 1.0)
    return ("mm²", float(medio.pixel_area_mm2(meta))) if meta.spacing_known else ("px", 1.0)


def class_probability(probs: np.ndarray | None, k: int, shape: tuple[int, ...],
                      regions: bool = False) -> np.ndarray | None:
    """Probability map of class ``k`` (1-based) in the input's spatial ``shape`` (``regions``: region ``k``'s own
    sigmoid; region models have no background channel)."""
    if probs is None:
        return None
    p = probs[:, 0] if probs.shape[1] == 1 else probs[:, k - 1 if regions else k]
    return p.reshape(shape)


def mean_foreground_probability(labels: np.ndarray, probs: np.ndarray | None, regions: bool = False) -> float | None:
    """Mean, over the segmented voxels, of the probability of the class each voxel was given (a region model: of
    the innermost region holding it); None without probabilities or when nothing is segmented. ``labels``:
    classes, or region bit masks with ``regions``."""
    if probs is None:
        return None
    lab = np.asarray(labels).reshape(probs.shape[0], *probs.shape[2:])  # 2D images: (1, H, W) like probs
    if regions:
        lab = regions_to_labels(lab, probs.shape[1])
    total, n = 0.0, 0
    for k in range(1, int(lab.max(initial=0)) + 1):
        m = lab == k
        count = int(np.count_nonzero(m))
        if count:
            channel = 0 if probs.shape[1] == 1 else (k - 1 if regions else k)
            total += float(probs[:, channel][m].sum(dtype=np.float64))
            n += count
    return round(total / n, 4) if n else None


# ------------------------------------------------------------------------------------------ diameter
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
    for i in range(0, len(pts), 512):  # bounded memory for hulls with many vertices
        d = np.abs(pts[i:i + 512, None, :] - pts[None, :, :]) + s
        best = max(best, float(np.sqrt((d * d).sum(-1)).max()))
    return best


# ------------------------------------------------------------------------------------- one component
def _size_fields(comp_sub: np.ndarray, offset: np.ndarray, spacing: tuple[float, ...], known: bool) -> dict:
    """Voxel / pixel count, volume or area and (volumes) the slices of one component."""
    n = int(comp_sub.sum())
    if comp_sub.ndim != 3:
        return {"pixels": n, "area_mm2": n * spacing[0] * spacing[1] if known else None}
    vol_mm3 = n * float(np.prod(spacing)) if known else None
    per_slice = comp_sub.reshape(len(comp_sub), -1).sum(1)
    axial = max(max_diameter(comp_sub[z], spacing[1:]) for z in np.flatnonzero(per_slice))
    return {"voxels": n, "volume_mm3": vol_mm3, "volume_ml": vol_mm3 / 1000.0 if vol_mm3 is not None else None,
            "slice_index": int(offset[0] + int(np.argmax(per_slice))),
            "slice_range": [int(offset[0]), int(offset[0] + len(comp_sub) - 1)],
            "axial_diameter_mm" if known else "axial_diameter_px": axial}


def _centroid(mask: np.ndarray) -> np.ndarray:
    """Mean index of the foreground along each axis, from per-axis counts: no (N, ndim) coordinate list, which for
    a lesion filling a 512 x 512 x 200 volume would take 1.3 GB."""
    n = max(int(np.count_nonzero(mask)), 1)
    axes = range(mask.ndim)
    return np.array([float(np.dot(np.count_nonzero(mask, axis=tuple(b for b in axes if b != a)), np.arange(mask.shape[a])))
                     / n for a in axes])


def _measure(comp_sub: np.ndarray, offset: np.ndarray, meta: medio.ImageMeta, prob_sub: np.ndarray | None) -> dict:
    """Measurements of one component given as a boolean crop ``comp_sub`` at index ``offset``."""
    known = meta.spacing_known
    spacing = tuple(float(s) for s in meta.spacing) if known else (1.0,) * comp_sub.ndim
    centroid = _centroid(comp_sub) + offset
    lo, hi = offset, offset + np.asarray(comp_sub.shape) - 1
    extent_px = (hi - lo + 1).tolist()
    d_units = max_diameter(comp_sub, spacing)
    item: dict[str, Any] = _size_fields(comp_sub, offset, spacing, known)
    item["max_diameter_mm"] = d_units if known else None
    if not known:
        item["max_diameter_px"] = d_units
    item["centroid_index"] = [round(float(c), 2) for c in centroid]
    if comp_sub.ndim == 3 and meta.affine is not None:
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


# ------------------------------------------------------------------------------------------ the case
def _amount(n: int, unit_size: float | None, is_volume: bool) -> dict:
    """``volume_ml`` (3D) or ``area_mm2`` (2D) of ``n`` voxels / pixels; None without a known spacing."""
    if is_volume:
        return {"volume_ml": n * unit_size / 1000.0 if unit_size is not None else None}
    return {"area_mm2": n * unit_size if unit_size is not None else None}


def _components(labels: np.ndarray, probs: np.ndarray | None, meta: medio.ImageMeta, class_names: list[str],
                roles: list[str], regions: bool = False
                ) -> tuple[list[dict], list[tuple[int, int, dict]], dict[int, np.ndarray]]:
    """(structures, lesions as (group, component, measurements), component maps of the lesion groups).

    A group is one lesion class; for a region model the union of the lesion regions is the one group (key 0),
    so a tumour made of nested regions is one lesion, not one per region (its ``regions`` give each part)."""
    shape = tuple(labels.shape)
    unit_size = float(np.prod(meta.spacing)) if meta.spacing_known else None  # mm^3 per voxel or mm^2 per pixel
    count_key = "voxels" if len(shape) == 3 else "pixels"
    structure = np.ones((3,) * labels.ndim, bool)
    structures, groups = [], []
    for k, (name, role) in enumerate(zip(class_names, roles), start=1):
        m = class_mask(labels, k, regions)
        n = int(np.count_nonzero(m))
        comp, ncomp = ndimage.label(m, structure) if n else (None, 0)
        structures.append({"class": name, "class_index": k, "role": role, count_key: n, "components": int(ncomp),
                           **_amount(n, unit_size, len(shape) == 3)})
        if role == "lesion" and ncomp and not regions:
            groups.append((k, comp))
    lesion_ks = [k for k, r in enumerate(roles, 1) if r == "lesion"]
    if regions and lesion_ks:
        union = np.zeros(shape, bool)
        for k in lesion_ks:
            union |= class_mask(labels, k, True)
        comp, ncomp = ndimage.label(union, structure)
        if ncomp:
            groups.append((0, comp))
    pending, comps = [], {}
    for key, comp in groups:
        comps[key] = comp
        for c, sl in enumerate(ndimage.find_objects(comp), start=1):
            inside = comp[sl] == c
            # a region lesion is named by its outermost lesion region (listed first), and measured part by part
            k = key or next(j for j in lesion_ks if class_mask(labels[sl], j, True)[inside].any())
            prob_k = class_probability(probs, k, shape, regions)
            offset = np.array([s.start for s in sl])
            item = {"class": class_names[k - 1], "class_index": k,
                    **_measure(inside, offset, meta, prob_k[sl] if prob_k is not None else None)}
            if regions:
                item["regions"] = [{"class": class_names[j - 1], count_key: n,
                                    **_amount(n, unit_size, len(shape) == 3)}
                                   for j in range(1, len(class_names) + 1)
                                   if (n := int(np.count_nonzero(class_mask(labels[sl], j, True) & inside)))]
            pending.append((key, c, item))
    pending.sort(key=lambda e: (-e[2][count_key], e[2]["bbox_min"], e[0]))
    return structures, pending, comps


def _totals(labels: np.ndarray, roles: list[str], structures: list[dict], count_key: str,
            regions: bool) -> tuple[int, int, int]:
    """(lesion, organ, lesion-or-organ) voxel counts: sums over exclusive classes, unions of (nested) regions."""
    if not regions:
        lesion_n = sum(s[count_key] for s in structures if s["role"] == "lesion")
        organ_n = sum(s[count_key] for s in structures if s["role"] == "organ")
        return lesion_n, organ_n, lesion_n + organ_n
    masks = {}
    for role in ("lesion", "organ"):
        bits = sum(1 << (k - 1) for k, r in enumerate(roles, 1) if r == role)
        masks[role] = (np.asarray(labels) & bits) != 0
    return (int(np.count_nonzero(masks["lesion"])), int(np.count_nonzero(masks["organ"])),
            int(np.count_nonzero(masks["lesion"] | masks["organ"])))


def _summary(lesions: list[dict], structures: list[dict], meta: medio.ImageMeta, roles: list[str],
             totals: tuple[int, int, int]) -> dict:
    """The case's totals: lesion count and burden, largest diameter, organ size (``totals``: :func:`_totals`)."""
    is_volume, known = len(meta.shape) == 3, meta.spacing_known
    unit_size = float(np.prod(meta.spacing)) if known else None
    count_key = "voxels" if is_volume else "pixels"
    lesion_n, organ_n, either_n = totals
    has_lesion = "lesion" in roles
    summary: dict[str, Any] = {"is_volume": is_volume, "spacing_known": known, "has_lesion_class": has_lesion,
                               "n_lesions": len(lesions),
                               "lesion_total": {count_key: lesion_n, **_amount(lesion_n, unit_size, is_volume)}}
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
        summary["lesion_burden_percent"] = 100.0 * lesion_n / either_n
    else:
        summary["lesion_burden_percent"] = None
    return summary


def analyze_with_ids(labels: np.ndarray, probs: np.ndarray | None, meta: medio.ImageMeta, prep: Preprocessing,
                     roles: list[str] | None = None) -> tuple[dict, np.ndarray]:
    """:func:`analyze_mask` plus the lesion id map (each lesion voxel = its ``id``) the overlays are drawn from."""
    labels = np.asarray(labels)
    shape = tuple(int(s) for s in meta.shape)
    if labels.shape != shape:
        raise InputError(f"{meta.path}: label map has shape {labels.shape} but the image has {shape}")
    roles = check_roles(roles or class_roles(prep.class_names), prep.n_classes)
    structures, pending, comps = _components(labels, probs, meta, prep.class_names, roles, prep.regions)
    id_map = np.zeros(shape, np.int32)
    lesions = [{"id": i, **item} for i, (_, _, item) in enumerate(pending, start=1)]
    for key, comp in comps.items():  # one look-up per group, not one pass over the volume per lesion
        lut = np.zeros(int(comp.max()) + 1, np.int32)
        for i, (k, c, _) in enumerate(pending, start=1):
            if k == key:
                lut[c] = i
        inside = comp > 0
        id_map[inside] = lut[comp[inside]]
    del comps
    count_key = "voxels" if len(shape) == 3 else "pixels"
    summary = _summary(lesions, structures, meta, roles, _totals(labels, roles, structures, count_key, prep.regions))
    summary["mean_foreground_probability"] = mean_foreground_probability(labels, probs, prep.regions)
    return {"lesions": lesions, "summary": summary}, id_map


def analyze_mask(labels: np.ndarray, probs: np.ndarray | None, meta: medio.ImageMeta, prep: Preprocessing,
                 roles: list[str] | None = None) -> dict:
    """Measure a class map (pure function): ``{"lesions": [...], "summary": {...}}``.

    labels: classes 0..K in the image's spatial shape (``meta.shape``), or for a region model (``prep.regions``)
    the region bit masks (:func:`preprocess.class_mask`); probs: (Z, C_out, H, W) from
    :func:`inference.predict_image` or None. Region models: structures are per region; lesions are the
    components of the union of the lesion regions, each named by its outermost region, with ``regions`` giving
    the size of every region inside it. Lesions are connected components (full connectivity) of
    the lesion-role classes, sorted by size (largest first, ``id`` 1..n). Units: see the module docstring.
    """
    return analyze_with_ids(labels, probs, meta, prep, roles)[0]

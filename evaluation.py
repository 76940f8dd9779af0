"""Whole-case evaluation on real data: per-case scores, the post-processing choice, summaries and per-case output.

Every case is predicted by :func:`inference.predict_planes` (the function ``predict.py`` uses) at the original
resolution, then scored with :mod:`metrics`' per-case functions. Used on the validation cases during
training (Dice only) and on the test cases after it (every score).
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch

import medio
import visualize
from datasets import read_case_image
from fileio import atomic_write
from inference import keep_largest, largest_component, predict_prepared, probs_to_labels
from metrics import case_scores, class_mean, per_case_scores, summarize
from model import UNet
from preprocess import Preprocessing, class_mask, regions_to_labels, to_planes

log = logging.getLogger("run")

LESION_KEYS = ("true_lesions", "detected_lesions", "pred_lesions", "false_positive_lesions")


def evaluate_cases(model: UNet, cases: list, prep: Preprocessing, device: torch.device, precision: str,
                   cfg, hd: bool = True, keep_pred: bool = False, largest=(),
                   compare_largest: bool = False, mirror: bool | None = None) -> list[dict]:
    """Whole-case prediction (sliding window, original resolution) and per-class scores, one row per case and class.

    largest: classes (1-based) reduced to their largest connected component before scoring (the
    post-processing :func:`choose_postprocessing` picked); ``compare_largest`` adds a ``dice_largest``
    column: the Dice each class would get with that step.
    """
    rows = []
    for c in cases:
        probs = predict_prepared(model, c.planes if prep.dim == 2 else c.volume, prep, device, precision, cfg.overlap,
                                 channels_last=cfg.channels_last, mirror=mirror)
        pred = keep_largest(probs_to_labels(probs, cfg.threshold, prep.regions), largest, prep.regions)
        spacing = c.meta.spacing if c.is_volume else c.meta.spacing[-2:]
        for k, name in enumerate(prep.class_names, start=1):
            p, t = class_mask(pred, k, prep.regions), class_mask(c.labels, k, prep.regions)
            if c.roi is not None:  # only pixels inside the field of view count
                p, t = p & c.roi, t & c.roi
            if not c.is_volume:
                p, t = p[0], t[0]
            if hd:
                s = case_scores(p, t, spacing)
            else:  # validation: overlap scores only, no surface distances
                s = {key: float(v[0]) for key, v in per_case_scores(p[None], t[None]).items()}
            if compare_largest:
                s["dice_largest"] = float(per_case_scores(largest_component(p)[None], t[None])["dice"][0])
            row = {"case": c.ref.case_id, "class": name, **s}
            if keep_pred:
                row["_case"], row["_pred"], row["_k"] = c, pred, k
            rows.append(row)
    return rows


def choose_postprocessing(rows: list[dict], prep: Preprocessing) -> dict:
    """nnU-Net's habit: keep only the largest connected component of a class when that raises its mean
    validation Dice (rows from :func:`evaluate_cases` with ``compare_largest``). Decided on validation
    cases only, never on the test cases it is then applied to."""
    chosen, scores = [], {}
    for name in prep.class_names:
        rs = [r for r in rows if r["class"] == name]
        raw, big = float(np.mean([r["dice"] for r in rs])), float(np.mean([r["dice_largest"] for r in rs]))
        scores[name] = {"val_dice": raw, "val_dice_largest": big}
        if big > raw:
            chosen.append(name)
    return {"largest_component": chosen, "validation": scores}


def summarize_rows(rows: list[dict], prep: Preprocessing) -> dict:
    """Mean ± std per class (NaN-skipping), and the class-mean of each score."""
    per_class = {}
    for name in prep.class_names:
        rs = [r for r in rows if r["class"] == name]
        keys = [k for k in rs[0] if not k.startswith("_") and k not in ("case", "class")] if rs else []
        stats = summarize({k: np.array([r[k] for r in rs], dtype=float) for k in keys if k not in LESION_KEYS})
        stats.update({k: int(sum(r[k] for r in rs)) for k in LESION_KEYS if k in keys})
        stats["n"] = len(rs)
        per_class[name] = stats
    out = {k: class_mean(per_class, k) for k in ("dice", "iou", "sensitivity", "precision")}
    out["per_class"] = per_class
    return out



def write_case_csv(path: Path, rows: list[dict]) -> Path:
    """One CSV row per case and class (columns from the first row; private ``_`` keys left out), atomically."""
    keys = [k for k in rows[0] if not k.startswith("_")] if rows else ["case", "class"]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, ".csv", write)

def plot_case_overlays(rows: list[dict], out_dir: Path, prep: Preprocessing) -> None:
    """Best, median and worst test cases of the first class: the slice with the most ground truth."""
    rows = [r for r in rows if r["_k"] == 1]
    if not rows:
        return
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["dice"])
    picks = list(dict.fromkeys([order[0], order[len(order) // 2], order[-1]]))
    imgs, truths, preds, scores, titles = [], [], [], [], []
    for i, tag in zip(picks, ("最好", "中位", "最差")):
        c, pred = rows[i]["_case"], rows[i]["_pred"]
        z = int(np.argmax((c.labels > 0).reshape(len(c.labels), -1).sum(1)))
        planes = c.planes if c.planes is not None else to_planes(read_case_image(c.ref)[0], 3, prep)  # 3D keeps no planes
        imgs.append(display_plane(planes[z]))
        truths.append(_display_labels(c.labels[z], prep))
        preds.append(_display_labels(pred[z], prep))
        scores.append(rows[i]["dice"])
        titles.append(f"{tag} {c.ref.case_id}" + (f" z={z}" if c.is_volume else ""))
    visualize.plot_predictions(imgs, truths, preds, out_dir, scores=scores, titles=titles)


def _display_labels(labels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    return regions_to_labels(labels, prep.n_classes) if prep.regions else labels


def display_plane(plane: np.ndarray) -> np.ndarray:
    """(C, H, W) network input -> (H, W) grey or (H, W, 3) RGB in [0, 1] for display."""
    x = plane if plane.shape[0] == 3 else plane[:1]
    x = (x - x.min()) / (np.ptp(x) + 1e-8)
    return np.moveaxis(x, 0, -1) if x.shape[0] == 3 else x[0]


def dataset_report(cases: list, prep: Preprocessing) -> dict:
    """Per-case geometry, intensity range and structure sizes (voxels, mL) for ``--check``."""
    report = {"cases": [], "preprocessing": prep.to_dict()}
    for c in cases:
        image, _ = read_case_image(c.ref)
        vox_ml = medio.voxel_volume_ml(c.meta) if c.is_volume else None
        entry = {"case": c.ref.case_id, "image": str(c.ref.image), "shape": list(c.meta.shape),
                 "spacing_mm": [round(float(s), 4) for s in c.meta.spacing], "format": c.meta.format,
                 "intensity_min": float(image.min()), "intensity_max": float(image.max()), "structures": {}}
        for k, name in enumerate(prep.class_names, start=1):
            n = int(class_mask(c.labels, k, prep.regions).sum())
            entry["structures"][name] = {"voxels": n, **({"volume_ml": round(n * vox_ml, 2)} if vox_ml else {})}
            log.info("%s: %s %s mm, 强度 [%.0f, %.0f]; %s: %d 体素%s", c.ref.case_id, "x".join(map(str, c.meta.shape)),
                     "x".join(f"{s:.3g}" for s in c.meta.spacing), entry["intensity_min"], entry["intensity_max"], name, n,
                     f", 体积 {n * vox_ml:.1f} mL" if vox_ml else "")
        report["cases"].append(entry)
    return report

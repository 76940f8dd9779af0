"""Segmentation losses and metrics: pure functions with a stated shape contract.

Shape contract
    Metric functions take binary ``pred`` and ``truth`` of shape ``(N, *spatial)`` (torch tensors or
    NumPy arrays, any dtype; non-zero = foreground). Each of the ``N`` items is one *case* (a 2-D image
    or a whole 3-D volume) and every score is computed per case, then averaged over cases. Nothing is
    pooled across cases: a small missed lesion costs its case a Dice of 0 however big the others are.

Empty-mask rule (per case, ``tp``/``fp``/``fn`` = true positive / false positive / false negative pixels)
    * Dice = 2tp / (2tp + fp + fn) and IoU = tp / (tp + fp + fn); **empty prediction on empty truth
      scores 1.0** (nothing to find, nothing claimed). Anything predicted on an empty truth scores 0,
      and an empty prediction on a non-empty truth scores 0 (a missed structure never helps the mean).
    * Sensitivity = tp / (tp + fn) is undefined (NaN) when the truth is empty; precision = tp / (tp + fp)
      is undefined (NaN) when the prediction is empty. Means skip NaN (``nanmean``) and report how many
      cases were counted.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SCORES = ("dice", "iou", "sensitivity", "precision")


# ----------------------------------------------------------------------------------------- losses
def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, computed per case and per channel over the spatial dims, then averaged.

    probs, target: (N, C, *spatial) float. ``smooth`` keeps empty cases finite and pushes their
    prediction towards empty.
    """
    dims = tuple(range(2, probs.dim()))
    inter = (probs * target).sum(dims)
    denom = probs.sum(dims) + target.sum(dims)
    return 1.0 - ((2.0 * inter + smooth) / (denom + smooth)).mean()


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1.0,
                      regions: bool = False) -> torch.Tensor:
    """BCE + soft Dice on logits (one output channel, or one per region) or CE + soft Dice over foreground classes.

    logits: (N, C, *spatial). labels: (N, *spatial) integer label map (0 = background), or for ``regions`` the
    bit masks of :func:`preprocess.to_classes` (bit c set = inside region c + 1).
    C == 1: sigmoid / binary; regions: one sigmoid per region (nnU-Net's region-based training);
    otherwise softmax over C classes, Dice over classes 1..C-1.
    """
    logits = logits.float()  # the loss in fp32 even under bf16 autocast
    if regions:
        bits = labels.to(torch.int32).unsqueeze(1)
        target = ((bits >> torch.arange(logits.size(1), device=bits.device).view(1, -1, *[1] * (bits.dim() - 2))) & 1)
        target = target.to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target) + soft_dice_loss(torch.sigmoid(logits), target, smooth)
    if logits.size(1) == 1:
        target = (labels > 0).unsqueeze(1).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        return bce + soft_dice_loss(torch.sigmoid(logits), target, smooth)
    labels = labels.long()
    ce = F.cross_entropy(logits, labels)
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(labels, logits.size(1)).movedim(-1, 1)[:, 1:].to(probs.dtype)
    return ce + soft_dice_loss(probs, onehot, smooth)


# ---------------------------------------------------------------------------------------- metrics
def _as_bool(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x) != 0


def confusion_counts(pred, truth) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-case (tp, fp, fn) pixel counts as float64 tensors of shape (N,)."""
    p, t = _as_bool(pred), _as_bool(truth)
    if p.shape != t.shape:
        raise ValueError(f"pred and truth must have the same shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    if p.dim() < 2:
        raise ValueError(f"expected (N, *spatial) with at least one spatial dim, got shape {tuple(p.shape)}")
    p, t = p.flatten(1), t.flatten(1)
    tp = (p & t).sum(1).double()
    fp = (p & ~t).sum(1).double()
    fn = (~p & t).sum(1).double()
    return tp, fp, fn


def per_case_scores(pred, truth) -> dict[str, np.ndarray]:
    """Dice, IoU, sensitivity and precision for each of the N cases (see the module's empty-mask rule)."""
    tp, fp, fn = confusion_counts(pred, truth)
    nan = torch.full_like(tp, math.nan)
    both_empty = (tp + fp + fn) == 0
    dice = torch.where(both_empty, torch.ones_like(tp), 2 * tp / (2 * tp + fp + fn).clamp_min(1))
    iou = torch.where(both_empty, torch.ones_like(tp), tp / (tp + fp + fn).clamp_min(1))
    sens = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), nan)
    prec = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), nan)
    return {"dice": dice.numpy(), "iou": iou.numpy(), "sensitivity": sens.numpy(), "precision": prec.numpy()}


def per_class_scores(pred_labels, truth_labels, classes: list[int]) -> dict[int, dict[str, np.ndarray]]:
    """Per-case scores for each foreground class value in ``classes`` of two integer label maps."""
    p, t = torch.as_tensor(np.asarray(pred_labels)), torch.as_tensor(np.asarray(truth_labels))
    return {c: per_case_scores(p == c, t == c) for c in classes}


def class_mean(per_class: dict, key: str) -> float:
    """Mean of ``key`` over the classes' summaries, skipping classes where it is undefined (NaN when all are)."""
    vals = np.asarray([pc[key] for pc in per_class.values()], dtype=np.float64)
    ok = vals[~np.isnan(vals)]
    return float(ok.mean()) if ok.size else math.nan


def summarize(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean, std and count of each score over cases, NaN (undefined) cases skipped."""
    out: dict[str, float] = {}
    for name, values in scores.items():
        v = np.asarray(values, dtype=np.float64)
        ok = v[~np.isnan(v)]
        out[name] = float(ok.mean()) if ok.size else math.nan
        out[f"{name}_std"] = float(ok.std()) if ok.size else math.nan
        out[f"{name}_n"] = int(ok.size)
    return out


def best_threshold_dice(images: np.ndarray, truth: np.ndarray, num_thresholds: int = 101) -> tuple[float, float, str]:
    """The baseline a network must beat: the best single global intensity threshold.

    Tries ``image > t`` and ``image < t`` for ``num_thresholds`` values of ``t`` spanning the
    intensity range and returns ``(mean per-image Dice, t, direction)`` of the best one. It is
    chosen on the very images it is scored on, so it is an optimistic baseline.
    """
    images = np.asarray(images, dtype=np.float32)
    truth_t = _as_bool(truth).flatten(1)
    imgs = torch.from_numpy(images).flatten(1)
    best = (-1.0, 0.0, ">")
    for t in np.linspace(float(images.min()), float(images.max()), num_thresholds):
        for direction in (">", "<"):
            pred = imgs > t if direction == ">" else imgs < t
            dice = float(per_case_scores(pred, truth_t)["dice"].mean())
            if dice > best[0]:
                best = (dice, float(t), direction)
    return best


# ------------------------------------------------------------------------- whole-case metrics
def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between the surfaces of two binary masks (mm with ``spacing``).

    Rule: both empty -> 0.0; exactly one empty -> the diagonal of the array extent (the largest
    possible distance), so a missed or hallucinated structure is penalised, never skipped.
    """
    from scipy import ndimage

    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    spacing = tuple(spacing) if spacing is not None else (1.0,) * p.ndim
    if p.shape != t.shape or len(spacing) != p.ndim:
        raise ValueError(f"hd95: pred {p.shape}, truth {t.shape} and spacing {spacing} must agree")
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(p.shape, spacing))))

    def surface(m: np.ndarray) -> np.ndarray:
        return m & ~ndimage.binary_erosion(m, border_value=0)

    sp, st = surface(p), surface(t)
    dist_to_t = ndimage.distance_transform_edt(~st, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(np.percentile(np.concatenate([dist_to_t[sp], dist_to_p[st]]), 95))


def lesion_detection(pred: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """Lesion-wise counts by connected components (full connectivity).

    A true lesion is *detected* when any predicted pixel overlaps it; a predicted component that
    overlaps no true lesion is a *false-positive lesion*.
    """
    from scipy import ndimage

    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    structure = np.ones((3,) * p.ndim, bool)
    t_lab, n_true = ndimage.label(t, structure)
    p_lab, n_pred = ndimage.label(p, structure)
    detected = len(np.unique(t_lab[p & t])) if n_true else 0
    tp_pred = len(np.unique(p_lab[p & t])) if n_pred else 0
    return {"true_lesions": int(n_true), "detected_lesions": int(detected), "pred_lesions": int(n_pred),
            "false_positive_lesions": int(n_pred - tp_pred)}


def case_scores(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None = None,
                roi: np.ndarray | None = None) -> dict[str, float]:
    """All scores of one binary case (2D image or 3D volume): Dice, IoU, sensitivity, precision, HD95, lesions.

    ``roi`` (same shape, bool) restricts every count to the region of interest (e.g. DRIVE's field of view).
    """
    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    if roi is not None:
        p, t = p & roi, t & roi
    s = {k: float(v[0]) for k, v in per_case_scores(p[None], t[None]).items()}
    s["hd95"] = hd95(p, t, spacing)
    s.update(lesion_detection(p, t))
    return s

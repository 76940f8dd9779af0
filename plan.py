"""The network configuration derived from the data: target spacing, 3D patch size and pooling per level.

Rules (nnU-Net's, scaled to a laptop CPU; see docs/plan.md):

* target spacing: :func:`resample.target_spacing` (the median spacing; the 10th percentile on an axis that is
  much coarser than the others);
* patch: the median case shape at the target spacing, shrunk (largest axis first) until it fits a voxel budget
  a CPU trains in reasonable time, then rounded up to what the pooling needs;
* pooling: each of the four levels halves an axis only while its spacing is at most twice the finest one and
  the feature map stays at least 4 voxels long; otherwise that axis keeps its size on that level.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from errors import InputError

#: voxels of one 3D training patch: 48^3 ~ 110k; a CPU trains a base-32 3D U-Net at a few patches per second
PATCH_VOXELS_3D = 48 ** 3
LEVELS = 4
MIN_FEATURE_MAP = 4


def pooling(patch: list[int], spacing: list[float]) -> list[list[int]]:
    """Pooling factors (1 or 2 per axis) of the four levels for ``patch`` voxels at ``spacing`` mm."""
    size, sp = list(map(float, patch)), list(map(float, spacing))
    levels = []
    for _ in range(LEVELS):
        finest = min(sp)
        f = [2 if s <= 2 * finest and n / 2 >= MIN_FEATURE_MAP else 1 for s, n in zip(sp, size)]
        levels.append(f)
        size = [n / k for n, k in zip(size, f)]
        sp = [s * k for s, k in zip(sp, f)]
    return levels


def fit_patch(patch: list[int], pools: list[list[int]]) -> list[int]:
    """``patch`` rounded up on each axis to a multiple of that axis's total pooling factor."""
    total = [math.prod(level[a] for level in pools) for a in range(len(patch))]
    return [int(math.ceil(n / t) * t) for n, t in zip(patch, total)]


def patch_3d(median_shape: list[int], spacing: list[float], budget: int = PATCH_VOXELS_3D) -> tuple[list[int], list[list[int]]]:
    """The 3D patch and pooling for cases of ``median_shape`` voxels at the target ``spacing``.

    Starts from the median shape (a patch that covers the typical case) and shrinks its physically largest axis
    by 10 % at a time until it fits ``budget`` voxels, then rounds up to the pooling's multiples.
    """
    patch = [max(8, int(n)) for n in median_shape]
    while math.prod(patch) > budget:
        mm = [n * s for n, s in zip(patch, spacing)]
        a = int(np.argmax(mm))
        patch[a] = max(8, int(patch[a] * 0.9))
        if all(n == 8 for n in patch):
            break
    pools = pooling(patch, spacing)
    return fit_patch(patch, pools), pools


# ------------------------------------------------------------------------------------------- the plan
#: training pixels of one 2D patch a CPU handles comfortably (a 160 x 160 image, or a 128 x 128 crop of a bigger one)
PATCH_PIXELS_2D = 160 * 160
#: half-thickness (px) below which structures are thin: they keep the native resolution (vessels, fibres)
THIN_PX = 4.0
#: the smallest long side a photograph is scaled to (the U-Net's four poolings leave 4 x 4 pixels) and the step
#: between the sides the plan tries
MIN_SIDE_2D, SIDE_STEP_2D = 64, 16
#: share of the budget for training steps; the rest is validation and the epochs' overhead
STEP_SHARE = 0.85
MIN_EPOCHS, MAX_EPOCHS = 8, 60
NO_BUDGET_EPOCHS = 30


@dataclass
class Plan:
    """A run's configuration, derived from the dataset's fingerprint, the machine and the time budget.

    ``values`` are :class:`train.TrainConfig` fields; ``sources`` says for each whether the plan or the user set it,
    and ``reasons`` the rule behind each planned value (docs/plan.md)."""

    values: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)
    step_seconds: float | None = None
    budget_minutes: float = 0.0

    def set(self, name: str, value, reason: str, user: dict) -> None:
        if name in user:
            self.values[name], self.sources[name] = user[name], "user"
        else:
            self.values[name], self.sources[name], self.reasons[name] = value, "plan", reason

    def table(self) -> str:
        """The plan as a short readable table (printed before training)."""
        rows = [f"{'setting':18} {'value':28} from   why"]
        for name, value in self.values.items():
            text = value if not isinstance(value, list) else ",".join(map(str, value))
            rows.append(f"{name:18} {str(text)[:28]:28} {self.sources[name]:6} {self.reasons.get(name, '')}")
        if self.step_seconds:
            rows.append(f"measured training step: {self.step_seconds * 1000:.0f} ms on this machine")
        return "\n".join(rows)


def plan_dataset(fp, user: dict, budget_minutes: float) -> Plan:
    """Everything but the schedule length: dimension, labels, scale, patch, batch, width, rate, augmentation.
    ``user``: the TrainConfig fields the user set (they win). Rules: docs/plan.md."""
    import resample

    plan = Plan(budget_minutes=budget_minutes)
    if user.get("dim") == 3 and not fp.is_volume:
        flat = next(c.case for c in fp.cases if len(c.shape) != 3)
        raise InputError(f"{flat}: --dim 3 needs volumes, this image is 2D (use --dim 2)")
    values = fp.label_values
    if fp.label_names:
        labels = ",".join(f"{n}={v}" for n, v in sorted(fp.label_names.items(), key=lambda kv: kv[1]))
        plan.set("labels", labels, "the classes dataset.json declares", user)
    else:
        plan.set("labels", ",".join(map(str, values)) if len(values) > 1 else None,
                 f"the label values the masks hold ({values})", user)
    spacings, shapes = [c.spacing for c in fp.cases], [c.shape for c in fp.cases]
    aniso = fp.is_volume and max(fp.median("spacing")) > resample.ANISOTROPY_THRESHOLD * min(fp.median("spacing"))
    plan.set("dim", 3 if fp.is_volume and not aniso else 2,
             "volumes of comparable resolution on every axis: a 3D U-Net" if fp.is_volume and not aniso else
             ("slices much thicker than the pixels: 2D planes" if fp.is_volume else "2D images"), user)
    if plan.values["dim"] == 3:
        target = list(resample.target_spacing(spacings, shapes))
        median = [int(np.median([resample.new_shape(s, sp, target)[a] for s, sp in zip(shapes, spacings)]))
                  for a in range(3)]
        patch, _ = patch_3d(median, target)
        plan.set("spacing", ",".join(f"{v:g}" for v in target), "the median spacing (nnU-Net's rule)", user)
        plan.set("patch", ",".join(map(str, patch)), f"the median case ({'x'.join(map(str, median))}) within "
                 f"{PATCH_VOXELS_3D} voxels", user)
        plan.set("batch_size", 2, "3D patches: 2 per step", user)
        plan.set("lr", 2e-3, "3D, batch 2", user)
        plan.set("norm", "instance", "batches of 2 patches: per-patch statistics (nnU-Net's)", user)
    else:
        _plan_2d(plan, fp, user)
        plan.set("lr", 5e-4, "2D, batch 8", user)
    plan.set("base_channels", 32, "a CPU-sized U-Net (32 filters at full resolution)", user)
    plan.set("lr_schedule", "poly", "a fixed budget ends at a small learning rate", user)
    rgb = fp.is_photo and all(c.channels == 3 for c in fp.cases)
    plan.set("photometric", 0.2 if rgb else 0.0, "colour photographs: brightness, contrast, hue, blur and noise "
             "jitter" if rgb else "not colour photographs", user)
    return plan


def _plan_2d(plan: Plan, fp, user: dict) -> None:
    """Scale and patch of a 2D run: the whole image when it fits the pixel budget once scaled down so that the
    objects keep a few pixels of thickness; thin structures keep the native resolution and train on crops."""
    h, w = fp.median("shape")[-2:]
    long_side, thick, sides = max(h, w), fp.thickness(), photo_sides(fp)
    if sides:
        plan.set("resize", sides[0], f"objects {thick:.0f} px thick: the image scaled to at most {sides[0]} px "
                 f"(the budget picks the side, see choose_scale)", user)
        plan.set("image_size", sides[0], "the whole scaled image is one patch", user)
    else:
        patch = min(128, max(64, int(math.ceil(long_side / 16) * 16)))
        plan.set("resize", None, "thin structures: native resolution" if thick < THIN_PX * 2 else
                 "small planes: native resolution", user)
        plan.set("image_size", patch, f"planes of {h:.0f}x{w:.0f} px: {patch} px crops", user)
    plan.set("batch_size", 8, "2D: 8 patches per step", user)


def photo_sides(fp) -> list[int]:
    """Long sides (px, largest first) a photograph with thick objects may be scaled to: from the 2D pixel budget's
    side down to MIN_SIDE_2D, while its objects stay at least THIN_PX thick; empty for other images."""
    h, w = fp.median("shape")[-2:]
    long_side, thick, top = max(h, w), fp.thickness(), int(math.sqrt(PATCH_PIXELS_2D))
    if not fp.is_photo or long_side <= top:
        return []
    return [s for s in range(top, MIN_SIDE_2D - 1, -SIDE_STEP_2D) if thick * s / long_side >= THIN_PX]


def _passes(plan: Plan, step_seconds: float, n_items: int) -> float:
    """Passes over the training items (at least 256 patches each, as in :func:`size_schedule`) the budget fits."""
    steps = plan.budget_minutes * 60 * STEP_SHARE / step_seconds
    return steps * plan.values["batch_size"] / max(n_items, 256)


def choose_scale(plan: Plan, fp, step_seconds_at: Callable[[int], float], n_items: int, user: dict) -> float:
    """For a photograph the plan scales (neither ``resize`` nor ``image_size`` from the user, a time budget set):
    the largest of :func:`photo_sides` at which the budget fits MAX_EPOCHS passes over the training images (the
    user's ``epochs`` when given) at the step time ``step_seconds_at(side)`` measured on this machine; the smallest
    side when none does. A from-scratch U-Net gains more from passes over the data than from pixels once the
    objects are thick (docs/plan.md). Sets ``resize`` and ``image_size``; returns the step time at that side."""
    sides = photo_sides(fp)
    scalable = (plan.budget_minutes > 0 and sides and plan.sources.get("resize") == "plan"
                and plan.sources.get("image_size") == "plan")
    if not scalable:
        return step_seconds_at(plan.values["image_size"])
    wanted = user.get("epochs", MAX_EPOCHS)
    for side in sides:
        step = step_seconds_at(side)
        passes = _passes(plan, step, n_items)
        if passes >= wanted or side == sides[-1]:
            break
    why = "fit" if passes >= wanted else f"fit only {passes:.0f} of"
    plan.set("resize", side, f"objects {fp.thickness():.0f} px thick; at {side} px the {plan.budget_minutes:g} min "
             f"{why} {wanted} passes over the images ({step * 1000:.0f} ms a step)", {})
    plan.set("image_size", side, "the whole scaled image is one patch", {})
    return step


def size_schedule(plan: Plan, step_seconds: float, n_items: int, user: dict) -> None:
    """Epochs and patches per epoch that fit the budget at the measured step time (at least one pass over the
    training items per epoch, between MIN_EPOCHS and MAX_EPOCHS epochs)."""
    plan.step_seconds = step_seconds
    batch = plan.values["batch_size"]
    per_epoch = max(n_items, 64 if plan.values["dim"] == 3 else 256)
    if plan.budget_minutes <= 0:  # no budget: one pass over the training items per epoch, the user's epochs or 30
        plan.set("samples_per_epoch", per_epoch, "no time budget: one patch per training item", user)
        plan.set("epochs", NO_BUDGET_EPOCHS, "no time budget", user)
        return
    steps = max(1, int(plan.budget_minutes * 60 * STEP_SHARE / step_seconds))
    epochs = steps * batch // per_epoch
    if "epochs" in user:  # the user's epochs, each sized so that all of them fit the budget
        per_epoch, epochs = max(batch, steps * batch // user["epochs"]), user["epochs"]
    elif epochs > MAX_EPOCHS:
        per_epoch, epochs = steps * batch // MAX_EPOCHS, MAX_EPOCHS
    elif epochs < MIN_EPOCHS:
        per_epoch, epochs = max(batch, steps * batch // MIN_EPOCHS), MIN_EPOCHS
    plan.set("samples_per_epoch", per_epoch, f"{steps} steps of {step_seconds:.2f} s fit {plan.budget_minutes:g} "
             f"min x {STEP_SHARE:.0%}", user)
    plan.set("epochs", epochs, f"{per_epoch} patches per epoch", user)

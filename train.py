"""Training: the configuration, seeded data loaders, the epoch loop and validation scores.

The loop fits on a screen (:func:`fit`). Everything it needs arrives as arguments: a model, the training
data, a ``validate(model)`` function and a :class:`TrainConfig`. The test split is never seen here: the
checkpoint is chosen on validation Dice and the LR scheduler steps on validation loss. Writing
checkpoints (:class:`CheckpointWriter`) and torchrun's process group (:class:`DistInfo`) live in helpers.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from budget import Pace
from checkpoint import checkpoint_dict, save_checkpoint, write_checkpoint
from data_gen import DIFFICULTIES
from errors import ConfigError, MedSegError
from inference import probs_from_logits, probs_to_labels
from metrics import class_mean, per_case_scores, segmentation_loss, summarize
from model import NORMS
from options import TRAIN
from preprocess import NORMALIZATIONS, class_mask
from runtime import ThreadPolicy, autocast, channels_last, make_grad_scaler, to_channels_last

log = logging.getLogger(__name__)

LR_SCHEDULES = ("plateau", "poly")
#: width and learning rate of runs that leave them at None, by task (measured with ``bench.py``'s default-run
#: rows): on the post's threshold-solvable ``seed`` preset a 16-wide U-Net at 3e-3 reaches the same test Dice
#: as a 32-wide one at 1e-3 in half the time; the ``realistic`` preset and real scans need the 32-wide one
TASK_DEFAULTS = {"seed": {"base_channels": 16, "lr": 3e-3}, "other": {"base_channels": 32, "lr": 1e-3}}


@dataclass
class TrainConfig:
    """Every knob of a training run; stored verbatim in each checkpoint."""

    epochs: int = 10
    num_samples: int = 200
    image_size: int = 64
    base_channels: int | None = None  # None: TASK_DEFAULTS (16 for the seed preset, else 32)
    bilinear: bool = True
    norm: str = "batch"  # batch or instance normalisation (the plan takes instance for 3D)
    batch_size: int | None = None  # None: 8 for 2D, 2 for 3D
    lr: float | None = None  # None: TASK_DEFAULTS (3e-3 for the seed preset, else 1e-3)
    seed: int = 42
    difficulty: str = "seed"
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast where supported, fp16 + GradScaler on older CUDA GPUs, else fp32
    channels_last: bool = True
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    lr_schedule: str = "plateau"  # plateau: ReduceLROnPlateau(val loss); poly: nnU-Net's (1 - epoch/epochs)^0.9
    lr_factor: float = 0.5
    lr_patience: int = 2
    threshold: float = 0.5
    num_workers: int = 0  # in-memory arrays: worker processes only add start-up cost (and Windows pickling)
    threads: int = 0  # CPU threads for PyTorch; 0 = its default (one per core)
    checkpoint_every: float = 60.0  # seconds between writes of last.pth + the best checkpoint (0: every epoch)
    output_dir: str = "output_figures"
    checkpoint: str = "best_unet.pth"
    progress: bool = True
    figures: bool = True  # the PNG figures (run.py --no-figures skips them; the JSON results are written as always)
    # real datasets (run.py --data); image_size is then the square training patch
    data: str | None = None
    images_dir: str | None = None
    masks_dir: str | None = None
    labels: str | None = None
    window: str | None = None
    normalize: str = "auto"
    in_channels: int = 0  # 0 = from the data (3 for RGB images, else 1)
    resize: int | None = None  # rescale planes so the long side has this many pixels (None = native)
    samples_per_epoch: int = 0  # 0 = one patch per training plane (at least 256)
    fg_prob: float = 0.5
    augment: bool = True
    elastic: float = 0.0
    overlap: float = 0.5
    tta: bool = False  # mirror test-time augmentation at test and in predict.py (not in per-epoch validation)
    max_cases: int = 0  # 0 = all cases (a smaller number for quick experiments)
    resume: bool = False  # continue from last.pth in output_dir
    # whole volumes (run.py --dim 3); None: derived from the data (plan.py)
    dim: int = 2
    patch: str | None = None  # "Z,Y,X" voxels at the target spacing
    spacing: str | None = None  # "Z,Y,X" mm, the target spacing every case is resampled to
    # the time budget (run.py --time-budget) and the colour jitter of photographs, both set by the plan
    time_budget: float = 0.0  # minutes of training (validation included); 0 = no limit
    schedule_changes: list | None = None  # a finished run's budget changes, replayed instead of the clock
    epochs_planned: bool = False  # the plan chose `epochs` from a step-time estimate: the budget may also raise it
    photometric: float = 0.0
    snapshot_minutes: list | None = None  # bench.py --real: the best model so far saved at these training minutes

    def __post_init__(self) -> None:
        task = "seed" if self.difficulty == "seed" and not self.real_data else "other"
        for name, value in TASK_DEFAULTS[task].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.batch_size is None:
            self.batch_size = 2 if self.dim == 3 else 8

    @property
    def real_data(self) -> bool:
        """True when the run reads a dataset (``--data`` / ``--images-dir``) instead of generating images."""
        return bool(self.data or self.images_dir or self.masks_dir)

    def validate(self) -> None:
        """Raise :class:`ConfigError` listing every invalid value at once (ranges: :data:`options.TRAIN`)."""
        problems = [p for name, rng in TRAIN.items()
                    if (getattr(self, name) is not None or name != "resize")
                    and (p := rng.problem("--" + name.replace("_", "-"), getattr(self, name)))]
        if self.val_fraction + self.test_fraction >= 1:
            problems.append(f"--val-fraction + --test-fraction must be < 1 (got {self.val_fraction + self.test_fraction:g})")
        for name, choices in (("lr_schedule", LR_SCHEDULES), ("difficulty", DIFFICULTIES),
                              ("normalize", ("auto", *NORMALIZATIONS)), ("in_channels", (0, 1, 3)), ("dim", (2, 3)),
                              ("norm", tuple(NORMS))):
            if getattr(self, name) not in choices:
                problems.append(f"--{name.replace('_', '-')} must be one of {', '.join(map(str, choices))} "
                                f"(got {getattr(self, name)!r})")
        if self.dim == 3 and not self.real_data:
            problems.append("--dim 3 trains on volumes: give --data (the synthetic images are 2D)")
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Rebuild from a checkpoint's ``config`` (unknown keys from other versions are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def set_seed(seed: int) -> None:
    """Seed Python, NumPy's legacy global RNG (for third-party code) and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------- data
class ArrayDataset(Dataset):
    """In-memory (images (N, C, *spatial) float32, labels (N, *spatial) uint8), fetched a whole batch at a time.

    ``__getitems__`` lets the DataLoader slice a batch in one tensor op instead of N Python calls.
    Module-level and free of lambdas, so it pickles into worker processes on Windows too.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dim() != labels.dim() + 1 or images.shape[0] != labels.shape[0] or images.shape[2:] != labels.shape[1:]:
            raise ValueError(f"expected images (N, C, *spatial) and labels (N, *spatial), got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx_t = torch.as_tensor(idx)
        return self.images[idx_t], self.labels[idx_t]


def _keep_batch(batch):
    return batch  # __getitems__ already returns the stacked batch


def make_loader(data: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0,
                sampler=None) -> DataLoader:
    """A seeded DataLoader over a batch-fetching dataset (same seed -> same batch order; ``loader.generator``)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler, generator=gen,
                      num_workers=num_workers, collate_fn=_keep_batch, persistent_workers=num_workers > 0)


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded random train/val/test split of ``range(n)`` (val and test get at least one item each when asked)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction))) if test_fraction > 0 else 0
    n_val = max(1, int(round(n * val_fraction))) if val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise ConfigError(f"{n} samples are too few for a train/val/test split of {val_fraction}/{test_fraction}")
    return {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]),
            "train": np.sort(perm[n_test + n_val:])}


# ------------------------------------------------------------------------------- train / eval
class TrainingDiverged(MedSegError):
    """The training loss became NaN or infinite: the run stops instead of 'succeeding' on garbage weights."""


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device,
                    precision: str = "fp32", use_channels_last: bool = False, desc: str = "",
                    progress: bool = True, augment: Callable | None = None,
                    scaler: torch.amp.GradScaler | None = None, loss_fn: Callable = segmentation_loss,
                    stop: Callable[[int], bool] | None = None) -> float:
    """One pass over ``loader``; returns the mean training loss per image. ``scaler``: fp16's GradScaler
    (a step whose scaled gradients overflow is skipped and the scale halved). ``stop(steps_done)``: ends the
    epoch early when it returns True (the time budget's deadline)."""
    model.train()
    total, count, steps = 0.0, 0, 0
    with tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch") as bar:
        for images, labels in bar:
            if augment is not None:
                images, labels = augment(images, labels)
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            if use_channels_last:
                images = channels_last(images)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, precision):
                logits = model(images)
            loss = loss_fn(logits, labels)
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingDiverged(f"the training loss became {value} ({desc.strip() or 'training'}); the "
                                       "learning rate is probably too high for this data: try a smaller --lr")
            if scaler is not None and scaler.is_enabled():
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            total += value * len(images)
            count += len(images)
            bar.set_postfix(loss=f"{value:.4f}")
            steps += 1
            if stop is not None and stop(steps):
                break
    return total / max(count, 1)


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
             precision: str = "fp32", use_channels_last: bool = False, threshold: float = 0.5,
             regions: bool = False) -> dict:
    """Loss and per-image scores of in-memory patches (validation). Returns ``{"loss", "scores", "summary"}``.

    Binary models: scores of the foreground; multi-class: the summary's ``dice``/``iou``/... are the means
    over the foreground classes (``summary["per_class"]``).
    """
    model.eval()
    chunks = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        with autocast(device, precision):
            chunks.append(model(channels_last(x) if use_channels_last else x).float().cpu())
    logits = torch.cat(chunks)
    loss = float(segmentation_loss(logits, labels, regions=regions).item())
    pred = probs_to_labels(probs_from_logits(logits, regions), threshold, regions)
    if logits.size(1) == 1:
        scores = per_case_scores(pred, labels.numpy() > 0)
        return {"loss": loss, "scores": scores, "summary": summarize(scores)}
    classes = range(1, logits.size(1) + (1 if regions else 0))
    per_class = {c: summarize(per_case_scores(class_mask(pred, c, regions), class_mask(labels.numpy(), c, regions)))
                 for c in classes}
    summary = {k: class_mean(per_class, k) for k in ("dice", "iou", "sensitivity", "precision")}
    return {"loss": loss, "scores": None, "summary": {**summary, "per_class": per_class}}


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam, with the fused kernel where this torch has one for the parameters' device (one pass over all
    parameters instead of a loop of small kernels); plain Adam elsewhere."""
    params = list(model.parameters())
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device / dtype / torch
        return torch.optim.Adam(params, lr=lr)


class PolyLR(torch.optim.lr_scheduler.LRScheduler):
    """nnU-Net's poly decay, LR x (1 - done/epochs)^0.9 after each epoch, where ``epochs()`` is the current count.

    When the time budget changes the count mid-run, the LR does not jump to the new curve: from the last epoch
    trained on the old count it decays from its value then to 0 at the new end. A jump up late in a run would
    undo the annealing it has done; a jump down would waste the epochs it was shortened for."""

    def __init__(self, optimizer: torch.optim.Optimizer, epochs: Callable[[], int]):
        self.epochs = epochs
        self.end, self.anchor, self.anchor_factor, self.factor = epochs(), 0, 1.0, 1.0
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        done = self.last_epoch
        if self.epochs() != self.end:  # changed since the previous step, which set the LR of epoch `done`
            self.anchor, self.anchor_factor, self.end = done - 1, self.factor, self.epochs()
        span = self.end - self.anchor
        self.factor = self.anchor_factor * max(0.0, (self.end - done) / span) ** 0.9 if span > 0 else 0.0
        return [base * self.factor for base in self.base_lrs]

    def state_dict(self) -> dict:
        """Numbers only (``epochs`` is a function of the run), so ``last.pth`` loads with ``weights_only=True``."""
        return {k: v for k, v in super().state_dict().items() if k != "epochs"}


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """``plateau`` (the post's): halve the LR after ``lr_patience`` epochs without a lower validation loss.
    ``poly`` (nnU-Net's, :class:`PolyLR`): decay to 0 at ``cfg.epochs``, so a fixed budget ends at a small LR
    whatever the validation noise; better when the epoch budget, not convergence, ends the run."""
    if cfg.lr_schedule == "poly":
        return PolyLR(optimizer, lambda: cfg.epochs)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.lr_factor,
                                                      patience=cfg.lr_patience)


# ------------------------------------------------------------------------------------ the loop
class TrainingInterrupted(MedSegError):
    """Ctrl-C during training; ``last.pth`` holds the last saved epoch."""


@dataclass
class FitResult:
    history: dict[str, list] = field(default_factory=dict)
    best_epoch: int = 0
    best_val: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0  # CPU time of this process (all threads): independent of other jobs
    schedule_changes: list = field(default_factory=list)  # the time budget's changes ([epoch, new epochs, steps])


HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_dice", "val_iou", "val_sensitivity", "val_precision", "lr",
                "seconds")


def rng_state() -> dict:
    """Global RNG states of torch, NumPy and Python as weights_only-safe values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


@dataclass
class DistInfo:
    """torchrun / DistributedDataParallel context (world_size 1 = a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module, data: Dataset, seed: int, device: torch.device):
        """(the module to train, the sampler): DistributedDataParallel and a per-rank sampler under torchrun."""
        if self.world_size == 1:
            return model, None
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data.distributed import DistributedSampler

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return net, DistributedSampler(data, self.world_size, self.rank, shuffle=True, seed=seed)

    def mean(self, value: float, device: torch.device) -> float:
        """The mean of ``value`` over ranks."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world_size

    def from_main(self, obj):
        """Rank 0's ``obj`` on every rank (so every scheduler takes the same step)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


class CheckpointWriter:
    """Writes the best checkpoint and ``last.pth`` (everything needed to resume) at the same moments: after
    the first and the last epoch and whenever ``every`` seconds have passed since the previous write. The best
    model is held in memory in between, so the two files always agree. Why not every epoch: serialising the
    weights and Adam's state costs time on short epochs, and a crash loses at most ``every`` seconds."""

    def __init__(self, best_path, last_path, cfg: TrainConfig, extra: dict | None, main: bool):
        self.best_path, self.last_path, self.cfg, self.extra, self.main = best_path, last_path, cfg, extra or {}, main
        self.best: dict | None = None  # the best checkpoint so far; written at the next due moment
        self.best_unsaved = False
        self.saved_epoch, self.last_write = 0, time.perf_counter()
        self.snapshots = sorted(cfg.snapshot_minutes or [])

    def new_best(self, model: nn.Module, epoch: int, best_val: dict) -> None:
        if self.main:
            self.best = checkpoint_dict(model, self.cfg, epoch, best_val, self.extra, snapshot=True)
            self.best_unsaved = True

    def snapshot(self, elapsed_s: float) -> None:
        """The best model so far as ``snapshots/best_at_<M>min.pth`` once ``M`` minutes of training have passed
        (``cfg.snapshot_minutes``: the benchmark's Dice against training time, evaluated off the clock)."""
        while self.main and self.snapshots and elapsed_s >= self.snapshots[0] * 60 and self.best is not None:
            m = self.snapshots.pop(0)
            write_checkpoint(Path(self.best_path).parent / "snapshots" / f"best_at_{m:g}min.pth",
                             {**self.best, "elapsed_seconds": elapsed_s})

    def end_of_epoch(self, model: nn.Module, epoch: int, first: int, state: Callable[[], dict]) -> None:
        due = epoch in (first, self.cfg.epochs) or time.perf_counter() - self.last_write >= self.cfg.checkpoint_every
        if not (due and self.main):
            return
        if self.best_unsaved:
            write_checkpoint(self.best_path, self.best)
            self.best_unsaved = False
        if self.last_path:
            resume = state()
            save_checkpoint(self.last_path, model, self.cfg, epoch, resume["best_val"], {**self.extra, "resume": resume})
        self.saved_epoch, self.last_write = epoch, time.perf_counter()


def fit(model: nn.Module, train_data: Dataset, validate: Callable[[nn.Module], dict], cfg: TrainConfig,
        device: torch.device, precision: str, checkpoint_path: str | os.PathLike,
        augment: Callable | None = None, extra_checkpoint: dict | None = None,
        last_path: str | os.PathLike | None = None, resume: dict | None = None,
        dist_info: DistInfo | None = None, loss_fn: Callable = segmentation_loss,
        threads: ThreadPolicy | None = None) -> FitResult:
    """Train with Adam + ReduceLROnPlateau(val loss) or poly LR; keep the model with the best validation Dice.

    ``train_data`` yields (images, labels) batches through ``__getitems__`` (and may have ``set_epoch``);
    ``validate(model)`` returns ``{"loss": float, "summary": {"dice", "iou", "sensitivity", "precision", ...}}``.
    ``resume``: the ``"resume"`` entry of a ``last.pth``. ``threads``: re-checked before the first epoch and after
    each (automatic thread count on a machine others share). Batch order and augmentation are seeded per epoch, so
    a resumed run repeats exactly what the uninterrupted run would have done. Under torchrun each rank trains
    on its share of every epoch and rank 0 validates, saves and broadcasts its result.
    """
    dist = dist_info or DistInfo()
    model.to(device)
    if cfg.channels_last:
        to_channels_last(model, model.args.dim)
    net, sampler = dist.wrap(model, train_data, cfg.seed, device)
    optimizer, scaler = make_optimizer(model, cfg.lr), make_grad_scaler(device, precision)
    scheduler = make_scheduler(optimizer, cfg)
    loader = make_loader(train_data, cfg.batch_size, True, cfg.seed, cfg.num_workers, sampler)
    res = FitResult(history={k: [] for k in HISTORY_KEYS})
    best_key, start, spent, cpu_spent = _restore(resume, optimizer, scheduler, scaler, res)
    t_start, cpu_start = time.perf_counter() - spent, time.process_time() - cpu_spent
    pace = (Pace(cfg.time_budget * 60, cfg.schedule_changes, cfg.epochs_planned)
            if cfg.time_budget or cfg.schedule_changes else None)
    if pace:
        pace.start(spent)
    writer = CheckpointWriter(checkpoint_path, last_path, cfg, extra_checkpoint, dist.main)
    writer.saved_epoch = start - 1

    def state() -> dict:  # everything --resume needs, read when a write is due
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": res.history,
                "best_epoch": res.best_epoch, "best_val": res.best_val, "best_key": list(best_key), "epoch": epoch,
                "train_seconds": time.perf_counter() - t_start, "train_cpu_seconds": time.process_time() - cpu_start,
                "rng": rng_state(), "grad_scaler": scaler.state_dict() if scaler.is_enabled() else {}}

    epoch = start - 1
    threads = threads or ThreadPolicy(cfg.threads)
    threads.update()
    try:
        while epoch < cfg.epochs:  # not a range: the time budget may shorten cfg.epochs on the way
            epoch += 1
            t0, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
            _seed_epoch(loader, train_data, sampler, augment, cfg.seed, epoch)
            train_loss = dist.mean(train_one_epoch(net, loader, optimizer, device, precision, cfg.channels_last,
                                                   f"Epoch {epoch}/{cfg.epochs}", cfg.progress and dist.main, augment,
                                                   scaler, loss_fn, pace.stop_step(epoch) if pace else None), device)
            val = dist.from_main(validate(model) if dist.main else None)
            if cfg.lr_schedule == "plateau":
                scheduler.step(val["loss"])
            else:
                scheduler.step()
            s = val["summary"]
            _record(res.history, epoch, train_loss, val, lr, time.perf_counter() - t0)
            if (s["dice"], -val["loss"]) > best_key:  # best validation Dice, ties broken by lower validation loss
                best_key, res.best_epoch = (s["dice"], -val["loss"]), epoch
                res.best_val = {"val_loss": val["loss"], **{k: v for k, v in s.items() if k != "per_class"}}
                writer.new_best(model, epoch, res.best_val)
            if pace:
                pace.after_epoch(epoch, time.perf_counter() - t0, cfg)
            threads.update()
            writer.end_of_epoch(model, epoch, start, state)
            writer.snapshot(time.perf_counter() - t_start)
            if dist.main:
                log.info("Epoch %2d | Train: %.4f | Val: %.4f | Dice: %.4f | IoU: %.4f | lr %.1e | %.1fs%s%s", epoch,
                         train_loss, val["loss"], s["dice"], s["iou"], lr, time.perf_counter() - t0,
                         " *" if res.best_epoch == epoch else "", f" | {pace.progress(cfg, epoch)}" if pace else "")
    except KeyboardInterrupt:
        where = f"{last_path} holds epoch {writer.saved_epoch}" if last_path and writer.saved_epoch >= 1 else "no epoch was saved"
        raise TrainingInterrupted(f"training interrupted during epoch {epoch}; {where}. "
                                  f"Resume with the same command plus --resume") from None
    res.train_seconds, res.train_cpu_seconds = time.perf_counter() - t_start, time.process_time() - cpu_start
    res.schedule_changes = list(pace.changes if pace and pace.replay is None else cfg.schedule_changes or [])
    return res


def _restore(resume: dict | None, optimizer, scheduler, scaler, res: FitResult) -> tuple:
    """Load a ``last.pth``'s training state; returns (best key, first epoch, seconds and CPU seconds spent)."""
    if not resume:
        return (-math.inf, -math.inf), 1, 0.0, 0.0
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    if resume.get("grad_scaler"):
        scaler.load_state_dict(resume["grad_scaler"])
    res.history, res.best_epoch, res.best_val = resume["history"], resume["best_epoch"], resume["best_val"]
    set_rng_state(resume["rng"])
    log.info("resuming after epoch %d (best epoch %d)", resume["epoch"], res.best_epoch)
    return tuple(resume["best_key"]), resume["epoch"] + 1, resume["train_seconds"], resume.get("train_cpu_seconds", 0.0)


def _seed_epoch(loader: DataLoader, data: Dataset, sampler, augment, seed: int, epoch: int) -> None:
    """Batch order, patch sampling and augmentation of this epoch depend on (seed, epoch) only, whatever came
    before: what makes a resumed run equal an uninterrupted one."""
    loader.generator.manual_seed(seed * 100_003 + epoch)
    for obj in (data, sampler):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
    if hasattr(augment, "reseed"):
        augment.reseed(seed * 100_003 + epoch)


def _record(history: dict, epoch: int, train_loss: float, val: dict, lr: float, seconds: float) -> None:
    s = val["summary"]
    for k, v in zip(HISTORY_KEYS, (epoch, train_loss, val["loss"], s["dice"], s["iou"], s["sensitivity"],
                                   s["precision"], lr, seconds)):
        history[k].append(v)

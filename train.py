"""Training: config, data splits, the epoch loop, evaluation and self-describing checkpoints.

The loop fits on a screen (:func:`fit`). Everything the loop needs arrives as arguments: a model, the
train/validation arrays and a :class:`TrainConfig`. The test split is never seen here: the checkpoint
is chosen on validation Dice and the LR scheduler steps on validation loss.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import pickle
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from errors import CheckpointError, ConfigError, MedSegError
from metrics import logits_to_labels, per_case_scores, segmentation_loss, summarize
from model import UNet, UNetArgs

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "medseg-unet/1"
LR_SCHEDULES = ("plateau", "poly")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: width and learning rate of runs that leave them at None, by task (measured, see the README's performance
#: section): on the post's threshold-solvable ``seed`` preset a 16-wide U-Net at 3e-3 reaches the same test Dice
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
    batch_size: int = 8
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

    def __post_init__(self) -> None:
        task = "seed" if self.difficulty == "seed" and not self.real_data else "other"
        for name, value in TASK_DEFAULTS[task].items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    @property
    def real_data(self) -> bool:
        """True when the run reads a dataset (``--data`` / ``--images-dir``) instead of generating images."""
        return bool(self.data or self.images_dir)

    def validate(self) -> None:
        """Raise :class:`ConfigError` listing every invalid value at once."""
        problems = []
        if self.threads < 0:
            problems.append(f"--threads must be >= 0 (got {self.threads})")
        if not self.checkpoint_every >= 0:
            problems.append(f"--checkpoint-every must be >= 0 seconds (got {self.checkpoint_every})")
        for name in ("epochs", "num_samples", "base_channels", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.image_size < 16:
            problems.append(f"--image-size must be >= 16 (got {self.image_size})")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0 (got {self.lr})")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            problems.append("val_fraction and test_fraction must be in [0, 1) and sum to < 1")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)} (got {self.lr_schedule!r})")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Rebuild from a checkpoint's ``config`` (unknown keys from other versions are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------- environment
def tune_allocator() -> bool:
    """Keep freed tensor memory in the process instead of handing it back to the OS (glibc only).

    Why: glibc returns every freed block above 128 kB to the kernel, so each training step's activations
    come back as fresh pages that the kernel must fault in and zero: 300 000-590 000 page faults and up
    to 1 s of system time in a default run (``/usr/bin/time -v python run.py``). Raising the mmap
    threshold to its maximum (32 MB) and the trim threshold to 1 GB (both are needed: either alone makes
    it worse) cuts that to 110 000; ``bench.py``'s default run goes from 12.1 to 11.7 s wall (12.7 ->
    12.5 s in a second run); peak memory is unchanged. Intel's PyTorch CPU guide gets the same with
    jemalloc or tcmalloc. Returns False where there is no glibc ``mallopt`` (macOS, Windows, musl) or the environment
    sets ``MEDSEG_MALLOC_TUNING=0`` (to compare, or when preloading jemalloc / tcmalloc instead).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("MEDSEG_MALLOC_TUNING") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def set_seed(seed: int) -> None:
    """Seed Python, NumPy's legacy global RNG (for third-party code) and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; an explicit name that is unavailable is an error."""
    mps = getattr(torch.backends, "mps", None)
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": bool(mps and mps.is_available())}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if name not in available:
        raise ConfigError(f"unknown device {name!r} (expected auto, cpu, cuda or mps)")
    if not available[name]:
        raise ConfigError(f"device {name!r} was requested but is not available on this machine (try --device auto)")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """True where bf16 autocast is fast: CPUs with AVX512-BF16/AMX, CUDA GPUs with bf16 support."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.cpu._is_avx512_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``auto`` into ``bf16`` (where supported), ``fp16`` (CUDA GPUs without bf16, e.g. V100 / T4:
    fp16 tensor cores, trained with a GradScaler) or ``fp32``; refuse a precision the device lacks."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else ("fp16" if device.type == "cuda" else "fp32")
    if precision == "bf16" and not bf16_supported(device):
        raise ConfigError(f"--precision bf16 is not supported on {device} (use fp32 or auto)")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"--precision fp16 is for CUDA GPUs; on {device} use bf16 where supported, fp32 or auto")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast context for those precisions, else a no-op."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (its 5 exponent bits underflow small gradients); disabled (a no-op) otherwise:
    bf16 has fp32's exponent range."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


# ---------------------------------------------------------------------------------------- data
class ArrayDataset(Dataset):
    """In-memory (images (N, C, H, W) float32, labels (N, H, W) uint8), fetched a whole batch at a time.

    ``__getitems__`` lets the DataLoader slice a batch in one tensor op instead of N Python calls.
    Module-level and free of lambdas, so it pickles into worker processes on Windows too.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dim() != 4 or labels.dim() != 3 or images.shape[0] != labels.shape[0] or images.shape[2:] != labels.shape[1:]:
            raise ValueError(f"expected images (N, C, H, W) and labels (N, H, W), got {tuple(images.shape)} and {tuple(labels.shape)}")
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
def build_model(model_args: dict | UNetArgs) -> UNet:
    """Rebuild a U-Net from its ``model_args``."""
    args = model_args if isinstance(model_args, UNetArgs) else UNetArgs(**model_args)
    return UNet(**asdict(args))


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def train_one_epoch(model: UNet, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device,
                    precision: str = "fp32", channels_last: bool = False, desc: str = "",
                    progress: bool = True, augment: Callable | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> float:
    """One pass over ``loader``; returns the mean training loss per image. ``scaler``: fp16's GradScaler
    (a step whose scaled gradients overflow is skipped and the scale halved)."""
    model.train()
    total, count = 0.0, 0
    with tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch") as bar:
        for images, labels in bar:
            if augment is not None:
                images, labels = augment(images, labels)
            images, labels = _to_device(images, device, channels_last), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, precision):
                logits = model(images)
            loss = segmentation_loss(logits, labels)
            if scaler is not None and scaler.is_enabled():
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            total += loss.item() * len(images)
            count += len(images)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / max(count, 1)


@torch.inference_mode()
def predict_logits(model: UNet, images: torch.Tensor, batch_size: int, device: torch.device,
                   precision: str = "fp32", channels_last: bool = False) -> torch.Tensor:
    """Logits (N, C, H, W) in fp32 on the CPU for in-memory ``images`` (N, C, H, W)."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        with autocast(device, precision):
            out.append(model(_to_device(images[i:i + batch_size], device, channels_last)).float().cpu())
    return torch.cat(out)


def evaluate(model: UNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
             precision: str = "fp32", channels_last: bool = False, threshold: float = 0.5) -> dict:
    """Loss and per-image scores on a split. Returns ``{"loss", "scores", "summary", "pred"}``.

    Binary models: scores of the foreground; multi-class: scores per class (``scores[c]``) and the
    summary's ``dice``/``iou``/... are the means over foreground classes.
    """
    logits = predict_logits(model, images, batch_size, device, precision, channels_last)
    loss = float(segmentation_loss(logits, labels).item())
    pred = logits_to_labels(logits, threshold)
    n_classes = logits.size(1)
    if n_classes == 1:
        scores = per_case_scores(pred, labels > 0)
        summary = summarize(scores)
    else:
        scores = {c: per_case_scores(pred == c, labels == c) for c in range(1, n_classes)}
        per_class = {c: summarize(s) for c, s in scores.items()}
        summary = {k: float(np.nanmean([pc[k] for pc in per_class.values()])) for k in ("dice", "iou", "sensitivity", "precision")}
        summary["per_class"] = per_class
    return {"loss": loss, "scores": scores, "summary": summary, "pred": pred}


# -------------------------------------------------------------------------------- checkpoints
def checkpoint_dict(model: UNet, config: TrainConfig, epoch: int, metrics: dict, extra: dict | None = None,
                    snapshot: bool = False) -> dict:
    """The self-describing checkpoint (model args, weights, config, epoch, metrics, ``extra``).

    ``snapshot=True`` copies every tensor, so the dict stays as it is while training goes on (the best
    model so far, held until :func:`fit` writes it); otherwise the weights are shared with the model.
    """
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model_args": model.model_args,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": asdict(config),
        "epoch": int(epoch),
        "metrics": _plain(metrics),
        "torch_version": str(torch.__version__),
    }
    if extra:
        ckpt.update(_plain(extra))
    return copy.deepcopy(ckpt) if snapshot else ckpt


def save_checkpoint(path: str | os.PathLike, model: UNet, config: TrainConfig, epoch: int,
                    metrics: dict, extra: dict | None = None) -> Path:
    """Write a self-describing checkpoint atomically (temp file in the same folder, fsync, rename).

    Holds only tensors and plain Python values, so ``torch.load(..., weights_only=True)`` reads it.
    """
    return write_checkpoint(path, checkpoint_dict(model, config, epoch, metrics, extra))


def write_checkpoint(path: str | os.PathLike, ckpt: dict) -> Path:
    """Write a :func:`checkpoint_dict` atomically, creating the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save(ckpt, path)
    return path


def _atomic_torch_save(obj: dict, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path`` (never a half-written file)."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def update_checkpoint(path: str | os.PathLike, **fields) -> None:
    """Add plain fields (e.g. the test metrics measured after training) to a checkpoint, atomically."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt.update(_plain(fields))
    _atomic_torch_save(ckpt, path)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[UNet, dict]:
    """Load a checkpoint safely (``weights_only=True``) and rebuild its model from the file alone."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (train one with `python run.py`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a Python object: never run it
        lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln or "Unsupported operand" in ln]
        detail = lines[0].replace("WeightsUnpickler error: ", "")[:160] if lines else "arbitrary Python objects"
        raise CheckpointError(f"{path}: refused to load: the file holds Python objects that could run code "
                              f"when unpickled ({detail}); only weights-only medseg checkpoints are accepted") from exc
    except Exception as exc:  # corrupt, truncated or not a torch file at all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable medseg checkpoint, the file is corrupt or of another kind ({first[:160]})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format", "no 'format' key") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: expected a checkpoint of format {CHECKPOINT_FORMAT!r}, found {found!r}")
    try:
        model = build_model(ckpt["model_args"])
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: weights do not match the U-Net described by its model_args ({msg[:200]})") from exc
    return model.to(device).eval(), ckpt


def _plain(obj):
    """Convert NumPy scalars/arrays and paths to plain Python values (JSON- and weights_only-safe)."""
    if isinstance(obj, dict):
        return {(k if isinstance(k, (int, str)) else str(k)): _plain(v) for k, v in obj.items()}  # int keys: optimizer state
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ------------------------------------------------------------------------------------ the loop
class TrainingInterrupted(MedSegError):
    """Ctrl-C during training; ``last.pth`` holds the last completed epoch."""


@dataclass
class DistInfo:
    """torchrun / DistributedDataParallel context (world_size 1 = a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class FitResult:
    history: dict[str, list] = field(default_factory=dict)
    best_epoch: int = 0
    best_val: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0  # CPU time of this process (all threads): independent of other jobs


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


class EagerAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (same update, same state dict) with two costs of eager CPU training removed.

    * Channels_last 4-D tensors reach the kernel as plain contiguous views. The fused CPU kernel calls
      ``grad.contiguous()``, which for a channels_last gradient copies every convolution's gradient on
      every step (``bench.py``'s levers at the post's settings, base 64 batch 4: 23.4 -> 21.7 ms/image).
      ``permute(0, 2, 3, 1)`` of a channels_last tensor is contiguous and shares its memory, and Adam
      is elementwise, so updating the permuted views is the same update.
    * ``step`` skips ``Adam.step``'s wrapper, which imports ``torch._dynamo`` (0.65-0.84 s, 5-7 % of a default
      run) to mark graph breaks for ``torch.compile``; this step is never compiled. Like the wrapper, it
      runs the update under ``no_grad``. See also :func:`_skip_dynamo_import`.
    """

    def step(self, closure=None):
        with torch.no_grad():
            return torch.optim.Adam.step.__wrapped__(self, closure)

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        has_complex = super()._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if group["amsgrad"] else [])
        for i in range(len(params)):
            tensors = [lst[i] for lst in lists]
            if all(t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
                   for t in tensors):
                for lst, t in zip(lists, tensors):
                    lst[i] = t.permute(0, 2, 3, 1)
        return has_complex


def _skip_dynamo_import() -> None:
    """Let ``torch.optim`` run without importing ``torch._dynamo`` (0.65-0.84 s of a 12 s default run).

    Why: ``Optimizer.__init__`` / ``zero_grad`` / ``state_dict`` / ``load_state_dict`` are wrapped by
    ``torch._disable_dynamo``, whose first call imports the whole compiler stack only to mark the
    method "do not trace"; the wrapper caches its answer on the method as ``__dynamo_disable``. Our
    training step is never compiled, so that cache is filled with the plain method. Does nothing when
    ``torch._dynamo`` is already loaded (``torch.compile`` in use) or the wrapper looks different.
    """
    import sys

    if "torch._dynamo" in sys.modules:
        return
    for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict"):
        wrapper = getattr(torch.optim.Optimizer, name, None)
        plain = getattr(wrapper, "__wrapped__", None)
        code = getattr(wrapper, "__code__", None)
        ours_to_fill = plain is not None and code is not None and code.co_filename.endswith("_compile.py")
        if ours_to_fill and getattr(plain, "__dynamo_disable", None) is None:
            setattr(plain, "__dynamo_disable", plain)


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel where this torch has one for the parameters' device (CPU, CUDA, MPS).

    Why: PyTorch's default CPU Adam updates the parameters tensor by tensor; the fused kernel does it in
    one pass (``bench.py``'s training levers: per-tensor vs fused Adam). :class:`EagerAdam` spares
    the kernel a copy of every channels_last gradient and the process an import of the compiler.
    Elsewhere it falls back to plain (per-tensor) Adam.
    """
    _skip_dynamo_import()
    params = list(model.parameters())
    try:
        return EagerAdam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device / dtype / torch
        return EagerAdam(params, lr=lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """``plateau`` (the post's): halve the LR after ``lr_patience`` epochs without a lower validation loss.
    ``poly`` (nnU-Net's): LR x (1 - done/epochs)^0.9 after each epoch, so a fixed budget ends at a small LR
    whatever the validation noise; better when the epoch budget, not convergence, ends the run."""
    if cfg.lr_schedule == "poly":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: max(0.0, 1 - done / cfg.epochs) ** 0.9)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.lr_factor,
                                                      patience=cfg.lr_patience)


def fit(model: UNet, train_data: Dataset, validate: Callable[[UNet], dict], cfg: TrainConfig,
        device: torch.device, precision: str, checkpoint_path: str | os.PathLike,
        augment: Callable | None = None, extra_checkpoint: dict | None = None,
        last_path: str | os.PathLike | None = None, resume: dict | None = None,
        dist_info: DistInfo | None = None) -> FitResult:
    """Train with Adam + ReduceLROnPlateau(val loss) or poly LR; save the best-validation-Dice model atomically.

    ``train_data`` yields (images, labels) batches through ``__getitems__`` (and may have ``set_epoch``);
    ``validate(model)`` returns ``{"loss": float, "summary": {"dice", "iou", "sensitivity", "precision", ...}}``.
    ``last_path``: everything needed to continue (``resume`` = its ``"resume"`` entry), written after the
    first and the last epoch and whenever ``cfg.checkpoint_every`` seconds have passed since the previous
    write; the best checkpoint is written at the same moments (held in memory in between), so the two
    files always agree. Why not every epoch: serialising weights + Adam state every epoch made
    ``bench.py``'s default run 12.5 instead of 11.7 s, and a crash loses at most ``checkpoint_every``
    seconds of training. Batch order and
    augmentation are seeded per epoch, so a resumed run repeats
    exactly what the uninterrupted run would have done. Under torchrun (``dist_info.world_size > 1``)
    the model is wrapped in DistributedDataParallel, each rank trains on its share of every epoch,
    losses are averaged over ranks, and rank 0 validates, saves and broadcasts its decision.
    """
    dist_info = dist_info or DistInfo()
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    sampler = None
    if dist_info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data.distributed import DistributedSampler

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        sampler = DistributedSampler(train_data, dist_info.world_size, dist_info.rank, shuffle=True, seed=cfg.seed)
    optimizer = make_optimizer(model, cfg.lr)
    scheduler = make_scheduler(optimizer, cfg)
    scaler = make_grad_scaler(device, precision)
    loader = make_loader(train_data, cfg.batch_size, True, cfg.seed, cfg.num_workers, sampler)
    gen = loader.generator
    res = FitResult(history={k: [] for k in ("epoch", "train_loss", "val_loss", "val_dice", "val_iou",
                                             "val_sensitivity", "val_precision", "lr", "seconds")})
    best_key = (-math.inf, -math.inf)
    start, spent = 1, 0.0
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume.get("grad_scaler"):
            scaler.load_state_dict(resume["grad_scaler"])
        res.history, res.best_epoch, res.best_val = resume["history"], resume["best_epoch"], resume["best_val"]
        best_key, start, spent = tuple(resume["best_key"]), resume["epoch"] + 1, resume["train_seconds"]
        set_rng_state(resume["rng"])
        log.info("resuming after epoch %d (best epoch %d)", resume["epoch"], res.best_epoch)
    t_start = time.perf_counter() - spent
    cpu_start = time.process_time() - (resume or {}).get("train_cpu_seconds", 0.0)
    epoch = start - 1
    saved_epoch, last_write, best_unsaved = start - 1, time.perf_counter(), None
    try:
        for epoch in range(start, cfg.epochs + 1):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            gen.manual_seed(cfg.seed * 100_003 + epoch)  # batch order of this epoch, whatever came before
            for obj in (train_data, sampler):
                if hasattr(obj, "set_epoch"):
                    obj.set_epoch(epoch)
            if hasattr(augment, "reseed"):
                augment.reseed(cfg.seed * 100_003 + epoch)
            train_loss = train_one_epoch(net, loader, optimizer, device, precision, cfg.channels_last,
                                         desc=f"Epoch {epoch}/{cfg.epochs}", progress=cfg.progress and dist_info.main,
                                         augment=augment, scaler=scaler)
            train_loss = _mean_over_ranks(train_loss, dist_info, device)
            val = validate(model) if dist_info.main else None
            if dist_info.world_size > 1:  # every rank takes rank 0's validation, so all schedulers agree
                box = [val]
                torch.distributed.broadcast_object_list(box, src=0)
                val = box[0]
            if cfg.lr_schedule == "plateau":
                scheduler.step(val["loss"])
            else:
                scheduler.step()
            s = val["summary"]
            for k, v in (("epoch", epoch), ("train_loss", train_loss), ("val_loss", val["loss"]), ("val_dice", s["dice"]),
                         ("val_iou", s["iou"]), ("val_sensitivity", s["sensitivity"]), ("val_precision", s["precision"]),
                         ("lr", lr), ("seconds", time.perf_counter() - t0)):
                res.history[k].append(v)
            key = (s["dice"], -val["loss"])
            if key > best_key:  # best validation Dice, ties broken by lower validation loss
                best_key, res.best_epoch = key, epoch
                res.best_val = {"val_loss": val["loss"], **{k: v for k, v in s.items() if k != "per_class"}}
                if dist_info.main:  # held in memory until the next write, so the two files always agree
                    best_unsaved = checkpoint_dict(model, cfg, epoch, res.best_val, extra_checkpoint, snapshot=True)
            due = epoch in (start, cfg.epochs) or time.perf_counter() - last_write >= cfg.checkpoint_every
            if due and dist_info.main:
                if best_unsaved is not None:
                    write_checkpoint(checkpoint_path, best_unsaved)
                    best_unsaved = None
                if last_path:
                    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "history": res.history, "best_epoch": res.best_epoch, "best_val": res.best_val,
                             "best_key": list(best_key), "epoch": epoch, "train_seconds": time.perf_counter() - t_start,
                             "train_cpu_seconds": time.process_time() - cpu_start, "rng": rng_state(),
                             "grad_scaler": scaler.state_dict() if scaler.is_enabled() else {}}
                    save_checkpoint(last_path, model, cfg, epoch, res.best_val, {**(extra_checkpoint or {}), "resume": state})
                saved_epoch, last_write = epoch, time.perf_counter()
            if dist_info.main:
                log.info("Epoch %2d | Train: %.4f | Val: %.4f | Dice: %.4f | IoU: %.4f | lr %.1e | %.1fs%s",
                         epoch, train_loss, val["loss"], s["dice"], s["iou"], lr, time.perf_counter() - t0,
                         " *" if res.best_epoch == epoch else "")
    except KeyboardInterrupt:
        where = f"{last_path} holds epoch {saved_epoch}" if last_path and saved_epoch >= 1 else "no epoch was saved"
        raise TrainingInterrupted(f"training interrupted during epoch {epoch}; {where}. "
                                  f"Resume with the same command plus --resume") from None
    res.train_seconds = time.perf_counter() - t_start
    res.train_cpu_seconds = time.process_time() - cpu_start
    return res


def _mean_over_ranks(value: float, dist_info: DistInfo, device: torch.device) -> float:
    if dist_info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / dist_info.world_size

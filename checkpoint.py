"""Self-describing checkpoints: save, update and load, with the whole schema checked once, at load.

A checkpoint is a dict of tensors and plain Python values (so ``torch.load(..., weights_only=True)`` reads
it and never runs pickled code):

    format          "medseg-unet/1"
    model_args      the U-Net's constructor arguments (``model.UNetArgs``)
    state_dict      the weights
    config          the training configuration (``train.TrainConfig`` as a dict)
    epoch, metrics  the epoch it was taken at and its validation scores
    preprocessing   how raw arrays become network input (``preprocess.Preprocessing``), when trained on data
    ...             anything the run adds (test metrics, post-processing choice, split, resume state)

Every reader of a model file (training's test phase, ``--resume``, ``predict.py``, the demo page, the
benchmark) goes through :func:`load_checkpoint`.
"""
from __future__ import annotations

import copy
import os
import pickle
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from errors import CheckpointError
from fileio import atomic_write
from model import UNet, UNetArgs, pool_factors
from preprocess import Preprocessing

CHECKPOINT_FORMAT = "medseg-unet/1"
MAX_WIDTH = 4096  # channels: a larger value in model_args is a corrupt or hostile file, not a model


def plain(obj: Any) -> Any:
    """NumPy scalars / arrays and paths as plain Python values; tensors kept (``weights_only``-safe)."""
    if isinstance(obj, dict):
        return {(k if isinstance(k, (int, str)) else str(k)): plain(v) for k, v in obj.items()}  # int keys: optimizer
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def checkpoint_dict(model: UNet, config: Any, epoch: int, metrics: dict, extra: dict | None = None,
                    snapshot: bool = False) -> dict:
    """The checkpoint of ``model`` (``config`` is a dataclass or a dict).

    ``snapshot=True`` copies every tensor, so the dict stays as it is while training goes on; otherwise the
    weights are shared with the model.
    """
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model_args": model.model_args,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": asdict(config) if is_dataclass(config) else dict(config),
        "epoch": int(epoch),
        "metrics": plain(metrics),
        "torch_version": str(torch.__version__),
    }
    if extra:
        ckpt.update(plain(extra))
    return copy.deepcopy(ckpt) if snapshot else ckpt


def write_checkpoint(path: str | os.PathLike, ckpt: dict) -> Path:
    """Write a checkpoint dict atomically (a reader never sees a half-written file), creating the folder."""
    path = Path(path)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, ".tmp", save)


def save_checkpoint(path: str | os.PathLike, model: UNet, config: Any, epoch: int, metrics: dict,
                    extra: dict | None = None) -> Path:
    """:func:`checkpoint_dict` written by :func:`write_checkpoint`."""
    return write_checkpoint(path, checkpoint_dict(model, config, epoch, metrics, extra))


def update_checkpoint(path: str | os.PathLike, **more: Any) -> None:
    """Add plain fields (e.g. the test metrics measured after training) to a checkpoint, atomically."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    ckpt.update(plain(more))
    write_checkpoint(path, ckpt)


def build_model(model_args: dict | UNetArgs) -> UNet:
    """Rebuild a U-Net from its ``model_args``."""
    args = model_args if isinstance(model_args, UNetArgs) else UNetArgs(**model_args)
    return UNet(**asdict(args))


# ------------------------------------------------------------------------------------- loading
def _read(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found (train one with `python run.py`)")
    if not path.is_file():
        raise CheckpointError(f"{path}: is not a file (expected a .pth checkpoint written by run.py)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text:  # weights_only refused a class or function to call: never run it
            found = next((ln.strip() for ln in text.splitlines() if "Unsupported" in ln), "")
            raise CheckpointError(f"{path}: refused to load: the file holds Python objects that could run code when "
                                  f"unpickled ({found.replace('WeightsUnpickler error: ', '')[:160]}); expected a "
                                  "weights-only medseg checkpoint") from None
        raise CheckpointError(f"{path}: not a checkpoint (the file is corrupt or of another kind; expected a .pth "
                              "written by run.py)") from None
    except Exception as exc:  # truncated zip, random bytes, a folder's worth of nonsense
        raise CheckpointError(f"{path}: not a checkpoint (the file is corrupt or of another kind: "
                              f"{type(exc).__name__}; expected a .pth written by run.py)") from None


def schema_problem(ckpt: Any) -> str | None:
    """What is wrong with a loaded checkpoint's structure (None when it is a valid medseg checkpoint)."""
    if not isinstance(ckpt, dict):
        return f"expected a checkpoint of format {CHECKPOINT_FORMAT!r}, found a {type(ckpt).__name__}"
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        return f"expected a checkpoint of format {CHECKPOINT_FORMAT!r}, found {ckpt.get('format', 'no format key')!r}"
    args = ckpt.get("model_args")
    if not isinstance(args, dict) or set(args) - {f.name for f in fields(UNetArgs)}:
        return f"model_args is {str(args)[:80]!r}, expected the keys of model.UNetArgs"
    for key in ("n_channels", "n_classes", "base_channels"):
        v = args.get(key, 1)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_WIDTH:
            return f"model_args.{key} is {v!r}, expected an integer in 1..{MAX_WIDTH}"
    if args.get("dim", 2) not in (2, 3) or not isinstance(args.get("bilinear", True), bool):
        return f"model_args dim / bilinear are {args.get('dim')!r} / {args.get('bilinear')!r}, expected 2 or 3 / a bool"
    try:
        pool_factors(args.get("dim", 2), args.get("pool"))
    except (TypeError, ValueError):
        return f"model_args.pool is {args.get('pool')!r}, expected 4 levels of pooling factors"
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "state_dict is missing or holds non-tensors, expected the network's weights"
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        return f"weights hold NaN or infinite values ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    for key in ("config", "metrics", "preprocessing", "postprocessing"):
        if key in ckpt and not isinstance(ckpt[key], dict):
            return f"{key} is a {type(ckpt[key]).__name__}, expected a dict"
    return None


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[UNet, dict]:
    """Load a checkpoint safely (``weights_only=True``), check its whole schema and rebuild its model.

    Raises :class:`errors.CheckpointError` with one line naming the file for a missing, corrupt, foreign,
    unsafe or inconsistent checkpoint (NaN weights and an unusable preprocessing record included).
    """
    path = Path(path)
    ckpt = _read(path)
    problem = schema_problem(ckpt)
    if problem:
        raise CheckpointError(f"{path}: not a usable medseg checkpoint: {problem}")
    try:
        model = build_model(ckpt["model_args"])
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: weights do not match the U-Net described by its model_args ({msg[:200]})") from None
    if "preprocessing" in ckpt:
        preprocessing_of(ckpt, path)  # refuse an unusable record now, not at the first input
    return model.to(device).eval(), ckpt


def preprocessing_of(ckpt: dict, path: str | os.PathLike = "checkpoint") -> tuple[Preprocessing, list[str]]:
    """The checkpoint's :class:`Preprocessing`, checked against its network; a checkpoint from before the record
    existed gets the synthetic default (8-bit images / 255, patch = training image size) and a warning."""
    args = ckpt.get("model_args") or {}
    if "preprocessing" not in ckpt:
        n_classes = int(args.get("n_classes", 1))
        names = ["lesion"] if n_classes == 1 else [f"class {k}" for k in range(1, n_classes)]
        size = (ckpt.get("config") or {}).get("image_size", 64)
        prep = Preprocessing(normalization="unit", in_channels=int(args.get("n_channels", 1)),
                             patch_size=size if isinstance(size, int) and size >= 16 else 64, class_names=names)
        return prep, [f"{Path(path).name}: no preprocessing record in the checkpoint (older version); assuming 8-bit "
                      f"images scaled by 1/255 and {prep.patch_size}-px patches as in synthetic training"]
    try:
        prep = Preprocessing.from_dict(ckpt["preprocessing"])
        prep.validate()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unusable preprocessing record ({' '.join(str(exc).split())[:200]})") from None
    if int(args.get("n_channels", 1)) != prep.in_channels:
        raise CheckpointError(f"{path}: the network takes {args.get('n_channels')} input channels but its "
                              f"preprocessing record says {prep.in_channels}")
    if int(args.get("n_classes", 1)) != prep.model_out_channels:
        raise CheckpointError(f"{path}: the network has {args.get('n_classes')} outputs but its preprocessing "
                              f"record names {prep.n_classes} class(es) ({', '.join(map(str, prep.class_names))})")
    return prep, []

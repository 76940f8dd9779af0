"""Where and how tensors are computed: device, numeric precision, autocast, memory layout and CPU threads.

Training (``train.py``), inference (``inference.py``), ``predict.py`` and the demo page all take these
decisions through this module, so a model is run the same way wherever it runs.
"""
from __future__ import annotations

import contextlib

import torch

from errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; an explicit name that is unavailable is an error."""
    mps = getattr(torch.backends, "mps", None)
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": bool(mps and mps.is_available())}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if name not in available:
        raise ConfigError(f"unknown device {name!r} (expected one of {', '.join(DEVICES)})")
    if not available[name]:
        raise ConfigError(f"device {name!r} was requested but is not available on this machine (try --device auto)")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """True where bf16 autocast is fast: CPUs with AVX512-BF16 or AMX, CUDA GPUs with bf16 support."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        caps = getattr(torch.cpu, "get_capabilities", None)  # public since torch 2.10; older: fp32
        flags = caps() if caps is not None else {}
        return bool(torch.backends.mkldnn.is_available() and (flags.get("avx512_bf16") or flags.get("amx_bf16")))
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``auto`` into ``bf16`` (where supported), ``fp16`` (CUDA GPUs without bf16, e.g. V100 / T4, trained
    with a GradScaler) or ``fp32``; refuse a precision the device lacks."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r} (expected one of {', '.join(PRECISIONS)})")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else ("fp16" if device.type == "cuda" else "fp32")
    if precision == "bf16" and not bf16_supported(device):
        raise ConfigError(f"--precision bf16 is not supported on {device} (use fp32 or auto)")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"--precision fp16 is for CUDA GPUs; on {device} use bf16 where supported, fp32 or auto")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast for those precisions, else a no-op."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (its 5 exponent bits underflow small gradients); a no-op otherwise (bf16 has fp32's
    exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the channels-last layout of its rank (oneDNN's and cuDNN's fast layout for convolutions)."""
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def to_channels_last(model: torch.nn.Module, dim: int) -> torch.nn.Module:
    """Convert a model's 4D / 5D parameters to the channels-last layout of a ``dim``-D network."""
    return model.to(memory_format=torch.channels_last if dim == 2 else torch.channels_last_3d)


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` when ``threads > 0``; 0 keeps PyTorch's default (one per core)."""
    if threads > 0:
        torch.set_num_threads(threads)

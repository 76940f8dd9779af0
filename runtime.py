"""Where and how tensors are computed: device, numeric precision, autocast, memory layout and CPU threads.

Training (``train.py``), inference (``inference.py``), ``predict.py`` and the demo page all take these
decisions through this module, so a model is run the same way wherever it runs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

from errors import ConfigError

log = logging.getLogger(__name__)

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


def set_threads(threads: int) -> int:
    """``threads > 0``: exactly that many. 0 (automatic): one per core that other processes leave idle, measured
    now (:func:`busy_elsewhere`). Returns the count set."""
    n = threads if threads > 0 else auto_threads()
    torch.set_num_threads(n)
    return n


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells, else the machine's count)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return max(1, len(affinity(0)) if affinity else (os.cpu_count() or 1))


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (sum(fields) - idle) / hz, sum(fields) / hz


class LoadMeter:
    """How many CPUs other processes keep busy, measured between two calls (this process's own CPU time is
    subtracted from the machine's busy time, so the measurement does not count our own training)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._machine, self._own, self._wall = _cpu_times(), time.process_time(), time.perf_counter()

    def others(self) -> float | None:
        """CPUs busy with other processes since the last reset (None where the OS does not tell)."""
        now = _cpu_times()
        if now is None or self._machine is None:
            return None
        wall = time.perf_counter() - self._wall
        if wall < 0.05:  # the kernel counts in 10 ms ticks: a shorter window says nothing
            return None
        busy = now[0] - self._machine[0]
        own = time.process_time() - self._own
        return max(0.0, (busy - own) / wall)


def busy_elsewhere(window: float = 0.3) -> float | None:
    """CPUs other processes keep busy, sampled over ``window`` seconds (None where the OS does not tell)."""
    meter = LoadMeter()
    time.sleep(window)
    return meter.others()


def threads_for(others: float | None, cpus: int | None = None) -> int:
    """The thread count that leaves the busy CPUs to the processes using them: an OpenMP parallel region waits
    for its slowest thread, so a thread sharing a core with another busy process stalls every region."""
    cpus = cpus or usable_cpus()
    if others is None:
        return cpus
    return max(1, min(cpus, cpus - int(others + 0.5)))


def auto_threads(window: float = 0.3) -> int:
    """:func:`threads_for` of the load measured now."""
    return threads_for(busy_elsewhere(window))


class ThreadPolicy:
    """``threads > 0``: exactly that many, always (the same seed then gives the same metrics bit for bit).
    0: automatic: start with every usable CPU and, at each :meth:`update` (between epochs), use the CPUs other
    processes left idle since the previous one. Changing the count can change results in the last bits."""

    def __init__(self, threads: int = 0):
        # OMP_NUM_THREADS in the environment is the user's fixed choice too (torch has already applied it)
        self.auto = threads <= 0 and "OMP_NUM_THREADS" not in os.environ
        self.meter = LoadMeter() if self.auto else None
        if threads > 0:
            torch.set_num_threads(threads)
        elif self.auto:
            torch.set_num_threads(usable_cpus())

    def update(self) -> int:
        """Re-check the load (automatic mode) and set the thread count; returns it."""
        if self.auto:
            others = self.meter.others()
            n = threads_for(others)
            if n != torch.get_num_threads():
                log.info("CPU 线程 %d -> %d (其他进程占用约 %.1f 个 CPU)", torch.get_num_threads(), n, others or 0.0)
                torch.set_num_threads(n)
            self.meter.reset()
        return torch.get_num_threads()

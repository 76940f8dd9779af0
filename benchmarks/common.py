"""Running and recording: child processes with their wall time and peak memory, the reference script, our
default ``python run.py``, and the training record both pipelines are compared on.

Every timed pipeline runs in a fresh process (no warm caches, its own peak RSS from ``os.wait4``). ``root``
arguments name the checkout whose ``run.py`` / ``bench.py`` run, so another version of this project (``bench.py
--before DIR``) is measured in the same run, interleaved with this one.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import torch

import train
from runtime import bf16_supported
from train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TARGET_DICE = 0.95


def machine_info() -> dict:
    """CPU, core and thread counts, torch version, bf16 support and the current load average."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "bf16_autocast": bf16_supported(torch.device("cpu")), "load_average": loadavg()}


def loadavg() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


# ---------------------------------------------------------------------------------------- processes
@dataclass
class ProcResult:
    """One finished child process: exit code, wall seconds, its own peak RSS and its output."""

    returncode: int
    wall_s: float
    peak_rss_mb: float | None
    stdout: str
    stderr: str

    def last_json(self) -> dict | None:
        """The last stdout line that parses as a JSON object (the reference prints its results so)."""
        for line in reversed(self.stdout.strip().splitlines()):
            if line.lstrip().startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    return json.loads(line)
        return None


HAS_WAIT4 = hasattr(os, "wait4")  # not on Windows: no per-child peak RSS there


def run_process(cmd: list[str], cwd: str | os.PathLike | None = None, env: dict | None = None,
                timeout: float = 3600.0) -> ProcResult:
    """Run ``cmd``; measure its wall time and its own peak RSS (``os.wait4`` through ``peak_rss.py``, a small
    launcher, so the benchmark's own memory does not count; where the OS has ``wait4``)."""
    with tempfile.TemporaryDirectory(prefix="bench_rss_") as tmp, \
            tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        rss_file = Path(tmp) / "rss"
        launch = [sys.executable, str(Path(__file__).with_name("peak_rss.py")), str(rss_file)] if HAS_WAIT4 else []
        t0 = time.perf_counter()
        proc = subprocess.Popen([*launch, *cmd], cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if HAS_WAIT4:
                proc.terminate()  # the launcher kills the command on SIGTERM
            else:
                proc.kill()
            proc.wait()
        wall = time.perf_counter() - t0
        rss = None
        if HAS_WAIT4 and rss_file.is_file():
            rss = int(rss_file.read_text()) / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)
        out.seek(0)
        err.seek(0)
        return ProcResult(proc.returncode, wall, rss, out.read(), err.read())


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def check(res: ProcResult, what: str) -> None:
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed with exit code {res.returncode}:\n{tail}")


def read_json(path: Path) -> dict | None:
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads(path.read_text(encoding="utf-8"))
    return None


def timeit(fn: Callable[[], Any], min_seconds: float, max_iters: int = 50) -> float:
    """Median seconds per call after one warm-up call; at least 2 timed calls, about ``min_seconds`` in all."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    iters = int(max(2, min(max_iters, math.ceil(min_seconds / max(first, 1e-6)))))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_record(records: list[dict]) -> dict:
    """Field-wise median of numeric fields over repeats (other fields from the first record)."""
    if not records:
        return {}
    out = dict(records[0])
    for k, v in records[0].items():
        vals = [r.get(k) for r in records]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            out[k] = statistics.median(vals)
    out["repeats"] = len(records)
    return out


# ------------------------------------------------------------------------------- our training runs
def seconds_to_dice(val_dice: list[float], seconds: list[float], target: float = TARGET_DICE) -> tuple[int | None, float | None]:
    """(epoch, cumulative seconds) of the first epoch whose validation Dice reaches ``target``."""
    total = 0.0
    for epoch, (d, s) in enumerate(zip(val_dice, seconds), start=1):
        total += s
        if d is not None and d >= target:
            return epoch, total
    return None, None


def measure_training(cfg: TrainConfig) -> dict:
    """Run the whole synthetic pipeline in this process and time its training phase (forward + backward +
    step, the phase the reference's ``train_images_per_second`` counts) by wrapping ``train.train_one_epoch``."""
    import experiments

    phase = {"seconds": 0.0, "images": 0}
    original = train.train_one_epoch

    def timed(model, loader, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(model, loader, *args, **kwargs)
        finally:
            phase["seconds"] += time.perf_counter() - t0
            phase["images"] += len(loader.dataset)

    train.train_one_epoch = timed
    try:
        summary = experiments.run_synthetic(cfg)
    finally:
        train.train_one_epoch = original
    return training_record(summary, read_json(Path(cfg.output_dir) / "history.json") or {}, phase)


def training_record(summary: dict, history: dict, phase: dict | None = None) -> dict:
    """Test Dice, time to validation Dice 0.95 and training images/s of one run, from its JSON outputs."""
    val_dice, seconds = history.get("val_dice", []), history.get("seconds", [])
    epoch_hit, s_hit = seconds_to_dice(val_dice, seconds)
    fit_s = float(summary.get("train_seconds") or sum(seconds) or math.nan)
    n_epochs = len(seconds) or summary.get("epochs", 0)
    cfg = TrainConfig.from_dict(summary.get("config", {}))
    n_train = len(train.split_indices(cfg.num_samples, cfg.val_fraction, cfg.test_fraction, cfg.seed)["train"])
    rec = {"test_dice": summary.get("dice"), "best_val_dice": summary.get("best_val_dice"), "dtype": summary.get("dtype"),
           "cumulative_seconds": [float(x) for x in np.cumsum(seconds)], "epochs": n_epochs, "train_seconds": fit_s,
           "total_seconds": summary.get("total_seconds"), "val_dice_per_epoch": val_dice, "epoch_seconds": seconds,
           "first_epoch_at_target": epoch_hit, "seconds_to_target": s_hit,
           "train_images_per_second_incl_eval": n_train * n_epochs / fit_s if fit_s else None}
    if phase and phase["images"]:
        rec.update(train_phase_seconds=phase["seconds"], train_images=phase["images"],
                   train_images_per_second=phase["images"] / phase["seconds"])
    else:  # whole epochs (validation included)
        rec.update(train_phase_seconds=None, train_images=n_train * n_epochs,
                   train_images_per_second=rec["train_images_per_second_incl_eval"])
    return rec


def train_in_subprocess(cfg: TrainConfig, threads: int = 0, root: Path = ROOT) -> dict:
    """:func:`measure_training` in a fresh Python process of the checkout ``root`` (``bench.py --worker-train``),
    plus its wall time and peak RSS."""
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        cfg = replace(cfg, output_dir=str(Path(tmp) / "out"), checkpoint=str(Path(tmp) / "best.pth"), progress=False)
        cfg_path, out_path = Path(tmp) / "cfg.json", Path(tmp) / "result.json"
        cfg_path.write_text(json.dumps(asdict(cfg)))
        res = run_process([sys.executable, str(root / "bench.py"), "--worker-train", str(cfg_path),
                           "--worker-out", str(out_path), "--threads", str(threads)], cwd=root)
        check(res, f"training worker of {root} ({cfg.image_size}px, base {cfg.base_channels}, {cfg.precision})")
        rec = json.loads(out_path.read_text())
    rec.update(wall_s=res.wall_s, peak_rss_mb=res.peak_rss_mb)
    return rec


def run_default_pipeline(threads: int = 0, extra_args: list[str] | None = None, extra_env: dict | None = None,
                         root: Path = ROOT) -> dict:
    """The whole ``python run.py`` of the checkout ``root`` (defaults, outputs into a temporary folder): wall time,
    peak RSS, test Dice, time to validation Dice 0.95."""
    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, str(root / "run.py"), "--output-dir", str(out), "--checkpoint", str(Path(tmp) / "best.pth"),
               "--no-progress", *(extra_args or [])]
        res = run_process(cmd, cwd=tmp, env={**child_env(threads), **(extra_env or {})})
        check(res, f"python {root / 'run.py'}")
        summary, history = read_json(out / "summary.json") or {}, read_json(out / "history.json") or {}
    rec = training_record(summary, history)
    rec.update(wall_s=res.wall_s, peak_rss_mb=res.peak_rss_mb)
    return rec


# ------------------------------------------------------------------------------------ the reference
def load_reference(path: str | os.PathLike) -> ModuleType:
    """Import the reference script as a module (nothing of it runs: it guards ``main()``)."""
    spec = importlib.util.spec_from_file_location("seed_reference", Path(path))
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{path}: cannot import the reference script")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_reference(path: str | os.PathLike, settings: dict, threads: int = 0) -> dict:
    """The reference script in its own process with ``settings`` (its flag names): its JSON + wall + peak RSS."""
    cmd = [sys.executable, str(Path(path).resolve())]
    for k, v in settings.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    if threads > 0:
        cmd += ["--threads", str(threads)]
    with tempfile.TemporaryDirectory(prefix="bench_ref_") as tmp:
        res = run_process(cmd, cwd=tmp, env=child_env(threads))
    check(res, "reference script")
    rec = res.last_json() or {}
    rec.update(wall_s=res.wall_s, peak_rss_mb_wait4=res.peak_rss_mb)
    return rec

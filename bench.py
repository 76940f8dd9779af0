"""Speed benchmark of the medseg pipeline, optionally side by side with the original post's pipeline.

``python bench.py [--quick] [--baseline ../shared/bench/seed_reference.py] [--repeats 2] [--out bench_results]``

Measures our pipeline with the project's own functions (``run.run_synthetic``, ``train.fit`` /
``train.train_one_epoch``, ``train.evaluate`` pieces) and, with ``--baseline``, the reference script
in the same run, interleaved A B A B, then prints a table of ratios against the issue's targets and
writes ``<out>/bench.json`` and ``<out>/scaling.png``:

* training images/s at the post's settings (64x64, base 64, batch 4, 5 epochs, 200 samples), our fp32
  and our ``auto`` precision (bf16 where the CPU has it), with the final test Dice of each;
* seconds to the first validation Dice >= 0.95, and the wall time of the whole default ``python run.py``;
* inference ms/image at 256 and 512 px, batch 1 and 16, of the default model of ``python run.py`` for several
  execution variants (eager fp32, ``inference_mode`` + channels_last, BatchNorm folded, bf16, optional
  ``torch.compile`` and ONNX Runtime), next to the reference's base-64 fp32 latency, and at batch 1 of the
  real-data width (:data:`REAL_BASE`);
* peak RSS of a 256x256 training run of the post's model and batch (each pipeline in its own process, read
  with ``os.wait4``);
* achieved training GFLOP/s at 128x128 base 64 against a measured 3x3 convolution peak (fp32, bf16), and the
  time of the convolutions alone there and at the post's settings (the ceiling of the throughput ratio);
* the default run with its width / learning rate and its BatchNorm statistics taken away in turn, by seed;
* Dice of every reduced-precision inference variant against fp32 on the realistic synthetic preset
  and on a real data set (Kvasir-SEG, when its folder is present);
* time per epoch against image size and dataset size (``scaling.png``).

Timings on a shared 2-core machine are noisy: compare ratios from one run, not numbers across runs.
``bench.json`` records the load average before and after.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from metrics import logits_to_labels, per_case_scores, summarize
from model import UNet, conv_flops, fold_batchnorm
from train import ArrayDataset, TrainConfig, bf16_supported, make_loader, make_optimizer, train_one_epoch

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent
DEFAULT_REAL_DATA = ROOT.parent / "shared" / "data" / "kvasir_seg" / "Kvasir-SEG"
TARGET_DICE = 0.95
#: the original post's training settings (the reference script's flag names; its Adam runs at POST_LR)
POST = {"epochs": 5, "num_samples": 200, "image_size": 64, "base_channels": 64, "batch_size": 4}
POST_LR = 1e-3
#: the width of the second model timed for inference (batch 1): the realistic preset's and real data's default,
#: since 256 / 512 px slices are real scans; the targets use the default model of ``python run.py``
REAL_BASE = train.TASK_DEFAULTS["other"]["base_channels"]

Runner = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    """Every size the benchmark uses; :func:`make_plan` gives the full and the ``--quick`` one."""

    quick: bool = False
    model_base: int | None = None  # None: TrainConfig's default width (inference, scaling, precision checks)
    ref_base: int = 64  # the reference's width for its inference latency and scaling curve
    post: dict = field(default_factory=lambda: dict(POST))
    default_run_args: list[str] = field(default_factory=list)  # extra run.py flags (quick only)
    rss_size: int = 256  # the post's model and batch at this size, ours and the reference's
    rss_samples: int = 40
    infer_sizes: tuple[int, ...] = (256, 512)
    infer_batches: tuple[int, ...] = (1, 16)
    infer_min_seconds: float = 1.0
    peak_seconds: float = 1.0
    peak_shapes: tuple[tuple[int, int, int], ...] = ((8, 128, 64), (8, 256, 32), (16, 64, 64))  # (N, C, HxW)
    gflops_size: int = 128
    gflops_base: int = 64
    gflops_steps: int = 10
    gflops_batches: tuple[int, ...] = (8, 16, 32)  # the best batch is reported (the target does not fix one)
    scaling_sizes: tuple[int, ...] = (64, 128, 256, 512)
    scaling_images: dict = field(default_factory=lambda: {64: 140, 128: 64, 256: 24, 512: 8})
    scaling_dataset_sizes: tuple[int, ...] = (35, 70, 140, 280, 560)
    epoch_images: int = 140  # training images per epoch of the default config (200 samples, 70 %)
    lever_steps: int = 12
    extra_seeds: tuple[int, ...] = (0, 1, 2, 3)  # default run.py on these seeds too (seconds to 0.95 per seed)
    realistic: dict = field(default_factory=lambda: {"difficulty": "realistic", "num_samples": 400, "epochs": 12})
    real_images: int = 240
    real_size: int = 128
    real_epochs: int = 8


def make_plan(quick: bool) -> Plan:
    """The full plan, or a shrunken one that runs every code path in about a minute."""
    if not quick:
        return Plan()
    tiny = {"epochs": 1, "num_samples": 24, "image_size": 32, "base_channels": 8, "batch_size": 4}
    return Plan(quick=True, model_base=8, ref_base=8, post=tiny,
                default_run_args=["--epochs", "1", "--num-samples", "24", "--image-size", "32", "--base-channels", "8"],
                rss_size=64, rss_samples=12, infer_sizes=(64,), infer_batches=(1, 4), infer_min_seconds=0.1,
                peak_seconds=0.2, peak_shapes=((4, 64, 32),), gflops_size=32, gflops_base=8, gflops_steps=2,
                gflops_batches=(4,), extra_seeds=(0,),
                scaling_sizes=(32, 64), scaling_images={32: 8, 64: 8}, scaling_dataset_sizes=(8, 16),
                epoch_images=140, lever_steps=2,
                realistic={"difficulty": "realistic", "num_samples": 24, "epochs": 1, "image_size": 32,
                           "base_channels": 8},
                real_images=12, real_size=32, real_epochs=1)


# ------------------------------------------------------------------------------ environment
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
            "bf16_autocast": bf16_supported(torch.device("cpu")), "load_average": _loadavg()}


def _loadavg() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` when ``threads > 0`` (0 keeps torch's default: the physical cores),
    and the allocator setting every training run uses (:func:`train.tune_allocator`)."""
    train.tune_allocator()
    if threads > 0:
        torch.set_num_threads(threads)


# -------------------------------------------------------------------------------- processes
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


def run_process(cmd: list[str], cwd: str | os.PathLike | None = None, env: dict | None = None,
                timeout: float = 3600.0) -> ProcResult:
    """Run ``cmd``; measure its wall time and its own peak RSS (``os.wait4``, where the OS has it)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        rss = None
        if hasattr(os, "wait4"):
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() - t0 > timeout:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.02)
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            # ru_maxrss is KiB on Linux, bytes on macOS
            rss = usage.ru_maxrss / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)
        else:  # Windows: no per-child rusage
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return ProcResult(proc.returncode, wall, rss, out.read(), err.read())


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _check(res: ProcResult, what: str) -> None:
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed with exit code {res.returncode}:\n{tail}")


# ------------------------------------------------------------------------- our training runs
def seconds_to_dice(val_dice: list[float], seconds: list[float], target: float = TARGET_DICE) -> tuple[int | None, float | None]:
    """(epoch, cumulative seconds) of the first epoch whose validation Dice reaches ``target``."""
    total = 0.0
    for epoch, (d, s) in enumerate(zip(val_dice, seconds), start=1):
        total += s
        if d is not None and d >= target:
            return epoch, total
    return None, None


def measure_training(cfg: TrainConfig) -> dict:
    """Run the whole pipeline (``run.run_synthetic``) in this process and time its training phase.

    ``train.train_one_epoch`` is wrapped for the duration, so the forward + backward + step time is
    timed inside the real loop (the reference's ``train_images_per_second`` counts the same phase).
    """
    import run  # the CLI module; imported here so that the benchmark does not need it to import

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
        summary = run.run_synthetic(cfg)
    finally:
        train.train_one_epoch = original
    history = _read_json(Path(cfg.output_dir) / "history.json") or {}
    return _training_record(summary, history, phase)


def _training_record(summary: dict, history: dict, phase: dict | None = None) -> dict:
    val_dice, seconds = history.get("val_dice", []), history.get("seconds", [])
    epoch_hit, s_hit = seconds_to_dice(val_dice, seconds)
    fit_s = float(summary.get("train_seconds") or sum(seconds) or math.nan)
    n_epochs = len(seconds) or summary.get("epochs", 0)
    cfg = TrainConfig.from_dict(summary.get("config", {}))
    n_train = len(train.split_indices(cfg.num_samples, cfg.val_fraction, cfg.test_fraction, cfg.seed)["train"])
    rec = {"test_dice": summary.get("dice"), "best_val_dice": summary.get("best_val_dice"), "dtype": summary.get("dtype"),
           "cumulative_seconds": [float(x) for x in np.cumsum(seconds)], "epochs": n_epochs, "train_seconds": fit_s, "total_seconds": summary.get("total_seconds"),
           "val_dice_per_epoch": val_dice, "epoch_seconds": seconds,
           "first_epoch_at_target": epoch_hit, "seconds_to_target": s_hit,
           "train_images_per_second_incl_eval": n_train * n_epochs / fit_s if fit_s else None}
    if phase and phase["images"]:
        rec.update(train_phase_seconds=phase["seconds"], train_images=phase["images"],
                   train_images_per_second=phase["images"] / phase["seconds"])
    else:  # the loop no longer calls train.train_one_epoch: fall back to whole epochs (eval included)
        rec.update(train_phase_seconds=None, train_images=n_train * n_epochs,
                   train_images_per_second=rec["train_images_per_second_incl_eval"])
    return rec


def train_in_subprocess(cfg: TrainConfig, threads: int = 0) -> dict:
    """:func:`measure_training` in a fresh Python process (no warm caches), plus its wall time and peak RSS."""
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        cfg = replace(cfg, output_dir=str(Path(tmp) / "out"), checkpoint=str(Path(tmp) / "best.pth"), progress=False)
        cfg_path, out_path = Path(tmp) / "cfg.json", Path(tmp) / "result.json"
        cfg_path.write_text(json.dumps(asdict(cfg)))
        res = run_process([sys.executable, str(ROOT / "bench.py"), "--worker-train", str(cfg_path),
                           "--worker-out", str(out_path), "--threads", str(threads)], cwd=ROOT)
        _check(res, f"training worker ({cfg.image_size}px, base {cfg.base_channels}, {cfg.precision})")
        rec = json.loads(out_path.read_text())
    rec.update(wall_s=res.wall_s, peak_rss_mb=res.peak_rss_mb)
    return rec


def run_default_pipeline(threads: int = 0, extra_args: list[str] | None = None, extra_env: dict | None = None) -> dict:
    """The whole ``python run.py`` (defaults, outputs into a temporary folder): wall time, peak RSS, Dice, time to 0.95."""
    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, str(ROOT / "run.py"), "--output-dir", str(out), "--checkpoint", str(Path(tmp) / "best.pth"),
               *(extra_args or [])]
        res = run_process(cmd, cwd=tmp, env={**_child_env(threads), **(extra_env or {})})
        _check(res, "python run.py")
        summary, history = _read_json(out / "summary.json") or {}, _read_json(out / "history.json") or {}
    rec = _training_record(summary, history)
    rec.update(wall_s=res.wall_s, peak_rss_mb=res.peak_rss_mb)
    return rec


def _read_json(path: Path) -> dict | None:
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads(path.read_text(encoding="utf-8"))
    return None


# ------------------------------------------------------------------------------ the reference
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
        res = run_process(cmd, cwd=tmp, env=_child_env(threads))
    _check(res, "reference script")
    rec = res.last_json() or {}
    rec.update(wall_s=res.wall_s, peak_rss_mb_wait4=res.peak_rss_mb)
    return rec


# ---------------------------------------------------------------------------------- inference
def _timeit(fn: Callable[[], Any], min_seconds: float, max_iters: int = 50) -> float:
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


def _autocast_bf16() -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def make_runners(model: nn.Module, example: torch.Tensor, *, bf16: bool, onnx: bool = False,
                 compile_model: bool = False) -> tuple[dict[str, Runner], dict]:
    """Inference variants of ``model`` (eval mode), each a function from an NCHW fp32 batch to fp32 logits.

    Returns ``(runners, info)``; ``info`` holds export / compile seconds and skip reasons.
    """
    model = model.eval()
    cl = torch.channels_last
    plain = model
    cl_model = copy.deepcopy(model).to(memory_format=cl)
    fold = fold_batchnorm(model).to(memory_format=cl)
    runners: dict[str, Runner] = {}
    info: dict = {}

    def eager_fp32(x):
        with torch.no_grad():
            return plain(x)

    def inference_mode_cl(x):
        with torch.inference_mode():
            return cl_model(x.contiguous(memory_format=cl))

    def folded_cl(x):
        with torch.inference_mode():
            return fold(x.contiguous(memory_format=cl))

    runners.update(eager_fp32=eager_fp32, inference_mode_cl_fp32=inference_mode_cl, folded_cl_fp32=folded_cl)
    if bf16:
        fold_bf16 = copy.deepcopy(fold).to(torch.bfloat16)

        def bf16_nchw(x):
            with torch.inference_mode(), _autocast_bf16():
                return plain(x).float()

        def bf16_cl(x):
            with torch.inference_mode(), _autocast_bf16():
                return cl_model(x.contiguous(memory_format=cl)).float()

        def folded_bf16_cl(x):
            with torch.inference_mode(), _autocast_bf16():
                return fold(x.contiguous(memory_format=cl)).float()

        def folded_bf16_weights_cl(x):
            with torch.inference_mode():
                return fold_bf16(x.to(torch.bfloat16).contiguous(memory_format=cl)).float()

        runners.update(bf16_autocast_nchw=bf16_nchw, bf16_autocast_cl=bf16_cl, folded_bf16_autocast_cl=folded_bf16_cl,
                       folded_bf16_weights_cl=folded_bf16_weights_cl)
    if compile_model:
        try:
            compiled = torch.compile(fold)
            ctx = _autocast_bf16 if bf16 else contextlib.nullcontext

            def compiled_run(x):
                with torch.inference_mode(), ctx():
                    return compiled(x.contiguous(memory_format=cl)).float()

            t0 = time.perf_counter()
            compiled_run(example)
            info["compile_seconds"] = time.perf_counter() - t0
            runners["compiled_folded_" + ("bf16" if bf16 else "fp32")] = compiled_run
        except Exception as exc:  # no C++ compiler, unsupported platform, ...
            info["compile_skipped"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            log.warning("torch.compile skipped: %s", info["compile_skipped"])
    if onnx:
        ort_run, ort_info = _onnx_runner(fold, example)
        info.update(ort_info)
        if ort_run is not None:
            runners["onnxruntime_fp32"] = ort_run
    return runners, info


def _onnx_runner(model: nn.Module, example: torch.Tensor) -> tuple[Runner | None, dict]:
    """Export ``model`` (spatial size fixed, batch dynamic) and wrap an ONNX Runtime CPU session around it."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, {"onnx_skipped": "onnxruntime is not installed (pip install onnxruntime onnx onnxscript)"}
    model = copy.deepcopy(model).to(memory_format=torch.contiguous_format).float().eval()  # never touch the caller's
    path = Path(tempfile.mkdtemp(prefix="bench_onnx_")) / "unet.onnx"
    t0 = time.perf_counter()
    err = None
    quiet = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [q.level for q in quiet]
    for dynamo in (False, True):  # the TorchScript exporter first: quick and quiet; the dynamo one if it is gone
        try:
            for q in quiet:
                q.setLevel(logging.ERROR)
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                kw = ({"dynamic_shapes": {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}} if dynamo
                      else {"dynamic_axes": {"x": {0: "batch"}, "logits": {0: "batch"}}})
                torch.onnx.export(model, (example[:1].contiguous(),), str(path), input_names=["x"],
                                  output_names=["logits"], dynamo=dynamo, **kw)
            break
        except Exception as exc:  # exporter missing (onnx / onnxscript) or unsupported op
            err = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        finally:
            for q, lvl in zip(quiet, levels):
                q.setLevel(lvl)
    else:
        return None, {"onnx_skipped": f"export failed ({err})"}
    export_s = time.perf_counter() - t0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting worker threads: they would keep spinning and slow down every torch measurement after this one
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def ort_run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {"x": x.contiguous().numpy()})[0])

    return ort_run, {"onnx_export_seconds": export_s, "onnxruntime": ort.__version__}


def bench_inference(base_channels: int, sizes: tuple[int, ...], batches: tuple[int, ...], *,
                    min_seconds: float = 1.0, onnx: bool = True, compile_model: bool = False,
                    reference: ModuleType | None = None, reference_base: int = 64, seed: int = 0) -> dict:
    """ms per image for every runner of :func:`make_runners` at each size x batch (+ the reference's fp32)."""
    torch.manual_seed(seed)
    model = UNet(n_channels=1, n_classes=1, base_channels=base_channels).eval()
    _randomize_bn(model, seed)
    bf16 = bf16_supported(torch.device("cpu"))
    results: dict = {"base_channels": base_channels, "ms_per_image": {}, "max_abs_diff_vs_eager_fp32": {}, "info": {}}
    for size in sizes:
        example = torch.rand(1, 1, size, size)
        runners, info = make_runners(model, example, bf16=bf16, onnx=onnx, compile_model=compile_model and size == max(sizes))
        results["info"][str(size)] = info
        for batch in batches:
            x = torch.rand(batch, 1, size, size)
            key = f"{size}x{size}_b{batch}"
            row, diffs = {}, {}
            check = batch == min(batches)  # outputs compared once per size (the big batches are slow in fp32)
            want = runners["eager_fp32"](x) if check else None
            for name, run_fn in runners.items():
                sec = _timeit(lambda: run_fn(x), min_seconds)
                row[name] = 1000.0 * sec / batch
                if check:
                    diffs[name] = float((run_fn(x).float() - want).abs().max())
                log.info("inference %-26s %-12s %8.2f ms/image", name, key, row[name])
            results["ms_per_image"][key] = row
            if check:
                results["max_abs_diff_vs_eager_fp32"][key] = diffs
    if reference is not None:
        size = 256 if 256 in sizes else max(sizes)
        ref = reference.UNet(n_channels=1, n_classes=1, base_channels=reference_base).eval()
        x = torch.rand(1, 1, size, size)

        def ref_run():
            with torch.no_grad():  # the post's inference: eval + no_grad, fp32, NCHW
                return ref(x)

        results["reference_fp32_base64"] = {"key": f"{size}x{size}_b1", "base_channels": reference_base,
                                            "ms_per_image": 1000.0 * _timeit(ref_run, min_seconds)}
        log.info("inference %-26s %-12s %8.2f ms/image", "reference_fp32_base64", f"{size}x{size}_b1",
                 results["reference_fp32_base64"]["ms_per_image"])
    return results


def thread_scaling(base_channels: int, size: int, min_seconds: float = 0.5) -> dict:
    """ms/image of the folded bf16 (or fp32) model at batch 1 with 1 thread and with torch's default."""
    model = fold_batchnorm(UNet(base_channels=base_channels)).to(memory_format=torch.channels_last)
    x = torch.rand(1, 1, size, size).contiguous(memory_format=torch.channels_last)
    ctx = _autocast_bf16 if bf16_supported(torch.device("cpu")) else contextlib.nullcontext
    default = torch.get_num_threads()
    out = {}
    for n in sorted({1, default}):
        torch.set_num_threads(n)
        try:
            with torch.inference_mode(), ctx():
                out[f"{n}_threads_ms"] = 1000.0 * _timeit(lambda: model(x), min_seconds)
        finally:
            torch.set_num_threads(default)
    return out


def _randomize_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics, so that folding is exercised like on a trained model."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)


# ---------------------------------------------------------------------------------- peak / GFLOP/s
def conv_peak(shapes: tuple[tuple[int, int, int], ...], seconds: float = 1.0) -> dict:
    """GFLOP/s of a 3x3 same-padded convolution (channels_last, inference) in fp32 and bf16.

    ``shapes`` are ``(batch, channels in = out, height = width)``; the peak is the best shape.
    """
    out: dict = {}
    dtypes = [torch.float32] + ([torch.bfloat16] if bf16_supported(torch.device("cpu")) else [])
    for dtype in dtypes:
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        per_shape = {}
        for n, c, s in shapes:
            conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(memory_format=torch.channels_last, dtype=dtype)
            x = torch.randn(n, c, s, s).to(memory_format=torch.channels_last, dtype=dtype)
            flops = 2 * n * c * c * 9 * s * s
            with torch.inference_mode():
                sec = _timeit(lambda: conv(x), seconds, max_iters=1000)
            per_shape[f"{n}x{c}x{s}x{s}"] = flops / sec / 1e9
        out[name] = {"peak_gflops": max(per_shape.values()), "per_shape_gflops": per_shape}
        log.info("conv peak %s: %.0f GFLOP/s %s", name, out[name]["peak_gflops"],
                 {k: round(v) for k, v in per_shape.items()})
    return out


def _random_split(n: int, size: int, channels: int = 1, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.rand(n, channels, size, size, generator=g),
                        (torch.rand(n, size, size, generator=g) > 0.9).to(torch.uint8))


OPTIMIZERS = ("eager", "fused", "per_tensor")  # train.make_optimizer's EagerAdam, torch's fused Adam, its default


def time_training_epoch(cfg: TrainConfig, n_images: int, precision: str, warmup_batches: int = 2,
                        channels_last: bool | None = None, optimizer: str = "eager", small_map_wgrad: bool = True,
                        dense_upsample_grad: bool = True, compile_model: bool = False) -> dict:
    """Seconds of one ``train.train_one_epoch`` over ``n_images`` random images (after a warm-up), per image too.

    Levers: ``optimizer`` (:data:`OPTIMIZERS`), ``small_map_wgrad=False`` (every convolution on oneDNN's own
    weight-gradient kernel: ``model.SMALL_MAP_PIXELS = 0``), ``dense_upsample_grad=False`` (the up-sampled
    branch gets cat's channel-slice gradient as it comes), ``compile_model`` (``torch.compile``; its
    compile time, spent in the warm-up, is returned as ``compile_seconds``).
    """
    import model as model_module

    torch.manual_seed(cfg.seed)
    device = torch.device("cpu")
    channels_last = cfg.channels_last if channels_last is None else channels_last
    model = UNet(n_channels=1, n_classes=1, base_channels=cfg.base_channels, bilinear=cfg.bilinear)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = {"eager": lambda: make_optimizer(model, cfg.lr),
           "fused": lambda: torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True),
           "per_tensor": lambda: torch.optim.Adam(model.parameters(), lr=cfg.lr)}[optimizer]()
    net = torch.compile(model) if compile_model else model
    small_before, dense_before = model_module.SMALL_MAP_PIXELS, model_module._ChannelsLastGrad.apply
    model_module.SMALL_MAP_PIXELS = small_before if small_map_wgrad else 0
    if not dense_upsample_grad:
        model_module._ChannelsLastGrad.apply = staticmethod(lambda x: x)
    try:
        warm = make_loader(_random_split(cfg.batch_size * warmup_batches, cfg.image_size, seed=1), cfg.batch_size, True, cfg.seed)
        t0 = time.perf_counter()
        train_one_epoch(net, warm, opt, device, precision, channels_last, progress=False)
        warm_s = time.perf_counter() - t0
        data = make_loader(_random_split(n_images, cfg.image_size), cfg.batch_size, True, cfg.seed)
        t0 = time.perf_counter()
        train_one_epoch(net, data, opt, device, precision, channels_last, progress=False)
        sec = time.perf_counter() - t0
    finally:
        model_module.SMALL_MAP_PIXELS = small_before
        model_module._ChannelsLastGrad.apply = dense_before
    flops = 3 * conv_flops(model, (1, 1, cfg.image_size, cfg.image_size)) * n_images  # fwd + bwd ~ 3x fwd
    rec = {"seconds": sec, "images": n_images, "seconds_per_image": sec / n_images, "gflops": flops / sec / 1e9}
    if compile_model:
        rec["compile_seconds"] = warm_s
    return rec


def training_gflops(size: int, base: int, batch: int, steps: int, precision: str) -> dict:
    """Achieved conv GFLOP/s of our training step (``train_one_epoch``) at ``size`` px, base ``base``."""
    cfg = TrainConfig(image_size=size, base_channels=base, batch_size=batch)
    rec = time_training_epoch(cfg, batch * steps, precision)
    rec.update(image_size=size, base_channels=base, batch_size=batch, precision=precision)
    log.info("training %dpx base %d batch %d %s: %.0f GFLOP/s (conv, fwd+bwd = 3x fwd)", size, base, batch,
             precision, rec["gflops"])
    return rec


def conv_bound(size: int, base: int, batch: int, precision: str, min_seconds: float = 0.2) -> dict:
    """GFLOP/s the training step would reach if only its convolutions took time.

    Every convolution of the U-Net at ``size`` px is timed alone (channels_last, forward + input and weight
    gradient, the layer's real shapes; :class:`model.Conv3x3` keeps its small-map path). The sum is the
    step's convolution time; the achieved GFLOP/s of :func:`training_gflops` divided by this bound says
    how much of the gap to the peak is everything else (BatchNorm, ReLU, pooling, casts, the optimizer).
    """
    model = UNet(n_channels=1, n_classes=1, base_channels=base).to(memory_format=torch.channels_last)
    shapes: list[tuple[nn.Conv2d, tuple[int, ...]]] = []
    handles = [m.register_forward_hook(lambda mod, inp, out: shapes.append((mod, tuple(inp[0].shape))))
               for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 1, size, size).to(memory_format=torch.channels_last))
    for h in handles:
        h.remove()
    total_s = 0.0
    for conv, shape in shapes:
        x = torch.randn(batch, *shape[1:]).to(memory_format=torch.channels_last).requires_grad_(shape[1] > 1)

        def step(conv=conv, x=x):
            conv.weight.grad = None
            with train.autocast(torch.device("cpu"), precision):
                y = conv(x)
            y.backward(torch.ones_like(y))

        total_s += _timeit(step, min_seconds, max_iters=200)
    flops = 3 * conv_flops(model, (1, 1, size, size)) * batch
    return {"conv_seconds_per_step": total_s, "gflops": flops / total_s / 1e9, "image_size": size,
            "base_channels": base, "batch_size": batch}


def reference_step_time(reference: ModuleType, size: int, base: int, batch: int, steps: int) -> dict:
    """The reference's own training step (fp32, NCHW, its BCE + Dice loss, Adam) timed on random data."""
    torch.manual_seed(0)
    model = reference.UNet(n_channels=1, n_classes=1, base_channels=base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 1, size, size)
    y = (torch.rand(batch, 1, size, size) > 0.9).float()

    def step():
        opt.zero_grad()
        loss = reference.bce_dice_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    model.train()
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sec = (time.perf_counter() - t0) / (steps * batch)
    flops = 3 * conv_flops(model, (1, 1, size, size))
    model.train()
    return {"seconds_per_image": sec, "gflops": flops / sec / 1e9, "image_size": size, "base_channels": base,
            "batch_size": batch}


def optimizer_step_time(cfg: TrainConfig, precision: str, min_seconds: float = 0.2) -> dict:
    """Seconds of one ``optimizer.step()`` (:func:`train.make_optimizer`) alone, on the gradients of one training batch."""
    torch.manual_seed(cfg.seed)
    model = UNet(n_channels=1, n_classes=1, base_channels=cfg.base_channels, bilinear=cfg.bilinear)
    model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg.lr)
    data = _random_split(cfg.batch_size, cfg.image_size)
    train_one_epoch(model, make_loader(data, cfg.batch_size, False, cfg.seed), opt, torch.device("cpu"), precision,
                    True, progress=False)  # gradients and Adam state exist from here on
    return {"seconds_per_step": _timeit(opt.step, min_seconds, max_iters=200)}


def post_step_breakdown(plan: Plan, precision: str, rounds: int = 3) -> dict:
    """Where our training step's time goes at the post's settings, in ms/image (the ceiling of the throughput ratio).

    ``step``: the whole step (``train_one_epoch``); ``convolutions``: every convolution of the U-Net alone
    (:func:`conv_bound`: forward and both gradients, with their bf16 casts); ``optimizer``: ``optimizer.step()``
    alone; ``rest``: step - convolutions - optimizer, i.e. BatchNorm, ReLU, pooling, up-sampling, concatenation,
    the loss and the autograd / Python work. The three are timed in ``rounds`` interleaved rounds and each is the
    fastest round's, so that a noisy minute on a shared machine does not shift one against another.
    ``step_one_thread``: the step on one thread (how far the second core helps); ``fixed_per_step``: the same step on a
    1-channel-wide U-Net at 16 px, the cost of the step's few hundred calls that no width removes (it overlaps the
    others: the convolutions and the optimizer pay part of it).
    """
    cfg = TrainConfig(lr=POST_LR, **{k: plan.post[k] for k in ("image_size", "base_channels", "batch_size")})
    n, b = cfg.batch_size * plan.lever_steps, cfg.batch_size
    ms = lambda rec: 1000.0 * rec["seconds_per_image"]  # noqa: E731
    timed: dict[str, list[float]] = {"step": [], "convolutions": [], "optimizer": []}
    for _ in range(rounds):
        timed["step"].append(ms(time_training_epoch(cfg, n, precision)))
        bound = conv_bound(cfg.image_size, cfg.base_channels, b, precision, 0.05 if plan.quick else 0.2)
        timed["convolutions"].append(1000.0 * bound["conv_seconds_per_step"] / b)
        timed["optimizer"].append(1000.0 * optimizer_step_time(cfg, precision)["seconds_per_step"] / b)
    out = {k: min(v) for k, v in timed.items()}
    out["rest"] = out["step"] - out["convolutions"] - out["optimizer"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out["step_one_thread"] = ms(time_training_epoch(cfg, n, precision))
    finally:
        torch.set_num_threads(threads)
    out["fixed_per_step"] = ms(time_training_epoch(replace(cfg, base_channels=1, image_size=16), n, precision))
    out["rounds"] = timed
    log.info("training step at the post's settings, ms/image: %s",
             {k: round(v, 2) for k, v in out.items() if k != "rounds"})
    return out


def training_levers(plan: Plan, compile_model: bool = False) -> dict:
    """ms/image of our training step at the post's settings: fp32/bf16 x NCHW/channels_last, then the best
    of those with each of this project's levers taken away in turn (and ``torch.compile`` added if asked)."""
    cfg = TrainConfig(lr=POST_LR, **{k: plan.post[k] for k in ("image_size", "base_channels", "batch_size")})
    precisions = ["fp32"] + (["bf16"] if bf16_supported(torch.device("cpu")) else [])
    n = cfg.batch_size * plan.lever_steps
    out = {}
    for prec in precisions:
        for cl in (False, True):
            rec = time_training_epoch(cfg, n, prec, channels_last=cl)
            out[f"{prec}_{'channels_last' if cl else 'nchw'}"] = 1000.0 * rec["seconds_per_image"]
    best = f"{precisions[-1]}_channels_last"
    for name, kwargs in (("torch_fused_adam", {"optimizer": "fused"}), ("per_tensor_adam", {"optimizer": "per_tensor"}),
                         ("no_small_map_wgrad", {"small_map_wgrad": False}),
                         ("no_dense_upsample_grad", {"dense_upsample_grad": False})):
        rec = time_training_epoch(cfg, n, precisions[-1], channels_last=True, **kwargs)
        out[f"{best}_{name}"] = 1000.0 * rec["seconds_per_image"]
    if compile_model:
        rec = time_training_epoch(cfg, n, precisions[-1], channels_last=True, compile_model=True)
        out[f"{best}_compiled"] = 1000.0 * rec["seconds_per_image"]
        out["compile_seconds"] = rec["compile_seconds"]
    log.info("training levers (ms/image, post settings): %s", {k: round(v, 2) for k, v in out.items()})
    return out


def default_choices_levers(plan: Plan, threads: int = 0) -> dict:
    """The default run on seed 42 and ``plan.extra_seeds`` with two of its choices taken away in turn.

    * ``width_32_lr_1e-3``: the realistic preset's width and learning rate instead of the seed preset's
      (``python run.py --base-channels 32 --lr 1e-3``, a fresh process each, like ``default_run``).
    * ``plain_batchnorm``: PyTorch's BatchNorm running statistics instead of :class:`model.BatchNorm2d`'s
      bias-corrected ones (``DEBIAS_STEPS = 0``, in this process: its epoch times are not comparable, the epoch
      at which validation Dice first reaches 0.95 and the test Dice are).
    """
    import model as model_module
    import run

    seeds = (42, *plan.extra_seeds)
    wide = ["--base-channels", "32", "--lr", "1e-3"] if not plan.quick else ["--lr", "1e-3"]
    keys = ("first_epoch_at_target", "seconds_to_target", "test_dice", "train_seconds", "wall_s")
    out: dict = {"width_32_lr_1e-3": {}, "plain_batchnorm": {}}
    for seed in seeds:
        rec = run_default_pipeline(threads, [*plan.default_run_args, *wide, "--seed", str(seed)])
        out["width_32_lr_1e-3"][seed] = {k: rec.get(k) for k in keys}
    before = model_module.BatchNorm2d.DEBIAS_STEPS
    model_module.BatchNorm2d.DEBIAS_STEPS = 0
    try:
        args = run.build_parser().parse_args(plan.default_run_args)
        for seed in seeds:
            with tempfile.TemporaryDirectory(prefix="bench_bn_") as tmp:
                cfg = replace(TrainConfig(**{k: v for k, v in vars(args).items() if k != "check"}), seed=seed,
                              output_dir=str(Path(tmp) / "out"), checkpoint=str(Path(tmp) / "best.pth"), progress=False)
                summary = run.run_synthetic(cfg)
                rec = _training_record(summary, _read_json(Path(cfg.output_dir) / "history.json") or {})
            out["plain_batchnorm"][seed] = {k: rec.get(k) for k in ("first_epoch_at_target", "test_dice")}
    finally:
        model_module.BatchNorm2d.DEBIAS_STEPS = before
    log.info("default-run levers: %s", out)
    return out


# ----------------------------------------------------------------------------------- scaling
def scaling_curves(plan: Plan, precision: str, reference: ModuleType | None = None) -> dict:
    """Seconds per training epoch against image size (default config) and against dataset size (64 px)."""
    cfg = replace(TrainConfig(), base_channels=plan.model_base or TrainConfig().base_channels)
    out: dict = {"epoch_images": plan.epoch_images, "image_size": [], "dataset_size": [],
                 "ours_label": f"medseg (base {cfg.base_channels}, batch {cfg.batch_size}, {precision})",
                 "reference_label": f"reference (base {plan.ref_base}, batch {POST['batch_size']}, fp32)"}
    for size in plan.scaling_sizes:
        n = plan.scaling_images.get(size, 16)
        rec = time_training_epoch(replace(cfg, image_size=size), n, precision)
        row = {"image_size": size, "measured_images": n, "seconds_per_image": rec["seconds_per_image"],
               "seconds_per_epoch": rec["seconds_per_image"] * plan.epoch_images}
        if reference is not None:
            steps = max(1, min(8, n // 4))
            ref = reference_step_time(reference, size, plan.ref_base, POST["batch_size"], steps)
            row.update(reference_seconds_per_image=ref["seconds_per_image"],
                       reference_seconds_per_epoch=ref["seconds_per_image"] * plan.epoch_images)
        out["image_size"].append(row)
        log.info("scaling %dpx: %.2f s/epoch (ours)%s", size, row["seconds_per_epoch"],
                 f", {row['reference_seconds_per_epoch']:.2f} s/epoch (reference)" if reference is not None else "")
    small = min(plan.scaling_sizes)
    for n in plan.scaling_dataset_sizes:
        rec = time_training_epoch(replace(cfg, image_size=small), n, precision)
        out["dataset_size"].append({"image_size": small, "images": n, "seconds_per_epoch": rec["seconds"]})
    return out


def plot_scaling(scaling: dict, path: Path) -> Path:
    """Two panels: s/epoch vs image size and vs dataset size (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ours = scaling.get("ours_label", "medseg")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = scaling["image_size"]
    sizes = [r["image_size"] for r in rows]
    a.plot(sizes, [r["seconds_per_epoch"] for r in rows], "o-", label=ours)
    if rows and "reference_seconds_per_epoch" in rows[0]:
        a.plot(sizes, [r["reference_seconds_per_epoch"] for r in rows], "s--",
               label=scaling.get("reference_label", "reference"))
    a.set(xscale="log", yscale="log", xlabel="image size (px, square)",
          ylabel=f"seconds per epoch of {scaling['epoch_images']} images", title="Training time vs image size")
    d = scaling["dataset_size"]
    b.plot([r["images"] for r in d], [r["seconds_per_epoch"] for r in d], "o-", label=ours)
    b.set(xscale="log", yscale="log", xlabel="training images per epoch", ylabel="seconds per epoch",
          title=f"Training time vs dataset size ({d[0]['image_size'] if d else ''} px)")
    for ax, ticks in ((a, sizes), (b, [r["images"] for r in d])):
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.text(0.01, 0.01, "per-epoch times at large sizes are extrapolated from the images actually timed "
             "(bench.json: measured_images)", fontsize=7, alpha=0.7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------ reduced precision Dice
def dice_by_runner(runners: dict[str, Runner], images: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 16, threshold: float = 0.5) -> dict:
    """Per-image mean Dice of every runner, its gap to ``eager_fp32`` and its mask agreement with it."""
    preds = {}
    for name, run_fn in runners.items():
        out = [run_fn(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)]
        preds[name] = logits_to_labels(torch.cat(out), threshold)
    base = preds["eager_fp32"]
    base_dice = summarize(per_case_scores(base, labels > 0))["dice"]
    res = {}
    for name, p in preds.items():
        d = summarize(per_case_scores(p, labels > 0))["dice"]
        agree = float(per_case_scores(p, base)["dice"].mean())
        res[name] = {"dice": d, "dice_delta_vs_fp32": d - base_dice, "mask_agreement_dice": agree}
    return res


def precision_check_synthetic(overrides: dict, onnx: bool = True) -> dict:
    """Train with the default config on the realistic preset (``run.run_synthetic``), then score every
    inference variant on the test split: reduced precision must stay within 0.005 Dice of fp32."""
    import data_gen
    import run

    with tempfile.TemporaryDirectory(prefix="bench_prec_") as tmp:
        cfg = TrainConfig(output_dir=str(Path(tmp) / "out"), checkpoint=str(Path(tmp) / "best.pth"), progress=False,
                          **overrides)  # built, not replaced: the preset's own width and rate apply
        summary = run.run_synthetic(cfg)
        model, _ = train.load_checkpoint(cfg.checkpoint)
    data = data_gen.generate_dataset(cfg.num_samples, cfg.image_size, cfg.seed, cfg.difficulty)
    idx = train.split_indices(len(data), cfg.val_fraction, cfg.test_fraction, cfg.seed)["test"]
    images = torch.from_numpy(data.images[idx]).unsqueeze(1)
    labels = torch.from_numpy(data.labels("lesion")[idx])
    runners, info = make_runners(model, images[:1], bf16=bf16_supported(torch.device("cpu")), onnx=onnx)
    res = dice_by_runner(runners, images, labels)
    log.info("precision check (realistic synthetic, %d test images, pipeline Dice %.4f): %s", len(idx),
             summary["dice"], {k: round(v["dice_delta_vs_fp32"], 4) for k, v in res.items()})
    return {"dataset": f"realistic synthetic, {cfg.num_samples} samples, {cfg.image_size}px", "test_images": len(idx),
            "pipeline_test_dice": summary["dice"], "variants": res, "info": info}


def load_kvasir(folder: Path, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` Kvasir-SEG pairs (sorted names) read with ``medio``, RGB in [0, 1] resized to ``size``."""
    import medio

    names = sorted((folder / "images").glob("*.jpg"))[:n]
    if not names:
        raise FileNotFoundError(f"{folder}: no images/*.jpg")
    imgs, masks = [], []
    for p in names:
        img, meta = medio.read_image(p)
        mask, _ = medio.read_mask(folder / "masks" / p.name, reference=meta)
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None] / 255.0
        imgs.append(F.interpolate(t, size=(size, size), mode="area")[0])
        m = torch.from_numpy(mask.astype(np.float32))[None, None]
        masks.append((F.interpolate(m, size=(size, size), mode="area")[0, 0] > 0.5).to(torch.uint8))
    return torch.stack(imgs), torch.stack(masks)


def precision_check_real(folder: Path, n: int, size: int, epochs: int, onnx: bool = True,
                         base_channels: int | None = None) -> dict:
    """Train the real-data default U-Net (3 input channels) on ``n`` Kvasir-SEG images with ``train.fit`` and
    score every inference variant on a held-out 20 %."""
    images, labels = load_kvasir(folder, n, size)
    cfg = replace(TrainConfig(data=str(folder)), image_size=size, epochs=epochs, num_samples=n, progress=False)
    if base_channels:
        cfg = replace(cfg, base_channels=base_channels)
    split = train.split_indices(n, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    sub = {k: ArrayDataset(images[v], labels[v]) for k, v in split.items()}
    train.set_seed(cfg.seed)
    device = torch.device("cpu")
    precision = train.resolve_precision(cfg.precision, device)
    model = UNet(n_channels=3, n_classes=1, base_channels=cfg.base_channels, bilinear=cfg.bilinear)
    with tempfile.TemporaryDirectory(prefix="bench_real_") as tmp:
        ckpt = Path(tmp) / "best.pth"
        val, eval_bs = sub["val"], max(cfg.batch_size, 16)
        train.fit(model, sub["train"], lambda m: train.evaluate(m, val.images, val.labels, eval_bs, device, precision,
                                                               cfg.channels_last, cfg.threshold),
                  cfg, device, precision, ckpt)
        best, _ = train.load_checkpoint(ckpt)
    runners, info = make_runners(best, images[:1], bf16=bf16_supported(device), onnx=onnx)
    res = dice_by_runner(runners, sub["test"].images, sub["test"].labels)
    log.info("precision check (Kvasir-SEG, %d test images): %s", len(split["test"]),
             {k: round(v["dice_delta_vs_fp32"], 4) for k, v in res.items()})
    return {"dataset": f"Kvasir-SEG, first {n} images, {size}px RGB, {epochs} epochs", "test_images": len(split["test"]),
            "variants": res, "info": info}


# ------------------------------------------------------------------------------- aggregation
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


@dataclass
class Target:
    """One target line of the issue: ``value`` compared against ``goal`` with ``op`` ('>=' or '<=')."""

    name: str
    ours: float | None
    reference: float | None
    value: float | None
    goal: float
    op: str
    unit: str = ""

    @property
    def status(self) -> str:
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return "n/a"
        return "PASS" if (self.value >= self.goal if self.op == ">=" else self.value <= self.goal) else "FAIL"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def evaluate_targets(r: dict) -> list[Target]:
    """The issue's target lines from the collected results ``r`` (reference-dependent ones are n/a without it)."""
    ours_fp32, ours_auto = r.get("train_post_fp32", {}), r.get("train_post_auto", {})
    ref_post, ours_def = r.get("reference_post", {}), r.get("default_run", {})
    inf = r.get("inference", {})
    t: list[Target] = []
    ips, ref_ips = ours_auto.get("train_images_per_second"), ref_post.get("train_images_per_second")
    t.append(Target("train images/s, post settings (ours auto / ref)", ips, ref_ips, _ratio(ips, ref_ips), 2.5, ">=", "x"))
    gap = (abs(ours_auto["test_dice"] - ours_fp32["test_dice"])
           if ours_auto.get("test_dice") is not None and ours_fp32.get("test_dice") is not None else None)
    t.append(Target("|test Dice bf16 - fp32|, post settings", ours_auto.get("test_dice"), ours_fp32.get("test_dice"), gap, 0.01, "<="))
    s, ref_s = ours_def.get("seconds_to_target"), ref_post.get("seconds_to_target")
    t.append(Target("seconds to val Dice 0.95, defaults (ref / ours)", s, ref_s, _ratio(ref_s, s), 6.0, ">=", "x"))
    w, ref_w = ours_def.get("wall_s"), ref_post.get("wall_s")
    t.append(Target("whole run.py wall (ours / ref)", w, ref_w, _ratio(w, ref_w), 0.25, "<="))
    best = _best_variant(inf, "256x256_b1")
    ref_ms = inf.get("reference_fp32_base64", {}).get("ms_per_image")
    t.append(Target(f"inference 256 b1 ms ({best[0] if best else '-'} / ref fp32 base 64)", best[1] if best else None,
                    ref_ms, _ratio(best[1] if best else None, ref_ms), 1 / 8, "<="))
    best512 = _best_variant(inf, "512x512_b1")
    t.append(Target(f"inference 512 b1 ms ({best512[0] if best512 else '-'})", best512[1] if best512 else None, None,
                    best512[1] if best512 else None, 100.0, "<=", "ms"))
    tg = r.get("training_gflops", {})
    g, peak = tg.get("gflops"), r.get("conv_peak", {}).get("bf16", {}).get("peak_gflops")
    t.append(Target(f"training GFLOP/s 128px base 64 / bf16 conv peak (batch {tg.get('batch_size', '-')})", g, peak,
                    _ratio(g, peak), 0.5, ">="))
    rss, ref_rss = r.get("rss_256", {}).get("peak_rss_mb"), r.get("reference_rss_256", {}).get("peak_rss_mb_wait4")
    t.append(Target("peak RSS MB, 256px training, post's model (ours / ref)", rss, ref_rss, _ratio(rss, ref_rss), 1.0, "<="))
    for key, label in (("precision_synthetic", "realistic synthetic"), ("precision_real", "real (Kvasir-SEG)")):
        variants = r.get(key, {}).get("variants", {})
        worst = max((abs(v["dice_delta_vs_fp32"]) for n, v in variants.items() if "bf16" in n), default=None)
        t.append(Target(f"max |Dice bf16 variant - fp32|, {label}", None, None, worst, 0.005, "<="))
    return t


def _best_variant(inf: dict, key: str) -> tuple[str, float] | None:
    row = inf.get("ms_per_image", {}).get(key)
    if not row:
        return None
    name = min(row, key=row.get)
    return name, row[name]


def format_report(r: dict, targets: list[Target]) -> str:
    """Plain-text tables: targets, training runs, inference variants."""
    f = lambda v, d=3: "-" if v is None else (f"{v:.{d}g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"machine: {r['machine']['cpu']} | {r['machine']['logical_cpus']} logical CPUs | torch "
             f"{r['machine']['torch']} ({r['machine']['torch_threads']} threads) | bf16 {r['machine']['bf16_autocast']} | "
             f"load avg before {r['machine']['load_average']} after {r.get('load_average_after')}"]
    if r["plan"]["quick"]:
        lines.append("QUICK MODE: tiny sizes, numbers are a smoke test, not a measurement")
    # only the load before the start says whether other jobs were running: afterwards it is the benchmark's own
    load, cpus = r["machine"].get("load_average"), r["machine"].get("logical_cpus") or 1
    if load and load[0] > 0.5 * cpus:
        lines.append(f"WARNING: the machine was busy before the start (1-minute load average {load[0]:.1f} on {cpus} "
                     f"CPUs): timings may be unreliable")
    lines += ["", f"{'target':58} {'ours':>10} {'ref':>10} {'value':>8} {'goal':>8}  status"]
    for t in targets:
        lines.append(f"{t.name:58} {f(t.ours, 4):>10} {f(t.reference, 4):>10} {f(t.value, 3):>8} "
                     f"{t.op}{f(t.goal, 3):>6}  {t.status}")
    lines += ["", f"{'training run':36} {'img/s':>8} {'img/s+eval':>10} {'test Dice':>9} {'s to .95':>8} {'wall s':>7} {'RSS MB':>7}"]
    for key in ("train_post_fp32", "train_post_auto", "reference_post", "default_run", "default_run_glibc_malloc",
                "default_run_checkpoint_every_epoch", "rss_256", "reference_rss_256"):
        rec = r.get(key)
        if rec:
            rss = rec.get("peak_rss_mb") if rec.get("peak_rss_mb_wait4") is None else rec["peak_rss_mb_wait4"]
            dice = rec.get("test_dice", rec.get("final_dice"))
            lines.append(f"{key:36} {f(rec.get('train_images_per_second'), 4):>8} "
                         f"{f(rec.get('train_images_per_second_incl_eval'), 4):>10} {f(dice, 4):>9} "
                         f"{f(rec.get('seconds_to_target'), 3):>8} {f(rec.get('wall_s'), 3):>7} {f(rss, 4):>7}")
    seeds = r.get("default_run_other_seeds")
    if seeds:
        lines += ["", "defaults on other seeds: " + "; ".join(
            f"seed {s}: 0.95 at epoch {v.get('first_epoch_at_target')} ({f(v.get('seconds_to_target'), 3)} s), "
            f"test Dice {f(v.get('test_dice'), 4)}" for s, v in seeds.items())]
    levers = r.get("default_run_levers")
    if levers and seeds:
        ours = {42: r.get("default_run", {}), **seeds}
        lines += ["", "default run, epoch of the first validation Dice >= 0.95 (s) / test Dice, by seed:"]
        lines.append(f"  {'this version':34}" + "".join(
            f"{s}: {v.get('first_epoch_at_target')} ({f(v.get('seconds_to_target'), 3)} s) {f(v.get('test_dice'), 4)}   "
            for s, v in ours.items()))
        for name, per_seed in levers.items():
            lines.append(f"  {name:34}" + "".join(
                f"{s}: {v.get('first_epoch_at_target')}"
                + (f" ({f(v.get('seconds_to_target'), 3)} s)" if "seconds_to_target" in v else "")
                + f" {f(v.get('test_dice'), 4)}   " for s, v in per_seed.items()))
    tg, bound = r.get("training_gflops"), r.get("training_conv_bound")
    if tg and bound:
        lines += ["", (f"training GFLOP/s at {bound['image_size']} px base {bound['base_channels']} batch "
                       f"{bound['batch_size']}: {tg['gflops']:.0f} achieved; {bound['gflops']:.0f} if only its "
                       f"convolutions took time (each timed alone)")]
    bd, ref_ips = r.get("post_step_breakdown"), r.get("reference_post", {}).get("train_images_per_second")
    if bd and ref_ips:
        ref_ms = 1000.0 / ref_ips
        need = ref_ms / 2.5
        lines += ["", (f"post's settings, ms/image (fastest of {len(bd['rounds']['step'])} interleaved rounds): our step "
                       f"{bd['step']:.1f} = convolutions {bd['convolutions']:.1f} (each timed alone, with their bf16 casts) + "
                       f"optimizer step {bd['optimizer']:.1f} + everything else {bd['rest']:.1f}; one thread: "
                       f"{bd['step_one_thread']:.1f}; the same step on a 1-channel U-Net at 16 px: {bd['fixed_per_step']:.1f}"),
                  (f"  the reference trains at {ref_ms:.1f} ms/image, so 2.5x needs <= {need:.1f}: everything else in "
                   f"{need - bd['convolutions'] - bd['optimizer']:.1f}; with no other work at all the ratio could reach "
                   f"{ref_ms / bd['convolutions']:.2f}x (convolutions alone), {ref_ms / (bd['convolutions'] + bd['optimizer']):.2f}x "
                   f"(convolutions and optimizer)")]
    levers = r.get("training_levers")
    if levers:
        lines += ["", "training ms/image at the post's settings (each lever taken away in turn from the best)"]
        lines += [f"  {k:52} {f(v, 4):>8}" for k, v in levers.items()]
    for rec in (r.get(k, {}) for k in ("inference", "inference_real_width")):
        inf = rec.get("ms_per_image", {})
        if not inf:
            continue
        keys = list(inf)
        lines += ["", f"inference ms/image (base {rec['base_channels']})".ljust(28) + "".join(f"{k:>14}" for k in keys)]
        for name in inf[keys[0]]:
            lines.append(f"{name:28}" + "".join(f"{f(inf[k].get(name), 3):>14}" for k in keys))
        ref = rec.get("reference_fp32_base64")
        if ref:
            label = f"reference fp32 base {ref.get('base_channels', 64)}"
            lines.append(f"{label:28}{ref.get('key', '256x256_b1'):>14}{f(ref.get('ms_per_image'), 3):>14}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the run
def run_benchmark(plan: Plan, baseline: str | None, repeats: int, out_dir: Path, threads: int = 0,
                  onnx: bool = True, compile_model: bool = False, real_data: Path | None = None) -> dict:
    """Everything, in order; the subprocess measurements are interleaved ours / reference per repeat."""
    set_threads(threads)
    reference = load_reference(baseline) if baseline else None
    precision = train.resolve_precision("auto", torch.device("cpu"))
    r: dict = {"machine": machine_info(), "plan": asdict(plan), "baseline": baseline, "repeats": repeats,
               "precision_auto": precision, "notes": {
                   "train_images_per_second": "forward + backward + optimizer step only (both pipelines)",
                   "seconds_to_target": "cumulative epoch time (train + validation) to the first epoch with validation "
                                        "Dice >= 0.95; ours is per-image Dice on the validation split, the reference's "
                                        "is its batch-pooled Dice on its test split",
                   "gflops": "convolutions only; training = 3 x forward FLOPs",
                   "peak_rss_mb": "each run in its own process, ru_maxrss from os.wait4"}}
    post_cfg = replace(TrainConfig(), lr=POST_LR, **plan.post)
    # peak memory of the same model, batch and image size in both pipelines
    ref_rss = {**plan.post, "image_size": plan.rss_size, "num_samples": plan.rss_samples, "epochs": 1}
    rss_cfg = replace(post_cfg, **ref_rss)
    rounds: dict[str, list[dict]] = {}
    for i in range(repeats):
        log.info("round %d/%d: ours (A)", i + 1, repeats)
        rounds.setdefault("train_post_fp32", []).append(train_in_subprocess(replace(post_cfg, precision="fp32"), threads))
        rounds.setdefault("train_post_auto", []).append(train_in_subprocess(replace(post_cfg, precision="auto"), threads))
        rounds.setdefault("default_run", []).append(run_default_pipeline(threads, plan.default_run_args))
        rounds.setdefault("default_run_glibc_malloc", []).append(  # the allocator lever, taken away
            run_default_pipeline(threads, plan.default_run_args, {"MEDSEG_MALLOC_TUNING": "0"}))
        rounds.setdefault("default_run_checkpoint_every_epoch", []).append(  # the checkpoint cadence, taken away
            run_default_pipeline(threads, [*plan.default_run_args, "--checkpoint-every", "0"]))
        rounds.setdefault("rss_256", []).append(train_in_subprocess(rss_cfg, threads))
        if baseline:
            log.info("round %d/%d: reference (B)", i + 1, repeats)
            rounds.setdefault("reference_post", []).append(run_reference(baseline, plan.post, threads))
            rounds.setdefault("reference_rss_256", []).append(run_reference(baseline, ref_rss, threads))
    # how much of "seconds to 0.95" is the seed: the epoch that first crosses 0.95 moves with the last bits
    # of the arithmetic (any change of kernel gives another trajectory), so the defaults are run on more seeds
    r["default_run_other_seeds"] = {}
    for seed in plan.extra_seeds:
        rec = run_default_pipeline(threads, [*plan.default_run_args, "--seed", str(seed)])
        r["default_run_other_seeds"][seed] = {k: rec.get(k) for k in ("first_epoch_at_target", "seconds_to_target",
                                                                     "test_dice", "train_seconds", "wall_s")}
    for k, recs in rounds.items():
        r[k] = median_record(recs)
        r[k]["per_repeat"] = [{kk: rec.get(kk) for kk in ("train_images_per_second", "seconds_to_target", "wall_s",
                                                          "peak_rss_mb", "peak_rss_mb_wait4", "test_dice")
                               if kk in rec} for rec in recs]
    default_base = plan.model_base or TrainConfig().base_channels
    r["inference"] = bench_inference(default_base, plan.infer_sizes, plan.infer_batches, min_seconds=plan.infer_min_seconds,
                                     onnx=onnx, compile_model=compile_model, reference=reference,
                                     reference_base=plan.ref_base)
    if not plan.quick:
        r["inference_real_width"] = bench_inference(REAL_BASE, plan.infer_sizes, (1,), min_seconds=plan.infer_min_seconds,
                                                    onnx=False)
    r["thread_scaling"] = thread_scaling(default_base, plan.infer_sizes[0], plan.infer_min_seconds)
    r["conv_peak"] = conv_peak(plan.peak_shapes, plan.peak_seconds)
    per_batch = [training_gflops(plan.gflops_size, plan.gflops_base, b, plan.gflops_steps, precision)
                 for b in plan.gflops_batches]
    best = max(per_batch, key=lambda rec: rec["gflops"])
    r["training_gflops"] = {**best, "per_batch": {rec["batch_size"]: rec["gflops"] for rec in per_batch}}
    r["training_conv_bound"] = conv_bound(plan.gflops_size, plan.gflops_base, best["batch_size"], precision,
                                          0.05 if plan.quick else 0.2)
    if reference is not None:
        r["reference_training_gflops"] = reference_step_time(reference, plan.gflops_size, plan.gflops_base,
                                                             POST["batch_size"], max(2, plan.gflops_steps // 2))
    # the ceiling of the training-throughput ratio at the post's settings: our convolutions alone, the optimizer alone
    r["post_step_breakdown"] = post_step_breakdown(plan, precision)
    r["training_levers"] = training_levers(plan, compile_model)
    r["default_run_levers"] = default_choices_levers(plan, threads)
    r["scaling"] = scaling_curves(plan, precision, reference)
    r["scaling_figure"] = str(plot_scaling(r["scaling"], out_dir / "scaling.png"))
    r["precision_synthetic"] = precision_check_synthetic(plan.realistic, onnx=onnx)
    if real_data is not None and (real_data / "images").is_dir():
        r["precision_real"] = precision_check_real(real_data, plan.real_images, plan.real_size, plan.real_epochs,
                                                   onnx=onnx, base_channels=plan.model_base)
    else:
        log.warning("real-data precision check skipped: %s has no images/ folder (pass --real-data)", real_data)
    r["load_average_after"] = _loadavg()
    r["targets"] = [{**asdict(t), "status": t.status} for t in evaluate_targets(r)]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(train._plain(r), indent=2, default=float), encoding="utf-8")
    return r


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the medseg pipeline (optionally against the reference script).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in about a minute, not a measurement")
    p.add_argument("--baseline", default=None, help="path of the reference script (e.g. ../shared/bench/seed_reference.py)")
    p.add_argument("--repeats", type=int, default=None, help="A/B rounds of the subprocess runs (default 2, quick 1)")
    p.add_argument("--out", default="bench_results", help="folder for bench.json and scaling.png")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both pipelines (0 = torch default)")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the ONNX Runtime variant")
    p.add_argument("--compile", dest="compile_model", action="store_true",
                   help="also time torch.compile for inference and for the training step (compile time reported "
                        "separately; ~30 s per shape)")
    p.add_argument("--real-data", default=str(DEFAULT_REAL_DATA), help="Kvasir-SEG folder for the real-data Dice check")
    p.add_argument("--worker-train", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    if args.worker_train:  # child process of train_in_subprocess
        logging.getLogger().setLevel(logging.WARNING)
        set_threads(args.threads)
        cfg = TrainConfig.from_dict(json.loads(Path(args.worker_train).read_text()))
        Path(args.worker_out).write_text(json.dumps(train._plain(measure_training(cfg)), default=float))
        return 0
    plan = make_plan(args.quick)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
    if args.baseline and not Path(args.baseline).is_file():
        log.error("error: --baseline %s: no such file", args.baseline)
        return 2
    t0 = time.perf_counter()
    r = run_benchmark(plan, args.baseline, repeats, Path(args.out), args.threads, args.onnx, args.compile_model,
                      Path(args.real_data) if args.real_data else None)
    targets = [Target(**{k: v for k, v in t.items() if k != "status"}) for t in r["targets"]]
    print(format_report(r, targets))
    print(f"\nwrote {Path(args.out) / 'bench.json'} and {r['scaling_figure']} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

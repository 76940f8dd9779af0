"""Speed: inference variants, the convolution peak, training GFLOP/s, training-step levers and scaling curves.

Everything here runs in the benchmark's own process on random data; :mod:`benchmarks.common` runs whole
pipelines in fresh processes.
"""
from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torch.nn as nn

import model as model_module
from benchmarks.common import timeit
from budget import measure_step_seconds
from model import UNet, fold_batchnorm
from runtime import autocast, bf16_supported, to_channels_last
from train import ArrayDataset, TrainConfig, make_loader, make_optimizer, train_one_epoch

log = logging.getLogger("bench")

Runner = Callable[[torch.Tensor], torch.Tensor]
CPU = torch.device("cpu")


def conv_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs (2 x multiply-adds) of every convolution / transposed convolution in one forward pass of ``input_shape``.

    Counted with forward hooks on a zero input, so the numbers follow the real shapes (odd sizes, padding).
    Bias adds, BatchNorm, activations and pooling are not counted (a few % of the total).
    """
    total = 0
    kinds = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        k = 1
        for s in mod.kernel_size:
            k *= s
        if isinstance(mod, (nn.ConvTranspose2d, nn.ConvTranspose3d)):  # every input element meets Cout/groups * k weights
            macs = inputs[0].numel() * (mod.out_channels // mod.groups) * k
        else:  # every output element sums Cin/groups * k products
            macs = out.numel() * (mod.in_channels // mod.groups) * k
        total += 2 * macs

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        with torch.inference_mode():
            model(torch.zeros(input_shape, device=param.device if param is not None else "cpu"))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


# ------------------------------------------------------------------------------------------ inference
def make_runners(model: nn.Module, example: torch.Tensor, *, bf16: bool, onnx: bool = False,
                 compile_model: bool = False) -> tuple[dict[str, Runner], dict]:
    """Inference variants of ``model`` (eval mode), each a function from an NCHW fp32 batch to fp32 logits.

    Returns ``(runners, info)``; ``info`` holds export / compile seconds and skip reasons.
    """
    model = model.eval()
    cl_model = to_channels_last(copy.deepcopy(model), 2)
    fold = to_channels_last(fold_batchnorm(model), 2)
    cl = torch.channels_last

    def run_with(net: nn.Module, dtype: str, layout_cl: bool) -> Runner:
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), autocast(CPU, dtype):
                return net(x.contiguous(memory_format=cl) if layout_cl else x).float()
        return run

    def eager_fp32(x: torch.Tensor) -> torch.Tensor:  # the post's inference: eval + no_grad, fp32, NCHW
        with torch.no_grad():
            return model(x)

    runners: dict[str, Runner] = {"eager_fp32": eager_fp32, "inference_mode_cl_fp32": run_with(cl_model, "fp32", True),
                                  "folded_cl_fp32": run_with(fold, "fp32", True)}
    info: dict = {}
    if bf16:
        runners.update(bf16_autocast_nchw=run_with(model, "bf16", False), bf16_autocast_cl=run_with(cl_model, "bf16", True),
                       folded_bf16_autocast_cl=run_with(fold, "bf16", True))
    if compile_model:
        try:
            compiled = run_with(torch.compile(fold), "bf16" if bf16 else "fp32", True)
            t0 = time.perf_counter()
            compiled(example)
            info["compile_seconds"] = time.perf_counter() - t0
            runners["compiled_folded_" + ("bf16" if bf16 else "fp32")] = compiled
        except Exception as exc:  # no C++ compiler, unsupported platform, ...
            info["compile_skipped"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            log.warning("torch.compile skipped: %s", info["compile_skipped"])
    if onnx:
        ort_run, ort_info = onnx_runner(fold)
        info.update(ort_info)
        if ort_run is not None:
            runners["onnxruntime_fp32"] = ort_run
    return runners, info


def onnx_runner(model: UNet) -> tuple[Runner | None, dict]:
    """``model`` through ``export.py``, the project's one ONNX path: exported with BatchNorm folded and dynamic
    batch and spatial sizes, then run by its onnxruntime CPU session (no spinning threads) as an ``OnnxNet``."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, {"onnx_skipped": "onnxruntime is not installed (pip install onnxruntime onnx)"}
    import export
    from errors import ConfigError

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as tmp:
        path = Path(tmp) / "unet.onnx"
        try:
            export.export_model(model, path)
        except ConfigError as exc:  # onnx not installed
            return None, {"onnx_skipped": str(exc)}
        except Exception as exc:  # noqa: BLE001 - unsupported op or exporter failure: the benchmark goes on
            return None, {"onnx_skipped": f"export failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"}
        export_s = time.perf_counter() - t0
        session = export.create_session(path)  # read into memory: the file may go with the folder
    return export.OnnxNet(session, model.args), {"onnx_export_seconds": export_s, "onnxruntime": ort.__version__}


def randomize_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics, so that folding is exercised like on a trained model."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)


def bench_inference(base_channels: int, sizes: tuple[int, ...], batches: tuple[int, ...], *,
                    min_seconds: float = 1.0, onnx: bool = True, compile_model: bool = False,
                    reference: ModuleType | None = None, reference_base: int = 64, seed: int = 0) -> dict:
    """ms per image for every runner of :func:`make_runners` at each size x batch (+ the reference's fp32)."""
    torch.manual_seed(seed)
    model = UNet(n_channels=1, n_classes=1, base_channels=base_channels).eval()
    randomize_bn(model, seed)
    results: dict = {"base_channels": base_channels, "ms_per_image": {}, "max_abs_diff_vs_eager_fp32": {}, "info": {}}
    for size in sizes:
        runners, info = make_runners(model, torch.rand(1, 1, size, size), bf16=bf16_supported(CPU), onnx=onnx,
                                     compile_model=compile_model and size == max(sizes))
        results["info"][str(size)] = info
        for batch in batches:
            x = torch.rand(batch, 1, size, size)
            key, check = f"{size}x{size}_b{batch}", batch == min(batches)  # outputs compared once per size
            want = runners["eager_fp32"](x) if check else None
            row, diffs = {}, {}
            for name, run_fn in runners.items():
                row[name] = 1000.0 * timeit(lambda: run_fn(x), min_seconds) / batch
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
            with torch.no_grad():
                return ref(x)

        ms = 1000.0 * timeit(ref_run, min_seconds)
        results["reference_fp32_base64"] = {"key": f"{size}x{size}_b1", "base_channels": reference_base, "ms_per_image": ms}
        log.info("inference %-26s %-12s %8.2f ms/image", "reference_fp32_base64", f"{size}x{size}_b1", ms)
    return results


def thread_scaling(base_channels: int, size: int, min_seconds: float = 0.5) -> dict:
    """ms/image of the folded model at batch 1 (bf16 where supported) with 1 thread and with torch's default."""
    model = to_channels_last(fold_batchnorm(UNet(base_channels=base_channels)), 2)
    x = torch.rand(1, 1, size, size).contiguous(memory_format=torch.channels_last)
    precision = "bf16" if bf16_supported(CPU) else "fp32"
    default = torch.get_num_threads()
    out = {}
    for n in sorted({1, default}):
        torch.set_num_threads(n)
        try:
            with torch.inference_mode(), autocast(CPU, precision):
                out[f"{n}_threads_ms"] = 1000.0 * timeit(lambda: model(x), min_seconds)
        finally:
            torch.set_num_threads(default)
    return out


# ------------------------------------------------------------------------------------------- training
def conv_peak(shapes: tuple[tuple[int, int, int], ...], seconds: float = 1.0) -> dict:
    """GFLOP/s of a 3x3 same-padded convolution (channels_last, inference) in fp32 and bf16.

    ``shapes`` are ``(batch, channels in = out, height = width)``; the peak is the best shape.
    """
    out: dict = {}
    for dtype in [torch.float32] + ([torch.bfloat16] if bf16_supported(CPU) else []):
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        per_shape = {}
        for n, c, s in shapes:
            conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(memory_format=torch.channels_last, dtype=dtype)
            x = torch.randn(n, c, s, s).to(memory_format=torch.channels_last, dtype=dtype)
            with torch.inference_mode():
                sec = timeit(lambda: conv(x), seconds, max_iters=1000)
            per_shape[f"{n}x{c}x{s}x{s}"] = 2 * n * c * c * 9 * s * s / sec / 1e9
        out[name] = {"peak_gflops": max(per_shape.values()), "per_shape_gflops": per_shape}
        log.info("conv peak %s: %.0f GFLOP/s %s", name, out[name]["peak_gflops"], {k: round(v) for k, v in per_shape.items()})
    return out


def random_split(n: int, size: int, channels: int = 1, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.rand(n, channels, size, size, generator=g),
                        (torch.rand(n, size, size, generator=g) > 0.9).to(torch.uint8))


def time_training_epoch(cfg: TrainConfig, n_images: int, precision: str, warmup_batches: int = 2,
                        channels_last: bool | None = None, compile_model: bool = False) -> dict:
    """Seconds of one ``train.train_one_epoch`` over ``n_images`` random images (after a warm-up), per image too.

    ``compile_model``: ``torch.compile`` the network; its compile time, spent in the warm-up, is returned as
    ``compile_seconds``.
    """
    torch.manual_seed(cfg.seed)
    channels_last = cfg.channels_last if channels_last is None else channels_last
    model = UNet(n_channels=1, n_classes=1, base_channels=cfg.base_channels, bilinear=cfg.bilinear)
    if channels_last:
        to_channels_last(model, 2)
    opt = make_optimizer(model, cfg.lr)
    net = torch.compile(model) if compile_model else model
    warm = make_loader(random_split(cfg.batch_size * warmup_batches, cfg.image_size, seed=1), cfg.batch_size, True, cfg.seed)
    t0 = time.perf_counter()
    train_one_epoch(net, warm, opt, CPU, precision, channels_last, progress=False)
    warm_s = time.perf_counter() - t0
    data = make_loader(random_split(n_images, cfg.image_size), cfg.batch_size, True, cfg.seed)
    t0 = time.perf_counter()
    train_one_epoch(net, data, opt, CPU, precision, channels_last, progress=False)
    sec = time.perf_counter() - t0
    flops = 3 * conv_flops(model, (1, 1, cfg.image_size, cfg.image_size)) * n_images  # fwd + bwd ~ 3x fwd
    rec = {"seconds": sec, "images": n_images, "seconds_per_image": sec / n_images, "gflops": flops / sec / 1e9}
    if compile_model:
        rec["compile_seconds"] = warm_s
    return rec


def training_gflops(size: int, base: int, batch: int, steps: int, precision: str) -> dict:
    """Achieved convolution GFLOP/s of our training step (``train_one_epoch``) at ``size`` px, base ``base``."""
    rec = time_training_epoch(TrainConfig(image_size=size, base_channels=base, batch_size=batch), batch * steps, precision)
    rec.update(image_size=size, base_channels=base, batch_size=batch, precision=precision)
    log.info("training %dpx base %d batch %d %s: %.0f GFLOP/s (conv, fwd+bwd = 3x fwd)", size, base, batch,
             precision, rec["gflops"])
    return rec


def reference_step_time(reference: ModuleType, size: int, base: int, batch: int, steps: int) -> dict:
    """The reference's own training step (fp32, NCHW, its BCE + Dice loss, Adam) timed on random data."""
    torch.manual_seed(0)
    model = reference.UNet(n_channels=1, n_classes=1, base_channels=base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(batch, 1, size, size), (torch.rand(batch, 1, size, size) > 0.9).float()

    def step():
        opt.zero_grad()
        loss = reference.bce_dice_loss(model(x), y)
        loss.backward()
        opt.step()

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


def training_levers(post: dict, steps: int, lr: float, compile_model: bool = False) -> dict:
    """ms/image of our training step at the post's settings for fp32 / bf16 x NCHW / channels_last (and
    ``torch.compile`` on the best of those if asked)."""
    cfg = TrainConfig(lr=lr, **{k: post[k] for k in ("image_size", "base_channels", "batch_size")})
    precisions = ["fp32"] + (["bf16"] if bf16_supported(CPU) else [])
    n, out = cfg.batch_size * steps, {}
    for prec in precisions:
        for cl in (False, True):
            rec = time_training_epoch(cfg, n, prec, channels_last=cl)
            out[f"{prec}_{'channels_last' if cl else 'nchw'}"] = 1000.0 * rec["seconds_per_image"]
    if compile_model:
        rec = time_training_epoch(cfg, n, precisions[-1], channels_last=True, compile_model=True)
        out[f"{precisions[-1]}_channels_last_compiled"] = 1000.0 * rec["seconds_per_image"]
        out["compile_seconds"] = rec["compile_seconds"]
    log.info("training levers (ms/image, post settings): %s", {k: round(v, 2) for k, v in out.items()})
    return out


def _interleaved_step_ms(shape: tuple[int, ...], flag: str, variants: dict[str, tuple[bool, str]], base: int,
                         repeats: int, steps: int, precision: str) -> dict[str, float]:
    """Median ms per training step of a width-``base`` U-Net on a random ``shape`` batch for each variant
    ``name: (value of model.<flag>, norm)``, the variants interleaved ``repeats`` times; the flag is restored."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (on, norm) in variants.items():
            setattr(model_module, flag, on)
            try:
                torch.manual_seed(0)
                net = UNet(shape[1], 3, base, True, len(shape) - 2, norm=norm)
                times[name].append(1000.0 * measure_step_seconds(net, shape, 3, precision, CPU, steps=steps))
            finally:
                setattr(model_module, flag, True)
    return {f"{name}_ms": statistics.median(v) for name, v in times.items()}


def upsampling_gradient_lever(shapes: dict[str, tuple[int, ...]], base: int, repeats: int, steps: int) -> dict:
    """ms per training step (bf16 where supported, channels-last, as real-data runs train) of U-Nets of width
    ``base`` on random batches of each ``(N, C, *spatial)`` shape, with and without the dense up-sampling gradient
    (``model.DENSE_UPSAMPLING_GRADIENT``), interleaved ``repeats`` times; the medians."""
    precision = "bf16" if bf16_supported(CPU) else "fp32"
    out: dict = {"precision": precision, "base_channels": base}
    for name, shape in shapes.items():
        out[name] = {"shape": list(shape), **_interleaved_step_ms(
            shape, "DENSE_UPSAMPLING_GRADIENT", {"dense": (True, "batch"), "plain": (False, "batch")}, base, repeats,
            steps, precision)}
        log.info("up-sampling gradient lever %s: %s", name, out[name])
    return out


def instance_norm_lever(shape: tuple[int, ...], base: int, repeats: int, steps: int) -> dict:
    """ms per training step (as :func:`upsampling_gradient_lever`) of a U-Net of width ``base`` on a random
    ``(N, C, *spatial)`` batch with BatchNorm, with instance norm computed per item (``model.PER_ITEM_INSTANCE_NORM``)
    and with torch's plain instance norm, interleaved ``repeats`` times; the medians."""
    precision = "bf16" if bf16_supported(CPU) else "fp32"
    variants = {"batch": (True, "batch"), "instance_per_item": (True, "instance"), "instance_plain": (False, "instance")}
    out = {"precision": precision, "base_channels": base, "shape": list(shape),
           **_interleaved_step_ms(shape, "PER_ITEM_INSTANCE_NORM", variants, base, repeats, steps, precision)}
    log.info("instance norm lever: %s", out)
    return out


# -------------------------------------------------------------------------------------------- scaling
def scaling_curves(plan, precision: str, reference: ModuleType | None = None) -> dict:
    """Seconds per training epoch against image size (default config) and against dataset size (smallest size)."""
    cfg = replace(TrainConfig(), base_channels=plan.model_base or TrainConfig().base_channels)
    out: dict = {"epoch_images": plan.epoch_images, "image_size": [], "dataset_size": [],
                 "ours_label": f"medseg (base {cfg.base_channels}, batch {cfg.batch_size}, {precision})",
                 "reference_label": f"reference (base {plan.ref_base}, batch {plan.post['batch_size']}, fp32)"}
    for size in plan.scaling_sizes:
        n = plan.scaling_images.get(size, 16)
        rec = time_training_epoch(replace(cfg, image_size=size), n, precision)
        row = {"image_size": size, "measured_images": n, "seconds_per_image": rec["seconds_per_image"],
               "seconds_per_epoch": rec["seconds_per_image"] * plan.epoch_images}
        if reference is not None:
            ref = reference_step_time(reference, size, plan.ref_base, plan.post["batch_size"], max(1, min(8, n // 4)))
            row.update(reference_seconds_per_image=ref["seconds_per_image"],
                       reference_seconds_per_epoch=ref["seconds_per_image"] * plan.epoch_images)
        out["image_size"].append(row)
        log.info("scaling %dpx: %.2f s/epoch (ours)", size, row["seconds_per_epoch"])
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
    rows, d = scaling["image_size"], scaling["dataset_size"]
    sizes = [r["image_size"] for r in rows]
    a.plot(sizes, [r["seconds_per_epoch"] for r in rows], "o-", label=ours)
    if rows and "reference_seconds_per_epoch" in rows[0]:
        a.plot(sizes, [r["reference_seconds_per_epoch"] for r in rows], "s--", label=scaling.get("reference_label"))
    a.set(xscale="log", yscale="log", xlabel="image size (px, square)",
          ylabel=f"seconds per epoch of {scaling['epoch_images']} images", title="Training time vs image size")
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

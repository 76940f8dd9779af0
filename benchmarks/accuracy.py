"""Accuracy rows of the benchmark: reduced-precision inference against fp32, and the default run's choices by seed."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data_gen
import experiments
import medio
import model as model_module
import run
from benchmarks.common import read_json, run_default_pipeline, training_record
from benchmarks.speed import Runner, make_runners
from checkpoint import load_checkpoint
from inference import probs_from_logits, probs_to_labels
from metrics import per_case_scores, summarize
from model import UNet
from runtime import bf16_supported, resolve_precision
from train import ArrayDataset, TrainConfig, evaluate, fit, set_seed, split_indices

log = logging.getLogger("bench")
CPU = torch.device("cpu")


def dice_by_runner(runners: dict[str, Runner], images: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 16, threshold: float = 0.5) -> dict:
    """Per-image mean Dice of every runner, its gap to ``eager_fp32`` and its mask agreement with it."""
    preds = {}
    for name, run_fn in runners.items():
        logits = torch.cat([run_fn(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)])
        preds[name] = probs_to_labels(probs_from_logits(logits), threshold)
    base_dice = summarize(per_case_scores(preds["eager_fp32"], labels > 0))["dice"]
    res = {}
    for name, p in preds.items():
        d = summarize(per_case_scores(p, labels > 0))["dice"]
        agree = float(per_case_scores(p, preds["eager_fp32"])["dice"].mean())
        res[name] = {"dice": d, "dice_delta_vs_fp32": d - base_dice, "mask_agreement_dice": agree}
    return res


def precision_check_synthetic(overrides: dict, onnx: bool = True) -> dict:
    """Train with the default config on the realistic preset, then score every inference variant on the test
    split: reduced precision must stay within 0.005 Dice of fp32."""
    with tempfile.TemporaryDirectory(prefix="bench_prec_") as tmp:
        cfg = TrainConfig(output_dir=str(Path(tmp) / "out"), checkpoint=str(Path(tmp) / "best.pth"), progress=False,
                          **overrides)  # built, not replaced: the preset's own width and rate apply
        summary = experiments.run_synthetic(cfg)
        model, _ = load_checkpoint(cfg.checkpoint)
    data = data_gen.generate_dataset(cfg.num_samples, cfg.image_size, cfg.seed, cfg.difficulty)
    idx = split_indices(len(data), cfg.val_fraction, cfg.test_fraction, cfg.seed)["test"]
    images, labels = torch.from_numpy(data.images[idx]).unsqueeze(1), torch.from_numpy(data.labels("lesion")[idx])
    runners, info = make_runners(model, images[:1], bf16=bf16_supported(CPU), onnx=onnx)
    res = dice_by_runner(runners, images, labels)
    log.info("precision check (realistic synthetic, %d test images, pipeline Dice %.4f): %s", len(idx),
             summary["dice"], {k: round(v["dice_delta_vs_fp32"], 4) for k, v in res.items()})
    return {"dataset": f"realistic synthetic, {cfg.num_samples} samples, {cfg.image_size}px", "test_images": len(idx),
            "pipeline_test_dice": summary["dice"], "variants": res, "info": info}


def load_kvasir(folder: Path, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` Kvasir-SEG pairs (sorted names) read with ``medio``, RGB in [0, 1] resized to ``size``."""
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
    split = split_indices(n, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    sub = {k: ArrayDataset(images[v], labels[v]) for k, v in split.items()}
    set_seed(cfg.seed)
    precision = resolve_precision(cfg.precision, CPU)
    model = UNet(n_channels=3, n_classes=1, base_channels=cfg.base_channels, bilinear=cfg.bilinear)
    with tempfile.TemporaryDirectory(prefix="bench_real_") as tmp:
        val, bs = sub["val"], max(cfg.batch_size, 16)
        fit(model, sub["train"], lambda m: evaluate(m, val.images, val.labels, bs, CPU, precision, cfg.channels_last,
                                                     cfg.threshold), cfg, CPU, precision, Path(tmp) / "best.pth")
        best, _ = load_checkpoint(Path(tmp) / "best.pth")
    runners, info = make_runners(best, images[:1], bf16=bf16_supported(CPU), onnx=onnx)
    res = dice_by_runner(runners, sub["test"].images, sub["test"].labels)
    log.info("precision check (Kvasir-SEG, %d test images): %s", len(split["test"]),
             {k: round(v["dice_delta_vs_fp32"], 4) for k, v in res.items()})
    return {"dataset": f"Kvasir-SEG, first {n} images, {size}px RGB, {epochs} epochs", "test_images": len(split["test"]),
            "variants": res, "info": info}


def default_choices_levers(seeds: tuple[int, ...], run_args: list[str], quick: bool, threads: int = 0) -> dict:
    """The default run on ``seeds`` with two of its choices taken away in turn.

    * ``width_32_lr_1e-3``: the realistic preset's width and learning rate instead of the seed preset's
      (``python run.py --base-channels 32 --lr 1e-3``, a fresh process each).
    * ``plain_batchnorm``: PyTorch's BatchNorm running statistics instead of the bias-corrected ones
      (``DEBIAS_STEPS = 0``, in this process: its epoch times are not comparable, the epoch at which validation
      Dice first reaches 0.95 and the test Dice are).
    """
    wide = ["--base-channels", "32", "--lr", "1e-3"] if not quick else ["--lr", "1e-3"]
    keys = ("first_epoch_at_target", "seconds_to_target", "test_dice", "train_seconds", "wall_s")
    out: dict = {"width_32_lr_1e-3": {}, "plain_batchnorm": {}}
    for seed in seeds:
        rec = run_default_pipeline(threads, [*run_args, *wide, "--seed", str(seed)])
        out["width_32_lr_1e-3"][seed] = {k: rec.get(k) for k in keys}
    norms = (model_module.BatchNorm2d, model_module.BatchNorm3d)
    before = [n.DEBIAS_STEPS for n in norms]
    for n in norms:
        n.DEBIAS_STEPS = 0
    try:
        names = {f.name for f in fields(TrainConfig)}  # the parser also has run.py's own flags (--check, --plan, ...)
        args = {k: v for k, v in vars(run.build_parser().parse_args(run_args)).items() if k in names}
        args["time_budget"] = args["time_budget"] or 0.0
        for seed in seeds:
            with tempfile.TemporaryDirectory(prefix="bench_bn_") as tmp:
                cfg = replace(TrainConfig(**args), seed=seed, output_dir=str(Path(tmp) / "out"),
                              checkpoint=str(Path(tmp) / "best.pth"), progress=False)
                summary = experiments.run_synthetic(cfg)
                rec = training_record(summary, read_json(Path(cfg.output_dir) / "history.json") or {})
            out["plain_batchnorm"][seed] = {k: rec.get(k) for k in ("first_epoch_at_target", "test_dice")}
    finally:
        for n, b in zip(norms, before):
            n.DEBIAS_STEPS = b
    log.info("default-run levers: %s", out)
    return out

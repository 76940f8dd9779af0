"""Train and evaluate a U-Net on synthetic organ + lesion images: ``python run.py``.

A thin command line over :func:`run_synthetic`, which tests call directly. Writes the figures,
``history.json`` and ``summary.json`` into ``--output-dir`` and the best model to ``--checkpoint``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import data_gen
import visualize
from errors import MedSegError
from metrics import best_threshold_dice
from model import UNet, count_parameters
from train import ArrayDataset, TrainConfig, evaluate, fit, load_checkpoint, resolve_precision, select_device, set_seed, split_indices

log = logging.getLogger("run")


def run_synthetic(cfg: TrainConfig) -> dict:
    """The whole synthetic experiment: data -> split -> train -> test -> figures -> JSON. Returns the summary."""
    cfg.validate()
    t_run = time.perf_counter()
    set_seed(cfg.seed)
    device = select_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("使用设备: %s (%s)", device, precision)

    data = data_gen.generate_dataset(cfg.num_samples, cfg.image_size, cfg.seed, cfg.difficulty)
    split = split_indices(len(data), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    images = torch.from_numpy(data.images).unsqueeze(1)
    labels = torch.from_numpy(data.labels("lesion"))
    subsets = {k: ArrayDataset(images[idx], labels[idx]) for k, idx in split.items()}
    log.info("数据: %d 张 %dx%d (%s), 训练/验证/测试 = %d/%d/%d", len(data), cfg.image_size, cfg.image_size,
             cfg.difficulty, *(len(split[k]) for k in ("train", "val", "test")))
    visualize.plot_synthetic_samples(data.images[split["train"]], data.lesions[split["train"]], out_dir, seed=cfg.seed)

    model = UNet(n_channels=1, n_classes=1, base_channels=cfg.base_channels, bilinear=cfg.bilinear)
    log.info("模型参数量: %s", f"{count_parameters(model):,}")
    result = fit(model, subsets["train"], subsets["val"], cfg, device, precision, cfg.checkpoint)
    visualize.plot_training_history(result.history, out_dir)

    # test: the best-validation checkpoint, reloaded from disk exactly as a user would
    best, _ = load_checkpoint(cfg.checkpoint, device)
    if cfg.channels_last:
        best.to(memory_format=torch.channels_last)
    test = subsets["test"]
    ev = evaluate(best, test.images, test.labels, max(cfg.batch_size, 16), device, precision, cfg.channels_last, cfg.threshold)
    baseline_dice, baseline_t, baseline_dir = best_threshold_dice(test.images[:, 0].numpy(), test.labels.numpy())
    dice = ev["scores"]["dice"]
    show = _showcase_indices(dice, k=4)
    visualize.plot_predictions([test.images[i, 0].numpy() for i in show], [test.labels[i].numpy() for i in show],
                               [ev["pred"][i].numpy() for i in show], out_dir, scores=[float(dice[i]) for i in show])

    s = ev["summary"]
    summary = {
        "dice": s["dice"], "iou": s["iou"], "sensitivity": s["sensitivity"], "precision": s["precision"],
        "dice_std": s["dice_std"], "test_images": len(test), "test_loss": ev["loss"],
        "threshold_baseline_dice": baseline_dice, "threshold_baseline": f"image {baseline_dir} {baseline_t:.3f}",
        "best_epoch": result.best_epoch, "best_val_dice": result.best_val.get("dice"),
        "epochs": cfg.epochs, "train_seconds": round(result.train_seconds, 2),
        "total_seconds": round(time.perf_counter() - t_run, 2), "device": str(device), "dtype": precision,
        "difficulty": cfg.difficulty, "seed": cfg.seed, "checkpoint": str(cfg.checkpoint),
        "counting": "per-image mean over the test split; empty prediction on empty truth = 1; "
                    "sensitivity/precision skip images where they are undefined",
        "config": asdict(cfg),
    }
    _write_json(out_dir / "history.json", result.history)
    _write_json(out_dir / "summary.json", summary)
    log.info("测试集 (%d 张): Dice %.4f | IoU %.4f | 敏感度 %.4f | 精确率 %.4f | 最佳全局阈值 Dice %.4f",
             len(test), s["dice"], s["iou"], s["sensitivity"], s["precision"], baseline_dice)
    log.info("全部完成! 图像与结果保存在 %s/, 模型 %s (%.1f s)", out_dir, cfg.checkpoint, summary["total_seconds"])
    return summary


def _showcase_indices(dice: np.ndarray, k: int = 4) -> list[int]:
    """Best, two middle and worst test images (an honest sample, not only the good ones)."""
    order = np.argsort(-dice, kind="stable")
    picks = [order[0], order[len(order) // 3], order[2 * len(order) // 3], order[-1]]
    return list(dict.fromkeys(int(i) for i in picks))[:k]


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=float), encoding="utf-8")
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Train a U-Net on synthetic organ + lesion images (医学影像分割).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="synthetic images in total (train+val+test)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="image height and width in pixels (>= 16)")
    p.add_argument("--base-channels", type=int, default=d.base_channels, help="U-Net width of the first level")
    p.add_argument("--no-bilinear", dest="bilinear", action="store_false", help="up-sample with transposed convolutions")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for data, split, weights and batch order")
    p.add_argument("--difficulty", choices=data_gen.DIFFICULTIES, default=d.difficulty,
                   help="synthetic preset: 'seed' (the post's, threshold-solvable) or 'realistic'")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default=d.device, help="auto = cuda > mps > cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision,
                   help="auto = bf16 autocast where the hardware supports it, else fp32")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW memory layout")
    p.add_argument("--output-dir", default=d.output_dir, help="folder for figures, history.json and summary.json")
    p.add_argument("--checkpoint", default=d.checkpoint, help="where to save the best model")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the per-epoch progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    try:
        run_synthetic(cfg)
    except MedSegError as exc:
        log.error("error: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

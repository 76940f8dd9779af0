"""Experiments: the synthetic run and the real-dataset run, each data -> split -> train -> test -> figures -> JSON.

``run.py`` is the command line over these two functions; tests and other tools call them directly.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import data_gen
import datasets
import medio
import visualize
from augment import Augmenter
from errors import CheckpointError, ConfigError, InputError
from inference import keep_largest, largest_classes, largest_component, predict_planes, probs_to_labels
from metrics import best_threshold_dice, case_scores, per_case_scores, summarize
from model import UNet, count_parameters
from preprocess import WINDOW_PRESETS, Preprocessing, parse_labels, parse_window
from train import (ArrayDataset, DistInfo, FitResult, TrainConfig, evaluate, fit, load_checkpoint, resolve_precision,
                   select_device, set_seed, split_indices, tune_allocator, update_checkpoint)

log = logging.getLogger("run")


def run_synthetic(cfg: TrainConfig) -> dict:
    """The whole synthetic experiment: data -> split -> train -> test -> figures -> JSON. Returns the summary."""
    cfg.validate()
    t_run = time.perf_counter()
    set_seed(cfg.seed)
    device, precision, dist_info = setup_run(cfg)
    out_dir = prepare_output(cfg, device, precision) if dist_info.main else Path(cfg.output_dir)
    log.info("使用设备: %s (%s)%s", device, precision, f", {dist_info.world_size} 个进程" if dist_info.world_size > 1 else "")

    data = data_gen.generate_dataset(cfg.num_samples, cfg.image_size, cfg.seed, cfg.difficulty)
    split = split_indices(len(data), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    images = torch.from_numpy(data.images).unsqueeze(1)
    labels = torch.from_numpy(data.labels("lesion"))
    subsets = {k: ArrayDataset(images[idx], labels[idx]) for k, idx in split.items()}
    log.info("数据: %d 张 %dx%d (%s), 训练/验证/测试 = %d/%d/%d", len(data), cfg.image_size, cfg.image_size,
             cfg.difficulty, *(len(split[k]) for k in ("train", "val", "test")))
    if dist_info.main:
        visualize.plot_synthetic_samples(data.images[split["train"]], data.lesions[split["train"]], out_dir, seed=cfg.seed)

    model = UNet(n_channels=1, n_classes=1, base_channels=cfg.base_channels, bilinear=cfg.bilinear)
    log.info("模型参数量: %s", f"{count_parameters(model):,}")
    val = subsets["val"]
    eval_bs = max(cfg.batch_size, 16)
    result = train_model(cfg, model, subsets["train"],
                         lambda m: evaluate(m, val.images, val.labels, eval_bs, device, precision, cfg.channels_last, cfg.threshold),
                         device, precision, {"preprocessing": synthetic_preprocessing(cfg).to_dict()}, dist_info)
    if not dist_info.main:
        return finish_ranks(dist_info, {})
    visualize.plot_training_history(result.history, out_dir)

    # test: the best-validation checkpoint, reloaded from disk exactly as a user would
    best, _ = load_checkpoint(cfg.checkpoint, device)
    if cfg.channels_last:
        best.to(memory_format=torch.channels_last)
    test = subsets["test"]
    ev = evaluate(best, test.images, test.labels, eval_bs, device, precision, cfg.channels_last, cfg.threshold)
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
        "epochs": cfg.epochs, "train_seconds": round(result.train_seconds, 2), "train_cpu_seconds": round(result.train_cpu_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_run, 2), "device": str(device), "dtype": precision,
        "difficulty": cfg.difficulty, "seed": cfg.seed, "checkpoint": str(cfg.checkpoint),
        "counting": "per-image mean over the test split; empty prediction on empty truth = 1; "
                    "sensitivity/precision skip images where they are undefined",
        "config": asdict(cfg),
    }
    update_checkpoint(cfg.checkpoint, test_metrics={k: summary[k] for k in ("dice", "iou", "sensitivity", "precision")}
                      | {"test_images": len(test)})
    _write_json(out_dir / "history.json", result.history)
    _write_json(out_dir / "summary.json", summary)
    log.info("测试集 (%d 张): Dice %.4f | IoU %.4f | 敏感度 %.4f | 精确率 %.4f | 最佳全局阈值 Dice %.4f",
             len(test), s["dice"], s["iou"], s["sensitivity"], s["precision"], baseline_dice)
    log.info("全部完成! 图像与结果保存在 %s/, 模型 %s (%.1f s)", out_dir, cfg.checkpoint, summary["total_seconds"])
    return finish_ranks(dist_info, summary)


def finish_ranks(dist_info: DistInfo, result: dict) -> dict:
    """Under torchrun, hold the other ranks until rank 0 has tested and written everything, so no process
    tears down its gloo connection while another still holds it (that race aborted a rank now and then)."""
    if dist_info.world_size > 1:
        torch.distributed.barrier()
    return result


#: options that may differ between a run and its --resume
RESUME_FREE = {"epochs", "resume", "progress", "device", "num_workers", "threads", "checkpoint_every"}


def setup_run(cfg: TrainConfig) -> tuple[torch.device, str, DistInfo]:
    """Device, numeric precision and, under ``torchrun``, the process group (gloo on CPU, NCCL on CUDA)."""
    tune_allocator()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = select_device(cfg.device)
    dist_info = DistInfo()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        dist_info = DistInfo(rank, world, local)
    return device, resolve_precision(cfg.precision, device), dist_info


def train_model(cfg: TrainConfig, model: UNet, train_data, validate, device: torch.device, precision: str,
                extra: dict, dist_info: DistInfo, augment=None) -> FitResult:
    """:func:`train.fit` with ``last.pth`` in the output folder, continuing from it when ``cfg.resume``."""
    last = Path(cfg.output_dir) / "last.pth"
    resume = None
    if cfg.resume:
        if not last.is_file():
            raise ConfigError(f"{last}: nothing to resume (no last.pth in --output-dir {cfg.output_dir})")
        saved, ckpt = load_checkpoint(last, "cpu")
        defaults = asdict(TrainConfig())  # an option newer than the run counts as its default
        saved_cfg = {k: ckpt["config"].get(k, defaults.get(k)) for k in asdict(cfg)}
        differ = [f"{k}: {saved_cfg[k]!r} -> {v!r}" for k, v in asdict(cfg).items()
                  if k not in RESUME_FREE and saved_cfg[k] != v]
        if differ:
            raise ConfigError(f"{last}: the run was started with other settings ({'; '.join(differ)}); "
                              "resume with the same options (only --epochs may grow)")
        if "resume" not in ckpt:
            raise CheckpointError(f"{last}: holds no training state to resume from")
        model.load_state_dict(saved.state_dict())
        resume = ckpt["resume"]
    return fit(model, train_data, validate, cfg, device, precision, cfg.checkpoint, augment, extra, last, resume, dist_info)


def synthetic_preprocessing(cfg: TrainConfig) -> Preprocessing:
    """Synthetic images are in [0, 1], i.e. 8-bit grey / 255: a model trained on them reads PNGs with ``unit``."""
    return Preprocessing(normalization="unit", in_channels=1, patch_size=cfg.image_size, class_names=["lesion"])


def auto_preprocessing(cfg: TrainConfig, first: medio.ImageMeta, first_image: np.ndarray,
                       class_values, class_names) -> Preprocessing:
    """Pick intensity normalisation and channels from the data unless the config says otherwise."""
    rgb = first_image.ndim == len(first.shape) + 1 and first_image.shape[-1] == 3
    norm = cfg.normalize
    if norm == "auto":
        if cfg.window or first.extra.get("modality") == "CT" or (first.format != "png" and float(first_image.min()) <= -500):
            norm = "window"  # CT in HU
        elif first.format in ("png", "jpeg", "bmp", "tiff", "gif") and float(first_image.max()) <= 255:
            norm = "unit"
        elif first.format in ("png", "jpeg", "bmp", "tiff", "gif"):
            norm = "percentile"
        else:
            norm = "zscore"  # MRI and other volumes without a physical intensity scale
    window = parse_window(cfg.window) if cfg.window else (list(WINDOW_PRESETS["abdomen"]) if norm == "window" else None)
    return Preprocessing(normalization=norm, window=window, in_channels=cfg.in_channels or (3 if rgb else 1),
                         resize_long_side=cfg.resize, patch_size=cfg.image_size,
                         class_values=class_values, class_names=class_names, mirror_tta=cfg.tta)


def run_dataset(cfg: TrainConfig, check_only: bool = False) -> dict:
    """Train and evaluate on a real dataset folder (``cfg.data``); per-case metrics at the original resolution."""
    cfg.validate()
    t_run = time.perf_counter()
    set_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    spec = datasets.discover(cfg.data, cfg.images_dir, cfg.masks_dir)
    refs = spec.cases[: cfg.max_cases] if cfg.max_cases else spec.cases
    if spec.layout == "dicom+masks":
        groups = datasets.resolve_dicom_labels(spec, cfg.labels)
        for r in refs:
            r.mask_series = groups
        class_values, class_names = None if len(groups) == 1 else [[k] for k in range(1, len(groups) + 1)], ["+".join(g) for g in groups]
    else:
        class_values, class_names = parse_labels(cfg.labels, spec.label_names)
    if not refs:
        raise InputError(f"{cfg.data}: no cases found ({spec.layout} layout)")
    first_image, first_meta = medio.read_image(refs[0].image)
    prep = auto_preprocessing(cfg, first_meta, first_image, class_values, class_names)
    log.info("数据集 %s: %s 布局, %d 例; 预处理 %s", cfg.data, spec.layout, len(refs), prep)
    cases = datasets.load_cases(refs, prep)  # lists every problem, then fails once
    if check_only:
        out_dir.mkdir(parents=True, exist_ok=True)
        report = dataset_report(cases, prep)
        _write_json(out_dir / "dataset_report.json", report)
        return report

    device, precision, dist_info = setup_run(cfg)
    split = datasets.split_cases(refs, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    if dist_info.main:
        prepare_output(cfg, device, precision)
        _write_json(out_dir / "split.json", split)
    by_id = {c.ref.case_id: c for c in cases}
    sets = {k: [by_id[i] for i in ids] for k, ids in split.items()}
    log.info("按病例划分 训练/验证/测试 = %d/%d/%d 例 (split.json)", *(len(sets[k]) for k in ("train", "val", "test")))
    if not sets["train"] or not sets["val"]:
        raise InputError(f"{cfg.data}: too few cases ({len(refs)}) for a train/validation split")

    planes, labels, pads = datasets.training_planes(sets["train"], prep)
    length = cfg.samples_per_epoch or max(256, len(planes))
    train_data = datasets.PatchDataset(planes, labels, prep.patch_size, length, cfg.fg_prob, cfg.seed, pads)
    vp, vl, vpad = datasets.training_planes(sets["val"], prep)
    val_patches = datasets.PatchDataset(vp, vl, prep.patch_size, min(256, max(32, len(vp))), cfg.fg_prob, cfg.seed + 1, vpad)
    val_x, val_y = val_patches.__getitems__(list(range(len(val_patches))))
    if dist_info.main:
        visualize.plot_synthetic_samples(val_x[:, 0].numpy(), val_y.numpy(), out_dir, seed=cfg.seed)
    augment = Augmenter(seed=cfg.seed, elastic=cfg.elastic) if cfg.augment else None

    def validate(m: UNet) -> dict:
        loss = evaluate(m, val_x, val_y, 16, device, precision, cfg.channels_last)["loss"]
        rows = evaluate_cases(m, sets["val"], prep, device, precision, cfg, hd=False, mirror=False)  # TTA: test only
        return {"loss": loss, "summary": summarize_rows(rows, prep)}

    model = UNet(n_channels=prep.in_channels, n_classes=prep.model_out_channels, base_channels=cfg.base_channels,
                 bilinear=cfg.bilinear)
    log.info("模型参数量: %s; 每轮 %d 个 %dx%d 训练块", f"{count_parameters(model):,}", length, prep.patch_size, prep.patch_size)
    extra = {"preprocessing": prep.to_dict(), "split": split}
    result = train_model(cfg, model, train_data, validate, device, precision, extra, dist_info, augment)
    if not dist_info.main:
        return finish_ranks(dist_info, {})
    visualize.plot_training_history(result.history, out_dir)

    best, _ = load_checkpoint(cfg.checkpoint, device)
    post = choose_postprocessing(evaluate_cases(best, sets["val"], prep, device, precision, cfg, hd=False,
                                                compare_largest=True), prep)
    log.info("后处理 (在验证集上选择): 只保留最大连通域的类别 %s", post["largest_component"] or "无")
    rows = evaluate_cases(best, sets["test"], prep, device, precision, cfg, hd=True, keep_pred=True,
                          largest=largest_classes(prep.class_names, post))
    write_case_csv(out_dir / "metrics_per_case.csv", rows)
    stats = summarize_rows(rows, prep)
    hd_unit = "mm" if all(c.meta.spacing_known for c in sets["test"]) else "px"  # plain photos have no spacing
    plot_case_overlays(rows, out_dir)
    summary = {
        **{k: stats[k] for k in ("dice", "iou", "sensitivity", "precision")},
        "per_class": stats["per_class"], "test_cases": len(sets["test"]), "threshold_baseline_dice": None,
        "best_epoch": result.best_epoch, "best_val_dice": result.best_val.get("dice"), "epochs": cfg.epochs,
        "train_seconds": round(result.train_seconds, 2), "train_cpu_seconds": round(result.train_cpu_seconds, 1), "total_seconds": round(time.perf_counter() - t_run, 2),
        "device": str(device), "dtype": precision, "data": str(cfg.data), "layout": spec.layout,
        "preprocessing": prep.to_dict(), "postprocessing": post, "checkpoint": str(cfg.checkpoint),
        "hd95_unit": hd_unit,
        "counting": "per-case (per patient volume / per image) at the original resolution, after the "
                    "post-processing chosen on validation; see README",
        "config": asdict(cfg),
    }
    update_checkpoint(cfg.checkpoint, postprocessing=post,
                      test_metrics={k: stats[k] for k in ("dice", "iou", "sensitivity", "precision")}
                      | {"per_class_dice": {n: pc["dice"] for n, pc in stats["per_class"].items()}, "test_cases": len(sets["test"])})
    _write_json(out_dir / "metrics_summary.json", stats)
    _write_json(out_dir / "history.json", result.history)
    _write_json(out_dir / "summary.json", summary)
    for name, pc in stats["per_class"].items():
        log.info("测试集 %s (%d 例): Dice %.4f ± %.4f | IoU %.4f | HD95 %.2f %s | 病灶检出 %d/%d, 假阳性病灶 %d",
                 name, pc["n"], pc["dice"], pc["dice_std"], pc["iou"], pc["hd95"], hd_unit, pc["detected_lesions"],
                 pc["true_lesions"], pc["false_positive_lesions"])
    log.info("全部完成! 结果保存在 %s/, 模型 %s (%.1f s)", out_dir, cfg.checkpoint, summary["total_seconds"])
    return finish_ranks(dist_info, summary)


def evaluate_cases(model: UNet, cases: list, prep: Preprocessing, device: torch.device, precision: str,
                   cfg: TrainConfig, hd: bool = True, keep_pred: bool = False, largest=(),
                   compare_largest: bool = False, mirror: bool | None = None) -> list[dict]:
    """Whole-case prediction (sliding window, original resolution) and per-class scores, one row per case and class.

    largest: classes (1-based) reduced to their largest connected component before scoring (the
    post-processing :func:`choose_postprocessing` picked); ``compare_largest`` adds a ``dice_largest``
    column: the Dice each class would get with that step.
    """
    rows = []
    for c in cases:
        probs = predict_planes(model, c.planes, prep, device, precision, cfg.overlap, channels_last=cfg.channels_last,
                               mirror=mirror)
        pred = keep_largest(probs_to_labels(probs, cfg.threshold), largest)
        spacing = c.meta.spacing if c.is_volume else c.meta.spacing[-2:]
        for k, name in enumerate(prep.class_names, start=1):
            p, t = pred == k, c.labels == k
            if c.roi is not None:  # only pixels inside the field of view count
                p, t = p & c.roi, t & c.roi
            if not c.is_volume:
                p, t = p[0], t[0]
            if hd:
                s = case_scores(p, t, spacing)
            else:  # validation: overlap scores only, no surface distances
                s = {key: float(v[0]) for key, v in per_case_scores(p[None], t[None]).items()}
            if compare_largest:
                s["dice_largest"] = float(per_case_scores(largest_component(p)[None], t[None])["dice"][0])
            row = {"case": c.ref.case_id, "class": name, **s}
            if keep_pred:
                row["_case"], row["_pred"], row["_k"] = c, pred, k
            rows.append(row)
    return rows


def choose_postprocessing(rows: list[dict], prep: Preprocessing) -> dict:
    """nnU-Net's habit: keep only the largest connected component of a class when that raises its mean
    validation Dice (rows from :func:`evaluate_cases` with ``compare_largest``). Decided on validation
    cases only, never on the test cases it is then applied to."""
    chosen, scores = [], {}
    for name in prep.class_names:
        rs = [r for r in rows if r["class"] == name]
        raw, big = float(np.mean([r["dice"] for r in rs])), float(np.mean([r["dice_largest"] for r in rs]))
        scores[name] = {"val_dice": raw, "val_dice_largest": big}
        if big > raw:
            chosen.append(name)
    return {"largest_component": chosen, "validation": scores}


def summarize_rows(rows: list[dict], prep: Preprocessing) -> dict:
    """Mean ± std per class (NaN-skipping), and the class-mean of each score."""
    per_class = {}
    for name in prep.class_names:
        rs = [r for r in rows if r["class"] == name]
        keys = [k for k in rs[0] if not k.startswith("_") and k not in ("case", "class")] if rs else []
        stats = summarize({k: np.array([r[k] for r in rs], dtype=float) for k in keys if k not in LESION_KEYS})
        stats.update({k: int(sum(r[k] for r in rs)) for k in LESION_KEYS if k in keys})
        stats["n"] = len(rs)
        per_class[name] = stats
    out = {k: float(np.nanmean([pc[k] for pc in per_class.values()])) for k in ("dice", "iou", "sensitivity", "precision")}
    out["per_class"] = per_class
    return out


LESION_KEYS = ("true_lesions", "detected_lesions", "pred_lesions", "false_positive_lesions")


def write_case_csv(path: Path, rows: list[dict]) -> None:
    keys = [k for k in rows[0] if not k.startswith("_")] if rows else ["case", "class"]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def plot_case_overlays(rows: list[dict], out_dir: Path) -> None:
    """Best, median and worst test cases of the first class: the slice with the most ground truth."""
    rows = [r for r in rows if r["_k"] == 1]
    if not rows:
        return
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["dice"])
    picks = list(dict.fromkeys([order[0], order[len(order) // 2], order[-1]]))
    imgs, truths, preds, scores, titles = [], [], [], [], []
    for i, tag in zip(picks, ("最好", "中位", "最差")):
        c, pred = rows[i]["_case"], rows[i]["_pred"]
        z = int(np.argmax((c.labels > 0).reshape(len(c.labels), -1).sum(1)))
        imgs.append(display_plane(c.planes[z]))
        truths.append(c.labels[z])
        preds.append(pred[z])
        scores.append(rows[i]["dice"])
        titles.append(f"{tag} {c.ref.case_id}" + (f" z={z}" if c.is_volume else ""))
    visualize.plot_predictions(imgs, truths, preds, out_dir, scores=scores, titles=titles)


def display_plane(plane: np.ndarray) -> np.ndarray:
    """(C, H, W) network input -> (H, W) grey or (H, W, 3) RGB in [0, 1] for display."""
    x = plane if plane.shape[0] == 3 else plane[:1]
    x = (x - x.min()) / (np.ptp(x) + 1e-8)
    return np.moveaxis(x, 0, -1) if x.shape[0] == 3 else x[0]


def dataset_report(cases: list, prep: Preprocessing) -> dict:
    """Per-case geometry, intensity range and structure sizes (voxels, mL) for ``--check``."""
    report = {"cases": [], "preprocessing": prep.to_dict()}
    for c in cases:
        image, _ = medio.read_image(c.ref.image)
        vox_ml = medio.voxel_volume_ml(c.meta) if c.is_volume else None
        entry = {"case": c.ref.case_id, "image": str(c.ref.image), "shape": list(c.meta.shape),
                 "spacing_mm": [round(float(s), 4) for s in c.meta.spacing], "format": c.meta.format,
                 "intensity_min": float(image.min()), "intensity_max": float(image.max()), "structures": {}}
        for k, name in enumerate(prep.class_names, start=1):
            n = int((c.labels == k).sum())
            entry["structures"][name] = {"voxels": n, **({"volume_ml": round(n * vox_ml, 2)} if vox_ml else {})}
            log.info("%s: %s %s mm, 强度 [%.0f, %.0f]; %s: %d 体素%s", c.ref.case_id, "x".join(map(str, c.meta.shape)),
                     "x".join(f"{s:.3g}" for s in c.meta.spacing), entry["intensity_min"], entry["intensity_max"], name, n,
                     f", 体积 {n * vox_ml:.1f} mL" if vox_ml else "")
        report["cases"].append(entry)
    return report


def prepare_output(cfg: TrainConfig, device: torch.device, precision: str, min_free_mb: int = 200) -> Path:
    """Check, before any training, that the outputs can be written; record config, versions, device and seed.

    Raises :class:`ConfigError` for an unwritable folder or too little free disk space, so a run fails
    in the first second instead of after an hour of training.
    """
    out_dir = Path(cfg.output_dir)
    for folder in {out_dir, Path(cfg.checkpoint).resolve().parent}:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
                pass
        except OSError as exc:
            raise ConfigError(f"{folder}: cannot write there ({exc.strerror or exc}); choose another --output-dir/--checkpoint") from exc
        free_mb = shutil.disk_usage(folder).free / 2**20
        if free_mb < min_free_mb:
            raise ConfigError(f"{folder}: only {free_mb:.0f} MB free on disk, need at least {min_free_mb} MB for checkpoints and figures")
    info = {"config": asdict(cfg), "seed": cfg.seed, "device": str(device), "dtype": precision,
            "torch_threads": torch.get_num_threads(), "command": sys.argv,
            "versions": {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__,
                         "platform": platform.platform()},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_json(out_dir / "run_info.json", info)
    return out_dir


def _showcase_indices(dice: np.ndarray, k: int = 4) -> list[int]:
    """Best, two middle and worst test images (an honest sample, not only the good ones)."""
    order = np.argsort(-dice, kind="stable")
    picks = [order[0], order[len(order) // 3], order[2 * len(order) // 3], order[-1]]
    return list(dict.fromkeys(int(i) for i in picks))[:k]


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=float), encoding="utf-8")
    tmp.replace(path)

"""Experiments: the synthetic run and the real-dataset run, each data -> split -> train -> test -> figures -> JSON.

``run.py`` is the command line over these two functions; tests and other tools call them directly. Test
images and test cases are scored through the same inference function as ``predict.py``
(:func:`inference.predict_planes`), so a reported score is the score prediction reproduces.
"""
from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

import data_gen
import datasets
import planning
import medio
import visualize
from augment import Augmenter
from checkpoint import load_checkpoint, update_checkpoint
from errors import CheckpointError, ConfigError, InputError
from evaluation import (choose_postprocessing, dataset_report, evaluate_cases, plot_case_overlays, summarize_rows,
                        write_case_csv)
from fileio import write_json_atomic
from inference import largest_classes, predict_planes, probs_to_labels
from metrics import best_threshold_dice, per_case_scores, segmentation_loss, summarize
from model import UNet, count_parameters
from preprocess import WINDOW_PRESETS, Preprocessing, parse_labels, parse_window
from runtime import ThreadPolicy, resolve_precision, select_device, to_channels_last
from train import ArrayDataset, DistInfo, FitResult, TrainConfig, evaluate, fit, set_seed, split_indices

log = logging.getLogger("run")

#: mean validation Dice mirroring must add to be kept (it multiplies inference time by 4 in 2D, 8 in 3D)
TTA_MIN_GAIN = 0.002
#: options that may differ between a run and its --resume
RESUME_FREE = {"epochs", "epochs_planned", "resume", "progress", "figures", "device", "num_workers", "threads",
               "checkpoint_every"}


# ------------------------------------------------------------------------------ synthetic images
def run_synthetic(cfg: TrainConfig) -> dict:
    """The whole synthetic experiment: data -> split -> train -> test -> figures -> JSON. Returns the summary."""
    cfg.validate()
    t_run = time.perf_counter()
    set_seed(cfg.seed)
    check_outputs(cfg)
    device, precision, dist_info, threads = setup_run(cfg)
    out_dir = record_run(cfg, device, precision) if dist_info.main else Path(cfg.output_dir)
    log.info("使用设备: %s (%s)%s", device, precision, f", {dist_info.world_size} 个进程" if dist_info.world_size > 1 else "")
    data = data_gen.generate_dataset(cfg.num_samples, cfg.image_size, cfg.seed, cfg.difficulty)
    split = split_indices(len(data), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    images, labels = torch.from_numpy(data.images).unsqueeze(1), torch.from_numpy(data.labels("lesion"))
    subsets = {k: ArrayDataset(images[idx], labels[idx]) for k, idx in split.items()}
    log.info("数据: %d 张 %dx%d (%s), 训练/验证/测试 = %d/%d/%d", len(data), cfg.image_size, cfg.image_size,
             cfg.difficulty, *(len(split[k]) for k in ("train", "val", "test")))
    if dist_info.main and cfg.figures:
        visualize.plot_synthetic_samples(data.images[split["train"]], data.lesions[split["train"]], out_dir, seed=cfg.seed)

    model = UNet(n_channels=1, n_classes=1, base_channels=cfg.base_channels, bilinear=cfg.bilinear, norm=cfg.norm)
    log.info("模型参数量: %s", f"{count_parameters(model):,}")
    val, bs = subsets["val"], max(cfg.batch_size, 16)
    prep = synthetic_preprocessing(cfg)
    result = train_model(cfg, model, subsets["train"],
                         lambda m: evaluate(m, val.images, val.labels, bs, device, precision, cfg.channels_last, cfg.threshold),
                         device, precision, {"preprocessing": prep.to_dict()}, dist_info, threads=threads)
    if not dist_info.main:
        return finish_ranks(dist_info, {})
    if cfg.figures:
        visualize.plot_training_history(result.history, out_dir)
    summary = test_synthetic(cfg, subsets["test"], prep, device, precision, out_dir)
    summary.update(best_epoch=result.best_epoch, best_val_dice=result.best_val.get("dice"), epochs=cfg.epochs,
                   **_timing(result, t_run), device=str(device), dtype=precision, difficulty=cfg.difficulty,
                   seed=cfg.seed, checkpoint=str(cfg.checkpoint), config=asdict(cfg))
    update_checkpoint(cfg.checkpoint, test_metrics={k: summary[k] for k in ("dice", "iou", "sensitivity", "precision")}
                      | {"test_images": summary["test_images"]})
    write_json_atomic(out_dir / "history.json", result.history)
    write_json_atomic(out_dir / "summary.json", summary)
    log.info("全部完成! 图像与结果保存在 %s/, 模型 %s (%.1f s)", out_dir, cfg.checkpoint, summary["total_seconds"])
    return finish_ranks(dist_info, summary)


def test_synthetic(cfg: TrainConfig, test: ArrayDataset, prep: Preprocessing, device: torch.device, precision: str,
                   out_dir: Path) -> dict:
    """Score the best-validation checkpoint, reloaded from disk as a user would, on the test images."""
    best, _ = load_checkpoint(cfg.checkpoint, device)
    if cfg.channels_last:
        to_channels_last(best, best.args.dim)
    probs = predict_planes(best, test.images.numpy(), prep, device, precision, cfg.overlap,
                           batch_size=max(cfg.batch_size, 16), channels_last=cfg.channels_last)
    pred = probs_to_labels(probs, cfg.threshold)
    scores = per_case_scores(pred, test.labels.numpy())
    s = summarize(scores)
    loss = evaluate(best, test.images, test.labels, max(cfg.batch_size, 16), device, precision, cfg.channels_last)["loss"]
    baseline_dice, baseline_t, baseline_dir = best_threshold_dice(test.images[:, 0].numpy(), test.labels.numpy())
    show = _showcase_indices(scores["dice"], k=4)
    if cfg.figures:
        visualize.plot_predictions([test.images[i, 0].numpy() for i in show], [test.labels[i].numpy() for i in show],
                                   [pred[i] for i in show], out_dir, scores=[float(scores["dice"][i]) for i in show])
    log.info("测试集 (%d 张): Dice %.4f | IoU %.4f | 敏感度 %.4f | 精确率 %.4f | 最佳全局阈值 Dice %.4f",
             len(test), s["dice"], s["iou"], s["sensitivity"], s["precision"], baseline_dice)
    return {"dice": s["dice"], "iou": s["iou"], "sensitivity": s["sensitivity"], "precision": s["precision"],
            "dice_std": s["dice_std"], "test_images": len(test), "test_loss": loss,
            "threshold_baseline_dice": baseline_dice, "threshold_baseline": f"image {baseline_dir} {baseline_t:.3f}",
            "counting": "per-image mean over the test split; empty prediction on empty truth = 1; "
                        "sensitivity/precision skip images where they are undefined"}


def synthetic_preprocessing(cfg: TrainConfig) -> Preprocessing:
    """Synthetic images are in [0, 1], i.e. 8-bit grey / 255: a model trained on them reads PNGs with ``unit``."""
    return Preprocessing(normalization="unit", in_channels=1, patch_size=cfg.image_size, class_names=["lesion"])


# ------------------------------------------------------------------------------------- shared steps
def setup_run(cfg: TrainConfig) -> tuple[torch.device, str, DistInfo, ThreadPolicy]:
    """Threads, device, numeric precision and, under ``torchrun``, the process group (gloo on CPU, NCCL on CUDA).
    The thread policy starts measuring the machine's load here, so that training starts with what it found."""
    threads = ThreadPolicy(cfg.threads)
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
    return device, resolve_precision(cfg.precision, device), dist_info, threads


def finish_ranks(dist_info: DistInfo, result: dict) -> dict:
    """Under torchrun, hold the other ranks until rank 0 has tested and written everything, so no process
    tears down its gloo connection while another still holds it (that race aborted a rank now and then)."""
    if dist_info.world_size > 1:
        torch.distributed.barrier()
    return result


def train_model(cfg: TrainConfig, model: UNet, train_data, validate, device: torch.device, precision: str,
                extra: dict, dist_info: DistInfo, augment=None, loss_fn=segmentation_loss,
                threads: ThreadPolicy | None = None) -> FitResult:
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
    return fit(model, train_data, validate, cfg, device, precision, cfg.checkpoint, augment, extra, last, resume, dist_info,
               loss_fn, threads)


def check_outputs(cfg: TrainConfig, min_free_mb: int = 200) -> Path:
    """Check, before any data is read, that the outputs can be written: the output folder and the checkpoint's
    folder are writable with ``min_free_mb`` free, and the checkpoint path is not a folder.

    Raises :class:`ConfigError`, so a run fails in the first second instead of after an hour of training.
    """
    out_dir, ckpt = Path(cfg.output_dir), Path(cfg.checkpoint)
    if ckpt.is_dir():
        raise ConfigError(f"{ckpt}: --checkpoint names a folder, expected a file path such as {ckpt / 'best_unet.pth'}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: --output-dir names a file, expected a folder")
    for folder in {out_dir, ckpt.resolve().parent}:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
                pass
        except OSError as exc:
            raise ConfigError(f"{folder}: cannot write there ({exc.strerror or exc}); choose another --output-dir/--checkpoint") from exc
        free_mb = shutil.disk_usage(folder).free / 2**20
        if free_mb < min_free_mb:
            raise ConfigError(f"{folder}: only {free_mb:.0f} MB free on disk, need at least {min_free_mb} MB for checkpoints and figures")
    return out_dir


def record_run(cfg: TrainConfig, device: torch.device, precision: str) -> Path:
    """``run_info.json``: config, versions, device, threads and seed of this run."""
    out_dir = Path(cfg.output_dir)
    info = {"config": asdict(cfg), "seed": cfg.seed, "device": str(device), "dtype": precision,
            "torch_threads": torch.get_num_threads(), "command": sys.argv,
            "versions": {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__,
                         "platform": platform.platform()},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json_atomic(out_dir / "run_info.json", info)
    return out_dir


def _timing(result: FitResult, t_run: float) -> dict:
    return {"train_seconds": round(result.train_seconds, 2), "train_cpu_seconds": round(result.train_cpu_seconds, 1),
            "total_seconds": round(time.perf_counter() - t_run, 2)}


def _showcase_indices(dice: np.ndarray, k: int = 4) -> list[int]:
    """Best, two middle and worst test images (an honest sample, not only the good ones)."""
    order = np.argsort(-dice, kind="stable")
    picks = [order[0], order[len(order) // 3], order[2 * len(order) // 3], order[-1]]
    return list(dict.fromkeys(int(i) for i in picks))[:k]


# ------------------------------------------------------------------------------------- real datasets
def auto_preprocessing(cfg: TrainConfig, first: medio.ImageMeta, first_image: np.ndarray, class_values, class_names,
                       channel_names: list[str] | None = None) -> Preprocessing:
    """Pick intensity normalisation and channels from the data unless the config says otherwise: a CT window
    for CT, /255 for 8-bit pictures, z-score for MRI and other volumes; per channel for multi-channel scans
    (a channel named CT gets the window)."""
    photo = first.format in ("png", "jpeg", "bmp", "tiff", "gif")
    rgb = photo and first.channels == 3
    norm = cfg.normalize
    if norm == "auto":
        if cfg.window or first.extra.get("modality") == "CT" or (not photo and float(first_image.min()) <= -500):
            norm = "window"  # CT in HU
        elif photo:
            norm = "unit" if float(first_image.max()) <= 255 else "percentile"
        else:
            norm = "zscore"  # MRI and other volumes without a physical intensity scale
    window = parse_window(cfg.window) if cfg.window else (list(WINDOW_PRESETS["abdomen"]) if norm == "window" else None)
    n_in = cfg.in_channels or (3 if rgb else first.channels)
    channels = None
    if n_in > 1 and not rgb:
        names = channel_names if channel_names and len(channel_names) == n_in else [str(c) for c in range(n_in)]
        channels = [{"name": n, "normalization": "window" if n.upper() == "CT" and cfg.normalize == "auto" else norm,
                     "window": window or (list(WINDOW_PRESETS["abdomen"]) if n.upper() == "CT" else None)}
                    for n in names]
    prep = Preprocessing(normalization=norm, window=window, in_channels=n_in, resize_long_side=cfg.resize,
                         patch_size=cfg.image_size, class_values=class_values, class_names=class_names,
                         mirror_tta=cfg.tta, channels=channels, regions=regions_overlap(class_values))
    if cfg.dim == 3:  # zero background (skull-stripped MRI): statistics of the body only
        prep.zscore_nonzero = norm == "zscore" and float(np.mean(first_image == 0)) > 0.25
        prep.crop_nonzero, prep.dim = True, 3
    return prep


def regions_overlap(class_values: list[list[int]] | None) -> bool:
    """True when two label groups share a value (``wt=1+2+3,tc=1+3,et=3``): they are overlapping regions, each its
    own sigmoid output, not exclusive classes."""
    seen: set[int] = set()
    for group in class_values or []:
        if seen & set(group):
            return True
        seen |= set(group)
    return False


def volume_geometry(cfg: TrainConfig, refs: list) -> tuple[list[float], list[int], list[list[int]]]:
    """3D target spacing, patch and pooling: from ``--spacing`` / ``--patch`` when given, else from the cases'
    headers (:func:`resample.target_spacing`, :func:`plan.patch_3d`)."""
    import plan
    import resample

    metas = [medio.read_meta(r.channels[0] if r.channels and r.channels[0] else r.image) for r in refs]
    flat = [m.path for m in metas if len(m.shape) != 3]
    if flat:
        raise InputError(f"{flat[0]}: --dim 3 needs volumes, this image is 2D ({len(flat)} such case(s); use --dim 2)")
    spacing = _triple(cfg.spacing, "--spacing", float) or list(resample.target_spacing([m.spacing for m in metas], [m.shape for m in metas]))
    shapes = [resample.new_shape(m.shape, m.spacing, spacing) for m in metas]
    median = [int(np.median([s[a] for s in shapes])) for a in range(3)]
    patch = _triple(cfg.patch, "--patch", int)
    if patch:
        pools = plan.pooling(patch, spacing)
        return spacing, plan.fit_patch(patch, pools), pools
    patch, pools = plan.patch_3d(median, spacing)
    return spacing, patch, pools


def _triple(text: str | None, flag: str, kind: type) -> list | None:
    if not text:
        return None
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"{flag} {text!r}: expected three positive numbers Z,Y,X")
    if flag == "--patch" and (max(values) > 512 or np.prod(values) > 64 * 256 ** 2):
        raise ConfigError(f"{flag} {text!r}: expected at most 512 voxels per axis and {64 * 256 ** 2} in all "
                          "(a larger patch would not fit a CPU's memory)")
    return values


def find_cases(cfg: TrainConfig) -> tuple[datasets.DatasetSpec, list]:
    """The dataset's layout and case references (``--max-cases`` applied; DICOM mask structures resolved)."""
    spec = datasets.discover(cfg.data, cfg.images_dir, cfg.masks_dir)
    refs = spec.cases[: cfg.max_cases] if cfg.max_cases else spec.cases
    if not refs:
        raise InputError(f"{spec.root}: no cases found ({spec.layout} layout; expected image files with matching masks)")
    if spec.layout == "dicom+masks":
        groups = datasets.resolve_dicom_labels(spec, cfg.labels)
        for r in refs:
            r.mask_series = groups
    return spec, refs


def make_preprocessing(cfg: TrainConfig, spec: datasets.DatasetSpec, refs: list) -> Preprocessing:
    """The :class:`Preprocessing` of a run: labels, normalisation and channels from the first case, 3D geometry."""
    if spec.layout == "dicom+masks":
        groups = refs[0].mask_series
        class_values = None if len(groups) == 1 else [[k] for k in range(1, len(groups) + 1)]
        class_names = ["+".join(g) for g in groups]
    else:
        class_values, class_names = parse_labels(cfg.labels, spec.label_names)
    first_image, first_meta = datasets.read_case_image(refs[0])
    prep = auto_preprocessing(cfg, first_meta, first_image, class_values, class_names, spec.channel_names)
    if cfg.dim == 3:
        prep.spacing, prep.patch, prep.pool = volume_geometry(cfg, refs)
    log.info("数据集 %s: %s 布局, %d 例; 预处理 %s", spec.root, spec.layout, len(refs), prep)
    return prep


def run_dataset(cfg: TrainConfig, check_only: bool = False, given: set[str] | None = None) -> dict:
    """Train and evaluate on a real dataset folder (``cfg.data``); per-case metrics at the original resolution.

    ``given``: the config fields the user set; every other one comes from the plan (``plan.py``: the dataset's
    fingerprint, this machine's measured step time and ``cfg.time_budget``). None: ``cfg`` is used as it is.
    """
    cfg.validate()
    t_run = time.perf_counter()
    set_seed(cfg.seed)
    out_dir = check_outputs(cfg)
    spec, refs = find_cases(cfg)
    plan, fp = (None, None) if given is None else planning.plan_run(cfg, given, spec, refs, out_dir)
    if plan is not None:
        cfg = replace(cfg, **{k: v for k, v in plan.values.items() if k in asdict(cfg)})
    prep = make_preprocessing(cfg, spec, refs)
    if check_only:
        report = dataset_report(datasets.load_cases(refs, prep, spec.label_names), prep)
        if plan is not None:  # the schedule needs a measured step: --check shows everything else
            log.info("计划 (不含训练时长; plan.json 在训练时写出):\n%s", plan.table())
        report.update(plan=asdict(plan) if plan else None, fingerprint=fp.to_dict() if fp else None)
        write_json_atomic(out_dir / "dataset_report.json", report)
        return report
    device, precision, dist_info, threads = setup_run(cfg)
    split = datasets.split_cases(refs, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    if plan is not None:
        cfg = planning.size_run(cfg, plan, given, prep, split, fp, device, precision)
    if dist_info.main:
        record_run(cfg, device, precision)
        write_json_atomic(out_dir / "split.json", split)
    cases = datasets.load_cases(refs, prep, spec.label_names)
    by_id = {c.ref.case_id: c for c in cases}
    sets = {k: [by_id[i] for i in ids] for k, ids in split.items()}
    log.info("按病例划分 训练/验证/测试 = %d/%d/%d 例 (split.json)", *(len(sets[k]) for k in ("train", "val", "test")))
    if not sets["train"] or not sets["val"]:
        raise InputError(f"{spec.root}: too few cases ({len(refs)}) for a train/validation split")
    result = train_on_cases(cfg, sets, prep, split, device, precision, dist_info, threads)
    if not dist_info.main:
        return finish_ranks(dist_info, {})
    t_eval = time.perf_counter()
    summary = test_cases(cfg, sets, prep, device, precision, out_dir, choose_tta=plan is not None and "tta" not in given)
    cfg = replace(cfg, tta=prep.mirror_tta)
    summary.update(best_epoch=result.best_epoch, best_val_dice=result.best_val.get("dice"), epochs=cfg.epochs,
                   **_timing(result, t_run), eval_seconds=round(time.perf_counter() - t_eval, 2), device=str(device),
                   dtype=precision, data=str(cfg.data), layout=spec.layout, preprocessing=prep.to_dict(),
                   checkpoint=str(cfg.checkpoint), config=asdict(cfg))
    if plan is not None:
        summary.update(planning.finish(plan, fp, result, cfg, out_dir))
    write_json_atomic(out_dir / "history.json", result.history)
    write_json_atomic(out_dir / "summary.json", summary)
    log.info("全部完成! 结果保存在 %s/, 模型 %s (%.1f s)", out_dir, cfg.checkpoint, summary["total_seconds"])
    return finish_ranks(dist_info, summary)


def patch_data(cfg: TrainConfig, sets: dict, prep: Preprocessing) -> tuple:
    """(training patches, fixed validation patches (x, y), patches per epoch): 2D crops of every plane, or 3D
    crops of the prepared volumes, foreground-oversampled."""
    if prep.dim == 3:
        vols = {k: ([c.volume.volume for c in sets[k]], [c.volume.labels for c in sets[k]]) for k in ("train", "val")}
        length = cfg.samples_per_epoch or max(64, len(sets["train"]))
        kw = {"fg_prob": cfg.fg_prob, "n_classes": prep.n_classes, "regions": prep.regions}
        train_data = datasets.PatchDataset3D(*vols["train"], prep.patch, length, seed=cfg.seed, **kw)
        # one patch per case (at least 16): the whole-case Dice below is the score; this is the loss curve
        val = datasets.PatchDataset3D(*vols["val"], prep.patch, min(64, max(16, len(sets["val"]))), seed=cfg.seed + 1,
                                      **kw)
    else:
        planes, labels, pads = datasets.training_planes(sets["train"], prep)
        length = cfg.samples_per_epoch or max(256, len(planes))
        train_data = datasets.PatchDataset(planes, labels, prep.patch_size, length, cfg.fg_prob, cfg.seed, pads)
        vp, vl, vpad = datasets.training_planes(sets["val"], prep)
        val = datasets.PatchDataset(vp, vl, prep.patch_size, min(256, max(32, len(vp))), cfg.fg_prob, cfg.seed + 1, vpad)
    return train_data, val.__getitems__(list(range(len(val)))), length


def train_on_cases(cfg: TrainConfig, sets: dict, prep: Preprocessing, split: dict, device: torch.device,
                   precision: str, dist_info: DistInfo, threads: ThreadPolicy | None = None) -> FitResult:
    """Foreground-oversampled patches of the training cases; validation = patch loss + whole-case Dice."""
    train_data, (val_x, val_y), length = patch_data(cfg, sets, prep)
    if dist_info.main and cfg.figures:
        mid = (slice(None), 0) if prep.dim == 2 else (slice(None), 0, val_x.shape[2] // 2)  # 3D: the middle slices
        visualize.plot_synthetic_samples(val_x[mid].numpy(), val_y[mid[:1] + mid[2:]].numpy() > 0,
                                         Path(cfg.output_dir), seed=cfg.seed)
    anisotropic = prep.dim == 3 and max(prep.spacing) > 3 * min(prep.spacing)
    augment = Augmenter(seed=cfg.seed, elastic=cfg.elastic if prep.dim == 2 else 0.0, in_plane_only=anisotropic,
                        photometric=cfg.photometric) if cfg.augment else None
    loss_fn = partial(segmentation_loss, regions=prep.regions)

    def validate(m: UNet) -> dict:
        loss = evaluate(m, val_x, val_y, 16 if prep.dim == 2 else 2, device, precision, cfg.channels_last,
                        regions=prep.regions)["loss"]
        rows = evaluate_cases(m, sets["val"], prep, device, precision, cfg, hd=False, mirror=False)  # TTA: test only
        return {"loss": loss, "summary": summarize_rows(rows, prep)}

    model = UNet(n_channels=prep.in_channels, n_classes=prep.model_out_channels, base_channels=cfg.base_channels,
                 bilinear=cfg.bilinear, dim=prep.dim, pool=prep.pool, norm=cfg.norm)
    size = "x".join(map(str, prep.patch)) if prep.dim == 3 else f"{prep.patch_size}x{prep.patch_size}"
    log.info("模型参数量: %s; 每轮 %d 个 %s 训练块", f"{count_parameters(model):,}", length, size)
    result = train_model(cfg, model, train_data, validate, device, precision,
                         {"preprocessing": prep.to_dict(), "split": split}, dist_info, augment, loss_fn, threads)
    if dist_info.main and cfg.figures:
        visualize.plot_training_history(result.history, Path(cfg.output_dir))
    return result


def test_cases(cfg: TrainConfig, sets: dict, prep: Preprocessing, device: torch.device, precision: str,
               out_dir: Path, choose_tta: bool = False) -> dict:
    """Choose the post-processing (and with ``choose_tta`` whether mirroring pays off) on the validation cases,
    then score the test cases with it (per case, at the original resolution); writes the per-case CSV, the
    overlays and the test metrics into the checkpoint."""
    best, _ = load_checkpoint(cfg.checkpoint, device)
    val_rows = evaluate_cases(best, sets["val"], prep, device, precision, cfg, hd=False, compare_largest=True)
    tta = None
    if choose_tta:
        mirrored = evaluate_cases(best, sets["val"], prep, device, precision, cfg, hd=False, compare_largest=True,
                                  mirror=True)
        plain_dice, mirror_dice = (float(np.mean([r["dice"] for r in rows])) for rows in (val_rows, mirrored))
        prep.mirror_tta = mirror_dice >= plain_dice + TTA_MIN_GAIN
        tta = {"val_dice": plain_dice, "val_dice_mirrored": mirror_dice, "chosen": prep.mirror_tta}
        val_rows = mirrored if prep.mirror_tta else val_rows
        update_checkpoint(cfg.checkpoint, preprocessing=prep.to_dict())
        log.info("镜像测试时增强 (验证集 Dice %.4f -> %.4f): %s", plain_dice, mirror_dice, "采用" if prep.mirror_tta else "不采用")
    post = choose_postprocessing(val_rows, prep)
    log.info("后处理 (在验证集上选择): 只保留最大连通域的类别 %s", post["largest_component"] or "无")
    rows = evaluate_cases(best, sets["test"], prep, device, precision, cfg, hd=True, keep_pred=True,
                          largest=largest_classes(prep.class_names, post))
    write_case_csv(out_dir / "metrics_per_case.csv", rows)
    stats = summarize_rows(rows, prep)
    hd_unit = "mm" if all(c.meta.spacing_known for c in sets["test"]) else "px"  # plain photos have no spacing
    if cfg.figures:
        plot_case_overlays(rows, out_dir, prep)
    update_checkpoint(cfg.checkpoint, postprocessing=post,
                      test_metrics={k: stats[k] for k in ("dice", "iou", "sensitivity", "precision")}
                      | {"per_class_dice": {n: pc["dice"] for n, pc in stats["per_class"].items()},
                         "test_cases": len(sets["test"])})
    write_json_atomic(out_dir / "metrics_summary.json", stats)
    for name, pc in stats["per_class"].items():
        log.info("测试集 %s (%d 例): Dice %.4f ± %.4f | IoU %.4f | HD95 %.2f %s | 病灶检出 %d/%d, 假阳性病灶 %d",
                 name, pc["n"], pc["dice"], pc["dice_std"], pc["iou"], pc["hd95"], hd_unit, pc["detected_lesions"],
                 pc["true_lesions"], pc["false_positive_lesions"])
    return {**{k: stats[k] for k in ("dice", "iou", "sensitivity", "precision")}, "per_class": stats["per_class"],
            "test_cases": len(sets["test"]), "threshold_baseline_dice": None, "postprocessing": post,
            "mirror_tta": tta, "hd95_unit": hd_unit,
            "counting": "per-case (per patient volume / per image) at the original resolution, after the "
                        "post-processing chosen on validation; see README"}

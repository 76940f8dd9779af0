#!/usr/bin/env python
"""nnU-Net v2 (3d_fullres, default plans) as a benchmark peer on the same CPU, data and held-out cases.

Standalone: the product never imports this file. Run it with the benchmark venv's python (it needs nnunetv2,
see requirements-bench.txt), never with the product's environment:

    python -m venv /work/nnunet-venv && /work/nnunet-venv/bin/pip install -r requirements-bench.txt
    /work/nnunet-venv/bin/python benchmarks/nnunet_peer.py --data /work/shared/data/msd_hippocampus \\
        --split RUN/split.json --minutes 30 --out /tmp/nnunet_peer_30min

What it does, phase by phase (each phase's wall clock is reported):

1. convert: DIR/nnUNet_raw/Dataset004_Hippocampus in nnU-Net v2's raw format: imagesTr/<case>_0000.nii.gz and
   labelsTr/<case>.nii.gz as symlinks to the --data files (labels are exact 0/1/2 there, float64 or uint8 on
   disk; nnU-Net casts segmentations to int on its own), dataset.json (channel_names {"0": "MRI"}, labels
   background/anterior/posterior = 0/1/2, numTraining, file_ending ".nii.gz"). The raw dataset holds the
   train+val AND the test cases of --split (all 260 for the project's split), because nnU-Net only validates
   on cases of its own dataset: splits_final.json (written into nnUNet_preprocessed after preprocessing) makes
   fold 0 = {"train": our train + val (208), "val": our test (52)}, so nnU-Net's fold-0 final validation is
   exactly our held-out test set. Side effect to know: nnU-Net's dataset fingerprint (median shape/spacing,
   and with it patch and batch size) is computed over all cases including the 52 test images (no labels are
   used for an MRI dataset: z-score normalisation is per case). Every case here has 1 mm spacing and
   similar shapes, so the plan would not differ in practice, but it is not strictly blind.
2. plan_preprocess: ``nnUNetv2_plan_and_preprocess -d 4 -c 3d_fullres`` (nnU-Net's defaults, i.e. its own
   process counts) in a child process.
3. train: 3d_fullres fold 0 on the CPU, in this process, like ``nnUNetv2_train 4 3d_fullres 0 -device cpu``
   (torch.set_num_threads(cpu_count) as that entry point does, nnU-Net's data-augmentation workers from
   nnUNet_n_proc_DA or its default min(12, cpu_count)). The trainer is ``nnUNetTrainerWallClock``, a
   subclass of the default ``nnUNetTrainer`` defined below that changes only the length of training:
   epochs of ``--iters-per-epoch`` (default 10) training iterations plus a fifth as many pseudo-validation
   iterations (nnU-Net's own 250:50 ratio) instead of 250 + 50, and as many epochs as fit the clock: after
   every epoch the remaining time to the deadline (script start + --minutes, i.e. conversion and
   preprocessing count against the budget; minus --reserve-validation seconds if given) is divided by the
   measured epoch time (mean of the latest three epochs, the first, warm-up epoch only while it is the sole
   one) and rounded to the nearest whole epoch, so the run ends within about half an epoch of the deadline
   (at least one epoch always runs). nnU-Net's poly learning-rate schedule is re-targeted to that epoch
   count every epoch (``num_epochs`` and ``lr_scheduler.max_steps``), so it decays to ~0 at the end as in a
   full nnU-Net run. Everything else (network, loss, augmentation, sampling, SGD, checkpoints) is the
   default trainer's.
4. final_validation: ``perform_actual_validation()`` on fold 0's val set (our 52 test cases): sliding window,
   Gaussian blending, default mirroring, nnU-Net's export and ``compute_metrics_on_folder``; its
   ``validation/summary.json`` gives per-class Dice (anterior = label 1, posterior = label 2, mean =
   nnU-Net's foreground mean). It runs after the budget and is timed separately.

The last stdout line is one JSON object (also written to DIR/nnunet_result.json): dice_anterior,
dice_posterior, dice_mean, seconds per phase, iterations and epochs trained, the plan's patch and batch size.

The primus / timm / torchvision import problem, and how this script avoids it
------------------------------------------------------------------------------
nnunetv2 -> dynamic_network_architectures -> timm -> torchvision are hard dependencies, so pip installs the
PyPI torchvision build that pairs with torch 2.13 (0.28.0). That wheel is built against the CUDA torch; with
the local CPU torch its import fails ("RuntimeError: operator torchvision::nms does not exist"). Only three
modules import timm: dynamic_network_architectures/architectures/{primus,dinov2_eva}.py and
building_blocks/eva.py, reached only through nnunetv2/training/nnUNetTrainer/primus/primus_trainers.py.
``nnUNetv2_train -tr NAME`` finds NAME with ``recursive_find_trainer_class_by_name``, which imports every
module under nnunetv2/training/nnUNetTrainer until it finds the class; ``primus`` sorts before ``variants``,
so any trainer other than the top-level ``nnUNetTrainer`` imports primus first and the RuntimeError is
re-raised (the finder only skips a ModuleNotFoundError of the module itself). The plain default
``nnUNetTrainer`` would be found in the top-level module before any subpackage is imported, but it trains
1000 epochs of 250 iterations: a budgeted run needs a different trainer.

Choice: no discovery at all. This script defines its trainer subclass itself and instantiates it directly
(what ``get_trainer_from_args`` does after the lookup), so no primus module is ever imported. Everything else
on this path imports no timm: planning and preprocessing discover classes only under
nnunetv2/experiment_planning and nnunetv2/preprocessing, and the network is located with
``pydoc.locate("dynamic_network_architectures.architectures.unet.PlainConvUNet")``, which imports unet.py
only. Nothing inside site-packages is modified, no stub module is put on PYTHONPATH, and torchvision/timm
stay installed (pip check stays clean). The result JSON records ``imported_timm_torchvision`` (whether either
was imported in this process by the end: false on this path). Rejected alternatives: a stub timm/torchvision
on PYTHONPATH would have to provide working RotaryEmbeddingCat/EvaBlock/... for the finder's import of primus
to succeed; uninstalling torchvision turns the RuntimeError into a ModuleNotFoundError for 'timm', which the
finder re-raises as well; a trainer under nnUNet_extTrainer is looked for only after the built-in folder.

--smoke: 2 training cases (the first two of train+val) and 2 validation cases (the first two of test) only,
one epoch of 2 training iterations and 1 pseudo-validation iteration, 1 worker process for fingerprinting,
preprocessing and export (-npfp 1 -np 1, nnUNet_def_n_proc=1) instead of nnU-Net's 8/4/8: checks the whole
chain in 2-3 minutes. With --minutes too, the 2-iteration epochs run by the clock (checks the re-planning).
Its plan differs (nnU-Net caps the batch size by the dataset size) and its Dice means nothing.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

DATASET_ID = 4
DATASET_NAME = "Dataset004_Hippocampus"
LABELS = {"background": 0, "anterior": 1, "posterior": 2}
TRAINER_NAME = "nnUNetTrainerWallClock"
CONFIGURATION = "3d_fullres"
FOLD = 0


def log(msg: str) -> None:
    print(f"[nnunet_peer] {msg}", flush=True)


# ----------------------------------------------------------------------------------------- conversion
def read_split(path: Path) -> dict[str, list[str]]:
    split = json.loads(path.read_text())
    missing = [k for k in ("train", "val", "test") if k not in split]
    if missing:
        raise SystemExit(f"{path}: no {missing} list (expected {{'train': [...], 'val': [...], 'test': [...]}})")
    out = {k: [str(i) for i in split[k]] for k in ("train", "val", "test")}
    seen: dict[str, str] = {}
    for k, ids in out.items():
        for i in ids:
            if i in seen:
                raise SystemExit(f"{path}: case {i} is in both {seen[i]!r} and {k!r}")
            seen[i] = k
    if not out["test"] or not (out["train"] or out["val"]):
        raise SystemExit(f"{path}: needs train/val cases and test cases")
    return out


def convert(data: Path, cases: list[str], raw_root: Path) -> Path:
    """nnU-Net v2 raw dataset of ``cases`` (symlinks to the originals) with its dataset.json."""
    ds = raw_root / DATASET_NAME
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    for case in cases:
        img, lab = data / "imagesTr" / f"{case}.nii.gz", data / "labelsTr" / f"{case}.nii.gz"
        if not img.is_file() or not lab.is_file():
            raise SystemExit(f"case {case} of the split: {img} or {lab} is missing")
        (ds / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(img.resolve())
        (ds / "labelsTr" / f"{case}.nii.gz").symlink_to(lab.resolve())
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": LABELS, "numTraining": len(cases),
                    "file_ending": ".nii.gz", "name": "Hippocampus",
                    "description": "MSD Task04 hippocampus, converted by benchmarks/nnunet_peer.py"}
    (ds / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return ds


# ------------------------------------------------------------------------------------------ training
def make_trainer_class(deadline: float | None, iters_per_epoch: int, val_iters: int, fixed_epochs: int | None):
    """The default nnUNetTrainer with a wall-clock-sized schedule (imported here: nnunetv2 after the env setup)."""
    import numpy as np
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerWallClock(nnUNetTrainer):
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):  # noqa: B008  (nnUNetTrainer's signature)
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch = iters_per_epoch
            self.num_val_iterations_per_epoch = val_iters
            # a provisional count: epoch 0 runs at the initial rate whatever it is; re-planned after each epoch
            self.num_epochs = fixed_epochs if fixed_epochs is not None else 1000
            self.epoch_seconds: list[float] = []
            self.plan_log: list[dict] = []

        def replan(self) -> None:
            """Epochs that fit the time left, rounded to the nearest whole epoch; poly LR retargeted."""
            done = self.current_epoch  # on_epoch_end has already counted the finished epoch
            recent = self.epoch_seconds[1:][-3:] or self.epoch_seconds[-1:]
            per_epoch = float(np.mean(recent))
            left = deadline - time.time()
            more = max(0, int(np.floor(left / per_epoch + 0.5)))
            self.num_epochs = done + more
            self.lr_scheduler.max_steps = max(self.num_epochs, done + 1)
            self.plan_log.append({"after_epoch": done - 1, "epoch_s": round(per_epoch, 2),
                                  "seconds_left": round(left, 1), "epochs_total": self.num_epochs})
            self.print_to_log_file(f"wall clock: {per_epoch:.1f} s/epoch, {left:.0f} s left -> "
                                   f"{self.num_epochs} epochs in all ({more} more)")

        def run_training(self):
            # nnUNetTrainer.run_training with a while loop: its range() would fix num_epochs at the start
            self.on_train_start()
            while self.current_epoch < self.num_epochs:
                t_epoch = time.time()
                self.on_epoch_start()
                self.on_train_epoch_start()
                train_outputs = [self.train_step(next(self.dataloader_train))
                                 for _ in range(self.num_iterations_per_epoch)]
                self.on_train_epoch_end(train_outputs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val_outputs = [self.validation_step(next(self.dataloader_val))
                                   for _ in range(self.num_val_iterations_per_epoch)]
                    self.on_validation_epoch_end(val_outputs)
                self.on_epoch_end()
                self.epoch_seconds.append(time.time() - t_epoch)
                if deadline is not None:
                    self.replan()
            self.on_train_end()

    nnUNetTrainerWallClock.__qualname__ = TRAINER_NAME
    return nnUNetTrainerWallClock


def train_and_validate(trainer_cls, result: dict) -> Path:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed

    torch.set_num_threads(multiprocessing.cpu_count())  # what nnUNetv2_train -device cpu does
    base = join(nnUNet_preprocessed, DATASET_NAME)
    plans = load_json(join(base, "nnUNetPlans.json"))
    plans["continue_training"] = False
    cfg = plans["configurations"][CONFIGURATION]
    result["plan"] = {"patch_size": cfg.get("patch_size"), "batch_size": cfg.get("batch_size"),
                      "spacing": cfg.get("spacing"),
                      "median_image_size_in_voxels": cfg.get("median_image_size_in_voxels")}
    trainer = trainer_cls(plans=plans, configuration=CONFIGURATION, fold=FOLD,
                          dataset_json=load_json(join(base, "dataset.json")), device=torch.device("cpu"))
    t = time.time()
    trainer.run_training()
    result["seconds"]["train"] = round(time.time() - t, 1)
    result.update(epochs=trainer.current_epoch, iters_per_epoch=trainer.num_iterations_per_epoch,
                  val_iters_per_epoch=trainer.num_val_iterations_per_epoch,
                  iterations=trainer.current_epoch * trainer.num_iterations_per_epoch,
                  epoch_seconds=[round(s, 1) for s in trainer.epoch_seconds], replans=trainer.plan_log)
    log(f"trained {result['iterations']} iterations ({result['epochs']} epochs) in {result['seconds']['train']} s")
    t = time.time()
    trainer.perform_actual_validation(False)
    result["seconds"]["final_validation"] = round(time.time() - t, 1)
    return Path(trainer.output_folder) / "validation" / "summary.json"


def read_summary(path: Path) -> dict:
    s = json.loads(path.read_text())
    per_class = s["mean"]

    def dice(label: int) -> float:
        return float(per_class[str(label)]["Dice"])

    return {"dice_anterior": dice(LABELS["anterior"]), "dice_posterior": dice(LABELS["posterior"]),
            "dice_mean": float(s["foreground_mean"]["Dice"]), "n_cases_scored": len(s.get("metric_per_case", []))}


# ---------------------------------------------------------------------------------------------- main
def environment() -> dict:
    """Versions and worker settings of the nnU-Net run, for its result JSON."""
    import torch
    return {"nnunetv2_version": version("nnunetv2"), "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_count": multiprocessing.cpu_count(),
            "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA"),
            "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc"), "python": platform.python_version(),
            "imported_timm_torchvision": any(m.split(".")[0] in ("timm", "torchvision") for m in sys.modules)}


def build_parser() -> argparse.ArgumentParser:
    """The script's options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True,
                   help="folder with imagesTr/ and labelsTr/ (hippocampus_XXX.nii.gz)")
    p.add_argument("--split", type=Path, required=True,
                   help='our split.json: {"train": [...], "val": [...], "test": [...]}')
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget from the script's start: conversion + plan/preprocess + training "
                        "(required; with --smoke optional: it then sizes the 2-iteration epochs by the clock)")
    p.add_argument("--out", type=Path, required=True, help="work folder (nnUNet_raw/preprocessed/results, result JSON)")
    p.add_argument("--iters-per-epoch", type=int, default=10,
                   help="training iterations per nnU-Net epoch (pseudo-validation: a fifth of it, at least 1)")
    p.add_argument("--reserve-validation", type=float, default=0.0,
                   help="seconds taken off the training deadline to leave room for the final validation")
    p.add_argument("--overwrite", action="store_true", help="delete this script's earlier nnU-Net folders in --out")
    p.add_argument("--smoke", action="store_true",
                   help="2 training + 2 validation cases, epochs of 2 iterations (1 epoch unless --minutes)")
    return p


def make_work_dirs(out: Path, overwrite: bool, smoke: bool) -> dict[str, Path]:
    """nnU-Net's three folders under ``out``, exported as its environment variables."""
    dirs = {"nnUNet_raw": out / "nnUNet_raw", "nnUNet_preprocessed": out / "nnUNet_preprocessed",
            "nnUNet_results": out / "nnUNet_results"}
    existing = [d for d in dirs.values() if d.exists()]
    if existing and not overwrite:
        raise SystemExit(f"{', '.join(map(str, existing))} exist: pass --overwrite to start again")
    for d in existing:
        shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)
    for name, d in dirs.items():
        d.mkdir()
        os.environ[name] = str(d)  # read lazily by nnunetv2.paths; inherited by the preprocessing child
    if smoke:  # 1 worker process instead of nnU-Net's 8 spawned ones: keeps the check cheap on a shared CPU
        os.environ.setdefault("nnUNet_def_n_proc", "1")
    return dirs


def main(argv: list[str] | None = None) -> dict:
    """Convert, plan and preprocess, train to the deadline, validate; the result JSON is written and returned."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.minutes is None and not args.smoke:
        p.error("--minutes is required (except with --smoke)")
    t0 = time.time()
    out = args.out.resolve()
    dirs = make_work_dirs(out, args.overwrite, args.smoke)

    split = read_split(args.split)
    train_ids, val_ids = split["train"] + split["val"], split["test"]
    if args.smoke:
        train_ids, val_ids = train_ids[:2], val_ids[:2]
    result: dict = {"script": "benchmarks/nnunet_peer.py", "peer": "nnU-Net v2", "configuration": CONFIGURATION,
                    "plans": "nnUNetPlans", "trainer": TRAINER_NAME, "fold": FOLD, "smoke": args.smoke,
                    "minutes_budget": args.minutes, "n_train": len(train_ids),
                    "n_val": len(val_ids), "split": str(args.split.resolve()), "seconds": {}}

    t = time.time()
    convert(args.data.resolve(), sorted(train_ids + val_ids), dirs["nnUNet_raw"])
    result["seconds"]["convert"] = round(time.time() - t, 1)
    log(f"raw dataset: {len(train_ids) + len(val_ids)} cases in {dirs['nnUNet_raw'] / DATASET_NAME}")

    t = time.time()
    exe = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
    cmd = ([str(exe)] if exe.exists() else
           [sys.executable, "-m", "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints"])
    cmd += ["-d", str(DATASET_ID), "-c", CONFIGURATION] + (["-npfp", "1", "-np", "1"] if args.smoke else [])
    log("running " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    result["seconds"]["plan_preprocess"] = round(time.time() - t, 1)

    splits = [{"train": sorted(train_ids), "val": sorted(val_ids)}]
    (dirs["nnUNet_preprocessed"] / DATASET_NAME / "splits_final.json").write_text(json.dumps(splits, indent=1))

    deadline = None if args.minutes is None else t0 + args.minutes * 60 - args.reserve_validation
    iters = 2 if args.smoke else args.iters_per_epoch
    trainer_cls = make_trainer_class(deadline, iters, max(1, iters // 5), 1 if deadline is None else None)
    summary_path = train_and_validate(trainer_cls, result)

    result.update(read_summary(summary_path))
    s = result["seconds"]
    s["budgeted"] = round(s["convert"] + s["plan_preprocess"] + s["train"], 1)
    s["total"] = round(time.time() - t0, 1)
    result.update(summary_json=str(summary_path), **environment())
    (out / "nnunet_result.json").write_text(json.dumps(result, indent=1))
    log(f"Dice anterior {result['dice_anterior']:.4f} posterior {result['dice_posterior']:.4f} "
        f"mean {result['dice_mean']:.4f} on {result['n_cases_scored']} cases; seconds {s}")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

"""Train and evaluate a U-Net: ``python run.py`` (synthetic images) or ``python run.py --data DIR`` (a real dataset).

A thin command line over :func:`experiments.run_synthetic` and :func:`experiments.run_dataset`, which
tests call directly. Writes the figures, ``history.json`` and ``summary.json`` into ``--output-dir``
and the best model to ``--checkpoint``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path

import torch

import data_gen
from errors import MedSegError
from experiments import run_dataset, run_synthetic
from model import NORMS
from planning import load_plan
from options import TRAIN, Parser, add_number
from preprocess import NORMALIZATIONS, WINDOW_PRESETS
from runtime import DEVICES, PRECISIONS
from train import LR_SCHEDULES, TASK_DEFAULTS, TrainConfig, TrainingInterrupted

log = logging.getLogger("run")

__all__ = ["build_parser", "main", "run_dataset", "run_synthetic"]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """States each default, except for on/off flags and where the help text says it (defaults that depend on
    the data)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        plain = action.default is None or action.nargs == 0
        return action.help if plain else super()._get_help_string(action)


def _task_default(name: str) -> str:
    return (f"{TASK_DEFAULTS['seed'][name]:g} for the seed preset, {TASK_DEFAULTS['other'][name]:g} for realistic; "
            "with --data the plan's")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = Parser(prog="run.py", description="Train a U-Net on synthetic organ + lesion images (医学影像分割), or on your own data "
                           "(--data), configured from the data, this machine and --time-budget.",
               formatter_class=_HelpFormatter, allow_abbrev=False)  # exact flags: given_fields reads argv

    def num(group, flag: str, help: str, default=None, **kw) -> None:
        name = flag[2:].replace("-", "_")
        add_number(group, flag, TRAIN[name], getattr(d, name) if default is None else default, help, **kw)

    num(p, "--epochs", "training epochs")
    num(p, "--num-samples", "synthetic images in total (train+val+test)")
    num(p, "--image-size", "image height and width in pixels; with --data the square training patch")
    add_number(p, "--base-channels", TRAIN["base_channels"], None,
               f"U-Net width of the first level (default: {_task_default('base_channels')})")
    p.add_argument("--no-bilinear", dest="bilinear", action="store_false", help="up-sample with transposed convolutions")
    p.add_argument("--norm", choices=tuple(NORMS), default=d.norm,
                   help="normalisation after each convolution (default: batch; with --data 3D the plan's: instance)")
    add_number(p, "--batch-size", TRAIN["batch_size"], None, "training batch size (default: 8, 3D: 2)")
    add_number(p, "--lr", TRAIN["lr"], None, f"Adam learning rate (default: {_task_default('lr')})")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="plateau: halve the LR when the validation loss stalls (2 epochs); poly: decay to 0 over --epochs")
    num(p, "--seed", "seed for data, split, weights and batch order")
    p.add_argument("--difficulty", choices=data_gen.DIFFICULTIES, default=d.difficulty,
                   help="synthetic preset: 'seed' (the post's, threshold-solvable) or 'realistic'")
    p.add_argument("--device", choices=DEVICES, default=d.device, help="auto = cuda > mps > cpu")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto = bf16 autocast where the hardware supports it, fp16 + loss scaling on CUDA GPUs "
                        "without bf16, else fp32")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW memory layout")
    p.add_argument("--output-dir", default=d.output_dir, help="folder for figures, history.json and summary.json")
    p.add_argument("--checkpoint", default=d.checkpoint, help="where to save the best model (a file path)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the per-epoch progress bar")
    p.add_argument("--no-figures", dest="figures", action="store_false",
                   help="skip the PNG figures (scripted sweeps, servers); checkpoints and JSON results are written "
                        "as always")
    num(p, "--threads", "CPU threads for PyTorch (0 = one per core); 1 is much faster when other jobs share the cores")
    p.add_argument("--resume", action="store_true", help="continue from last.pth in --output-dir (after a crash or Ctrl-C)")
    num(p, "--checkpoint-every", "write last.pth and the best model after the first and the last epoch, and in between "
        "once SECONDS have passed since the previous write (0 = every epoch); a crash loses at most that much",
        metavar="SECONDS")
    r = p.add_argument_group("real data (instead of synthetic images)")
    r.add_argument("--data", default=None, help="dataset folder: MSD imagesTr/labelsTr, images/+masks/ folders, or "
                   "PATIENT_DICOM+MASKS_DICOM")
    r.add_argument("--images-dir", default=None, help="explicit image folder (with --masks-dir; --data not needed)")
    r.add_argument("--masks-dir", default=None, help="explicit mask folder (with --images-dir)")
    r.add_argument("--labels", default=None, help="label values or names to train: '1,2' = two classes, '1+2' = merged, "
                   "DICOM structures like 'liver'; default: any foreground")
    r.add_argument("--window", default=None, help=f"CT window: a preset ({', '.join(WINDOW_PRESETS)}) or LEVEL,WIDTH in HU")
    r.add_argument("--normalize", default=d.normalize, choices=("auto", *NORMALIZATIONS),
                   help="intensity normalisation; auto: window for CT, zscore for other volumes, /255 for 8-bit images")
    r.add_argument("--in-channels", type=int, default=d.in_channels, choices=(0, 1, 3), help="0 = 3 for RGB images, else 1")
    add_number(r, "--resize", TRAIN["resize"], None, "rescale each plane so its long side has this many pixels "
               "(default: native size)")
    num(r, "--samples-per-epoch", "patches per epoch (0 = one per plane, at least 256)")
    num(r, "--fg-prob", "share of patches centred on foreground")
    r.add_argument("--no-augment", dest="augment", action="store_false", help="disable flips/rotation/scaling/intensity jitter")
    num(r, "--elastic", "elastic deformation strength (0 = off, e.g. 0.03)")
    num(r, "--overlap", "sliding-window overlap at evaluation")
    r.add_argument("--tta", action="store_true", help="mirror test-time augmentation (4 flips averaged) on the test "
                   "cases and in predict.py; per-epoch validation stays without it")
    num(r, "--val-fraction", "share of cases for validation")
    num(r, "--test-fraction", "share of cases held out for testing")
    num(r, "--max-cases", "use only the first N cases (0 = all)")
    add_number(r, "--time-budget", TRAIN["time_budget"], None, "minutes of training (validation included) the plan "
               "sizes the run to; the training phase ends within it + 10 %% even if other load appears; test-time "
               "evaluation is extra. With --epochs, those epochs are sized to fit it; 0 = no limit (default: "
               f"{DEFAULT_BUDGET:g} with --data)", metavar="MINUTES")
    r.add_argument("--snapshot-minutes", default=None, metavar="M1,M2,...", help="also save the best model so far "
                   "after these many minutes of training, as snapshots/best_at_<M>min.pth beside --checkpoint "
                   "(bench.py --real draws Dice against training time from them)")
    r.add_argument("--plan", default=None, metavar="PLAN_JSON", help="replay the plan.json of an earlier run (its "
                   "values and schedule changes; with the same --threads the metrics repeat exactly)")
    v = p.add_argument_group("volumes")
    v.add_argument("--dim", type=int, choices=(2, 3), default=d.dim, help="2: train on planes (a volume slice by slice); "
                   "3: a 3D U-Net on whole volumes, resampled to a common spacing")
    v.add_argument("--patch", default=None, metavar="Z,Y,X", help="3D training patch in voxels at the target spacing "
                   "(default: from the median case shape, within a CPU's budget)")
    v.add_argument("--spacing", default=None, metavar="Z,Y,X", help="3D target spacing in mm (default: the dataset's "
                   "median spacing; a much coarser slice axis takes its 10th percentile)")
    r.add_argument("--check", action="store_true", help="only run the dataset check and report geometry / structure volumes")
    return p


#: minutes a --data run trains for unless --time-budget says otherwise: what a laptop user accepts
DEFAULT_BUDGET = 20.0
#: on/off flags whose field is not their name
_NEGATIONS = {"--no-bilinear": "bilinear", "--no-channels-last": "channels_last", "--no-progress": "progress",
              "--no-augment": "augment", "--no-figures": "figures"}


def given_fields(argv: list[str]) -> set[str]:
    """The TrainConfig fields the command line sets (the plan fills every other one). Exact because the parser
    refuses abbreviated flags."""
    flags = [tok.split("=", 1)[0] for tok in argv if tok.startswith("--")]
    return {_NEGATIONS.get(f, f[2:].replace("-", "_")) for f in flags}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = vars(build_parser().parse_args(argv))
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed on one line
        return exc.code if isinstance(exc.code, int) else 2
    check, plan_file = args.pop("check"), args.pop("plan")
    if args["snapshot_minutes"]:
        try:
            args["snapshot_minutes"] = [float(v) for v in args["snapshot_minutes"].split(",")]
        except ValueError:
            print(f"run.py: error: argument --snapshot-minutes: got {args['snapshot_minutes']!r}, expected numbers "
                  "separated by commas (see run.py --help)", file=sys.stderr)
            return 2
    given = given_fields(argv) - {"check", "plan"}
    real = bool(args["data"] or args["images_dir"])
    if args["time_budget"] is None:
        args["time_budget"] = DEFAULT_BUDGET if real else 0.0
    try:
        if args["resume"] and not plan_file and (Path(args["output_dir"]) / "plan.json").is_file():
            plan_file = Path(args["output_dir"]) / "plan.json"  # resume the run as it was planned
        replay = load_plan(plan_file) if plan_file and real else None
        if replay is not None:
            names = {f.name for f in fields(TrainConfig)}
            args.update({k: v for k, v in replay.items() if k in names and k not in given})
        cfg = TrainConfig(**args)
        if cfg.real_data:
            run_dataset(cfg, check_only=check, given=None if replay is not None else given)
        else:
            run_synthetic(cfg)
    except TrainingInterrupted as exc:
        log.error("%s", exc)
        return 130
    except MedSegError as exc:
        log.error("error: %s", exc)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

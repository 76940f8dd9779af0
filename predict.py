"""Assisted diagnosis on the command line: turn scans into a mask, an overlay figure and a readable report.

    python predict.py --checkpoint best_unet.pth --input PATH [PATH ...] --output-dir DIR \\
        [--threshold 0.5] [--min-lesion-size SIZE] [--device auto] [--lang zh|en]
    python predict.py --checkpoint best_unet.pth --benchmark      # ms per 256x256 / 512x512 slice

Each PATH is an image file (PNG/JPEG/BMP/TIFF/GIF), a NIfTI / NRRD / MHA volume, a DICOM file, a
DICOM series folder or ``.zip``, or a folder of such inputs (non-recursive; a sub-folder that holds
DICOM files is one series). The model and everything it needs (intensity window / normalisation,
channels, patch size, class names) come from the checkpoint alone.

Per input, ``DIR/<input stem>/`` receives

* ``mask.nii.gz`` (NIfTI and 3D inputs, with the input's affine) or ``mask.png`` (2D images) and,
  with ``--save-probability``, ``probability[_<class>].nii.gz|png``;
* ``overlay.png``: outlines on the image (volumes: the largest-lesion slice plus a montage of the
  slices with lesions);
* ``report.json``: every lesion (connected component) with its size, maximum diameter, centroid,
  slice, bounding box and probabilities; organ volumes and lesion burden for multi-class models;
* ``report.html``: a self-contained page for a doctor (images embedded, findings sentence, lesion
  table, model and settings) with the notice that this is research software, not a medical device.

This file is the command line only: segmentation, post-processing and the case files are
:mod:`diagnosis` (rules of the post-processing there), class roles :mod:`roles`, measurements and
their units :mod:`measure`, figures :mod:`display` (the demo page ``app.py`` uses the same modules).

Batch behaviour and exit codes
    One bad input (missing, unreadable, unsupported, wrong channels) gets a one-line error naming it
    and the batch goes on; a summary lists the failures. Exit code 0 = every input succeeded, 1 = at
    least one failed, 2 = usage error (no inputs, bad option, missing / corrupt / foreign checkpoint,
    or an output folder inside an input's folder without ``--allow-input-dir``). Inputs are only read.

Research software, not a medical device: never use it for diagnosis.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

import medio
from diagnosis import (
    NOTICE,
    DiagnosisSettings,
    ModelBundle,
    case_stem,
    check_output_location,
    describe_model,
    input_suffix,
    load_model,
    predict_case,
)
from errors import InputError, MedSegError, oneline
from fileio import write_json_atomic
from inference import predict_planes, tile_starts
from preprocess import scaled_size
from roles import ROLES
from runtime import PRECISIONS

# ============================================================================ inputs
_NON_DICOM_SUFFIXES = {s for s in medio.SUPPORTED_SUFFIXES if s not in (".dcm", ".zip")} | {
    ".txt", ".md", ".json", ".csv", ".pdf", ".xml", ".html", ".py"}


def is_series_dir(folder: Path) -> bool:
    """True when ``folder`` directly holds DICOM files (``.dcm`` or files with the DICM preamble)."""
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return False
    for f in children:
        if not f.is_file() or f.name.startswith("."):
            continue
        sfx = input_suffix(f)
        if sfx == ".dcm" or (sfx not in _NON_DICOM_SUFFIXES and medio.is_dicom_file(f)):
            return True
    return False


def _supported_file(f: Path) -> bool:
    sfx = input_suffix(f)
    return sfx in medio.SUPPORTED_SUFFIXES or (sfx not in _NON_DICOM_SUFFIXES and medio.is_dicom_file(f))


def expand_inputs(paths: list[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Input arguments -> (cases, failures).

    A file is one case (unsupported types fail later, with the reader's message). A folder that holds
    DICOM files is one DICOM series; any other folder contributes its supported files and its DICOM
    series sub-folders (not recursive). Missing paths and folders with nothing to read are failures
    ``(path, one-line message)``. Duplicates (same resolved path) are dropped.
    """
    cases: list[Path] = []
    failures: list[tuple[str, str]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            failures.append((str(raw), f"{raw}: no such file or folder"))
        elif p.is_dir():
            if is_series_dir(p):
                cases.append(p)
                continue
            found = [c for c in sorted(p.iterdir()) if not c.name.startswith(".") and
                     ((c.is_file() and _supported_file(c)) or (c.is_dir() and is_series_dir(c)))]
            if not found:
                msg = (f"{raw}: folder holds no supported image, volume or DICOM series "
                       f"(expected {', '.join(medio.SUPPORTED_SUFFIXES)} files or DICOM folders)")
                failures.append((str(raw), msg))
            cases.extend(found)
        else:
            cases.append(p)
    seen, unique = set(), []
    for c in cases:
        key = c.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique, failures


def unique_case_names(paths: list[Path]) -> list[str]:
    """Case stems, made unique (case-insensitively) with ``-2``, ``-3``, ... suffixes."""
    used: set[str] = set()
    names = []
    for p in paths:
        base = name = case_stem(p)
        k = 2
        while name.lower() in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name.lower())
        names.append(name)
    return names


# ============================================================================ latency
def latency(bundle: ModelBundle, size: int, repeats: int = 5, warmup: int = 1, overlap: float = 0.5,
            batch_size: int = 16) -> dict:
    """Milliseconds to predict one ``size`` x ``size`` slice with the full pipeline (sliding window, blending)."""
    prep = bundle.prep
    plane = np.random.default_rng(0).random((1, prep.in_channels, size, size), dtype=np.float32)
    h, w = scaled_size(size, size, prep)
    tiles = len(tile_starts(max(h, prep.patch_size), prep.patch_size, overlap)) * \
        len(tile_starts(max(w, prep.patch_size), prep.patch_size, overlap))

    def run() -> np.ndarray:
        return predict_planes(bundle.model, plane, prep, bundle.device, bundle.precision, overlap=overlap,
                              batch_size=batch_size, channels_last=bundle.channels_last)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(max(1, repeats)):
        if bundle.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if bundle.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000.0)
    return {"size": size, "ms_median": float(np.median(times)), "ms_min": float(min(times)), "repeats": len(times),
            "tiles": tiles, "patch": prep.patch_size, "overlap": overlap}


# ============================================================================ command line
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """States defaults, except for on/off flags and options without one (where '(default: True)' misleads)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """predict.py's options."""
    p = argparse.ArgumentParser(
        prog="predict.py", formatter_class=_HelpFormatter,
        description="Segment scans with a trained U-Net and write a mask, an overlay and a report per input "
                    "(research software, not a medical device).",
        epilog="Exit codes: 0 all inputs succeeded, 1 some failed, 2 usage error.")
    p.add_argument("--checkpoint", default="best_unet.pth", help="trained model (python run.py writes best_unet.pth)")
    p.add_argument("--input", nargs="+", metavar="PATH", help="image / NIfTI / DICOM file, DICOM folder or zip, or a "
                   "folder of such inputs (required unless --benchmark)")
    p.add_argument("--output-dir", metavar="DIR", help="one sub-folder per input is written here (required unless --benchmark)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold of single-class models "
                   "(multi-class models use argmax)")
    p.add_argument("--min-lesion-size", type=float, default=0.0, metavar="SIZE",
                   help="remove lesions smaller than this: mm² (2D) / mm³ (3D) when the spacing is known, else px / voxels")
    p.add_argument("--no-fill-holes", dest="fill_holes", action="store_false", help="do not fill holes in lesions/organs (filled by default)")
    p.add_argument("--no-keep-largest-organ", dest="keep_largest_organ", action="store_false",
                   help="keep every organ component (default: only the largest)")
    p.add_argument("--no-postprocess", action="store_true", help="raw thresholded masks: no hole filling, no size "
                   "filter, no largest-component step (the network's output as is)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="auto = cuda > mps > cpu")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto = bf16 autocast where the hardware supports it, else fp32")
    p.add_argument("--lang", default="zh", choices=("zh", "en"), help="language of the report and figure labels")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap for images larger than the patch")
    p.add_argument("--batch-size", type=int, default=16, help="sliding-window tiles per forward pass")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch (0 = PyTorch's default, one per "
                   "core; 1 is much faster on a machine busy with other jobs)")
    p.add_argument("--roles", default=None, metavar="R1,R2,...", help="override the role of each class: lesion, "
                   "organ or tubular, comma-separated in class order (default: from the class names, see the docs)")
    p.add_argument("--save-probability", action="store_true", help="also write the probability map(s)")
    p.add_argument("--allow-input-dir", action="store_true", help="allow --output-dir inside an input's folder")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of unexpected errors")
    b = p.add_argument_group("latency benchmark")
    b.add_argument("--benchmark", action="store_true", help="print ms per slice for --benchmark-sizes and exit")
    b.add_argument("--benchmark-sizes", type=int, nargs="+", default=[256, 512], metavar="N", help="square slice sizes")
    b.add_argument("--repeats", type=int, default=5, help="timed repeats per size (median reported)")
    return p


def _failure(path: Path | str, exc: BaseException) -> str:
    msg = oneline(exc)
    if not isinstance(exc, MedSegError):
        msg = f"unexpected {type(exc).__name__}: {msg}"
    return msg if str(path) in msg else f"{path}: {msg}"


def run_benchmark(bundle: ModelBundle, sizes: list[int], repeats: int, overlap: float, batch_size: int) -> list[dict]:
    """Print and return :func:`latency` for each square slice size."""
    print(f"Latency per slice on {bundle.device} ({bundle.precision}, {torch.get_num_threads()} thread(s)), "
          f"{Path(bundle.checkpoint or 'model').name}: {describe_model(bundle)['architecture']}; "
          f"patch {bundle.prep.patch_size}, overlap {overlap}")
    rows = []
    for s in sizes:
        r = latency(bundle, s, repeats=repeats, warmup=2, overlap=overlap, batch_size=batch_size)
        rows.append(r)
        print(f"  {s}x{s}: {r['ms_median']:.1f} ms (median of {r['repeats']}, min {r['ms_min']:.1f} ms; "
              f"{r['tiles']} tiles of {r['patch']}x{r['patch']})", flush=True)
    return rows


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the options (None when they are usable)."""
    if not args.benchmark and not args.input:
        return "no inputs: pass --input PATH [PATH ...]"
    if not args.benchmark and not args.output_dir:
        return "--output-dir is required"
    if not 0.0 < args.threshold < 1.0:
        return f"--threshold must be between 0 and 1 (got {args.threshold})"
    if args.min_lesion_size < 0 or not math.isfinite(args.min_lesion_size):
        return f"--min-lesion-size must be >= 0 (got {args.min_lesion_size})"
    if not 0.0 <= args.overlap < 1.0:
        return f"--overlap must be in [0, 1) (got {args.overlap})"
    if args.batch_size < 1 or args.repeats < 1 or min(args.benchmark_sizes) < 1 or args.threads < 0:
        return "--batch-size, --repeats and --benchmark-sizes must be >= 1, --threads >= 0"
    if args.roles and any(r.strip().lower() not in ROLES for r in args.roles.split(",")):
        return f"--roles {args.roles!r}: each role must be one of {', '.join(ROLES)}"
    return None


def settings_from_args(args: argparse.Namespace) -> DiagnosisSettings:
    """The :class:`diagnosis.DiagnosisSettings` the options ask for (``--no-postprocess``: none at all)."""
    raw = args.no_postprocess
    return DiagnosisSettings(threshold=args.threshold, min_lesion_size=0.0 if raw else args.min_lesion_size,
                             fill_holes=args.fill_holes and not raw,
                             keep_largest_organ=args.keep_largest_organ and not raw, learned_postprocess=not raw,
                             roles=[r.strip().lower() for r in args.roles.split(",")] if args.roles else None,
                             overlap=args.overlap, batch_size=args.batch_size, lang=args.lang,
                             save_probability=args.save_probability)


def run_batch(bundle: ModelBundle, inputs: list[Path], out_dir: Path, settings: DiagnosisSettings,
              args: argparse.Namespace) -> tuple[list[dict], list[tuple[str, str]]]:
    """Predict every input with a progress bar; one failing input never stops the batch.
    Returns (succeeded rows, (input, message) failures)."""
    from tqdm.auto import tqdm

    done: list[dict] = []
    failures: list[tuple[str, str]] = []
    cases = list(zip(inputs, unique_case_names(inputs)))
    with tqdm(cases, desc="predict", unit="case", disable=not args.progress, file=sys.stderr) as bar:
        for path, name in bar:
            bar.set_postfix_str(path.name[:30])
            try:
                res = predict_case(bundle, path, out_dir, settings, case_name=name,
                                   allow_input_dir=args.allow_input_dir)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad input never stops the batch
                msg = _failure(path, exc)
                failures.append((str(path), msg))
                tqdm.write(f"error: {msg}", file=sys.stderr)
                if args.verbose and not isinstance(exc, MedSegError):
                    traceback.print_exc()
                continue
            done.append({"input": str(path), "output": str(res.output_dir), "findings": res.summary["findings"],
                         "n_lesions": res.summary["n_lesions"], "seconds": round(res.seconds, 2)})
            tqdm.write(f"{path} -> {res.output_dir}{os.sep}  {res.summary['findings']} ({res.seconds:.1f} s)")
    return done, failures


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (0 all inputs succeeded, 1 some failed, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # INFO chatter of fontTools/matplotlib stays off

    def usage(msg: str) -> int:
        parser.print_usage(sys.stderr)
        print(f"predict.py: error: {msg}", file=sys.stderr)
        return 2

    problem = _usage_problem(args)
    if problem:
        return usage(problem)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    try:
        bundle = load_model(args.checkpoint, args.device, args.precision)
    except MedSegError as exc:
        print(f"predict.py: error: {oneline(exc)}", file=sys.stderr)
        return 2
    if settings.roles is not None and len(settings.roles) != bundle.prep.n_classes:
        return usage(f"--roles gives {len(settings.roles)} role(s) but the model has {bundle.prep.n_classes} "
                     f"class(es): {', '.join(bundle.prep.class_names)}")
    if args.benchmark:
        run_benchmark(bundle, args.benchmark_sizes, args.repeats, args.overlap, args.batch_size)
        return 0

    inputs, failures = expand_inputs(args.input)
    out_dir = Path(args.output_dir)
    try:
        check_output_location(inputs, out_dir, args.allow_input_dir)
    except InputError as exc:
        return usage(oneline(exc))
    for w in bundle.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for _, msg in failures:
        print(f"error: {msg}", file=sys.stderr)
    total = len(inputs) + len(failures)
    done, failed = run_batch(bundle, inputs, out_dir, settings, args)
    failures += failed
    if done or failures:
        write_json_atomic(out_dir / "batch_summary.json",
                          {"checkpoint": str(args.checkpoint), "succeeded": done,
                           "failed": [{"input": p, "error": m} for p, m in failures], "notice": NOTICE[args.lang]})
    print(f"Done: {len(done)} of {total} input(s) succeeded, {len(failures)} failed. Outputs in {out_dir}{os.sep}")
    if failures:
        print(f"Failed ({len(failures)}):", file=sys.stderr)
        for _, msg in failures:
            print(f"  {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

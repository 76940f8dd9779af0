"""Assisted diagnosis on the command line: turn scans into a mask, an overlay figure and a readable report.

    python predict.py --checkpoint best_unet.pth --input PATH [PATH ...] --output-dir DIR \\
        [--threshold 0.5] [--min-lesion-size SIZE] [--device auto] [--lang zh|en] \\
        [--output-type mask,dicom-seg,rtstruct] [--anonymize [--anonymize-salt TEXT]] [--series NAME]
    python predict.py --checkpoint best_unet.pth --benchmark      # ms per 256x256 / 512x512 slice

Each PATH is an image file (PNG/JPEG/BMP/TIFF/GIF), a NIfTI / NRRD / MHA volume, a DICOM file, a
DICOM series folder or ``.zip``, or a folder of such inputs (non-recursive; a sub-folder that holds
DICOM files is one series). The model and everything it needs (intensity window / normalisation,
channels, patch size, class names, 2D or 3D) come from the checkpoint alone: a ``.pth`` written by
``run.py`` or an ``.onnx`` file written by ``export.py`` (run by onnxruntime on the CPU in fp32).

Multi-channel models (e.g. MRI sequences): a case is a 4D NIfTI whose last axis holds the channels, or
the channel files of one case, ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ... (nnU-Net's naming),
given one by one or in a folder: files of the same case are grouped into one case, only when the model
takes more than one channel. A case with another channel count is refused, naming both counts.

Per input, ``DIR/<input stem>/`` receives

* ``mask.nii.gz`` (NIfTI and 3D inputs, with the input's affine) or ``mask.png`` (2D images) and,
  with ``--save-probability``, ``probability[_<class>].nii.gz|png``;
* ``overlay.png``: outlines on the image (volumes: the largest-lesion slice plus a montage of the
  slices with lesions; multi-channel cases: channel 0 or ``--display-channel``);
* ``report.json``: every lesion (connected component) with its size, maximum diameter, centroid,
  slice, bounding box and probabilities; organ volumes and lesion burden for multi-class models;
* ``report.html``: a self-contained page for a doctor (images embedded, findings sentence, lesion
  table, model and settings) with the notice that this is research software, not a medical device;
* with ``--output-type dicom-seg`` / ``rtstruct`` (DICOM inputs only): ``seg.dcm`` / ``rtstruct.dcm``
  over the source series; with ``--anonymize`` also the anonymized source series in ``series/``.

and ``DIR`` receives ``batch_summary.json`` and ``cohort.csv`` (one row per input: see :mod:`outputs`).

This file is the command line only: segmentation, post-processing and the case files are
:mod:`diagnosis` (rules of the post-processing there), class roles :mod:`roles`, measurements and
their units :mod:`measure`, figures :mod:`display`, DICOM files and the cohort table :mod:`outputs`.

Batch behaviour and exit codes
    One bad input (missing, unreadable, unsupported, wrong channels, a DICOM output asked of a
    non-DICOM input) gets a one-line error naming it and the batch goes on; a summary lists the
    failures. Exit code 0 = every input succeeded, 1 = at least one failed (or the run was stopped by
    SIGTERM / Ctrl-C: the cases not run are listed), 2 = usage error (no inputs, bad option, an
    unusable output folder, missing / corrupt / foreign checkpoint, or an output folder inside an
    input's folder without ``--allow-input-dir``). Inputs are only read; every file is written atomically.

Research software, not a medical device: never use it for diagnosis.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import medio
import options
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
from display import scan_channels
from errors import InputError, MedSegError, oneline
from fileio import format_bytes, write_json_atomic
from inference import predict_image, tile_starts
from outputs import OUTPUT_TYPES, RT_UTILS_HINT, case_row, failure_row, write_cohort
from preprocess import scaled_size
from roles import ROLES
from runtime import PRECISIONS, ThreadPolicy

MIN_FREE_BYTES = 200 * 2**20  # an output folder on a disk with less free space is refused before any work
MIN_LESION_SIZE = options.Range(float, 0.0)
BENCHMARK_SIZE = options.Range(int, 16, 8192)
REPEATS = options.Range(int, 1, 1000)
DISPLAY_CHANNEL = options.Range(int, 0, 63)
_CHANNEL = re.compile(r"^(.+)_(\d{4})$")  # nnU-Net: <case>_0000, <case>_0001, ... one file per channel

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


@dataclass
class InputCase:
    """One case of a batch: its input path(s), its output folder name, or why it cannot be run at all."""

    paths: list[Path | None]   # one input, or one case's channel files in channel order (None: missing)
    name: str = ""             # output folder and cohort case id (unique in the batch)
    error: str | None = None   # the one-line message of an input that could not even be planned

    @property
    def source(self) -> str:
        """The input(s) as the cohort table and the messages name them."""
        return ";".join(str(p) for p in self.paths if p is not None)


def _exists(p: Path) -> bool:
    try:
        return p.exists() or p.is_symlink()
    except (OSError, ValueError):  # a name too long, a NUL byte: not a path that exists
        return False


def plan_inputs(paths: list[str | os.PathLike]) -> list[InputCase]:
    """Input arguments -> cases in the order given (a folder's in name order), each one input path.

    A file is one case (unsupported types fail later, with the reader's message). A folder that holds
    DICOM files is one DICOM series; any other folder contributes its supported files and its DICOM
    series sub-folders (not recursive). A missing path or a folder with nothing to read is a case with
    its ``error``. Duplicates (same resolved path) are dropped.
    """
    out: list[InputCase] = []
    seen: set[Path] = set()
    for raw in paths:
        p = Path(raw)
        if not _exists(p):
            out.append(InputCase([p], error=f"{raw}: no such file or folder (expected an image, a volume, a DICOM "
                                            "file, folder or zip, or a folder of them)"))
            continue
        found = [p]
        if p.is_dir() and not is_series_dir(p):
            try:
                children = sorted(p.iterdir())
            except OSError as exc:
                out.append(InputCase([p], error=f"{raw}: folder cannot be listed ({exc.strerror or exc}; "
                                                  "expected a readable folder)"))
                continue
            found = [c for c in children if not c.name.startswith(".") and
                     ((c.is_file() and _supported_file(c)) or (c.is_dir() and is_series_dir(c)))]
            if not found:
                out.append(InputCase([p], error=f"{raw}: folder holds no supported image, volume or DICOM series "
                                                f"(expected {', '.join(medio.SUPPORTED_SUFFIXES)} files or DICOM folders)"))
        for c in found:
            key = c.resolve()
            if key not in seen:
                seen.add(key)
                out.append(InputCase([c]))
    return out


def expand_inputs(paths: list[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Input arguments -> (cases, failures ``(path, one-line message)``): :func:`plan_inputs` split in two."""
    planned = plan_inputs(paths)
    return ([c.paths[0] for c in planned if c.error is None],
            [(str(c.paths[0]), c.error) for c in planned if c.error is not None])


def channel_of(path: Path) -> tuple[str, int] | None:
    """(case id, channel index) of an nnU-Net channel file ``<case>_000N.<suffix>``, else None."""
    sfx = input_suffix(path)
    stem = path.name[: -len(sfx)] if sfx and path.name.lower().endswith(sfx) else path.name
    m = _CHANNEL.match(stem)
    return (m.group(1), int(m.group(2))) if m else None


def group_channels(cases: list[InputCase], n_channels: int) -> list[InputCase]:
    """For a model taking ``n_channels`` > 1 scans: the channel files of one case (same folder and case id)
    become one case, placed where its first file was; missing channels stay ``None`` (named when read)."""
    if n_channels <= 1:
        return cases
    out: list[InputCase] = []
    groups: dict[tuple[Path, str], tuple[InputCase, dict[int, Path]]] = {}
    for case in cases:
        p = case.paths[0]
        found = channel_of(p) if case.error is None and len(case.paths) == 1 and p.is_file() else None
        if found is None:
            out.append(case)
            continue
        key = (p.resolve().parent, found[0].lower())
        if key not in groups:
            groups[key] = (InputCase([], name=found[0]), {})
            out.append(groups[key][0])
        files = groups[key][1]
        if found[1] in files:
            out.append(InputCase([p], error=f"{p}: a second file for channel {found[1]} of case {found[0]} "
                                            f"(the first is {files[found[1]].name}; expected one file per channel)"))
            continue
        files[found[1]] = p
    for group, files in groups.values():
        group.paths = [files.get(c) for c in range(max(n_channels, max(files) + 1))]
    return out


def unique_case_names(paths: list[Path]) -> list[str]:
    """Case stems, made unique (case-insensitively) with ``-2``, ``-3``, ... suffixes."""
    return _unique([case_stem(p) for p in paths])


def _unique(names: list[str]) -> list[str]:
    used: set[str] = set()
    out = []
    for base in names:
        name, k = base, 2
        while name.lower() in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name.lower())
        out.append(name)
    return out


def name_cases(cases: list[InputCase]) -> list[InputCase]:
    """Give each case its unique output name (a channel group: its case id, else the input's stem)."""
    bases = [case_stem(Path(c.name)) if c.name else case_stem(next(p for p in c.paths if p is not None))
             for c in cases]
    for case, name in zip(cases, _unique(bases)):
        case.name = name
    return cases


# ============================================================================ the output folder
def output_dir_problem(path: str) -> str | None:
    """Why ``--output-dir`` cannot take the outputs (None when it can): an existing file, a folder that cannot be
    made, a virtual file system (``/proc``), a read-only place or less than 200 MB free. Looks only, writes
    nothing, so it runs before any input is read."""
    flag = f"--output-dir {path}"
    try:
        p = Path(path)
        if _exists(p) and not p.is_dir():
            return f"{flag}: exists and is not a folder (expected a folder, existing or new)"
        anc = p.absolute()
        while not anc.exists():
            anc = anc.parent
        if not anc.is_dir():
            return f"{flag}: {anc} is a file, so no folder can be made below it (expected a folder path)"
        st = os.statvfs(anc)
    except (OSError, ValueError) as exc:
        return f"{flag}: cannot be used ({oneline(exc, 120)}; expected a writable folder)"
    if st.f_blocks == 0:  # proc, sysfs, ...: no blocks, no files of ours
        return f"{flag}: {anc} is a virtual file system, not a disk (expected a folder on a disk)"
    if st.f_flag & os.ST_RDONLY or not os.access(anc, os.W_OK | os.X_OK):
        return f"{flag}: {anc} is read-only (expected a folder you can write to)"
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE_BYTES:
        return (f"{flag}: only {format_bytes(free)} free on its disk (expected at least "
                f"{format_bytes(MIN_FREE_BYTES)})")
    return None


# ============================================================================ latency
def latency(bundle: ModelBundle, size: int, repeats: int = 5, warmup: int = 1, overlap: float = 0.5,
            batch_size: int = 16) -> dict:
    """Milliseconds per ``size`` x ``size`` slice through the whole-image path (normalisation, sliding window,
    blending); a 3D model predicts a volume of one patch depth and the time is divided by its slices."""
    prep = bundle.prep
    rng = np.random.default_rng(0)
    n = scan_channels(prep)
    eye = tuple(tuple(float(i == j) for j in range(3)) for i in range(3))
    if prep.dim == 3:
        shape = (int(prep.patch[0]), size, size)
        meta = medio.ImageMeta("benchmark", "nifti", shape, tuple(prep.spacing), (0.0,) * 3, eye)
        tiles = math.prod(len(tile_starts(max(s, p), p, overlap)) for s, p in zip(shape, prep.patch))
        patch = "x".join(map(str, prep.patch))
    else:
        shape = (size, size)
        meta = medio.ImageMeta("benchmark", "png", shape, (1.0, 1.0), (0.0, 0.0), ((1.0, 0.0), (0.0, 1.0)))
        h, w = scaled_size(size, size, prep)
        tiles = len(tile_starts(max(h, prep.patch_size), prep.patch_size, overlap)) * \
            len(tile_starts(max(w, prep.patch_size), prep.patch_size, overlap))
        patch = f"{prep.patch_size}x{prep.patch_size}"
    image = rng.random(shape + ((n,) if n > 1 else ()), dtype=np.float32)

    def run() -> np.ndarray:
        return predict_image(bundle.model, image, meta, prep, device=bundle.device, precision=bundle.precision,
                             overlap=overlap, batch_size=batch_size, channels_last=bundle.channels_last)

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
        times.append((time.perf_counter() - t0) * 1000.0 / (shape[0] if prep.dim == 3 else 1))
    return {"size": size, "ms_median": float(np.median(times)), "ms_min": float(min(times)), "repeats": len(times),
            "tiles": tiles, "patch": patch, "overlap": overlap}


def run_benchmark(bundle: ModelBundle, sizes: list[int], repeats: int, overlap: float, batch_size: int) -> list[dict]:
    """Print and return :func:`latency` for each square slice size."""
    print(f"Latency per slice on {bundle.device} ({bundle.precision}, {torch.get_num_threads()} thread(s)), "
          f"{Path(bundle.checkpoint or 'model').name}: {describe_model(bundle)['architecture']}; "
          f"overlap {overlap}")
    rows = []
    for s in sizes:
        r = latency(bundle, s, repeats=repeats, warmup=2, overlap=overlap, batch_size=batch_size)
        rows.append(r)
        print(f"  {s}x{s}: {r['ms_median']:.1f} ms (median of {r['repeats']}, min {r['ms_min']:.1f} ms; "
              f"{r['tiles']} windows of {r['patch']})", flush=True)
    return rows


# ============================================================================ command line
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """States defaults, except for on/off flags and options without one (where '(default: True)' misleads)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def _output_types(text: str) -> tuple[str, ...]:
    """argparse ``type=`` of --output-type: comma-separated names; the mask is always among them."""
    parts = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not parts or any(t not in OUTPUT_TYPES for t in parts):
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a comma-separated list of {', '.join(OUTPUT_TYPES)}")
    return tuple(t for t in OUTPUT_TYPES if t == "mask" or t in parts)


def build_parser() -> argparse.ArgumentParser:
    """predict.py's options (numbers checked by their :mod:`options` range, stated in the help)."""
    p = options.Parser(
        prog="predict.py", formatter_class=_HelpFormatter,
        description="Segment scans with a trained U-Net (2D or 3D, .pth or .onnx) and write a mask, an overlay and "
                    "a report per input, and cohort.csv per batch (research software, not a medical device).",
        epilog="Exit codes: 0 all inputs succeeded, 1 some failed, 2 usage error.")
    p.add_argument("--checkpoint", default="best_unet.pth", help="trained model: a .pth written by run.py or an "
                   ".onnx written by export.py (ONNX runs on the CPU in fp32)")
    p.add_argument("--input", nargs="+", metavar="PATH", help="image / NIfTI / DICOM file, DICOM folder or zip, or a "
                   "folder of such inputs; for a multi-channel model also the channel files of a case "
                   "(case_0000.nii.gz case_0001.nii.gz ...) or a 4D NIfTI (required unless --benchmark)")
    p.add_argument("--output-dir", metavar="DIR", help="one sub-folder per input, batch_summary.json and cohort.csv "
                   "are written here (required unless --benchmark)")
    options.add_number(p, "--threshold", options.PROBABILITY_THRESHOLD, 0.5,
                       "probability threshold of single-class and region models (multi-class models use argmax)")
    options.add_number(p, "--min-lesion-size", MIN_LESION_SIZE, 0.0, "remove lesions smaller than this: mm² (2D) / "
                       "mm³ (3D) when the spacing is known, else px / voxels", metavar="SIZE")
    p.add_argument("--no-fill-holes", dest="fill_holes", action="store_false", help="do not fill holes in lesions/organs (filled by default)")
    p.add_argument("--no-keep-largest-organ", dest="keep_largest_organ", action="store_false",
                   help="keep every organ component (default: only the largest)")
    p.add_argument("--no-postprocess", action="store_true", help="raw thresholded masks: no hole filling, no size "
                   "filter, no largest-component step (the network's output as is)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="auto = cuda > mps > cpu")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto = bf16 autocast where the hardware supports it, else fp32")
    p.add_argument("--lang", default="zh", choices=("zh", "en"), help="language of the report and figure labels "
                   "(cohort.csv's column names stay English)")
    options.add_number(p, "--overlap", options.OVERLAP, 0.5, "sliding-window overlap for images larger than the patch")
    options.add_number(p, "--batch-size", options.BATCH_SIZE, 16, "sliding-window tiles per forward pass (3D: a "
                       "quarter as many windows)")
    options.add_number(p, "--threads", options.THREADS, 0, "CPU threads for PyTorch and onnxruntime (0 = automatic: "
                       "the CPUs other processes leave idle, re-checked before each case; N = exactly N)")
    p.add_argument("--roles", default=None, metavar="R1,R2,...", help="override the role of each class: lesion, "
                   "organ or tubular, comma-separated in class order (default: from the class names, see the docs)")
    options.add_number(p, "--display-channel", DISPLAY_CHANNEL, 0, "the channel of a multi-channel case the "
                       "overlay and report figure show", metavar="K")
    p.add_argument("--save-probability", action="store_true", help="also write the probability map(s)")
    p.add_argument("--allow-input-dir", action="store_true", help="allow --output-dir inside an input's folder "
                   "(never inside a DICOM series folder)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of unexpected errors")
    d = p.add_argument_group("DICOM outputs")
    d.add_argument("--output-type", type=_output_types, default="mask", metavar="T1,T2,...",
                   help="outputs per case, comma-separated: mask (mask.nii.gz / mask.png, always written), dicom-seg "
                   "(seg.dcm, a DICOM Segmentation), rtstruct (rtstruct.dcm, needs rt-utils); the DICOM ones need a "
                   "DICOM input and reference its series")
    d.add_argument("--series", default=None, metavar="NAME", help="the series of a DICOM folder / zip holding several: "
                   "its sub-folder, SeriesInstanceUID or SeriesDescription (default: the only one; series in one folder: "
                   "the one with most slices; series in several folders: the error lists the choices)")
    d.add_argument("--anonymize", action="store_true", help="seg.dcm, rtstruct.dcm, report.json and report.html carry "
                   "no patient identifiers (DICOM PS3.15 Basic Profile; UIDs remapped consistently per case); the "
                   "anonymized source series is written to <case>/series/ so a viewer can open the SEG over it")
    d.add_argument("--anonymize-salt", default=None, metavar="TEXT", help="secret that makes --anonymize's UID "
                   "remapping reproducible across runs (default: a new random one per case)")
    b = p.add_argument_group("latency benchmark")
    b.add_argument("--benchmark", action="store_true", help="print ms per slice for --benchmark-sizes and exit")
    b.add_argument("--benchmark-sizes", type=BENCHMARK_SIZE, nargs="+", default=[256, 512], metavar="N",
                   help=f"square slice sizes; each {BENCHMARK_SIZE}")
    options.add_number(b, "--repeats", REPEATS, 5, "timed repeats per size (median reported)")
    return p


def _failure(path: Path | str, exc: BaseException) -> str:
    msg = oneline(exc)
    if not isinstance(exc, MedSegError):
        msg = f"unexpected {type(exc).__name__}: {msg}"
    return msg if str(path) in msg else f"{path}: {msg}"


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the options that argparse cannot see (None when they are usable)."""
    if not args.benchmark and not args.input:
        return "no inputs: pass --input PATH [PATH ...]"
    if not args.benchmark and not args.output_dir:
        return "--output-dir is required (expected a folder for the outputs)"
    if args.roles and any(r.strip().lower() not in ROLES for r in args.roles.split(",")):
        return f"--roles {args.roles!r}: each role must be one of {', '.join(ROLES)}"
    if args.anonymize_salt is not None and not args.anonymize:
        return "--anonymize-salt only applies with --anonymize (expected both or neither)"
    if args.anonymize_salt is not None and not args.anonymize_salt.strip():
        return "--anonymize-salt is empty (expected a secret text)"
    if args.series is not None and not args.series.strip():
        return "--series is empty (expected a series' folder, SeriesInstanceUID or SeriesDescription)"
    if "rtstruct" in args.output_type:
        try:
            import rt_utils  # noqa: F401 - only whether it imports
        except ImportError:
            return f"--output-type rtstruct: {RT_UTILS_HINT}"
    return None


def _model_problem(args: argparse.Namespace, bundle: ModelBundle) -> str | None:
    """Options that do not fit the loaded model (None when they do)."""
    prep = bundle.prep
    if args.roles and len(args.roles.split(",")) != prep.n_classes:
        return (f"--roles gives {len(args.roles.split(','))} role(s) but the model has {prep.n_classes} "
                f"class(es): {', '.join(prep.class_names)}")
    n = scan_channels(prep)
    if args.display_channel >= n:
        names = f" ({', '.join(prep.channel_names)})" if prep.channel_names else ""
        return f"--display-channel {args.display_channel}: the model takes {n} channel(s){names}; expected 0..{n - 1}"
    return None


def settings_from_args(args: argparse.Namespace) -> DiagnosisSettings:
    """The :class:`diagnosis.DiagnosisSettings` the options ask for (``--no-postprocess``: none at all)."""
    raw = args.no_postprocess
    return DiagnosisSettings(threshold=args.threshold, min_lesion_size=0.0 if raw else args.min_lesion_size,
                             fill_holes=args.fill_holes and not raw,
                             keep_largest_organ=args.keep_largest_organ and not raw, learned_postprocess=not raw,
                             roles=[r.strip().lower() for r in args.roles.split(",")] if args.roles else None,
                             overlap=args.overlap, batch_size=args.batch_size, lang=args.lang,
                             save_probability=args.save_probability, display_channel=args.display_channel)


# ============================================================================ the batch
class Interrupted(Exception):
    """SIGTERM arrived: the batch stops after what it is writing (each file is atomic)."""


@contextlib.contextmanager
def _sigterm_stops_batch() -> Iterator[None]:
    """Turn SIGTERM into :class:`Interrupted` while the batch runs (Ctrl-C is KeyboardInterrupt already), so a
    killed run still writes its summary and cohort table; the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class BatchResult:
    """What :func:`run_batch` did: succeeded rows, failures (input, message), cohort rows, interruption."""

    done: list[dict]
    failures: list[tuple[str, str]]
    rows: list[dict]
    interrupted: str | None = None


def _run_one(bundle: ModelBundle, case: InputCase, out_dir: Path, settings: DiagnosisSettings,
             args: argparse.Namespace):
    return predict_case(bundle, case.paths if len(case.paths) > 1 else case.paths[0], out_dir, settings,
                        case_name=case.name, allow_input_dir=args.allow_input_dir, output_types=args.output_type,
                        series=args.series, anonymize=args.anonymize, anonymize_salt=args.anonymize_salt)


def run_batch(bundle: ModelBundle, cases: list[InputCase], out_dir: Path, settings: DiagnosisSettings,
              args: argparse.Namespace) -> BatchResult:
    """Predict every case in order with a progress bar; one failing input never stops the batch, SIGTERM or
    Ctrl-C stop it (the cases not run are listed as failures)."""
    from tqdm.auto import tqdm

    res = BatchResult([], [], [])

    def fail(case: InputCase, msg: str) -> None:
        res.failures.append((case.source, msg))
        res.rows.append(failure_row(case.name, case.source, msg))

    todo = sum(c.error is None for c in cases)
    with tqdm(total=todo, desc="predict", unit="case", disable=not args.progress, file=sys.stderr) as bar, \
            _sigterm_stops_batch():
        for case in cases:
            if case.error is not None:
                fail(case, case.error)
                continue
            if res.interrupted:
                fail(case, f"{case.source}: not run (the batch was stopped by {res.interrupted})")
                continue
            bar.set_postfix_str(case.name[:30])
            if getattr(args, "thread_policy", None) is not None:
                args.thread_policy.update()  # the CPUs other processes left idle since the previous case
            shown = case.paths[0] if len(case.paths) == 1 else case.name
            try:
                out = _run_one(bundle, case, out_dir, settings, args)
            except (KeyboardInterrupt, Interrupted) as exc:
                res.interrupted = str(exc) if isinstance(exc, Interrupted) else "Ctrl-C (SIGINT)"
                fail(case, f"{case.source}: stopped by {res.interrupted} while running (files it finished are "
                           "complete, the rest not written)")
                continue
            except Exception as exc:  # noqa: BLE001 - one bad input never stops the batch
                msg = _failure(shown, exc)
                fail(case, msg)
                tqdm.write(f"error: {msg}", file=sys.stderr)
                if args.verbose and not isinstance(exc, MedSegError):
                    traceback.print_exc()
                continue
            finally:
                bar.update(1)
            res.done.append({"input": case.source, "output": str(out.output_dir), "findings": out.summary["findings"],
                             "n_lesions": out.summary["n_lesions"], "seconds": round(out.seconds, 2)})
            res.rows.append(case_row(case.name, case.source, out.report))
            tqdm.write(f"{case.source} -> {out.output_dir}{os.sep}  {out.summary['findings']} ({out.seconds:.1f} s)")
            sys.stdout.flush()
    return res


def _write_batch_files(out_dir: Path, args: argparse.Namespace, bundle: ModelBundle, res: BatchResult) -> None:
    """``batch_summary.json`` and ``cohort.csv`` beside the case folders (both atomic)."""
    write_json_atomic(out_dir / "batch_summary.json",
                      {"checkpoint": str(args.checkpoint), "succeeded": res.done,
                       "failed": [{"input": p, "error": m} for p, m in res.failures],
                       "interrupted": res.interrupted, "cohort": "cohort.csv", "notice": NOTICE[args.lang]})
    write_cohort(out_dir / "cohort.csv", res.rows, bundle.prep.class_names)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (0 all inputs succeeded, 1 some failed, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a one-line usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # INFO chatter of fontTools/matplotlib stays off

    def usage(msg: str, hint: bool = True) -> int:
        print(f"predict.py: error: {msg}" + (" (see predict.py --help)" if hint else ""), file=sys.stderr)
        return 2

    problem = _usage_problem(args) or (None if args.benchmark else output_dir_problem(args.output_dir))
    if problem:
        return usage(problem)
    cases: list[InputCase] = []
    if not args.benchmark:
        cases = plan_inputs(args.input)
        try:  # before the model loads: a refused output folder costs nothing
            check_output_location([p for c in cases for p in c.paths], args.output_dir, args.allow_input_dir)
        except InputError as exc:
            return usage(oneline(exc, 1000), hint=False)  # one line; long paths are named whole
    args.thread_policy = ThreadPolicy(args.threads)  # automatic (0): measured from here to the first case
    try:
        bundle = load_model(args.checkpoint, args.device, args.precision)
    except MedSegError as exc:
        msg = oneline(exc, 1000)
        if "expected" not in msg:  # e.g. "weights hold NaN": say what a usable model file is
            msg += " (expected a .pth written by run.py or an .onnx written by export.py)"
        return usage(msg, hint=False)
    except Exception as exc:  # noqa: BLE001 - whatever else a hostile file provokes: still one line, exit 2
        return usage(f"{args.checkpoint}: cannot load the model ({type(exc).__name__}: {oneline(exc, 160)}; "
                     "expected a .pth written by run.py or an .onnx written by export.py)", hint=False)
    problem = _model_problem(args, bundle)
    if problem:
        return usage(problem)
    for w in bundle.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.benchmark:
        try:
            run_benchmark(bundle, args.benchmark_sizes, args.repeats, args.overlap, args.batch_size)
        except (MemoryError, MedSegError) as exc:
            return usage(f"--benchmark-sizes {' '.join(map(str, args.benchmark_sizes))}: {oneline(exc) or 'out of memory'}",
                         hint=False)
        return 0
    return _predict_all(bundle, cases, args)


def _predict_all(bundle: ModelBundle, cases: list[InputCase], args: argparse.Namespace) -> int:
    """The batch, its summary files and its report on the console; returns the exit code."""
    cases = name_cases(group_channels(cases, scan_channels(bundle.prep)))
    out_dir = Path(args.output_dir)
    for case in cases:
        if case.error is not None:
            print(f"error: {case.error}", file=sys.stderr)
    res = run_batch(bundle, cases, out_dir, settings_from_args(args), args)
    try:
        _write_batch_files(out_dir, args, bundle, res)
    except OSError as exc:
        print(f"predict.py: error: {out_dir}: cannot write batch_summary.json / cohort.csv ({oneline(exc)})",
              file=sys.stderr)
        return 1
    print(f"Done: {len(res.done)} of {len(cases)} input(s) succeeded, {len(res.failures)} failed. "
          f"Outputs in {out_dir}{os.sep} (cohort.csv: one row per input)")
    if res.interrupted:
        print(f"predict.py: error: stopped by {res.interrupted} after {len(res.done)} of {len(cases)} input(s); "
              f"the rest are listed as not run in {out_dir / 'cohort.csv'}", file=sys.stderr)
    if res.failures:
        print(f"Failed ({len(res.failures)}):", file=sys.stderr)
        for _, msg in res.failures:
            print(f"  {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

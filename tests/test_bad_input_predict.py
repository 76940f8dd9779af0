"""Bad input at predict.py, tried as an adversarial user would (the reader-level kinds are tests/test_bad_input.py).

Every kind is a row ``(kind, make, exit code, expected text)``: ``make(case_dir, env, monkeypatch)`` builds the
bad situation under ``case_dir`` and returns predict.py's arguments. For each row ``predict.main(argv)`` runs in
this process and must

* return the row's exit code (2: usage -- options, output folder, checkpoint; 1: an input failed);
* print ONE line naming the file or flag and saying what was expected (``expected`` text of the row, plus a word
  such as "expected" / "must" / "choose"), and no traceback;
* leave every file outside the output folder byte-for-byte unchanged and create nothing there;
* end within 30 s.

A FIFO input and a SIGTERM in the middle of a batch run as subprocesses (a hang or a signal cannot hurt the test
process). Research software, not a medical device.
"""
from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from scan_fixtures import ct_series
from test_bad_input import deadline

import predict
from checkpoint import save_checkpoint
from model import UNet
from preprocess import Preprocessing

REPO = Path(__file__).resolve().parents[1]
SECONDS = 30.0
EXPECTS = ("expected", "must be", "choose", "pass ", "needs", "see predict.py --help")
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ set-up
@dataclass(frozen=True)
class Env:
    """Shared, read-only material: checkpoints and a good image, in their own folder."""

    root: Path
    good: Path        # 1-channel 2D model, 8-bit images
    two: Path         # 2-channel 2D model (channels T1, T2)
    three_d: Path     # 3D model
    png: Path         # a good image


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("env")
    torch.manual_seed(0)
    good = save_checkpoint(root / "good.pth", UNet(1, 1, 4), {"epochs": 1}, 1, {"dice": 0.5},
                           {"preprocessing": Preprocessing(normalization="unit", patch_size=16).to_dict()})
    prep2 = Preprocessing(normalization="zscore", in_channels=2, patch_size=16,
                          channels=[{"name": "T1", "normalization": "zscore"}, {"name": "T2", "normalization": "zscore"}])
    two = save_checkpoint(root / "two.pth", UNet(2, 1, 4), {"epochs": 1}, 1, {}, {"preprocessing": prep2.to_dict()})
    pools = [[1, 2, 2]] * 4
    prep3 = Preprocessing(normalization="zscore", dim=3, spacing=[2.0, 1.0, 1.0], patch=[8, 16, 16], pool=pools)
    three_d = save_checkpoint(root / "three_d.pth", UNet(1, 1, 4, dim=3, pool=pools), {"epochs": 1}, 1, {},
                              {"preprocessing": prep3.to_dict()})
    png = root / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20), dtype=np.uint8)).save(png)
    return Env(root, good, two, three_d, png)


def tree(folder: Path, skip: Path | None = None) -> dict[str, str]:
    """Every path under ``folder`` (outside ``skip``) with the SHA-256 of regular files, the kind of the rest."""
    out = {}
    skipped = os.path.abspath(skip) if skip is not None else None  # abspath: the name may be too long to resolve
    for root, dirs, files in os.walk(folder):
        dirs[:] = [n for n in dirs if os.path.join(root, n) != skipped]
        for name in dirs + files:
            p = Path(root) / name
            if str(p) == skipped:
                continue
            mode = os.lstat(p).st_mode
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(mode) else stat.filemode(mode)
    return out


def nifti(path: Path, zyx: np.ndarray, spacing=(2.0, 1.0, 1.0)) -> Path:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(zyx.T), np.diag([*spacing[::-1], 1.0])), str(path))
    return path


def bad_checkpoint(d: Path, env: Env, change: Callable[[dict], None], name: str = "model.pth") -> Path:
    ckpt = torch.load(env.good, weights_only=True)
    change(ckpt)
    torch.save(ckpt, d / name)
    return d / name


def argv(checkpoint: Path, inputs: list, out: Path, *more) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--input", *map(str, inputs), "--output-dir", str(out),
            "--no-progress", "--threads", "1", *map(str, more)]


def inp(d: Path) -> Path:
    (d / "in").mkdir(exist_ok=True)
    return d / "in"


# ----------------------------------------------------------------------------------------------- the kinds
def _proc_out(d, env, mp):
    return argv(env.good, [env.png], "/proc/medseg_out")


def _read_only_out(d, env, mp):
    ro = d / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits: the folder is unwritable as far as access() is told
        real = os.access
        mp.setattr(os, "access", lambda p, m, *a, **k: False if Path(p) == ro else real(p, m, *a, **k))
    return argv(env.good, [env.png], ro / "out")


def _disk_full(d, env, mp):
    real = os.statvfs

    def tiny(p):
        s = real(p)
        if Path(p) != d:
            return s
        return os.statvfs_result((s.f_bsize, s.f_frsize, s.f_blocks, 10, 10, s.f_files, s.f_ffree, s.f_favail,
                                  s.f_flag, s.f_namemax))
    mp.setattr(os, "statvfs", tiny)
    return argv(env.good, [env.png], d / "out")


def _output_is_file(d, env, mp):
    (d / "out.txt").write_text("results go elsewhere")
    return argv(env.good, [env.png], d / "out.txt")


def _output_below_file(d, env, mp):
    (d / "notes.txt").write_text("x")
    return argv(env.good, [env.png], d / "notes.txt" / "out")


def _output_name_too_long(d, env, mp):
    return argv(env.good, [env.png], d / ("x" * 300) / "out")


def _output_in_input_folder(d, env, mp):
    img = inp(d) / "a.png"
    img.write_bytes(env.png.read_bytes())
    return argv(env.good, [img], inp(d) / "out")


def _output_in_dicom_series(d, env, mp):
    ct_series(inp(d) / "SERIES", n=2, shape=(16, 16))
    return argv(env.good, [inp(d) / "SERIES"], inp(d) / "SERIES" / "out", "--allow-input-dir")


def _checkpoint_folder(d, env, mp):
    (d / "model.pth").mkdir()
    return argv(d / "model.pth", [env.png], d / "out")


def _checkpoint_random(d, env, mp):
    (d / "model.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    return argv(d / "model.pth", [env.png], d / "out")


def _checkpoint_truncated(d, env, mp):
    data = env.good.read_bytes()
    (d / "model.pth").write_bytes(data[: len(data) // 2])
    return argv(d / "model.pth", [env.png], d / "out")


def _checkpoint_nan(d, env, mp):
    def nan(c):
        c["state_dict"]["inc.double_conv.0.weight"][0, 0, 0, 0] = float("nan")
    return argv(bad_checkpoint(d, env, nan), [env.png], d / "out")


def _checkpoint_config_string(d, env, mp):
    return argv(bad_checkpoint(d, env, lambda c: c.update(config="epochs=3")), [env.png], d / "out")


def _prep(field: str, value):
    def change(c):
        c["preprocessing"][field] = value
    return change


def _checkpoint_patch_abc(d, env, mp):
    return argv(bad_checkpoint(d, env, _prep("patch_size", "abc")), [env.png], d / "out")


def _checkpoint_patch_zero(d, env, mp):
    return argv(bad_checkpoint(d, env, _prep("patch_size", 0)), [env.png], d / "out")


def _checkpoint_no_classes(d, env, mp):
    return argv(bad_checkpoint(d, env, _prep("class_names", [])), [env.png], d / "out")


def _onnx_garbage(d, env, mp):
    (d / "model.onnx").write_bytes(b"\x08\x07" + np.random.default_rng(1).bytes(2048))
    return argv(d / "model.onnx", [env.png], d / "out")


def _rtstruct_missing(d, env, mp):
    mp.setitem(sys.modules, "rt_utils", None)  # import rt_utils now raises ImportError
    return argv(env.good, [env.png], d / "out", "--output-type", "rtstruct")


def _corrupt_png(d, env, mp):
    bad = inp(d) / "scan.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    return argv(env.good, [bad], d / "out")


def _text_as_nifti(d, env, mp):
    bad = inp(d) / "scan.nii.gz"
    bad.write_text("patient notes, not a volume")
    return argv(env.good, [bad], d / "out")


def _nan_volume(d, env, mp):
    vol = np.zeros((3, 16, 16), np.float32)
    vol[1, 2, 3] = np.nan
    return argv(env.good, [nifti(inp(d) / "nan.nii.gz", vol)], d / "out")


def _empty_folder(d, env, mp):
    (inp(d) / "empty").mkdir()
    (inp(d) / "empty" / "readme.txt").write_text("nothing to see")
    return argv(env.good, [inp(d) / "empty"], d / "out")


def _nifti_as_dicom_seg(d, env, mp):
    return argv(env.good, [nifti(inp(d) / "vol.nii.gz", np.zeros((3, 16, 16), np.float32))], d / "out",
                "--output-type", "dicom-seg")


def _one_channel_for_two(d, env, mp):
    return argv(env.two, [nifti(inp(d) / "t1.nii.gz", np.ones((3, 16, 16), np.float32))], d / "out")


def _misaligned_channels(d, env, mp):
    a = nifti(inp(d) / "pat_0000.nii.gz", np.ones((3, 16, 16), np.float32))
    b = nifti(inp(d) / "pat_0001.nii.gz", np.ones((3, 16, 15), np.float32))
    return argv(env.two, [a, b], d / "out")


def _picture_for_3d(d, env, mp):
    return argv(env.three_d, [env.png], d / "out")


def _series_on_nifti(d, env, mp):
    return argv(env.good, [nifti(inp(d) / "vol.nii.gz", np.zeros((3, 16, 16), np.float32))], d / "out",
                "--series", "ARTERIAL")


def _unknown_series_in_zip(d, env, mp):
    root = d / "exam"
    ct_series(root / "A", n=2, shape=(16, 16), description="A")
    ct_series(root / "B", n=2, shape=(16, 16), description="B", seed=1)
    z = inp(d) / "exam.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(root.rglob("*")):
            zf.write(f, f.relative_to(root).as_posix())
    return argv(env.good, [z], d / "out", "--series", "VENOUS")


def _opt(*more: str) -> Callable:
    return lambda d, env, mp: argv(env.good, [env.png], d / "out", *more)


@dataclass(frozen=True)
class Kind:
    name: str
    make: Callable
    code: int
    expect: tuple[str, ...]


KINDS = [
    # options (exit 2, before anything is loaded)
    Kind("threshold above 1", _opt("--threshold", "1.5"), 2, ("--threshold", "got 1.5", "(0, 1)")),
    Kind("threshold NaN", _opt("--threshold", "nan"), 2, ("--threshold", "got nan")),
    Kind("negative minimum lesion size", _opt("--min-lesion-size", "-1"), 2, ("--min-lesion-size", ">= 0")),
    Kind("infinite minimum lesion size", _opt("--min-lesion-size", "inf"), 2, ("--min-lesion-size", "got inf")),
    Kind("overlap 0.95", _opt("--overlap", "0.95"), 2, ("--overlap", "[0, 0.9]")),
    Kind("batch size 0", _opt("--batch-size", "0"), 2, ("--batch-size", "[1, 1024]")),
    Kind("negative threads", _opt("--threads", "-1"), 2, ("--threads", "got -1")),
    Kind("benchmark size 8", _opt("--benchmark", "--benchmark-sizes", "8"), 2, ("--benchmark-sizes", "[16, 8192]")),
    Kind("5000 repeats", _opt("--benchmark", "--repeats", "5000"), 2, ("--repeats", "[1, 1000]")),
    Kind("unknown output type", _opt("--output-type", "mask,stl"), 2, ("--output-type", "mask, dicom-seg, rtstruct")),
    Kind("salt without --anonymize", _opt("--anonymize-salt", "pepper"), 2, ("--anonymize-salt", "--anonymize")),
    Kind("roles of another model", _opt("--roles", "organ,lesion"), 2, ("--roles gives 2 role(s)", "1 class")),
    Kind("display channel of a 1-channel model", _opt("--display-channel", "1"), 2, ("--display-channel 1", "0..0")),
    Kind("rtstruct without rt-utils", _rtstruct_missing, 2, ("--output-type rtstruct", "pip install rt-utils")),
    # the output folder (exit 2, before any input is read)
    Kind("output folder is a file", _output_is_file, 2, ("out.txt", "is not a folder")),
    Kind("output folder below a file", _output_below_file, 2, ("notes.txt", "is a file")),
    Kind("output folder in /proc", _proc_out, 2, ("/proc/medseg_out", "virtual file system")),
    Kind("read-only output folder", _read_only_out, 2, ("readonly", "read-only")),
    Kind("disk almost full", _disk_full, 2, ("--output-dir", "free on its disk", "200 MiB")),
    Kind("output folder name too long", _output_name_too_long, 2, ("--output-dir", "cannot be used")),
    Kind("output folder inside the input's folder", _output_in_input_folder, 2, ("--allow-input-dir",)),
    Kind("output folder inside a DICOM series", _output_in_dicom_series, 2, ("inside the DICOM series folder",)),
    # the checkpoint (exit 2)
    Kind("checkpoint is a folder", _checkpoint_folder, 2, ("model.pth", "is not a file")),
    Kind("checkpoint of random bytes", _checkpoint_random, 2, ("model.pth", "checkpoint")),
    Kind("truncated checkpoint", _checkpoint_truncated, 2, ("model.pth", "not a checkpoint")),
    Kind("NaN weights", _checkpoint_nan, 2, ("model.pth", "NaN or infinite")),
    Kind("config is a string", _checkpoint_config_string, 2, ("model.pth", "config is a str")),
    Kind("patch size 'abc'", _checkpoint_patch_abc, 2, ("model.pth", "patch_size 'abc'")),
    Kind("patch size 0", _checkpoint_patch_zero, 2, ("model.pth", "patch_size 0")),
    Kind("no class names", _checkpoint_no_classes, 2, ("model.pth", "class_names []")),
    Kind("ONNX file of garbage", _onnx_garbage, 2, ("model.onnx",)),
    # inputs (exit 1: the batch reports them and goes on)
    Kind("missing input", lambda d, env, mp: argv(env.good, [d / "nope.png"], d / "out"), 1, ("nope.png", "no such")),
    Kind("folder with nothing to read", _empty_folder, 1, ("empty", "holds no supported image")),
    Kind("corrupt PNG", _corrupt_png, 1, ("scan.png", "cannot read")),
    Kind("text named .nii.gz", _text_as_nifti, 1, ("scan.nii.gz",)),
    Kind("NaN in a volume", _nan_volume, 1, ("nan.nii.gz", "NaN")),
    Kind("DICOM SEG of a NIfTI", _nifti_as_dicom_seg, 1, ("vol.nii.gz", "needs a DICOM series input")),
    Kind("one channel for a two-channel model", _one_channel_for_two, 1,
         ("t1.nii.gz", "1 channel but the model takes 2 (T1, T2)")),
    Kind("misaligned channel files", _misaligned_channels, 1, ("pat_0001.nii.gz",)),
    Kind("a picture for a 3D model", _picture_for_3d, 1, ("good.png", "3D network")),
    Kind("--series on a NIfTI", _series_on_nifti, 1, ("vol.nii.gz", "series")),
    Kind("unknown series in a zip", _unknown_series_in_zip, 1, ("exam.zip", "VENOUS")),
]


def test_at_least_25_kinds():
    assert len({k.name for k in KINDS}) == len(KINDS) >= 25


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_bad_input_kind(kind, env, tmp_path, monkeypatch, capsys):
    case = tmp_path / "case"
    case.mkdir()
    args = kind.make(case, env, monkeypatch)
    out = Path(args[args.index("--output-dir") + 1])
    skip = None if os.path.isfile(out) else out  # an existing file given as the output folder must stay as it is
    before, env_before = tree(case, skip=skip), tree(env.root)
    t0 = time.perf_counter()
    with deadline(int(SECONDS)):
        code = predict.main(args)
    elapsed = time.perf_counter() - t0
    monkeypatch.undo()
    captured = capsys.readouterr()
    assert code == kind.code, captured.err
    assert "Traceback" not in captured.err + captured.out
    lines = [ln for ln in captured.err.splitlines() if all(e in ln for e in kind.expect)]
    assert lines, f"no line with {kind.expect} in:\n{captured.err}"
    assert any(w in lines[0] for w in EXPECTS), lines[0]
    assert tree(case, skip=skip) == before and tree(env.root) == env_before  # nothing changed outside the output
    assert elapsed < SECONDS
    if kind.code == 2 and skip is not None:
        assert not os.path.isdir(out) or not os.listdir(out)  # a usage error writes nothing at all


# ------------------------------------------------------------------------------------------ subprocesses
def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "predict.py"), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_fifo_input_is_refused_without_hanging(env, tmp_path):
    fifo = inp(tmp_path) / "scan.nii.gz"
    os.mkfifo(fifo)
    before = tree(tmp_path / "in")
    t0 = time.perf_counter()
    proc = _spawn(argv(env.good, [fifo], tmp_path / "out"))
    _, err = proc.communicate(timeout=SECONDS)
    assert proc.returncode == 1 and time.perf_counter() - t0 < SECONDS
    assert "Traceback" not in err
    line = next(ln for ln in err.splitlines() if "scan.nii.gz" in ln)
    assert "FIFO" in line or "named pipe" in line, line
    assert tree(tmp_path / "in") == before


def test_sigterm_stops_the_batch_with_its_summary_and_no_half_written_file(env, tmp_path):
    """SIGTERM while a big volume is predicted: exit 1, one line saying so, cohort.csv lists the case as stopped,
    the output folder holds no temporary file, the input is unchanged."""
    big = nifti(inp(tmp_path) / "big.nii.gz", np.random.default_rng(0).random((48, 192, 192), dtype=np.float32) * 255)
    before = tree(tmp_path / "in")
    out = tmp_path / "out"
    args = [a for a in argv(env.good, [big], out) if a != "--no-progress"]  # ~25k windows: many seconds
    proc = _spawn(args)
    t0 = time.perf_counter()
    seen = ""
    while "predict:" not in seen and proc.poll() is None:  # the progress bar: the batch has begun
        seen += proc.stderr.read(1)
    time.sleep(1.0)
    assert proc.poll() is None, "the big case ended before the signal; make it bigger"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=SECONDS)
    assert proc.returncode == 1 and time.perf_counter() - t0 < SECONDS, err
    assert "Traceback" not in err
    line = next(ln for ln in err.replace("\r", "\n").splitlines() if "predict.py: error: stopped by SIGTERM" in ln)
    assert "0 of 1 input(s)" in line and "cohort.csv" in line
    assert "stopped by SIGTERM" in (out / "cohort.csv").read_text(encoding="utf-8")
    leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".")]
    assert not leftovers and tree(tmp_path / "in") == before

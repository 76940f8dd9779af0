"""Inference on a whole CT: ``predict.py`` on a DICOM series with a 2D model that sees whole 256-px planes (one
window per slice), timed end to end in a fresh process (start-up, reading, inference, report) with its peak RSS.

The model's weights do not change the time; a model of the right shape and preprocessing is written here, so the
row needs no training.
"""
from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import ROOT, check, run_process
from checkpoint import save_checkpoint
from model import UNet
from preprocess import WINDOW_PRESETS, Preprocessing
from train import TrainConfig

log = logging.getLogger("bench")

IRCADB = ROOT.parent / "shared" / "data" / "ircadb01_patient1" / "3Dircadb1.1"


def find_series(root: Path = IRCADB) -> Path | None:
    """3D-IRCADb patient 1's CT series (folder or zip), if the data is present."""
    for name in ("PATIENT_DICOM", "PATIENT_DICOM.zip"):
        p = root / name
        if p.exists():
            return p
    return None


def write_model(path: Path, base: int = 32, size: int = 256) -> Path:
    """The row's model: a base-``base`` 2D U-Net (seeded random weights) whose planes are resized to ``size`` px."""
    prep = Preprocessing(normalization="window", window=list(WINDOW_PRESETS["abdomen"]), patch_size=size,
                         resize_long_side=size, class_names=["liver"])
    torch.manual_seed(0)
    save_checkpoint(path, UNet(1, 1, base), TrainConfig(data="ct", base_channels=base, image_size=size), 1, {},
                    {"preprocessing": prep.to_dict()})
    return path


def whole_ct(series: Path, base: int = 32, size: int = 256, repeats: int = 2, threads: int = 0) -> dict:
    """Seconds and peak RSS of ``python predict.py`` on ``series`` with a base-``base`` 2D model whose planes are
    resized to ``size`` px and predicted in one window each (median of ``repeats`` fresh processes)."""
    with tempfile.TemporaryDirectory(prefix="bench_ct_") as tmp:
        ckpt = write_model(Path(tmp) / "ct_2d.pth", base, size)
        runs = []
        for i in range(repeats):
            out = Path(tmp) / f"out{i}"
            cmd = [sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(ckpt), "--input", str(series),
                   "--output-dir", str(out), "--no-progress", "--lang", "en"]
            if threads:
                cmd += ["--threads", str(threads)]
            res = run_process(cmd, cwd=tmp)
            check(res, "predict.py on the whole CT")
            runs.append({"wall_s": res.wall_s, "peak_rss_mb": res.peak_rss_mb})
            log.info("whole CT: %.2f s, peak RSS %.0f MB", res.wall_s, res.peak_rss_mb or 0)
    med = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    return {"series": str(series), "model": f"2D U-Net base {base}, planes resized to {size} px, one window each",
            **med, "runs": runs}


def profile(series: Path, top: int = 25) -> None:
    """Where the row's time goes: ``predict.main`` on ``series`` under cProfile in this process (start-up and
    imports excluded), the ``top`` functions by cumulative time printed."""
    import cProfile
    import pstats

    import predict

    with tempfile.TemporaryDirectory(prefix="bench_ct_") as tmp:
        ckpt = write_model(Path(tmp) / "ct_2d.pth")
        argv = ["--checkpoint", str(ckpt), "--input", str(series), "--output-dir", str(Path(tmp) / "out"),
                "--no-progress", "--lang", "en"]
        prof = cProfile.Profile()
        prof.runcall(predict.main, argv)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)


if __name__ == "__main__":  # python -m benchmarks.whole_ct [SERIES]: the profile of the whole-CT row
    found = Path(sys.argv[1]) if len(sys.argv) > 1 else find_series()
    if found is None:
        sys.exit("no CT series: pass the DICOM folder or zip of 3D-IRCADb patient 1")
    profile(found)

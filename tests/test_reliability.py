"""Crash safety: kill -9 mid-training then --resume, Ctrl-C, and torchrun with 2 CPU processes (gloo)."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num-samples", "24", "--image-size", "32", "--base-channels", "4", "--batch-size", "4",
        "--device", "cpu", "--no-progress", "--no-figures", "--seed", "3"]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), *TINY, "--output-dir", str(out), "--checkpoint", str(out / "best_unet.pth"), *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _default_sigint() -> None:
    # a shell's background job (`pytest ... &`) starts with SIGINT ignored, and Python keeps an ignored SIGINT
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_stop_after_first_epoch(out: Path, sig: int, epochs: int) -> subprocess.Popen:
    proc = subprocess.Popen(_cmd(out, "--epochs", str(epochs)), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_default_sigint)
    deadline = time.time() + 120
    while not (out / "last.pth").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no epoch finished in time"
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


def _final(out: Path) -> tuple[dict, dict]:
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    history = json.loads((out / "history.json").read_text(encoding="utf-8"))
    history.pop("seconds")
    return summary, history


def test_kill_9_mid_training_then_resume_gives_the_uninterrupted_result(tmp_path, caplog):
    epochs = 3
    assert _main(tmp_path / "ref", "--epochs", str(epochs)) == 0  # the uninterrupted run, in this process
    proc = _start_and_stop_after_first_epoch(tmp_path / "crash", signal.SIGKILL, epochs)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "crash" / "summary.json").exists(), "the run must have died before finishing"
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert _main(tmp_path / "crash", "--epochs", str(epochs), "--resume") == 0  # only the kill needs a process
    assert "resuming after epoch" in caplog.text
    (s_ref, h_ref), (s_res, h_res) = _final(tmp_path / "ref"), _final(tmp_path / "crash")
    assert h_res == h_ref  # every epoch's losses, scores and learning rate
    for key in ("dice", "iou", "sensitivity", "precision", "test_loss", "best_epoch"):
        assert s_res[key] == s_ref[key], key
    assert not list((tmp_path / "ref").glob("*.png"))  # --no-figures: the results without the figures


def test_ctrl_c_saves_and_says_how_to_resume(tmp_path):
    proc = _start_and_stop_after_first_epoch(tmp_path / "int", signal.SIGINT, epochs=50)
    output = proc.stdout.read()
    assert proc.returncode == 130, output[-2000:]
    assert "--resume" in output and "Traceback" not in output
    assert (tmp_path / "int" / "last.pth").is_file()


def _main(out: Path, *extra: str) -> int:
    """run.py in this process (no interpreter start-up): for the cases that need no crash."""
    import run

    return run.main([*TINY, "--threads", "1", "--output-dir", str(out), "--checkpoint", str(out / "best_unet.pth"),
                     *extra])


def test_resume_refuses_other_settings_and_missing_state(tmp_path, caplog):
    out = tmp_path / "r"
    assert _main(out, "--epochs", "1") == 0
    caplog.clear()
    assert _main(out, "--epochs", "2", "--resume", "--lr", "0.01") == 2
    assert "other settings" in caplog.text and "lr" in caplog.text
    caplog.clear()
    assert _main(tmp_path / "none", "--resume") == 2 and "nothing to resume" in caplog.text


def test_resume_of_a_run_from_an_older_version_and_with_other_threads(tmp_path):
    """A last.pth written before an option existed resumes (the option counts as its default);
    --threads may differ between a run and its resume."""
    import torch

    out = tmp_path / "old"
    assert _main(out, "--epochs", "1") == 0
    last = out / "last.pth"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    for key in ("lr_schedule", "tta", "threads"):  # options added after the first release
        ckpt["config"].pop(key)
    torch.save(ckpt, last)
    assert _main(out, "--epochs", "2", "--resume", "--threads", "2") == 0
    assert json.loads((out / "history.json").read_text(encoding="utf-8"))["epoch"] == [1, 2]


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo is exercised on Linux/macOS")
def test_torchrun_two_cpu_processes_match_one_process(tmp_path):
    """2 ranks x batch 4 vs 1 process x batch 8: the same global batch. Documented tolerance: Dice within 0.05."""
    import run

    cfg = ["--epochs", "3", "--num-samples", "40", "--image-size", "32", "--base-channels", "8", "--lr", "1e-3",
           "--device", "cpu", "--no-progress", "--no-figures", "--seed", "5", "--precision", "fp32"]
    one = tmp_path / "one"
    assert run.main([*cfg, "--batch-size", "8", "--threads", "1", "--output-dir", str(one), "--checkpoint",
                     str(one / "best_unet.pth")]) == 0
    two = tmp_path / "two"
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "run.py"),
                *cfg, "--batch-size", "4", "--output-dir", str(two), "--checkpoint", str(two / "best_unet.pth")])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 个进程" in ddp.stderr
    a = json.loads((one / "summary.json").read_text())
    b = json.loads((two / "summary.json").read_text())
    assert abs(a["dice"] - b["dice"]) <= 0.05, (a["dice"], b["dice"])
    assert len(json.loads((two / "history.json").read_text())["epoch"]) == 3

"""Smoke test of the command line: a tiny config end to end, and CPU determinism."""
import json

import pytest

import run
from checkpoint import load_checkpoint

TINY = ["--epochs", "2", "--num-samples", "24", "--image-size", "32", "--base-channels", "4",
        "--batch-size", "4", "--device", "cpu", "--no-progress", "--threads", "1"]  # fixed threads: exact repeats


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    code = run.main(TINY + ["--output-dir", str(out), "--checkpoint", str(out / "best_unet.pth"), *extra])
    assert code == 0
    return out


def test_run_writes_every_output(tmp_path):
    out = _run(tmp_path, "a")
    for name in ("training_history.png", "synthetic_data_samples.png", "segmentation_results.png",
                 "history.json", "summary.json", "run_info.json", "best_unet.pth"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    for key in ("dice", "iou", "sensitivity", "precision", "threshold_baseline_dice", "epochs", "train_seconds", "device"):
        assert key in summary, key
    assert summary["epochs"] == 2 and summary["device"] == "cpu" and 0 <= summary["dice"] <= 1
    history = json.loads((out / "history.json").read_text(encoding="utf-8"))
    assert history["epoch"] == [1, 2]
    assert {"train_loss", "val_loss", "val_dice", "val_iou", "lr"} <= set(history)
    info = json.loads((out / "run_info.json").read_text(encoding="utf-8"))
    assert info["seed"] == 42 and {"python", "torch", "numpy"} <= set(info["versions"]) and info["device"] == "cpu"
    model, ckpt = load_checkpoint(out / "best_unet.pth")
    assert ckpt["config"]["image_size"] == 32 and ckpt["epoch"] == summary["best_epoch"]


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_same_seed_same_metrics_on_cpu(tmp_path, precision):
    flags = ("--precision", precision, "--difficulty", "realistic", "--no-figures")
    a = json.loads((_run(tmp_path, "a", *flags) / "summary.json").read_text())
    b = json.loads((_run(tmp_path, "b", *flags) / "summary.json").read_text())
    for key in ("dice", "iou", "test_loss", "threshold_baseline_dice", "best_epoch"):
        assert a[key] == b[key], key


def test_bad_config_is_a_polite_error(tmp_path, capsys):
    code = run.main(["--epochs", "0", "--output-dir", str(tmp_path / "x"), "--checkpoint", str(tmp_path / "x.pth")])
    assert code == 2
    err = capsys.readouterr().err
    assert "argument --epochs: got 0, expected an integer in [1, 100000]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pth").exists()


def test_unwritable_output_fails_before_training(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = run.main(TINY + ["--output-dir", str(blocker / "out"), "--checkpoint", str(tmp_path / "b.pth")])
    assert code == 2
    assert "cannot write there" in caplog.text and "Epoch" not in caplog.text
    assert blocker.read_text() == "not a folder"

"""run.py under bad input, tried as an adversarial user would: ``run.main(argv)`` in-process.

Every case in ``RUN_CASES`` must end with exit code 2 (a usage or input error), a message that names the flag or
the file and says what was expected -- one line, or the dataset check's headline followed by one line per problem,
each naming its file -- no traceback, the user's files unchanged (SHA-256), nothing opened outside the test's
folder and the library locations (an audit hook records every Python ``open``), nothing written outside the
output folder, no checkpoint written, and no training started (``experiments.fit`` and ``run.run_synthetic`` are
replaced by tripwires). The list of every kind covered is ``docs/bad_input.md``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import test_bad_input
from PIL import Image
from test_bad_input import assert_no_foreign_opens, fingerprint

import data_gen
import experiments
import run

# the reader-level suite's audit hook (records every open())
_hook_installed, opened = test_bad_input._hook_installed, test_bad_input.opened

CASE_SECONDS = 30.0
TINY = ["--epochs", "1", "--base-channels", "4", "--device", "cpu", "--precision", "fp32", "--no-progress",
        "--no-figures", "--threads", "1", "--image-size", "32", "--num-samples", "12", "--samples-per-epoch", "8",
        "--batch-size", "4"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------- datasets
def png_pairs(root: Path, n: int = 4, size: int = 32, values: tuple[int, ...] = (255,), mask_size: int | None = None,
              images: str = "images", masks: str = "masks") -> Path:
    """``images/caseN.png`` + ``masks/caseN.png``: a bright square lesion labelled with ``values``."""
    rng = np.random.default_rng(0)
    (root / images).mkdir(parents=True)
    (root / masks).mkdir(parents=True)
    for i in range(n):
        m = np.zeros((size, size), np.uint8)
        for k, v in enumerate(values):
            m[4 + 10 * k:10 + 10 * k, 8:16] = v
        img = (rng.random((size, size)) * 100 + (m > 0) * 120).astype(np.uint8)
        Image.fromarray(img).save(root / images / f"case{i}.png")
        ms = mask_size or size
        Image.fromarray(m[:ms, :ms]).save(root / masks / f"case{i}.png")
    return root


def nifti_pairs(root: Path, label_affine: Callable[[np.ndarray], np.ndarray] = lambda a: a, n: int = 3,
                shape=(12, 12, 4), labels: str = "labelsTr") -> Path:
    """An MSD-style ``imagesTr/`` + ``labelsTr/`` dataset; ``label_affine`` changes the labels' affine."""
    (root / "imagesTr").mkdir(parents=True)
    (root / labels).mkdir(parents=True)
    for i in range(n):
        lab = np.zeros(shape, np.uint8)
        lab[3:7, 3:7, 1:3] = 1
        img = np.random.default_rng(i).normal(100, 10, shape).astype(np.float32) + lab * 50
        affine = np.diag([1.0, 1.0, 2.0, 1.0])
        nib.save(nib.Nifti1Image(img, affine), str(root / "imagesTr" / f"c{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, label_affine(affine.copy())), str(root / labels / f"c{i}.nii.gz"))
    return root


def mirrored(a: np.ndarray) -> np.ndarray:
    a[0, 0], a[0, 3] = -1.0, 11.0  # x axis flipped (same voxels, mirrored anatomy)
    return a


def shifted(a: np.ndarray) -> np.ndarray:
    a[:3, 3] = [0.0, 0.0, 30.0]  # origin 30 mm away
    return a


def with_dataset_json(root: Path, doc) -> Path:
    nifti_pairs(root)
    (root / "dataset.json").write_text(json.dumps(doc), encoding="utf-8")
    return root


def missing_channel(root: Path) -> Path:
    """nnU-Net two-channel dataset (``_0000`` / ``_0001``) where one case lacks its second channel."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(3):
        lab = np.zeros((8, 8, 4), np.uint8)
        lab[2:5, 2:5, 1:3] = 1
        for c in range(2):
            if (i, c) != (1, 1):
                img = np.random.default_rng(i).random(lab.shape).astype(np.float32)
                nib.save(nib.Nifti1Image(img, np.eye(4)), str(root / "imagesTr" / f"c{i}_{c:04d}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / "labelsTr" / f"c{i}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"},
                                                   "labels": {"background": 0, "x": 1}}))
    return root


def random_bytes_images(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
        for i in range(3):
            (root / sub / f"c{i}.png").write_bytes(rng.bytes(300))
    return root


def read_only_output(tmp: Path) -> list[str]:
    """An output folder that cannot be created: under a read-only folder, or (as root, who may write anywhere)
    under /sys, where even root cannot make folders."""
    if os.geteuid() != 0:
        ro = tmp / "in" / "ro"
        ro.mkdir(parents=True)
        ro.chmod(0o500)
        return ["--output-dir", str(ro / "out")]
    target = Path("/sys/medseg-bad-input-test/out")
    try:
        target.parent.mkdir()
    except OSError:
        return ["--output-dir", str(target)]
    target.parent.rmdir()  # pragma: no cover - a writable /sys: no read-only place to test with
    pytest.skip("no read-only location available to root")


def _data(make: Callable[[Path], Path], *extra: str) -> Callable[[Path], list[str]]:
    """A case whose dataset is ``make(tmp/'in'/'data')``, passed as ``--data``, plus ``extra`` flags."""
    return lambda tmp: ["--data", str(make(tmp / "in" / "data")), *extra]


def _flags(*flags: str) -> Callable[[Path], list[str]]:
    return lambda tmp: list(flags)


def M037(root: Path) -> Path:
    """Masks holding the values {0, 3, 7}."""
    return png_pairs(root, values=(3, 7))

#: (kind, argv(tmp) -> the flags after TINY and the output flags, what the message must hold)
RUN_CASES = [
    # numbers: refused by the parser, one line naming the flag and the range
    ("lr_inf", _flags("--lr", "inf"), "argument --lr: got inf, expected a number in (0, 1]"),
    ("lr_nan", _flags("--lr", "nan"), "argument --lr: got nan, expected"),
    ("lr_negative", _flags("--lr", "-1"), "argument --lr: got -1, expected"),
    ("elastic_nan", _flags("--elastic", "nan"), "argument --elastic: got nan, expected a number in [0, 0.5]"),
    ("fg_prob_nan", _flags("--fg-prob", "nan"), "argument --fg-prob: got nan, expected a number in [0, 1]"),
    ("fg_prob_5", _flags("--fg-prob", "5"), "argument --fg-prob: got 5, expected"),
    ("max_cases_negative", _flags("--max-cases", "-1"), "argument --max-cases: got -1, expected an integer"),
    ("overlap_1", _flags("--overlap", "1.0"), "argument --overlap: got 1.0, expected a number in [0, 0.9]"),
    ("overlap_0_999", _flags("--overlap", "0.999"), "argument --overlap: got 0.999, expected"),
    ("seed_negative", _flags("--seed", "-1"), "argument --seed: got -1, expected an integer in [0, 4294967295]"),
    ("image_size_100000", _flags("--image-size", "100000"), "argument --image-size: got 100000, expected"),
    ("image_size_abc", _flags("--image-size", "abc"), "argument --image-size: got 'abc', expected an integer"),
    ("epochs_0", _flags("--epochs", "0"), "argument --epochs: got 0, expected an integer in [1, 100000]"),
    ("threads_negative", _flags("--threads", "-1"), "argument --threads: got -1, expected"),
    ("checkpoint_every_nan", _flags("--checkpoint-every", "nan"), "argument --checkpoint-every: got nan, expected"),
    ("batch_size_0", _flags("--batch-size", "0"), "argument --batch-size: got 0, expected"),
    ("fractions_sum_over_1", _flags("--val-fraction", "0.6", "--test-fraction", "0.5"),
     "--val-fraction + --test-fraction must be < 1 (got 1.1)"),
    ("dim3_without_data", _flags("--dim", "3"), "--dim 3 trains on volumes: give --data"),
    # options whose text is parsed later
    ("window_text", _data(png_pairs, "--window", "40"), "--window '40': expected a preset"),
    ("window_nan", _data(png_pairs, "--window", "nan,400"), "--window 'nan,400'"),
    ("spacing_zero", _data(lambda r: nifti_pairs(r), "--dim", "3", "--spacing", "0,1,1"),
     "--spacing '0,1,1': expected three positive numbers"),
    # 10^15 voxels: more than any address space, so the failed allocation is immediate on any machine
    ("patch_100000_cubed", _data(lambda r: nifti_pairs(r), "--dim", "3", "--patch", "100000,100000,100000"), "--patch"),
    ("labels_0", _data(png_pairs, "--labels", "0"), "--labels '0': label values must be in 1..255"),
    ("labels_99_absent", _data(png_pairs, "--labels", "99"), "class '99' (label value(s) [99]) occurs in no mask"),
    ("labels_1_2_on_masks_0_3_7", _data(M037, "--labels", "1,2"), "the masks hold the values [3, 7]"),
    ("labels_unknown_name", _data(png_pairs, "--labels", "liver"), "--labels 'liver': unknown label 'liver'"),
    # which folders
    ("masks_dir_without_images_dir", lambda t: ["--masks-dir", str(png_pairs(t / "in" / "d") / "masks")], "give both --images-dir and --masks-dir"),
    ("images_dir_without_masks_dir", lambda t: ["--images-dir", str(png_pairs(t / "in" / "d") / "images")],
     "give both --images-dir and --masks-dir"),
    ("data_folder_missing", lambda t: ["--data", str(t / "in" / "nowhere")], "dataset folder not found (expected"),
    ("data_is_a_file", lambda t: ["--data", str(_file(t / "in" / "data.txt"))], "dataset folder not found"),
    ("empty_dataset_folder", _data(lambda r: r.mkdir(parents=True) or r), "no known dataset layout (expected"),
    ("random_bytes_images", _data(random_bytes_images), "cannot read png image"),
    ("mask_of_another_size", _data(lambda r: png_pairs(r, mask_size=16)), "has shape (16, 16) but image"),
    ("image_without_mask", _data(lambda r: _drop(png_pairs(r), "masks/case1.png")), "no matching mask found"),
    ("nifti_label_axis_mirrored", _data(lambda r: nifti_pairs(r, mirrored)), "(expected the same axes"),
    ("nifti_label_origin_shifted", _data(lambda r: nifti_pairs(r, shifted)), "(expected them within 0.05 mm)"),
    ("dataset_json_is_a_list", _data(lambda r: with_dataset_json(r, [1, 2])), "found list, expected a JSON object"),
    ("dataset_json_labels_is_a_list", _data(lambda r: with_dataset_json(r, {"labels": ["background", "x"]})),
     "found 'labels' as a list, expected"),
    ("dataset_json_not_json", _data(lambda r: (nifti_pairs(r), (r / "dataset.json").write_text("{oops"),
                                                           r)[2]), "dataset.json: not valid JSON"),
    ("multichannel_missing_channel_file", _data(missing_channel), "channel file(s) c1_0001 missing (expected 2"),
    ("dim3_on_2d_images", _data(png_pairs, "--dim", "3"), "--dim 3 needs volumes, this image is 2D"),
    ("in_channels_3_on_grey_images", _data(png_pairs, "--in-channels", "3"), "case0.png"),
    # outputs: checked before any case is read
    ("checkpoint_is_a_folder", lambda t: ["--data", str(png_pairs(t / "in" / "d")), "--checkpoint",
                                          str(_dir(t / "in" / "ckdir"))], "--checkpoint names a folder, expected"),
    ("checkpoint_parent_is_a_file", lambda t: ["--data", str(png_pairs(t / "in" / "d")), "--checkpoint",
                                               str(_file(t / "in" / "f.txt") / "m.pth")], "cannot write there"),
    ("output_dir_is_a_file", lambda t: ["--data", str(png_pairs(t / "in" / "d")), "--output-dir",
                                        str(_file(t / "in" / "out.txt"))], "--output-dir names a file, expected"),
    ("output_dir_read_only", lambda t: ["--data", str(png_pairs(t / "in" / "d")), *read_only_output(t)],
     "cannot write there"),
    ("resume_without_last_pth", _data(png_pairs, "--resume"), "nothing to resume (no last.pth in --output-dir"),
]


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a folder")
    return path


def _dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _drop(root: Path, rel: str) -> Path:
    (root / rel).unlink()
    return root


# ------------------------------------------------------------------------------------------------ checks
def _message(capsys, caplog) -> tuple[str, str]:
    """(the error the user reads, everything printed or logged)."""
    out = capsys.readouterr()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    everything = out.out + out.err + caplog.text
    return (out.err.strip() or "\n".join(errors)).strip(), everything


def assert_one_message(msg: str, tmp: Path) -> None:
    """One line; or the dataset check: its headline, then one line per problem, each naming a file."""
    lines = msg.splitlines()
    assert lines and all(line.isprintable() for line in lines), repr(msg)
    if len(lines) > 1:
        assert "dataset check failed:" in lines[0], msg
        for line in lines[1:]:
            assert line.startswith("  - ") and str(tmp) in line, f"a problem line names no file: {line!r}"


def _outputs_only(before: set[Path], tmp: Path, allowed: list[Path]) -> list[Path]:
    """Files created under ``tmp`` outside the ``allowed`` folders."""
    after = {p for p in tmp.rglob("*") if p.is_file()}
    return [p for p in after - before if not any(a == p or a in p.parents for a in allowed)]


@pytest.fixture
def no_training(monkeypatch) -> None:
    """Tripwires: a refused run must never start training, synthetic or real."""
    def tripwire(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(experiments, "fit", tripwire)
    monkeypatch.setattr(data_gen, "generate_dataset", tripwire)  # the synthetic preset's first step


def test_run_case_table_is_big_enough():
    kinds = [c.id if hasattr(c, "id") else c[0] for c in RUN_CASES]
    assert len(kinds) == len(set(kinds)) >= 40


@pytest.mark.parametrize("kind,argv,expected", RUN_CASES, ids=[c.id if hasattr(c, "id") else c[0] for c in RUN_CASES])
def test_run_refuses_bad_input(kind, argv, expected, tmp_path, capsys, caplog, opened, no_training):
    out = tmp_path / "out"
    extra = argv(tmp_path)
    (tmp_path / "in").mkdir(exist_ok=True)
    before_files = {p for p in tmp_path.rglob("*") if p.is_file()}
    before = fingerprint(tmp_path / "in")
    outputs = ["--output-dir", str(out), "--checkpoint", str(out / "model.pth")]
    opened.clear()
    t0 = time.monotonic()
    code = run.main(TINY + outputs + extra)  # later flags win: a case may name its own outputs
    took = time.monotonic() - t0
    seen = list(opened)
    msg, everything = _message(capsys, caplog)
    assert code == 2, (code, msg)
    assert expected in msg, msg
    assert_one_message(msg, tmp_path)
    assert "Traceback" not in everything and "Epoch" not in everything, everything[-2000:]
    assert took < CASE_SECONDS, f"{kind}: {took:.1f} s"
    assert fingerprint(tmp_path / "in") == before, "run.py changed the user's files"
    assert not _outputs_only(before_files, tmp_path, [out]), "wrote outside the output folder"
    assert not list(tmp_path.rglob("*.pth")), "a checkpoint was written"
    assert_no_foreign_opens(seen, tmp_path)
    if kind.startswith(("checkpoint_", "output_dir_")):  # outputs are checked before any case is read
        assert not [p for p in seen if p.startswith(str(tmp_path / "in" / "d"))], seen


def test_images_and_masks_dirs_without_data_train_on_them(tmp_path, capsys, caplog, opened):
    """``--images-dir A --masks-dir B`` without ``--data`` trains on A/B (never the synthetic preset)."""
    data = png_pairs(tmp_path / "in", n=5)
    before = fingerprint(tmp_path / "in")
    out = tmp_path / "out"
    opened.clear()
    code = run.main(TINY + ["--output-dir", str(out), "--checkpoint", str(out / "model.pth"),
                            "--images-dir", str(data / "images"), "--masks-dir", str(data / "masks")])
    seen = list(opened)
    assert code == 0, _message(capsys, caplog)[0]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["layout"] == "paired (explicit)" and summary["config"]["images_dir"] == str(data / "images")
    assert summary["test_cases"] >= 1 and (out / "model.pth").is_file()
    assert fingerprint(tmp_path / "in") == before
    inputs = str(tmp_path / "in")
    assert any(p.startswith(inputs) for p in seen)  # it did read the given images
    for p in seen:  # only the given folders, the output folder and library / cache locations
        assert not p.startswith(str(tmp_path)) or p.startswith((inputs, str(out))), p


def test_docs_list_every_run_kind():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "bad_input.md").read_text(encoding="utf-8")
    kinds = [c.id if hasattr(c, "id") else c[0] for c in RUN_CASES]
    assert not [k for k in kinds if f"`{k}`" not in doc], "docs/bad_input.md misses kinds"

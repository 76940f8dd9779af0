"""Property / fuzz tests: random, truncated and corrupt inputs only ever raise the project's own errors.

Kinds of bad input covered here (listed in the README's reliability section):
random bytes under every supported suffix, truncated valid NIfTI / PNG / JPEG / DICOM / zip files,
valid files renamed to the wrong suffix, empty files, random arrays to every metric, random bytes
and truncated checkpoints to the checkpoint loader, random bytes under every suffix to predict.py.
"""
import hashlib
import io
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_medio import ct_slice

import medio
from checkpoint import load_checkpoint, save_checkpoint
from errors import MedSegError
from metrics import case_scores, hd95, per_case_scores
from model import UNet
from train import TrainConfig

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# the whole predict.py per example (model load, report files): fewer examples; the bad-input suite covers the kinds
FUZZ_PREDICT = settings(FUZZ, max_examples=20)
SUFFIXES = [".nii", ".nii.gz", ".dcm", ".zip", ".png", ".jpg", ".bmp", ".tif", ".gif", ".nrrd", ".mha"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: small tensors on a shared CPU


def _valid_files(folder: Path) -> dict[str, bytes]:
    """Bytes of small valid files of each family."""
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.arange(60, dtype=np.float32).reshape(3, 4, 5), np.eye(4)), str(folder / "a.nii.gz"))
    buf = io.BytesIO()
    Image.fromarray((np.arange(64).reshape(8, 8) * 3).astype(np.uint8)).save(buf, "PNG")
    jpg = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(jpg, "JPEG")
    ct_slice(folder / "slice", np.arange(30, dtype=np.uint16).reshape(5, 6), position=(0, 0, 0), uid="1.2.3", instance=1)
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(folder / "slice", "series/slice")
    return {".nii.gz": (folder / "a.nii.gz").read_bytes(), ".png": buf.getvalue(), ".jpg": jpg.getvalue(),
            ".dcm": (folder / "slice").read_bytes(), ".zip": z.getvalue()}


def _read_is_clean(path: Path) -> None:
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    for reader in (medio.read_image, medio.read_mask):
        try:
            reader(path)
        except MedSegError as exc:
            assert "\n" not in str(exc) and path.name in str(exc)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before, "a reader changed its input"


@FUZZ
@given(data=st.binary(max_size=600), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_under_any_suffix(tmp_path, data, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    _read_is_clean(path)


@FUZZ
@given(cut=st.floats(0.0, 0.99), kind=st.sampled_from([".nii.gz", ".png", ".jpg", ".dcm", ".zip"]))
def test_truncated_valid_files(tmp_path, cut, kind):
    raw = _valid_files(tmp_path / "valid")[kind]
    path = tmp_path / f"cut{kind}"
    path.write_bytes(raw[: int(len(raw) * cut)])
    _read_is_clean(path)


@pytest.mark.parametrize("kind,wrong", [(".png", ".nii.gz"), (".nii.gz", ".png"), (".jpg", ".dcm"), (".dcm", ".tif")])
def test_valid_file_with_wrong_suffix(tmp_path, kind, wrong):
    path = tmp_path / f"renamed{wrong}"
    path.write_bytes(_valid_files(tmp_path / "valid")[kind])
    _read_is_clean(path)


@FUZZ
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)), seed=st.integers(0, 2**16),
       p_fg=st.floats(0, 1))
def test_metric_ranges_on_random_masks(shape, seed, p_fg):
    rng = np.random.default_rng(seed)
    pred, truth = rng.random(shape) < p_fg, rng.random(shape) < p_fg
    s = per_case_scores(pred, truth)
    for name, v in s.items():
        ok = ~np.isnan(v)
        assert np.all((v[ok] >= 0) & (v[ok] <= 1)), name
    assert np.all(~np.isnan(s["dice"])) and np.all(~np.isnan(s["iou"]))
    assert np.all(s["iou"] <= s["dice"] + 1e-12)
    assert np.array_equal(per_case_scores(truth, truth)["dice"], np.ones(shape[0]))
    c = case_scores(pred[0], truth[0], (0.5, 2.0))
    assert c["hd95"] >= 0 and c["detected_lesions"] <= c["true_lesions"]
    assert hd95(pred[0], truth[0]) == hd95(truth[0], pred[0])


@FUZZ
@given(data=st.binary(max_size=2000))
def test_random_checkpoint_bytes(tmp_path, data):
    path = tmp_path / "x.pth"
    path.write_bytes(data)
    with pytest.raises(MedSegError):
        load_checkpoint(path)


@FUZZ
@given(cut=st.floats(0.0, 0.99))
def test_truncated_checkpoint(tmp_path, cut):
    good = tmp_path / "good.pth"
    if not good.exists():
        save_checkpoint(good, UNet(base_channels=2), TrainConfig(), 1, {})
    raw = good.read_bytes()
    bad = tmp_path / "cut.pth"
    bad.write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(MedSegError):
        load_checkpoint(bad)


def test_empty_files(tmp_path):
    for suffix in SUFFIXES:
        path = tmp_path / f"empty{suffix}"
        path.write_bytes(b"")
        _read_is_clean(path)
    (tmp_path / "e.pth").write_bytes(b"")
    with pytest.raises(MedSegError):
        load_checkpoint(tmp_path / "e.pth")


@FUZZ_PREDICT
@given(data=st.binary(max_size=400), suffix=st.sampled_from(SUFFIXES))
def test_predict_entry_point_on_random_inputs(tmp_path, trained_model, data, suffix, capsys):
    import predict

    src = tmp_path / "in"
    src.mkdir(exist_ok=True)
    path = src / f"scan{suffix}"
    path.write_bytes(data)
    before = hashlib.sha256(data).hexdigest()
    code = predict.main(["--checkpoint", str(trained_model.checkpoint), "--input", str(path), "--output-dir", str(tmp_path / "out"),
                         "--no-progress", "--device", "cpu"])
    out = capsys.readouterr()
    assert code in (0, 1)
    assert "Traceback" not in out.out + out.err
    if code == 1:
        assert path.name in out.out + out.err
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before

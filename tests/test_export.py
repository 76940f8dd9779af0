"""export.py: ONNX round trips (2D 1-channel, 2D 3-channel multi-class, 3D 2-channel, a trained synthetic model, a
hippocampus case) agree with PyTorch; the metadata carries the checkpoint; hostile and foreign files are refused."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import data_gen
import experiments
import export
from checkpoint import load_checkpoint, preprocessing_of, save_checkpoint
from errors import CheckpointError, ConfigError
from inference import predict_planes, probs_to_labels
from model import UNet
from preprocess import Preprocessing
from train import TrainConfig, split_indices

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HIPPO = DATA / "msd_hippocampus"


# ------------------------------------------------------------------------------------------- helpers
def tiny(n_channels: int, n_classes: int, dim: int = 2, seed: int = 0, **kw) -> UNet:
    """A base-4 U-Net with random weights and random BatchNorm statistics (so that folding matters)."""
    torch.manual_seed(seed)
    model = UNet(n_channels, n_classes, 4, dim=dim, **kw)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    model.eval()
    return centre(model, torch.rand(2, n_channels, *[2 * s + 1 for s in model.min_size], generator=g))


def centre(model: UNet, x: torch.Tensor) -> UNet:
    """Shift each output's logits to mean 0 on ``x``: masks neither empty nor full and every class present, so
    agreement means something (a mean, not a median: a median would put constant regions on an exact tie)."""
    with torch.no_grad():
        model.outc.conv.bias -= model(x).transpose(0, 1).flatten(1).mean(1)
    return model


EXTRA = {"postprocessing": {"largest_component": ["organ"]}, "split": {"test": ["case_1", "case_2"]},
         "test_metrics": {"dice": 0.81, "per_class_dice": {"organ": 0.9, "tumour": 0.7}, "test_cases": 2}}


def save(tmp_path: Path, model: UNet, prep: Preprocessing, name: str = "m.pth") -> Path:
    cfg = {"epochs": 3, "image_size": prep.patch_size, "data": "toy"}
    return save_checkpoint(tmp_path / name, model, cfg, 2, {"dice": 0.75, "loss": 0.3},
                           {"preprocessing": prep.to_dict(), **EXTRA})


def exported(tmp_path: Path, model: UNet, prep: Preprocessing) -> tuple[Path, Path]:
    ckpt = save(tmp_path, model, prep)
    out, notes = export.export_checkpoint(ckpt, tmp_path / "m.onnx")
    assert notes == [] and out.is_file()
    return ckpt, out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    inter, total = np.logical_and(a, b).sum(), a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * inter / total


def per_case_dice(pa: np.ndarray, pb: np.ndarray, n_classes: int) -> list[float]:
    """Dice of every (case, class) pair between two label maps (Z, ...) : class k>=1 masks."""
    return [dice(pa[i] == k, pb[i] == k) for i in range(len(pa)) for k in range(1, max(n_classes, 1) + 1)]


def one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ round trips
CASES_2D = {
    "2d_1ch": ({"n_channels": 1, "n_classes": 1}, Preprocessing(normalization="unit", patch_size=32), (3, 1, 45, 37)),
    "2d_3ch_multiclass": ({"n_channels": 3, "n_classes": 3, "bilinear": False},
                          Preprocessing(normalization="zscore", in_channels=3, patch_size=32,
                                        class_names=["organ", "tumour"], class_values=[[1], [2]]), (2, 3, 41, 50)),
}


@pytest.mark.parametrize("case", list(CASES_2D))
def test_round_trip_2d(tmp_path, case):
    kw, prep, shape = CASES_2D[case]
    model = tiny(**kw)
    ckpt_path, onnx_path = exported(tmp_path, model, prep)
    net, info = export.load_onnx(onnx_path, threads=1)
    assert export.is_onnx(onnx_path) and not export.is_onnx(ckpt_path)
    assert net.args == model.args and net.min_size == model.min_size and net.n_parameters > 0
    # metadata round trip: the info dict reads like the checkpoint without weights
    _, ckpt = load_checkpoint(ckpt_path)
    assert info["format"] == export.ONNX_FORMAT and info["checkpoint_format"] == ckpt["format"]
    for key in ("model_args", "preprocessing", "config", "metrics", "epoch", "postprocessing", "test_metrics",
                "split", "torch_version"):
        assert info[key] == ckpt[key], key
    assert info["class_names"] == prep.class_names and "state_dict" not in info
    assert info["io"]["dynamic"] == ["batch", "height", "width"] and info["export"]["opset"] == export.DEFAULT_OPSET
    assert preprocessing_of(info, onnx_path) == (prep, [])
    # inference.predict_planes runs the ONNX net unchanged (channels_last batches, mirroring, bf16 ignored)
    planes = np.random.default_rng(1).random(shape, dtype=np.float32)
    want = predict_planes(model, planes, prep, precision="fp32", batch_size=4, mirror=True)
    got = predict_planes(net, planes, prep, precision="bf16", batch_size=3, channels_last=True, mirror=True)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert float(np.abs(got - want).max()) < 1e-4
    pa, pb = probs_to_labels(want), probs_to_labels(got)
    assert min(per_case_dice(pa, pb, prep.n_classes)) >= 0.999
    assert all((pa[i] == k).any() for i in range(len(pa)) for k in range(1, prep.n_classes + 1))  # not trivial


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_round_trip_3d_two_channels(tmp_path, norm):
    pool = [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]  # anisotropic first level, as for thick slices
    model = tiny(2, 3, dim=3, pool=pool, norm=norm)
    prep = Preprocessing(normalization="zscore", in_channels=2, patch_size=32, class_names=["a", "b"])
    _, onnx_path = exported(tmp_path, model, prep)
    net, info = export.load_onnx(onnx_path, threads=1)
    assert info["model_args"]["pool"] == pool and info["io"]["layout"] == "NCDHW"
    assert info["io"]["dynamic"] == ["batch", "depth", "height", "width"]
    assert preprocessing_of(info, onnx_path)[0] == prep
    # predict_planes tiles 2D planes, so the 3D network is compared on whole odd-sized volumes (two sizes, batch 2)
    # (instance norm needs more than one voxel per channel at the bottom)
    for shape in ((2, 2, 11, 19, 23), (1, 2, 9, 33, 17)) if norm == "batch" else ((2, 2, 17, 35, 37),):
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(2))
        with torch.inference_mode():
            want, got = torch.softmax(model(x), 1), torch.softmax(net(x), 1)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert float((got - want).abs().max()) < 1e-4
        assert min(per_case_dice(want.argmax(1).numpy(), got.argmax(1).numpy(), 2)) >= 0.999
    with pytest.raises(ValueError, match="input size must be"):
        net(torch.rand(1, 2, 4, 16, 16))


def test_synthetic_test_split(tmp_path):
    cfg = TrainConfig(epochs=2, num_samples=40, image_size=32, base_channels=4, progress=False, threads=1,
                      figures=False, output_dir=str(tmp_path / "out"), checkpoint=str(tmp_path / "best.pth"))
    experiments.run_synthetic(cfg)
    onnx_path, _ = export.export_checkpoint(cfg.checkpoint, tmp_path / "best.onnx")
    net, info = export.load_onnx(onnx_path, threads=1)
    model, ckpt = load_checkpoint(cfg.checkpoint)
    assert info["test_metrics"] == ckpt["test_metrics"] and info["config"] == ckpt["config"]
    prep, _ = preprocessing_of(info, onnx_path)
    data = data_gen.generate_dataset(cfg.num_samples, cfg.image_size, cfg.seed, cfg.difficulty)
    test = split_indices(len(data), cfg.val_fraction, cfg.test_fraction, cfg.seed)["test"]
    planes = data.images[test][:, None]
    want = probs_to_labels(predict_planes(model, planes, prep, precision="fp32"), cfg.threshold)
    got = probs_to_labels(predict_planes(net, planes, prep, precision="fp32"), cfg.threshold)
    scores = per_case_dice(want, got, 1)
    assert len(scores) == len(test) == 8 and min(scores) >= 0.999


@pytest.mark.realdata
@pytest.mark.skipif(not HIPPO.exists(), reason=f"real data not found at {HIPPO}")
def test_hippocampus_cases(tmp_path):
    import medio
    from preprocess import to_planes

    prep = Preprocessing(normalization="zscore", class_names=["anterior", "posterior"], class_values=[[1], [2]],
                         patch_size=32)
    cases = [medio.read_image(HIPPO / "imagesTr" / f"hippocampus_{i}.nii.gz")[0] for i in ("001", "003", "004")]
    model = centre(tiny(1, 3, seed=3), torch.from_numpy(to_planes(cases[0], 3, prep)[::4, :, :32, :32].copy()))
    _, onnx_path = exported(tmp_path, model, prep)
    net, info = export.load_onnx(onnx_path, threads=1)
    prep2, _ = preprocessing_of(info, onnx_path)
    for i, image in enumerate(cases):
        planes = to_planes(image, 3, prep2)
        want = probs_to_labels(predict_planes(model, planes, prep, precision="fp32", batch_size=16))
        got = probs_to_labels(predict_planes(net, planes, prep2, precision="fp32", batch_size=16))
        assert all((want == k).sum() > 100 for k in (1, 2)), i  # both classes predicted: a real comparison
        assert min(dice(want == k, got == k) for k in (1, 2)) >= 0.999, i  # the whole volume is the case


# ------------------------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("onnx")
    return exported(tmp, tiny(1, 1), Preprocessing(normalization="unit", patch_size=32))[1]


_OPENED: list[str] = []
_WATCH: list[bool] = [False]


def _audit(event: str, args: tuple) -> None:
    if _WATCH[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


def _with_external(proto, location: str):
    """``proto`` with its largest initializer moved to the external data file ``location``."""
    from onnx import TensorProto

    t = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    n = len(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(n))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return proto


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_external_data_outside_is_refused_unopened(tmp_path, onnx_file, location):
    import onnx

    folder = tmp_path / "model"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 100_000)
    path = folder / "evil.onnx"
    onnx.save_model(_with_external(onnx.load(onnx_file), location), path)
    if not getattr(_audit, "installed", False):
        sys.addaudithook(_audit)
        _audit.installed = True
    _OPENED.clear()
    _WATCH[0] = True
    try:
        with pytest.raises(CheckpointError) as exc:
            export.load_onnx(path)
    finally:
        _WATCH[0] = False
    msg = one_line(exc, path)
    assert "outside" in msg or "absolute path" in msg
    opened = {os.path.realpath(p) for p in _OPENED}
    assert str(path.resolve()) in opened  # the hook sees our reads
    assert str(secret.resolve()) not in opened and "/etc/passwd" not in opened, opened


def test_external_data_beside_is_accepted(tmp_path, onnx_file):
    import onnx

    path = tmp_path / "ext.onnx"
    onnx.save_model(onnx.load(onnx_file), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.weights", size_threshold=0)
    assert (tmp_path / "ext.weights").stat().st_size > 10_000
    net, info = export.load_onnx(path, threads=1)
    ref, _ = export.load_onnx(onnx_file, threads=1)
    x = torch.rand(2, 1, 21, 35)
    assert torch.equal(net(x), ref(x)) and info["format"] == export.ONNX_FORMAT
    (tmp_path / "ext.weights").unlink()
    with pytest.raises(CheckpointError, match="'ext.weights', which does not exist") as exc:
        export.load_onnx(path)
    one_line(exc, path)


def test_foreign_and_missing_files(tmp_path, onnx_file, monkeypatch):
    import onnx

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(CheckpointError, match="not an ONNX model") as exc:
        export.load_onnx(junk)
    one_line(exc, junk)
    bare = tmp_path / "bare.onnx"
    proto = onnx.load(onnx_file)
    del proto.metadata_props[:]
    onnx.save_model(proto, bare)
    with pytest.raises(CheckpointError) as exc:
        export.load_onnx(bare)
    assert one_line(exc, bare) == (f"{bare}: not a medseg ONNX model: no medseg metadata, expected a file written "
                                   "by export.py")
    bare_net = export.create_session(bare, threads=1)  # the plain session needs no metadata (benchmarks use it)
    assert bare_net.get_inputs()[0].name == export.INPUT_NAME
    missing = tmp_path / "none.onnx"
    with pytest.raises(CheckpointError, match="ONNX model not found") as exc:
        export.load_onnx(missing)
    one_line(exc, missing)
    with pytest.raises(CheckpointError, match="is a folder") as exc:
        export.load_onnx(tmp_path)
    # a record that no model could use is refused at load, as load_checkpoint refuses it
    bad = tmp_path / "bad.onnx"
    proto = onnx.load(onnx_file)
    for p in proto.metadata_props:
        if p.key == "medseg.preprocessing":
            p.value = json.dumps({**json.loads(p.value), "class_names": ["a", "b"]})
    onnx.save_model(proto, bad)
    with pytest.raises(CheckpointError, match="its preprocessing record names 2 class") as exc:
        export.load_onnx(bad)
    one_line(exc, bad)
    monkeypatch.setattr(export, "MAX_ONNX_BYTES", 1000)
    with pytest.raises(CheckpointError, match="more than the 1000 bytes") as exc:
        export.load_onnx(onnx_file)
    one_line(exc, onnx_file)


def test_without_onnxruntime(onnx_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ConfigError) as exc:
        export.load_onnx(onnx_file)
    assert str(exc.value) == f"{onnx_file}: running an ONNX model needs onnxruntime: pip install onnxruntime"
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ConfigError, match="needs onnx: pip install onnx"):
        export.export_model(tiny(1, 1), onnx_file.parent / "never.onnx")
    assert not (onnx_file.parent / "never.onnx").exists()


def test_cli(tmp_path, capsys):
    ckpt = save(tmp_path, tiny(1, 1), Preprocessing(normalization="unit", patch_size=32))
    assert export.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "a.onnx"), "--opset", "13"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime agrees with PyTorch" in out and export.read_onnx_info(tmp_path / "a.onnx")["export"]["opset"] == 13
    assert export.main(["--checkpoint", str(ckpt), "--no-verify"]) == 0  # default output: beside, .onnx
    assert (tmp_path / "m.onnx").is_file()
    capsys.readouterr()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all" * 50)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(bad)
    for argv, expected in (
            (["--checkpoint", str(bad), "--output", str(tmp_path / "b.onnx")], str(refused.value)),
            (["--checkpoint", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "b.onnx")], "checkpoint not found"),
            (["--checkpoint", str(ckpt), "--output", str(tmp_path / "b.pth")], "expected a file name ending in .onnx"),
            (["--checkpoint", str(ckpt), "--output", str(tmp_path / "b.onnx"), "--opset", "9"], "expected an integer in 11..20")):
        assert export.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("export.py: error: ") and expected in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "b.onnx").exists() and not list(tmp_path.glob(".b.onnx.*"))
    assert export.main(["--help"]) == 0 and "default: 17" in capsys.readouterr().out
    # a checkpoint from before the preprocessing record: the assumed record is written out, with the warning
    old = save_checkpoint(tmp_path / "old.pth", tiny(1, 1), {"image_size": 48}, 1, {})
    path, notes = export.export_checkpoint(old, tmp_path / "old.onnx")
    assert len(notes) == 1 and "no preprocessing record" in notes[0]
    assert export.read_onnx_info(path)["preprocessing"]["patch_size"] == 48

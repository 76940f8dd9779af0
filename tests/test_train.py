"""Checkpoints, splits, devices and config validation."""
import io
import math
import os
import pickle
from dataclasses import asdict

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint
from errors import CheckpointError, ConfigError
from model import UNet
from runtime import resolve_precision, select_device
from train import ArrayDataset, TrainConfig, make_loader, split_indices


def test_checkpoint_round_trip_rebuilds_model_from_file_alone(tmp_path):
    torch.manual_seed(0)
    model = UNet(n_channels=1, n_classes=3, base_channels=4, bilinear=False).eval()
    cfg = TrainConfig(base_channels=4, bilinear=False)
    path = save_checkpoint(tmp_path / "best_unet.pth", model, cfg, epoch=3, metrics={"dice": np.float64(0.9)})
    assert sorted(os.listdir(tmp_path)) == ["best_unet.pth"], "no temporary file left behind"
    raw = torch.load(path, weights_only=True)
    assert raw["model_args"] == model.model_args and raw["config"]["base_channels"] == 4
    assert raw["epoch"] == 3 and raw["metrics"]["dice"] == 0.9
    loaded, ckpt = load_checkpoint(path)
    x = torch.randn(2, 1, 33, 40)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert TrainConfig.from_dict(ckpt["config"]) == cfg


def test_corrupt_missing_and_foreign_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        load_checkpoint(bad)
    plain = tmp_path / "state_dict_only.pth"
    torch.save(UNet(base_channels=4).state_dict(), plain)
    with pytest.raises(CheckpointError, match="expected a checkpoint of format"):
        load_checkpoint(plain)
    good = save_checkpoint(tmp_path / "good.pth", UNet(base_channels=4), TrainConfig(), 1, {})
    ckpt = torch.load(good, weights_only=True)
    ckpt["model_args"]["base_channels"] = 8  # weights of one architecture, args of another
    torch.save(ckpt, tmp_path / "mismatch.pth")
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "mismatch.pth")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_payload_is_refused_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"format": "medseg-unet/1", "x": _Payload()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)


def test_split_is_disjoint_seeded_and_complete():
    s = split_indices(200, 0.1, 0.2, seed=42)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (140, 20, 40)
    allidx = np.concatenate([s["train"], s["val"], s["test"]])
    assert sorted(allidx.tolist()) == list(range(200))
    assert np.array_equal(split_indices(200, 0.1, 0.2, 42)["test"], s["test"])
    assert not np.array_equal(split_indices(200, 0.1, 0.2, 43)["test"], s["test"])
    with pytest.raises(ConfigError):
        split_indices(2, 0.4, 0.4, 0)


def test_loader_batches_are_seeded():
    data = ArrayDataset(torch.arange(10.0).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous(),
                        torch.zeros(10, 2, 2, dtype=torch.uint8))
    order = lambda: [b[0][:, 0, 0, 0].tolist() for b in make_loader(data, 4, True, seed=1)]  # noqa: E731
    first = order()
    assert first == order() and sorted(sum(first, [])) == list(range(10))
    assert [len(b) for b in first] == [4, 4, 2]


def test_device_and_precision_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ConfigError, match="unknown device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="not available"):
            select_device("cuda")
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cpu")) in ("fp32", "bf16")


def test_config_validation_lists_every_problem():
    with pytest.raises(ConfigError) as e:
        TrainConfig(epochs=0, image_size=8, lr=-1).validate()
    msg = str(e.value)
    assert "--epochs" in msg and "--image-size" in msg and "--lr" in msg


def test_width_and_learning_rate_default_per_kind_of_data():
    """Left at None (the CLI's default), width and LR come from TASK_DEFAULTS by the task: the seed preset,
    or the realistic preset and real data; explicit values are kept, and the resolved values are what a
    checkpoint stores."""
    import run
    from train import TASK_DEFAULTS

    assert (TrainConfig().base_channels, TrainConfig().lr) == (16, 3e-3) == tuple(TASK_DEFAULTS["seed"].values())
    for other in ({"data": "some/folder"}, {"images_dir": "i", "masks_dir": "m"}, {"difficulty": "realistic"}):
        assert (TrainConfig(**other).base_channels, TrainConfig(**other).lr) == (32, 1e-3)
    assert (TrainConfig(base_channels=8, lr=0.5).base_channels, TrainConfig(base_channels=8, lr=0.5).lr) == (8, 0.5)
    assert {"base_channels": 16, "lr": 3e-3}.items() <= asdict(TrainConfig()).items()  # what checkpoints store
    args = vars(run.build_parser().parse_args(["--data", "x"]))
    del args["check"], args["plan"]
    assert args["base_channels"] is None and TrainConfig(**args).base_channels == 32
    help_text = " ".join(run.build_parser().format_help().split())
    assert "width of the first level (default: 16 for the seed preset, 32 for realistic; with --data the plan's)" in help_text
    assert "learning rate (default: 0.003 for the seed preset, 0.001 for realistic; with --data the plan's)" in help_text


def test_fused_adam_and_poly_schedule():
    from train import make_optimizer, make_scheduler
    model = UNet(n_channels=1, n_classes=1, base_channels=4)
    opt = make_optimizer(model, 1e-2)
    assert opt.defaults.get("fused") is True  # CPU has the fused kernel in the pinned torch
    sched = make_scheduler(opt, TrainConfig(epochs=4, lr=1e-2, lr_schedule="poly"))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-2 * (1 - e / 4) ** 0.9 for e in range(4)])
    # the time budget changes the count mid-run: the LR goes on from its value, to 0 at the new end
    cfg = TrainConfig(epochs=10, lr=1.0, lr_schedule="poly")
    opt = make_optimizer(model, 1.0)
    sched, lrs = make_scheduler(opt, cfg), []
    for done in range(1, 15):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
        cfg.epochs = {5: 14, 9: 12}.get(done, cfg.epochs)  # lengthened after epoch 5, shortened after epoch 9
    at5 = 0.5 ** 0.9  # the LR of epoch 6, set after epoch 5 on the old count
    assert lrs[:5] == pytest.approx([(1 - e / 10) ** 0.9 for e in range(1, 6)])
    assert lrs[5:9] == pytest.approx([at5 * ((14 - e) / 9) ** 0.9 for e in range(6, 10)])
    at9 = lrs[8]
    assert lrs[9:12] == pytest.approx([at9 * ((12 - e) / 3) ** 0.9 for e in range(10, 13)]) and lrs[11] == 0
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))  # never a jump up
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    again = make_scheduler(make_optimizer(model, 1.0), cfg)
    again.load_state_dict(torch.load(buf, weights_only=True))  # resumable from last.pth
    assert (again.end, again.anchor, again.factor) == (sched.end, sched.anchor, sched.factor)
    assert isinstance(make_scheduler(opt, TrainConfig()), torch.optim.lr_scheduler.ReduceLROnPlateau)
    with pytest.raises(ConfigError, match="--lr-schedule"):
        TrainConfig(lr_schedule="cosine").validate()


@pytest.mark.parametrize("every, written", [(0.0, [1, 2, 3, 4]), (3600.0, [1, 4])])
def test_checkpoints_are_written_first_last_and_every_n_seconds(tmp_path, monkeypatch, every, written):
    import train
    torch.manual_seed(0)
    saved = []
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda ckpt, f: saved.append((os.path.basename(f.name).split(".")[1] + ".pth",
                                                                      ckpt["epoch"])) or real(ckpt, f))
    data = ArrayDataset(torch.rand(8, 1, 16, 16), (torch.rand(8, 16, 16) > 0.5).to(torch.uint8))
    dice = iter([0.1, 0.3, 0.2, 0.25])  # best at epoch 2, written with the next due write
    validate = lambda m: {"loss": 1.0, "summary": {"dice": next(dice), "iou": 0, "sensitivity": 0, "precision": 0}}  # noqa: E731
    cfg = TrainConfig(epochs=4, batch_size=4, base_channels=2, image_size=16, checkpoint_every=every, progress=False)
    res = train.fit(UNet(base_channels=2), data, validate, cfg, torch.device("cpu"), "fp32", tmp_path / "best.pth",
                    last_path=tmp_path / "last.pth")
    assert [e for name, e in saved if name == "last.pth"] == written
    best = [e for name, e in saved if name == "best.pth"]
    assert best == [1, 2] and res.best_epoch == 2  # with 3600 s: epoch 2 is held in memory until epoch 4
    last = torch.load(tmp_path / "last.pth", weights_only=True)
    assert last["resume"]["best_epoch"] == torch.load(tmp_path / "best.pth", weights_only=True)["epoch"] == 2


def test_fp16_is_for_cuda_and_auto_picks_it_on_gpus_without_bf16(monkeypatch):
    import runtime
    with pytest.raises(ConfigError, match="fp16 is for CUDA"):
        resolve_precision("fp16", torch.device("cpu"))
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: False)
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"  # e.g. V100 / T4
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert not runtime.make_grad_scaler(torch.device("cpu"), "bf16").is_enabled()


def test_fp16_grad_scaler_skips_overflowing_steps_and_trains_otherwise():
    """The loss-scaling loop of train_one_epoch, run with CPU fp16 autocast (CUDA's path, minus the GPU)."""
    from train import make_optimizer, train_one_epoch
    torch.manual_seed(0)
    model = UNet(base_channels=4)
    opt = make_optimizer(model, 1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    data = make_loader(ArrayDataset(torch.rand(8, 1, 32, 32), (torch.rand(8, 32, 32) > 0.7).to(torch.uint8)), 4, True, 0)
    before = [p.detach().clone() for p in model.parameters()]
    model.inc.double_conv[0].weight.register_hook(lambda g: g * float("inf"))  # every step overflows
    train_one_epoch(model, data, opt, torch.device("cpu"), "fp16", progress=False, scaler=scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "an overflowing step must be skipped"
    assert scaler.get_scale() == 2.0 ** 14  # halved once per skipped step (2 batches)
    model = UNet(base_channels=4)
    opt = make_optimizer(model, 1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_one_epoch(model, data, opt, torch.device("cpu"), "fp16", progress=False,
                           scaler=torch.amp.GradScaler("cpu"))
    assert math.isfinite(loss) and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

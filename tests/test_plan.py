"""The self-configuring plan: rules on small synthetic fingerprints, the budget arithmetic, user overrides, and a
generated dataset unlike the public ones trained with no flags."""
import json

import pytest

import data_gen
import run
from budget import Pace
from checkpoint import load_checkpoint, preprocessing_of
from fingerprint import CaseFingerprint, Fingerprint
from plan import PATCH_PIXELS_2D, choose_scale, photo_sides, plan_dataset, size_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def fingerprint(shape, spacing, *, n=20, fmt="nifti", channels=1, thickness=5.0, labels=(1,), names=None):
    cases = [CaseFingerprint(f"c{i}", list(shape), list(spacing), True, channels, fmt, "", {"0": 100, **{str(v): 10 for v in labels}},
                             {str(v): 1 for v in labels}, {str(v): thickness for v in labels}) for i in range(n)]
    return Fingerprint("key", "msd", [], names or {}, cases, [{"mean": 0.0, "std": 1.0}] * channels)


def test_isotropic_volumes_get_a_3d_plan_and_anisotropic_ones_2d():
    iso = plan_dataset(fingerprint((36, 50, 35), (1.0, 1.0, 1.0)), {}, 20)
    assert iso.values["dim"] == 3 and iso.values["patch"] == "40,56,40" and iso.values["spacing"] == "1,1,1"
    assert iso.values["batch_size"] == 2 and iso.values["norm"] == "instance"  # 2 patches: no batch statistics
    aniso = plan_dataset(fingerprint((12, 96, 96), (5.0, 0.8, 0.8)), {}, 20)
    assert aniso.values["dim"] == 2 and "thicker" in aniso.reasons["dim"] and "norm" not in aniso.values
    assert aniso.values["image_size"] == 96 and aniso.values["resize"] is None


def test_photos_with_large_objects_are_scaled_to_the_pixel_budget_and_thin_structures_keep_their_resolution():
    side = int(PATCH_PIXELS_2D ** 0.5)
    polyps = plan_dataset(fingerprint((530, 620), (1.0, 1.0), fmt="jpeg", channels=3, thickness=40.0), {}, 20)
    assert polyps.values["resize"] == side and polyps.values["image_size"] == side
    assert polyps.values["photometric"] > 0  # colour photographs get colour jitter
    vessels = plan_dataset(fingerprint((584, 565), (1.0, 1.0), fmt="tiff", channels=3, thickness=1.5), {}, 20)
    assert vessels.values["resize"] is None and vessels.values["image_size"] == 128
    tiny = plan_dataset(fingerprint((40, 30), (1.0, 1.0), fmt="png", thickness=3.0), {}, 20)
    assert tiny.values["image_size"] == 64 and tiny.values["photometric"] == 0.0
    ct = plan_dataset(fingerprint((512, 512), (0.7, 0.7), fmt="dicom", thickness=20.0), {}, 20)
    assert ct.values["resize"] is None and ct.values["photometric"] == 0.0  # scans are not rescaled like photos


def test_the_budget_picks_a_photographs_scale_from_the_step_time_measured_at_each_side():
    fp = fingerprint((530, 620), (1.0, 1.0), fmt="jpeg", channels=3, thickness=40.0)
    assert photo_sides(fp) == [160, 144, 128, 112, 96, 80, 64]
    measured = []

    def step_at(side):  # a fake machine: a fixed cost and one that grows with the pixels
        measured.append(side)
        return 0.02 + 0.28 * (side / 160) ** 2

    plan = plan_dataset(fp, {}, 20)
    step = choose_scale(plan, fp, step_at, n_items=700, user={})
    # 20 min x 85 % / step x 8 images / 700 passes: 160 px fits 39, 144 px 47, 128 px 59, 112 px 74 >= 60
    assert plan.values["resize"] == plan.values["image_size"] == 112 and measured == [160, 144, 128, 112]
    assert step == pytest.approx(0.1572) and "fit 60 passes" in plan.reasons["resize"]
    short = plan_dataset(fp, {}, 5)
    choose_scale(short, fp, step_at, 700, {})  # no side fits 60 passes in 5 min: the smallest
    assert short.values["resize"] == 64 and "fit only" in short.reasons["resize"]
    fewer = plan_dataset(fp, {}, 5)
    choose_scale(fewer, fp, step_at, 700, {"epochs": 30})  # the user's epochs are the passes wanted
    assert fewer.values["resize"] == 80  # 96 px fits 24 passes, 80 px 32
    thin = fingerprint((530, 620), (1.0, 1.0), fmt="jpeg", channels=3, thickness=20.0)
    assert photo_sides(thin)[-1] == 128  # objects must stay >= 4 px thick: 20 x 128 / 620 = 4.1
    for user in ({"resize": 160}, {"image_size": 160}):  # a side the user gave is measured, never changed
        mine = plan_dataset(fp, user, 5)
        measured.clear()
        choose_scale(mine, fp, step_at, 700, user)
        assert mine.values["image_size"] == 160 and measured == [160]
    retina = fingerprint((584, 565), (1.0, 1.0), fmt="tiff", channels=3, thickness=1.5)
    vessels = plan_dataset(retina, {}, 5)
    measured.clear()
    choose_scale(vessels, retina, step_at, 20, {})
    assert vessels.values["resize"] is None and measured == [128]


def test_labels_come_from_dataset_json_or_from_the_values_the_masks_hold():
    named = plan_dataset(fingerprint((36, 50, 35), (1, 1, 1), labels=(1, 2), names={"anterior": 1, "posterior": 2}), {}, 20)
    assert named.values["labels"] == "anterior=1,posterior=2"
    assert plan_dataset(fingerprint((36, 50, 35), (1, 1, 1), labels=(1, 2)), {}, 20).values["labels"] == "1,2"
    assert plan_dataset(fingerprint((36, 50, 35), (1, 1, 1), labels=(1,)), {}, 20).values["labels"] is None


def test_multichannel_volumes_keep_their_channels_in_the_plan():
    fp = fingerprint((24, 24, 24), (1, 1, 1), channels=2)
    assert fp.cases[0].channels == 2 and plan_dataset(fp, {}, 20).values["dim"] == 3


def test_the_budget_arithmetic_with_a_fake_step_time():
    plan = plan_dataset(fingerprint((36, 50, 35), (1, 1, 1)), {}, 10)
    size_schedule(plan, step_seconds=0.5, n_items=200, user={})  # 10 min x 85 % / 0.5 s = 1020 steps x 2 patches
    assert plan.values["epochs"] * plan.values["samples_per_epoch"] == pytest.approx(2040, rel=0.05)
    assert 8 <= plan.values["epochs"] <= 60
    slow = plan_dataset(fingerprint((36, 50, 35), (1, 1, 1)), {}, 1)
    size_schedule(slow, step_seconds=2.0, n_items=200, user={})
    assert slow.values["epochs"] == 8 and slow.values["samples_per_epoch"] == 25 * 2 // 8  # 25 steps of 2 s


def test_user_flags_win_and_the_plan_says_which_values_are_theirs():
    plan = plan_dataset(fingerprint((36, 50, 35), (1, 1, 1)), {"dim": 2, "lr": 5e-4, "labels": "2"}, 20)
    assert plan.values["dim"] == 2 and plan.sources["dim"] == "user" and plan.values["lr"] == 5e-4
    assert plan.values["labels"] == "2" and plan.sources["base_channels"] == "plan"
    size_schedule(plan, 0.1, 500, {"epochs": 30})  # 20 min x 85 % / 0.1 s = 10200 steps of 8 patches
    assert plan.values["epochs"] == 30 and plan.sources["epochs"] == "user"
    assert plan.values["samples_per_epoch"] == 10200 * 8 // 30  # the user's epochs, sized to the budget
    assert "user" in plan.table() and "plan" in plan.table()
    assert run.given_fields(["--data", "x", "--epochs=5", "--no-augment", "--lr", "1e-3"]) == {"data", "epochs",
                                                                                              "augment", "lr"}


def test_pace_shortens_the_schedule_when_epochs_run_slow_and_replays_recorded_changes():
    class Cfg:
        epochs = 10

    cfg, pace = Cfg(), Pace(100.0)
    pace.start(already_spent=30.0)  # 30 s gone, epochs of 20 s: 3 more fit
    pace.after_epoch(1, 20.0, cfg)
    assert cfg.epochs == 4 and pace.changes == [[1, 4, None]]
    fast, cfg.epochs = Pace(100.0, lengthen=True), 4  # epochs of 10 s: 10 fit; a planned count is lengthened
    fast.start()
    fast.after_epoch(1, 10.0, cfg)
    assert cfg.epochs == 10 and fast.changes == [[1, 10, None]]
    late, cfg.epochs = Pace(100.0, lengthen=True), 8  # late in a run too, by what the slowest recent epoch allows
    late.start(already_spent=55.0)  # 45 s left while these epochs are reported
    for e, s in ((5, 10.0), (6, 8.0), (7, 6.0), (8, 20.0)):
        late.after_epoch(e, s, cfg)
    # 45 s / 10 s fit 4 more after epochs 5, 6 and 7; after the 20 s epoch the median (8 s) says 13 but the slowest
    # says 10: between the two nothing changes
    assert cfg.epochs == 11 and late.changes == [[5, 9, None], [6, 10, None], [7, 11, None]]
    fixed, cfg.epochs = Pace(100.0), 4  # the user's --epochs 4 is never raised
    fixed.start()
    fixed.after_epoch(1, 10.0, cfg)
    assert cfg.epochs == 4 and fixed.changes == []
    cfg.epochs, replay = 10, Pace(100.0, replay=[[1, 4, None]])
    replay.start()
    replay.after_epoch(1, 999.0, cfg)  # the clock is not consulted
    assert cfg.epochs == 4


def test_an_anisotropic_two_channel_dataset_trains_with_no_flags(tmp_path):
    """A dataset unlike the public ones (two channels, 5 mm slices): the plan alone gets it to Dice >= 0.85."""
    root = tmp_path / "aniso"
    data_gen.write_two_channel_dataset(root, 10, shape=(6, 32, 32), spacing=(5.0, 1.0, 1.0), seed=3)
    out = tmp_path / "out"
    code = run.main(["--data", str(root), "--time-budget", "0.15", "--output-dir", str(out), "--checkpoint",
                     str(out / "best.pth"), "--no-progress", "--no-figures", "--threads", "1"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dice"] >= 0.85, summary["dice"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["values"]["dim"] == 2 and plan["sources"]["dim"] == "plan"
    assert summary["train_seconds"] <= 0.15 * 60 * 1.1 + 5  # budget + 10 % (and the start-up of the first epoch)
    assert (out / "fingerprint.json").is_file() and summary["step_seconds"] > 0


def _write_photos(root, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """``n`` colour photographs of ``size`` px with one red disc each (a third of the image across), and masks."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        cy, cx, r = rng.integers(h // 3, 2 * h // 3), rng.integers(w // 3, 2 * w // 3), rng.integers(h // 7, h // 5)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img = rng.integers(60, 120, (h, w, 3)).astype(np.uint8)
        img[disc] = (200, 90, 80)
        Image.fromarray(img).save(root / "images" / f"p{i}.png")
        Image.fromarray(disc.astype(np.uint8) * 255).save(root / "masks" / f"p{i}.png")


def test_the_scale_the_budget_picks_is_the_one_trained_predicted_and_recorded(tmp_path):
    root, out = tmp_path / "photos", tmp_path / "out"
    _write_photos(root, 8, (200, 240))
    code = run.main(["--data", str(root), "--time-budget", "0.05", "--base-channels", "4", "--output-dir", str(out),
                     "--checkpoint", str(out / "best.pth"), "--no-progress", "--no-figures", "--threads", "1"])
    assert code == 0
    plan = json.loads((out / "plan.json").read_text())
    side = plan["values"]["resize"]
    assert side in (160, 144, 128, 112, 96, 80, 64) and plan["values"]["image_size"] == side
    assert "passes over the images" in plan["reasons"]["resize"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preprocessing"]["resize_long_side"] == side and summary["preprocessing"]["patch_size"] == side
    assert summary["config"]["resize"] == side and summary["config"]["image_size"] == side
    _, ckpt = load_checkpoint(out / "best.pth", "cpu")
    assert preprocessing_of(ckpt)[0].resize_long_side == side


def test_robustness_table_scores_every_perturbation_of_colour_photographs(tmp_path):
    import robustness
    from experiments import run_dataset
    from train import TrainConfig

    root = tmp_path / "photos"
    _write_photos(root, 10, (40, 40))
    out = tmp_path / "out"
    run_dataset(TrainConfig(data=str(root), epochs=2, image_size=32, base_channels=4, samples_per_epoch=32,
                            figures=False, progress=False, output_dir=str(out), checkpoint=str(out / "best.pth"),
                            threads=1))
    res = robustness.robustness(out / "best.pth", root, out / "split.json")
    assert set(res["rows"]) == set(robustness.PERTURBATIONS) and res["test_images"] == 2
    assert all(0.0 <= r["dice"] <= 1.0 for r in res["rows"].values()) and res["rows"]["clean"]["loss"] == 0.0

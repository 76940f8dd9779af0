"""BatchNorm folding, FLOP counting, reduced-precision inference Dice and the benchmark's pieces on tiny sizes."""
import contextlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import bench
import data_gen
import model as model_module
import train
from benchmarks import accuracy, common, real, speed
from benchmarks.speed import conv_flops
from model import UNet, fold_batchnorm
from runtime import bf16_supported

BF16 = bf16_supported(torch.device("cpu"))
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "bench" / "seed_reference.py"


@contextlib.contextmanager
def one_thread():
    """Tiny models run faster (and far steadier on a busy 2-core machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


@pytest.mark.parametrize("bilinear", [True, False])
@pytest.mark.parametrize("hw", [(33, 47), (64, 64)])
def test_fold_batchnorm_matches_eval_model(bilinear, hw):
    torch.manual_seed(0)
    model = _random_bn(UNet(n_channels=2, n_classes=3, base_channels=6, bilinear=bilinear)).train()
    folded = fold_batchnorm(model)
    assert model.training, "the original model is left as it was"
    assert any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)) for m in model.modules())
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)) for m in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters())
    x = torch.randn(3, 2, *hw)
    with torch.no_grad(), one_thread():
        want = model.eval()(x)
        got = folded(x)
        got_cl = folded.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())
    assert torch.allclose(got_cl, want, atol=1e-5, rtol=1e-5)


def test_conv_flops_hand_counts():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    assert conv_flops(conv, (2, 3, 10, 12)) == 2 * (2 * 8 * 10 * 12) * (3 * 3 * 3)
    strided = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2))
    assert conv_flops(strided, (1, 4, 9, 9)) == 2 * (6 * 5 * 5) * (2 * 3 * 3)
    up = nn.Sequential(nn.ConvTranspose2d(8, 4, 2, stride=2))
    assert conv_flops(up, (1, 8, 5, 7)) == 2 * (8 * 5 * 7) * (4 * 2 * 2)
    model = UNet(base_channels=4)
    one = conv_flops(model, (1, 1, 32, 32))
    assert one > 0 and conv_flops(model, (3, 1, 32, 32)) == 3 * one
    assert model.training  # mode restored


@pytest.mark.skipif(not BF16, reason="this CPU has no fast bf16; the pipeline runs fp32 here")
def test_bf16_inference_keeps_dice_of_fp32_on_realistic_preset():
    """A model trained for 20 short epochs on the realistic preset: every bf16 inference variant stays
    within 0.005 Dice of fp32 and its masks agree with fp32's (per-image Dice of the two masks >= 0.99)."""
    torch.manual_seed(0)
    data = data_gen.generate_dataset(80, 32, seed=3, difficulty="realistic")
    x, y = torch.from_numpy(data.images).unsqueeze(1), torch.from_numpy(data.lesions)
    model = UNet(base_channels=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = train.make_loader(train.ArrayDataset(x[:48], y[:48]), 8, True, 0)
    with one_thread():
        for _ in range(20):
            train.train_one_epoch(model, loader, opt, torch.device("cpu"), "bf16", True, progress=False)
        runners, _ = speed.make_runners(model, x[:1], bf16=True)
        res = accuracy.dice_by_runner(runners, x[48:], y[48:])
    assert res["eager_fp32"]["dice"] > 0.15, "the model learned something (otherwise the check is vacuous)"
    bf16 = {k: v for k, v in res.items() if "bf16" in k}
    assert len(bf16) >= 3
    for name, v in res.items():
        assert abs(v["dice_delta_vs_fp32"]) <= 0.005, (name, v)
        assert v["mask_agreement_dice"] >= 0.99, (name, v)
    for name in ("inference_mode_cl_fp32", "folded_cl_fp32"):
        assert res[name]["mask_agreement_dice"] == 1.0


def test_inference_runners_agree_and_time_on_tiny_sizes():
    with one_thread():
        res = speed.bench_inference(4, (32,), (1, 2), min_seconds=0.0, onnx=False)
    row = res["ms_per_image"]["32x32_b2"]
    assert {"eager_fp32", "inference_mode_cl_fp32", "folded_cl_fp32"} <= set(row)
    assert all(v > 0 for v in row.values())
    diffs = res["max_abs_diff_vs_eager_fp32"]["32x32_b1"]
    assert diffs["folded_cl_fp32"] < 1e-4
    if BF16:
        assert diffs["folded_bf16_autocast_cl"] < 0.5


def test_training_timing_peak_and_scaling_figure(tmp_path):
    with one_thread():
        cfg = train.TrainConfig(image_size=32, base_channels=4, batch_size=4)
        rec = speed.time_training_epoch(cfg, 8, "fp32", warmup_batches=1)
        peak = speed.conv_peak(((2, 16, 16),), seconds=0.0)
    assert rec["images"] == 8 and rec["seconds"] > 0 and rec["gflops"] > 0
    assert peak["fp32"]["peak_gflops"] > 0 and ("bf16" in peak) == BF16
    with one_thread():
        lever = speed.upsampling_gradient_lever({"2d": (2, 1, 32, 32), "3d": (2, 2, 16, 16, 16)}, 4, 1, 1)
    assert all(lever[k]["dense_ms"] > 0 and lever[k]["plain_ms"] > 0 for k in ("2d", "3d"))
    assert model_module.DENSE_UPSAMPLING_GRADIENT  # the lever leaves the model as it found it
    with one_thread():
        inorm = speed.instance_norm_lever((2, 1, 32, 32, 32), 4, 1, 1)
    assert min(inorm[k] for k in ("batch_ms", "instance_per_item_ms", "instance_plain_ms")) > 0
    assert model_module.PER_ITEM_INSTANCE_NORM
    scaling = {"epoch_images": 140,
               "image_size": [{"image_size": s, "seconds_per_epoch": s / 64, "reference_seconds_per_epoch": s / 16}
                              for s in (32, 64)],
               "dataset_size": [{"image_size": 32, "images": n, "seconds_per_epoch": n / 100} for n in (8, 16)]}
    path = speed.plot_scaling(scaling, tmp_path / "scaling.png")
    assert path.is_file() and path.stat().st_size > 1000


def test_before_after_rows_and_retired_throughput_target_are_reported():
    r = {"machine": common.machine_info(), "plan": {"quick": True}, "before": "/x/before",
         "train_post_auto": {"train_images_per_second": 30.0}, "before_post_auto": {"train_images_per_second": 40.0},
         "default_run": {"wall_s": 9.0}, "before_default_run": {"wall_s": 6.0},
         "reference_post": {"train_images_per_second": 20.0}}
    targets = bench.evaluate_targets(r)
    assert targets[0].status == "info"  # 1.5x would have failed the retired 2.5x target: it is reported, not judged
    text = bench.format_report(r, targets)
    assert "this version / /x/before: training images/s at the post's settings 0.75x, default run wall 1.5x" in text
    assert "before_default_run" in text


def test_seconds_to_dice_median_and_targets():
    assert common.seconds_to_dice([0.5, 0.96, 0.99], [2.0, 3.0, 4.0]) == (2, 5.0)
    assert common.seconds_to_dice([0.5, 0.9], [1.0, 1.0]) == (None, None)
    med = common.median_record([{"a": 1.0, "b": "x"}, {"a": 3.0, "b": "y"}, {"a": 2.0, "b": "z"}])
    assert med["a"] == 2.0 and med["b"] == "x" and med["repeats"] == 3
    r = {"train_post_fp32": {"test_dice": 0.99}, "train_post_auto": {"test_dice": 0.995, "train_images_per_second": 60.0},
         "reference_post": {"train_images_per_second": 20.0, "seconds_to_target": 30.0, "wall_s": 40.0},
         "default_run": {"seconds_to_target": 6.0, "wall_s": 12.0},  # 5x at seed 42 alone (info)
         "default_run_other_seeds": {0: {"seconds_to_target": 3.0}, 1: {"seconds_to_target": None},
                                     2: {"seconds_to_target": 4.0}, 3: {"seconds_to_target": 2.0}},
         "inference": {"ms_per_image": {"256x256_b1": {"eager_fp32": 50.0, "folded_bf16_autocast_cl": 15.0},
                                        "512x512_b1": {"folded_bf16_autocast_cl": 120.0}},
                       "reference_fp32_base64": {"ms_per_image": 160.0}},
         "training_gflops": {"gflops": 600.0}, "conv_peak": {"bf16": {"peak_gflops": 1000.0}},
         "rss_256": {"peak_rss_mb": 900.0}, "reference_rss_256": {"peak_rss_mb_wait4": 1000.0},
         "precision_synthetic": {"variants": {"eager_fp32": {"dice_delta_vs_fp32": 0.0},
                                              "bf16_autocast_cl": {"dice_delta_vs_fp32": -0.002}}}}
    status = {t.name.split(" (")[0]: t.status for t in bench.evaluate_targets(r)}
    assert status["train images/s, post settings"] == "info"  # 3.0x, a retired target
    assert status["|test Dice bf16 - fp32|, post settings"] == "PASS"
    assert status["seconds to val Dice 0.95, seed median"] == "PASS"  # median(6, 3, inf, 4, 2) = 4: 7.5x
    assert status["seconds to val Dice 0.95, seed 42"] == "info"
    never = {0: {"seconds_to_target": None}}  # a seed that never reaches 0.95 counts as infinitely slow
    assert bench.median_seconds_to_target({**r, "default_run_other_seeds": never}) == math.inf
    assert status["whole run.py wall"] == "FAIL"  # 0.3
    assert status["inference 256 b1 ms"] == "PASS"  # 15 / 160 < 1/8
    assert status["inference 512 b1 ms"] == "FAIL"
    assert status["training GFLOP/s 128px base 64 / bf16 conv peak"] == "PASS"
    assert status["peak RSS MB, 256px training, post's model"] == "PASS"
    assert status["max |Dice bf16 variant - fp32|, realistic synthetic"] == "PASS"
    assert status["max |Dice bf16 variant - fp32|, real"] == "n/a"
    inorm = {"precision": "bf16", "base_channels": 32, "shape": [2, 1, 40, 56, 40], "batch_ms": 400.0,
             "instance_per_item_ms": 600.0, "instance_plain_ms": 950.0}
    text = bench.format_report({**r, "machine": common.machine_info(), "plan": {"quick": True},
                                "inference": {**r["inference"], "base_channels": 32}, "instance_norm": inorm},
                               bench.evaluate_targets(r))
    assert "PASS" in text and "FAIL" in text and "folded_bf16_autocast_cl" in text
    assert "instance norm per item" in text and "600.0 /    950.0" in text


def test_run_process_measures_wall_rss_and_json():
    code = "import json; b = bytearray(64 * 1024 * 1024); print('hello'); print(json.dumps({'x': 1}))"
    res = common.run_process([sys.executable, "-c", code])
    assert res.returncode == 0 and res.last_json() == {"x": 1} and res.wall_s > 0
    if res.peak_rss_mb is not None:  # os.wait4: not on Windows
        assert res.peak_rss_mb > 60
    big = bytearray(256 * 1024 * 1024)  # the benchmark's own memory must not count as the child's
    big[::4096] = b"\1" * len(big[::4096])
    small = common.run_process([sys.executable, "-c", "pass"])
    del big
    if small.peak_rss_mb is not None:
        assert small.peak_rss_mb < 100
    bad = common.run_process([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert bad.returncode == 3
    with pytest.raises(RuntimeError, match="exit code 3"):
        common.check(bad, "thing")


@pytest.mark.skipif(not REFERENCE.is_file(), reason="reference script not present")
def test_reference_model_loads_and_steps():
    ref = common.load_reference(REFERENCE)
    with one_thread():
        rec = speed.reference_step_time(ref, 32, 4, 2, 1)
    assert rec["seconds_per_image"] > 0 and rec["gflops"] > 0


def test_cli_parser_defaults():
    args = bench.build_parser().parse_args([])
    assert args.out == "bench_results" and args.repeats is None and args.onnx and not args.compile_model
    assert bench.make_plan(True).quick and bench.make_plan(False).infer_sizes == (256, 512)
    assert json.dumps(common.machine_info())


def test_resume_keeps_measured_sections_and_refuses_another_plans(tmp_path, monkeypatch):
    plan = bench.make_plan(True)
    scaling = {"epoch_images": 140, "image_size": [{"image_size": 32, "seconds_per_epoch": 0.5}],
               "dataset_size": [{"image_size": 32, "images": 8, "seconds_per_epoch": 0.1}]}
    sections = ("default_run_other_seeds", "inference", "thread_scaling", "conv_peak", "training_gflops",
                "training_levers", "upsampling_gradient", "instance_norm", "default_run_levers",
                "precision_synthetic")
    stored = {"plan": json.loads(json.dumps(bench.plain(bench.asdict(plan)), default=float)), "before": None,
              "default_run": {"wall_s": 9.0}, "scaling": scaling, **{k: {"kept": True} for k in sections}}
    (tmp_path / "bench.json").write_text(json.dumps(stored))

    def measured(*_a, **_k):
        raise AssertionError("a kept section was measured again")
    for mod, names in ((bench, ("interleaved_runs",)), (common, ("run_default_pipeline",)),
                       (speed, ("bench_inference", "thread_scaling", "conv_peak", "training_gflops",
                                "training_levers", "upsampling_gradient_lever", "instance_norm_lever",
                                "scaling_curves")),
                       (accuracy, ("default_choices_levers", "precision_check_synthetic"))):
        for name in names:
            monkeypatch.setattr(mod, name, measured)
    r = bench.run_benchmark(plan, None, 1, tmp_path, busy_rounds=0, resume=True)
    assert r["inference"] == {"kept": True} and r["default_run"] == {"wall_s": 9.0} and "targets" in r
    assert json.loads((tmp_path / "bench.json").read_text())["training_levers"] == {"kept": True}
    stored["plan"]["quick"] = False  # another plan: nothing is kept, the first section is measured
    (tmp_path / "bench.json").write_text(json.dumps(stored))
    with pytest.raises(AssertionError, match="measured again"):
        bench.run_benchmark(plan, None, 1, tmp_path, busy_rounds=0, resume=True)


def test_time_to_dice_figure_draws_the_nnunet_peers_result(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    peer = {"dice_mean": 0.284, "minutes_budget": 30.0, "iterations": 150}  # keys of nnunet_peer.py's result
    real.plot({"points": [{"minutes": 1.5, "dice": 0.77}, {"minutes": 25.1, "dice": 0.87}], "nnunet": peer},
              tmp_path / "t.png")
    ax = figures[0].axes[0]
    close(figures[0])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == 2 and labels[1] == "nnU-Net v2 3d_fullres (150 iterations)"
    assert ax.get_ylim()[0] <= 0.284 and (tmp_path / "t.png").stat().st_size > 0


def test_whole_ct_profile_prints_where_predict_spends_its_time(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    from benchmarks import whole_ct

    vol = (np.random.default_rng(0).random((24, 24, 3)) * 400 - 100).astype(np.float32)  # HU-like, 3 slices
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    whole_ct.profile(path, top=60)
    out = capsys.readouterr().out
    assert "predict_case" in out and "predict_planes" in out and "write_case_files" in out

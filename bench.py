"""Speed benchmark of the medseg pipeline, optionally side by side with the original post's pipeline and with
another version of this project.

``python bench.py [--quick] [--baseline ../shared/bench/seed_reference.py] [--before DIR] [--repeats 2]``

Measures our pipeline with the project's own functions and, with ``--baseline``, the reference script in the
same run, interleaved A B A B, each in a fresh process; with ``--before DIR`` (a checkout of another version,
e.g. ``git worktree add ../before <commit>``) that version's default run and training throughput too. Prints a
table of ratios against the targets and writes ``<out>/bench.json`` and ``<out>/scaling.png``:

* training images/s at the post's settings (64x64, base 64, batch 4, 5 epochs, 200 samples), our fp32 and our
  ``auto`` precision (bf16 where the CPU has it), with the final test Dice of each;
* seconds to the first validation Dice >= 0.95, and the wall time of the whole default ``python run.py``;
* inference ms/image at 256 and 512 px, batch 1 and 16, of the default model of ``python run.py`` for several
  execution variants, next to the reference's base-64 fp32 latency, and at batch 1 of the real-data width;
* peak RSS of a 256x256 training run of the post's model and batch (each pipeline in its own process);
* achieved training GFLOP/s at 128x128 base 64 against a measured 3x3 convolution peak (fp32, bf16);
* the default run with its width / learning rate and its BatchNorm statistics taken away in turn, by seed;
* Dice of every reduced-precision inference variant against fp32 on the realistic synthetic preset and on
  Kvasir-SEG (when its folder is present);
* time per epoch against image size and dataset size (``scaling.png``).

Timings on a shared 2-core machine are noisy: compare ratios from one run, not numbers across runs.
``bench.json`` records the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from benchmarks import accuracy, busy, common, real, speed, whole_ct
from checkpoint import plain
from runtime import resolve_precision, set_threads
from train import TASK_DEFAULTS, TrainConfig

log = logging.getLogger("bench")

ROOT = common.ROOT
DEFAULT_REAL_DATA = ROOT.parent / "shared" / "data" / "kvasir_seg" / "Kvasir-SEG"
HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "msd_hippocampus"
#: one 2D hippocampus epoch with every setting given, so that the plan changes nothing between rounds; on the first
#: 80 cases, because after one epoch the evaluation of a half-trained model on all 52 test cases takes minutes
HIPPOCAMPUS_EPOCH = ["--dim", "2", "--labels", "1,2", "--epochs", "1", "--image-size", "64", "--batch-size", "8",
                     "--base-channels", "32", "--lr", "1e-3", "--time-budget", "0", "--max-cases", "80"]
#: the original post's training settings (the reference script's flag names; its Adam runs at POST_LR)
POST = {"epochs": 5, "num_samples": 200, "image_size": 64, "base_channels": 64, "batch_size": 4}
POST_LR = 1e-3
#: the width of the second model timed for inference: real data's default, since 256 / 512 px slices are real scans
REAL_BASE = TASK_DEFAULTS["other"]["base_channels"]


@dataclass
class Plan:
    """Every size the benchmark uses; :func:`make_plan` gives the full and the ``--quick`` one."""

    quick: bool = False
    model_base: int | None = None  # None: TrainConfig's default width (inference, scaling, precision checks)
    ref_base: int = 64  # the reference's width for its inference latency and scaling curve
    post: dict = field(default_factory=lambda: dict(POST))
    default_run_args: list[str] = field(default_factory=list)  # extra run.py flags (quick only)
    rss_size: int = 256  # the post's model and batch at this size, ours and the reference's
    rss_samples: int = 40
    infer_sizes: tuple[int, ...] = (256, 512)
    infer_batches: tuple[int, ...] = (1, 16)
    infer_min_seconds: float = 1.0
    peak_seconds: float = 1.0
    peak_shapes: tuple[tuple[int, int, int], ...] = ((8, 128, 64), (8, 256, 32), (16, 64, 64))  # (N, C, HxW)
    gflops_size: int = 128
    gflops_base: int = 64
    gflops_steps: int = 10
    gflops_batches: tuple[int, ...] = (8, 16, 32)  # the best batch is reported (the target does not fix one)
    scaling_sizes: tuple[int, ...] = (64, 128, 256, 512)
    scaling_images: dict = field(default_factory=lambda: {64: 140, 128: 64, 256: 24, 512: 8})
    scaling_dataset_sizes: tuple[int, ...] = (35, 70, 140, 280, 560)
    epoch_images: int = 140  # training images per epoch of the default config (200 samples, 70 %)
    lever_steps: int = 12
    #: real-data training batches (N, C, *spatial) for the up-sampling gradient lever: a 2D RGB photograph plan and
    #: a 3D hippocampus plan, at the real-data width
    real_step_shapes: dict = field(default_factory=lambda: {"2d_rgb_160px": (8, 3, 160, 160),
                                                            "3d_40x56x40": (2, 1, 40, 56, 40)})
    real_step_repeats: int = 5
    extra_seeds: tuple[int, ...] = (0, 1, 2, 3)  # default run.py on these seeds too (seconds to 0.95 per seed)
    realistic: dict = field(default_factory=lambda: {"difficulty": "realistic", "num_samples": 400, "epochs": 12})
    real_images: int = 240
    real_size: int = 128
    real_epochs: int = 8


def make_plan(quick: bool) -> Plan:
    """The full plan, or a shrunken one that runs every code path in about a minute."""
    if not quick:
        return Plan()
    tiny = {"epochs": 1, "num_samples": 24, "image_size": 32, "base_channels": 8, "batch_size": 4}
    return Plan(quick=True, model_base=8, ref_base=8, post=tiny,
                default_run_args=["--epochs", "1", "--num-samples", "24", "--image-size", "32", "--base-channels", "8"],
                rss_size=64, rss_samples=12, infer_sizes=(64,), infer_batches=(1, 4), infer_min_seconds=0.1,
                peak_seconds=0.2, peak_shapes=((4, 64, 32),), gflops_size=32, gflops_base=8, gflops_steps=2,
                gflops_batches=(4,), extra_seeds=(0,), scaling_sizes=(32, 64), scaling_images={32: 8, 64: 8},
                scaling_dataset_sizes=(8, 16), lever_steps=2, real_step_repeats=1,
                real_step_shapes={"2d_rgb": (2, 3, 32, 32), "3d": (2, 1, 16, 16, 16)},
                realistic={"difficulty": "realistic", "num_samples": 24, "epochs": 1, "image_size": 32,
                           "base_channels": 8},
                real_images=12, real_size=32, real_epochs=1)


# ------------------------------------------------------------------------------------------ targets
@dataclass
class Target:
    """One target line: ``value`` compared against ``goal`` with ``op`` ('>=', '<=', or 'info' for a row that
    is reported but no longer a target)."""

    name: str
    ours: float | None
    reference: float | None
    value: float | None
    goal: float
    op: str
    unit: str = ""

    @property
    def status(self) -> str:
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return "n/a"
        if self.op == "info":
            return "info"
        return "PASS" if (self.value >= self.goal if self.op == ">=" else self.value <= self.goal) else "FAIL"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _best_variant(inf: dict, key: str) -> tuple[str, float] | None:
    row = inf.get("ms_per_image", {}).get(key)
    if not row:
        return None
    name = min(row, key=row.get)
    return name, row[name]


def _seed_runs(r: dict, prefix: str = "") -> dict:
    """The default run's records by seed: seed 42 (``default_run``) and ``default_run_other_seeds``."""
    return {42: r.get(f"{prefix}default_run", {}), **(r.get(f"{prefix}default_run_other_seeds") or {})}


def median_seconds_to_target(r: dict, prefix: str = "") -> float | None:
    """Median over seed 42 and the other seeds of the default run's seconds to validation Dice 0.95 (a seed that
    never gets there counts as infinitely slow). Why a median: the epoch that first crosses 0.95 moves with the last
    bits of the arithmetic (the same code on other seeds crosses anywhere from epoch 2 to 7), so one seed is a draw."""
    runs = [x for x in _seed_runs(r, prefix).values() if isinstance(x, dict) and x]
    if not runs:
        return None
    return statistics.median(math.inf if x.get("seconds_to_target") is None else x["seconds_to_target"] for x in runs)


def evaluate_targets(r: dict) -> list[Target]:
    """The target lines from the collected results ``r`` (reference-dependent ones are n/a without it)."""
    ours_fp32, ours_auto = r.get("train_post_fp32", {}), r.get("train_post_auto", {})
    ref_post, ours_def, inf = r.get("reference_post", {}), r.get("default_run", {}), r.get("inference", {})
    t: list[Target] = []
    ips, ref_ips = ours_auto.get("train_images_per_second"), ref_post.get("train_images_per_second")
    t.append(Target("train images/s, post settings (ours auto / ref; retired)", ips, ref_ips, _ratio(ips, ref_ips),
                    2.5, "info", "x"))
    gap = (abs(ours_auto["test_dice"] - ours_fp32["test_dice"])
           if ours_auto.get("test_dice") is not None and ours_fp32.get("test_dice") is not None else None)
    t.append(Target("|test Dice bf16 - fp32|, post settings", ours_auto.get("test_dice"), ours_fp32.get("test_dice"),
                    gap, 0.01, "<="))
    s, ref_s = ours_def.get("seconds_to_target"), ref_post.get("seconds_to_target")
    med = median_seconds_to_target(r)
    t.append(Target("seconds to val Dice 0.95, seed median (ref 42 / ours)", med, ref_s,
                    _ratio(ref_s, med), 6.0, ">=", "x"))
    t.append(Target("seconds to val Dice 0.95, seed 42 (ref / ours)", s, ref_s, _ratio(ref_s, s),
                    6.0, "info", "x"))
    w, ref_w = ours_def.get("wall_s"), ref_post.get("wall_s")
    t.append(Target("whole run.py wall (ours / ref)", w, ref_w, _ratio(w, ref_w), 0.25, "<="))
    best, best512 = _best_variant(inf, "256x256_b1"), _best_variant(inf, "512x512_b1")
    ref_ms = inf.get("reference_fp32_base64", {}).get("ms_per_image")
    t.append(Target(f"inference 256 b1 ms ({best[0] if best else '-'} / ref fp32 base 64)", best[1] if best else None,
                    ref_ms, _ratio(best[1] if best else None, ref_ms), 1 / 8, "<="))
    t.append(Target(f"inference 512 b1 ms ({best512[0] if best512 else '-'})", best512[1] if best512 else None, None,
                    best512[1] if best512 else None, 100.0, "<=", "ms"))
    tg = r.get("training_gflops", {})
    g, peak = tg.get("gflops"), r.get("conv_peak", {}).get("bf16", {}).get("peak_gflops")
    t.append(Target(f"training GFLOP/s 128px base 64 / bf16 conv peak (batch {tg.get('batch_size', '-')})", g, peak,
                    _ratio(g, peak), 0.5, ">="))
    rss, ref_rss = r.get("rss_256", {}).get("peak_rss_mb"), r.get("reference_rss_256", {}).get("peak_rss_mb_wait4")
    t.append(Target("peak RSS MB, 256px training, post's model (ours / ref)", rss, ref_rss, _ratio(rss, ref_rss), 1.0, "<="))
    for name, row in r.get("busy_machine", {}).items():
        t.append(Target(f"{name} beside a CPU-bound process / idle", row["busy"], row["idle"], row["busy_over_idle"],
                        1.7, "<=", "x"))
    ct = r.get("whole_ct", {})
    t.append(Target("predict.py on a whole CT (129x512x512), seconds", ct.get("wall_s"), None, ct.get("wall_s"), 10.0,
                    "<=", "s"))
    t.append(Target("predict.py on a whole CT, peak RSS MB", ct.get("peak_rss_mb"), None, ct.get("peak_rss_mb"),
                    2048.0, "<=", "MB"))
    before = r.get("before_default_run", {}).get("wall_s")
    t.append(Target("default run wall, idle, this version / --before", w, before, _ratio(w, before), 1.05, "<="))
    for key, label in (("precision_synthetic", "realistic synthetic"), ("precision_real", "real (Kvasir-SEG)")):
        variants = r.get(key, {}).get("variants", {})
        worst = max((abs(v["dice_delta_vs_fp32"]) for n, v in variants.items() if "bf16" in n), default=None)
        t.append(Target(f"max |Dice bf16 variant - fp32|, {label}", None, None, worst, 0.005, "<="))
    return t


# ------------------------------------------------------------------------------------------- report
def _f(v, d: int = 3) -> str:
    return "-" if v is None else (f"{v:.{d}g}" if isinstance(v, float) else str(v))


def format_report(r: dict, targets: list[Target]) -> str:
    """Plain-text tables: targets, training runs, before/after, inference variants."""
    m = r["machine"]
    lines = [f"machine: {m['cpu']} | {m['logical_cpus']} logical CPUs | torch {m['torch']} ({m['torch_threads']} threads) "
             f"| bf16 {m['bf16_autocast']} | load avg before {m['load_average']} after {r.get('load_average_after')}"]
    if r["plan"]["quick"]:
        lines.append("QUICK MODE: tiny sizes, numbers are a smoke test, not a measurement")
    load, cpus = m.get("load_average"), m.get("logical_cpus") or 1  # only the load before the start tells
    if load and load[0] > 0.5 * cpus:
        lines.append(f"WARNING: the machine was busy before the start (1-minute load average {load[0]:.1f} on {cpus} "
                     f"CPUs): timings may be unreliable")
    lines += ["", f"{'target':58} {'ours':>10} {'ref':>10} {'value':>8} {'goal':>8}  status"]
    lines += [f"{t.name:58} {_f(t.ours, 4):>10} {_f(t.reference, 4):>10} {_f(t.value, 3):>8} "
              f"{t.op if t.op != 'info' else ' '}{_f(t.goal, 3):>6}  {t.status}" for t in targets]
    lines += ["", f"{'training run':36} {'img/s':>8} {'img/s+eval':>10} {'test Dice':>9} {'s to .95':>8} {'wall s':>7} "
                  f"{'RSS MB':>7}"]
    for name, row in r.get("busy_machine", {}).items():
        lines.append(f"busy machine, {name}: {row['measure']} idle {_f(row['idle'], 3)} s, beside a CPU-bound process "
                     f"{_f(row['busy'], 3)} s ({_f(row['busy_over_idle'], 3)}x)")
    for key in ("train_post_fp32", "train_post_auto", "before_post_auto", "reference_post", "default_run",
                "before_default_run", "default_run_checkpoint_every_epoch", "rss_256", "reference_rss_256"):
        rec = r.get(key)
        if rec:
            rss = rec.get("peak_rss_mb") if rec.get("peak_rss_mb_wait4") is None else rec["peak_rss_mb_wait4"]
            lines.append(f"{key:36} {_f(rec.get('train_images_per_second'), 4):>8} "
                         f"{_f(rec.get('train_images_per_second_incl_eval'), 4):>10} "
                         f"{_f(rec.get('test_dice', rec.get('final_dice')), 4):>9} {_f(rec.get('seconds_to_target'), 3):>8} "
                         f"{_f(rec.get('wall_s'), 3):>7} {_f(rss, 4):>7}")
    if r.get("before"):
        a, b = r.get("train_post_auto", {}), r.get("before_post_auto", {})
        da, db = r.get("default_run", {}), r.get("before_default_run", {})
        lines += ["", f"this version / {r['before']}: training images/s at the post's settings "
                      f"{_f(_ratio(a.get('train_images_per_second'), b.get('train_images_per_second')), 3)}x, "
                      f"default run wall {_f(_ratio(da.get('wall_s'), db.get('wall_s')), 3)}x"]
    seeds, levers = r.get("default_run_other_seeds"), r.get("default_run_levers")
    if seeds:
        lines += ["", "default run, epoch of the first validation Dice >= 0.95 (s) / test Dice, by seed; median s:"]
        versions = [("", "this version")]
        if r.get("before_default_run_other_seeds"):
            versions.append(("before_", r["before"]))
        for prefix, name in versions:
            lines.append(f"  {name[-34:]:34}" + "".join(
                f"{s}: {v.get('first_epoch_at_target')} ({_f(v.get('seconds_to_target'), 3)} s) "
                f"{_f(v.get('test_dice'), 4)}   " for s, v in _seed_runs(r, prefix).items())
                + f"median {_f(median_seconds_to_target(r, prefix), 3)} s")
        for name, per_seed in (levers or {}).items():
            lines.append(f"  {name:34}" + "".join(
                f"{s}: {v.get('first_epoch_at_target')}" + (f" ({_f(v.get('seconds_to_target'), 3)} s)"
                                                            if "seconds_to_target" in v else "")
                + f" {_f(v.get('test_dice'), 4)}   " for s, v in per_seed.items()))
    if r.get("training_levers"):
        lines += ["", "training ms/image at the post's settings"]
        lines += [f"  {k:52} {_f(v, 4):>8}" for k, v in r["training_levers"].items()]
    up = r.get("upsampling_gradient")
    if up:
        head = (f"training ms/step at real-data shapes (base {up['base_channels']}, {up['precision']}): "
                "dense up-sampling gradient / plain backward")
        lines += ["", head]
        lines += [f"  {k:20} {tuple(v['shape'])!s:24} {v['dense_ms']:8.1f} / {v['plain_ms']:8.1f}"
                  for k, v in up.items() if isinstance(v, dict)]
    inorm = r.get("instance_norm")
    if inorm:
        lines += ["", f"3D training ms/step {tuple(inorm['shape'])} (base {inorm['base_channels']}, "
                      f"{inorm['precision']}): BatchNorm / instance norm per item / torch's instance norm",
                  "  " + " / ".join(f"{inorm[k]:8.1f}" for k in ("batch_ms", "instance_per_item_ms",
                                                                  "instance_plain_ms"))]
    for rec in (r.get(k, {}) for k in ("inference", "inference_real_width")):
        inf = rec.get("ms_per_image", {})
        if inf:
            keys = list(inf)
            lines += ["", f"inference ms/image (base {rec['base_channels']})".ljust(28) + "".join(f"{k:>14}" for k in keys)]
            lines += [f"{name:28}" + "".join(f"{_f(inf[k].get(name), 3):>14}" for k in keys) for name in inf[keys[0]]]
            ref = rec.get("reference_fp32_base64")
            if ref:
                lines.append(f"{'reference fp32 base ' + str(ref.get('base_channels', 64)):28}"
                             f"{ref.get('key', '256x256_b1'):>14}{_f(ref.get('ms_per_image'), 3):>14}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the run
def interleaved_runs(plan: Plan, baseline: str | None, before: Path | None, repeats: int, threads: int) -> dict:
    """The subprocess measurements, interleaved per round: ours (A), the reference (B), the other version (C)."""
    post_cfg = replace(TrainConfig(), lr=POST_LR, **plan.post)
    ref_rss = {**plan.post, "image_size": plan.rss_size, "num_samples": plan.rss_samples, "epochs": 1}
    rounds: dict[str, list[dict]] = {}

    def add(key: str, rec: dict) -> None:
        rounds.setdefault(key, []).append(rec)

    for i in range(repeats):
        log.info("round %d/%d: ours", i + 1, repeats)
        add("train_post_fp32", common.train_in_subprocess(replace(post_cfg, precision="fp32"), threads))
        add("train_post_auto", common.train_in_subprocess(replace(post_cfg, precision="auto"), threads))
        add("default_run", common.run_default_pipeline(threads, plan.default_run_args))
        add("default_run_checkpoint_every_epoch",  # the checkpoint cadence, taken away
            common.run_default_pipeline(threads, [*plan.default_run_args, "--checkpoint-every", "0"]))
        add("rss_256", common.train_in_subprocess(replace(post_cfg, **ref_rss), threads))
        if baseline:
            log.info("round %d/%d: reference", i + 1, repeats)
            add("reference_post", common.run_reference(baseline, plan.post, threads))
            add("reference_rss_256", common.run_reference(baseline, ref_rss, threads))
        if before:
            log.info("round %d/%d: %s", i + 1, repeats, before)
            add("before_post_auto", common.train_in_subprocess(replace(post_cfg, precision="auto"), threads, before))
            add("before_default_run", common.run_default_pipeline(threads, plan.default_run_args, root=before))
    out = {}
    for k, recs in rounds.items():
        out[k] = common.median_record(recs)
        out[k]["per_repeat"] = [{kk: rec.get(kk) for kk in ("train_images_per_second", "seconds_to_target", "wall_s",
                                                            "peak_rss_mb", "peak_rss_mb_wait4", "test_dice") if kk in rec}
                                for rec in recs]
    return out


NOTES = {"train_images_per_second": "forward + backward + optimizer step only (both pipelines)",
         "seconds_to_target": "cumulative epoch time (train + validation) to the first epoch with validation Dice >= "
                              "0.95; ours is per-image Dice on the validation split, the reference's is its "
                              "batch-pooled Dice on its test split",
         "gflops": "convolutions only; training = 3 x forward FLOPs",
         "peak_rss_mb": "each run in its own process, ru_maxrss from os.wait4"}


def other_seeds(plan: Plan, threads: int, root: Path = common.ROOT) -> dict:
    """The default run of the checkout ``root`` on the plan's extra seeds: the epoch that first crosses 0.95 moves
    with the last bits."""
    keys = ("first_epoch_at_target", "seconds_to_target", "test_dice", "train_seconds", "wall_s")
    return {seed: {k: rec.get(k) for k in keys} for seed in plan.extra_seeds
            for rec in [common.run_default_pipeline(threads, [*plan.default_run_args, "--seed", str(seed)], root=root)]}


def best_training_gflops(plan: Plan, precision: str) -> dict:
    """Training GFLOP/s at the plan's size and width, the best of its batch sizes (each one recorded)."""
    per_batch = [speed.training_gflops(plan.gflops_size, plan.gflops_base, b, plan.gflops_steps, precision)
                 for b in plan.gflops_batches]
    best = max(per_batch, key=lambda rec: rec["gflops"])
    return {**best, "per_batch": {rec["batch_size"]: rec["gflops"] for rec in per_batch}}


def run_benchmark(plan: Plan, baseline: str | None, repeats: int, out_dir: Path, threads: int = 0,
                  onnx: bool = True, compile_model: bool = False, real_data: Path | None = None,
                  before: Path | None = None, busy_rounds: int = 2, resume: bool = False) -> dict:
    """Everything, in order; writes ``out_dir/bench.json`` and returns the results.

    With ``resume`` the sections already in ``out_dir/bench.json`` (of a run with the same plan) are kept and not
    measured again, so an interrupted full run goes on where it stopped.
    """
    set_threads(threads)
    reference = common.load_reference(baseline) if baseline else None
    precision = resolve_precision("auto", torch.device("cpu"))
    r: dict = {"machine": common.machine_info(), "plan": asdict(plan), "baseline": baseline, "repeats": repeats,
               "before": str(before) if before else None, "precision_auto": precision, "notes": NOTES}
    done = common.read_json(out_dir / "bench.json") if resume else None
    same_plan = json.loads(json.dumps(plain(asdict(plan)), default=float))  # as bench.json stores it
    if done and done.get("plan") == same_plan and done.get("before") == r["before"]:
        log.info("resuming: keeping %s", ", ".join(k for k in done if k not in r))
        r = {**done, **r}
    elif resume:
        log.warning("nothing to resume in %s (missing, or another plan): measuring everything", out_dir)

    def save() -> None:  # after every section: a crash late in a long run keeps what was measured
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench.json").write_text(json.dumps(plain(r), indent=2, default=float), encoding="utf-8")

    def section(key: str, measure) -> None:
        if key not in r:
            r[key] = measure()
            save()

    if "default_run" not in r:
        r.update(interleaved_runs(plan, baseline, before, repeats, threads))
        save()

    base = plan.model_base or TrainConfig().base_channels
    section("default_run_other_seeds", lambda: other_seeds(plan, threads))
    if before:
        section("before_default_run_other_seeds", lambda: other_seeds(plan, threads, before))
    section("inference", lambda: speed.bench_inference(
        base, plan.infer_sizes, plan.infer_batches, min_seconds=plan.infer_min_seconds, onnx=onnx,
        compile_model=compile_model, reference=reference, reference_base=plan.ref_base))
    if not plan.quick:
        section("inference_real_width", lambda: speed.bench_inference(
            REAL_BASE, plan.infer_sizes, (1,), min_seconds=plan.infer_min_seconds, onnx=False))
    section("thread_scaling", lambda: speed.thread_scaling(base, plan.infer_sizes[0], plan.infer_min_seconds))
    section("conv_peak", lambda: speed.conv_peak(plan.peak_shapes, plan.peak_seconds))
    section("training_gflops", lambda: best_training_gflops(plan, precision))
    if reference is not None:
        section("reference_training_gflops", lambda: speed.reference_step_time(
            reference, plan.gflops_size, plan.gflops_base, POST["batch_size"], max(2, plan.gflops_steps // 2)))
    section("training_levers", lambda: speed.training_levers(plan.post, plan.lever_steps, POST_LR, compile_model))
    section("upsampling_gradient", lambda: speed.upsampling_gradient_lever(
        plan.real_step_shapes, plan.model_base or REAL_BASE, plan.real_step_repeats, plan.lever_steps))
    section("instance_norm", lambda: speed.instance_norm_lever(
        plan.real_step_shapes["3d_40x56x40"], plan.model_base or REAL_BASE, plan.real_step_repeats, plan.lever_steps))
    section("default_run_levers", lambda: accuracy.default_choices_levers(
        (42, *plan.extra_seeds), plan.default_run_args, plan.quick, threads))
    section("scaling", lambda: speed.scaling_curves(plan, precision, reference))
    r["scaling_figure"] = str(speed.plot_scaling(r["scaling"], out_dir / "scaling.png"))
    section("precision_synthetic", lambda: accuracy.precision_check_synthetic(plan.realistic, onnx=onnx))
    if real_data is not None and (real_data / "images").is_dir():
        section("precision_real", lambda: accuracy.precision_check_real(
            real_data, plan.real_images, plan.real_size, plan.real_epochs, onnx=onnx, base_channels=plan.model_base))
    else:
        log.warning("real-data precision check skipped: %s has no images/ folder (pass --real-data)", real_data)
    series = whole_ct.find_series()
    if series is not None and not plan.quick:
        section("whole_ct", lambda: whole_ct.whole_ct(series))
    if busy_rounds:
        runs = {"default_run": plan.default_run_args}
        if HIPPOCAMPUS.is_dir() and not plan.quick:
            runs["hippocampus_2d_epoch"] = ["--data", str(HIPPOCAMPUS), *HIPPOCAMPUS_EPOCH]
        section("busy_machine", lambda: busy.busy_machine(runs, busy_rounds))
    r["load_average_after"] = common.loadavg()
    r["targets"] = [{**asdict(t), "status": t.status} for t in evaluate_targets(r)]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(plain(r), indent=2, default=float), encoding="utf-8")
    return r


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the medseg pipeline (optionally against the reference script "
                                            "and another version).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in about a minute, not a measurement")
    p.add_argument("--baseline", default=None, help="path of the reference script (e.g. ../shared/bench/seed_reference.py)")
    p.add_argument("--before", default=None, metavar="DIR", help="a checkout of another version of this project "
                   "(git worktree add DIR COMMIT): its default run and training throughput, interleaved with ours")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds of the subprocess runs (default 2, quick 1)")
    p.add_argument("--out", default="bench_results", help="folder for bench.json and scaling.png")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both pipelines (0 = torch default)")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the ONNX Runtime variant")
    p.add_argument("--compile", dest="compile_model", action="store_true",
                   help="also time torch.compile for inference and for the training step (compile time reported "
                        "separately)")
    p.add_argument("--real-data", default=str(DEFAULT_REAL_DATA), help="Kvasir-SEG folder for the real-data Dice check")
    p.add_argument("--busy-rounds", type=int, default=2, help="idle / beside-a-CPU-bound-process rounds of the busy "
                   "machine rows (0 = skip them)")
    p.add_argument("--resume", action="store_true", help="keep the sections already in OUT/bench.json (an interrupted "
                   "run with the same plan) and measure only the rest")
    p.add_argument("--real", action="store_true", help="only the time-to-Dice row: the default run.py --data on the "
                   "hippocampus for --real-minutes with snapshots, scored on its held-out cases (about 40 min)")
    p.add_argument("--real-minutes", type=float, default=30.0, help="training budget of the --real run")
    p.add_argument("--nnunet-result", default=None, help="nnunet_result.json of benchmarks/nnunet_peer.py, drawn "
                   "beside ours")
    p.add_argument("--worker-train", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    if args.worker_train:  # child process of common.train_in_subprocess
        logging.getLogger().setLevel(logging.WARNING)
        set_threads(args.threads)
        cfg = TrainConfig.from_dict(json.loads(Path(args.worker_train).read_text()))
        Path(args.worker_out).write_text(json.dumps(plain(common.measure_training(cfg)), default=float))
        return 0
    if args.real:
        nn = json.loads(Path(args.nnunet_result).read_text()) if args.nnunet_result else None
        res = real.time_to_dice(HIPPOCAMPUS, Path(args.out) / "real", args.real_minutes, nnunet=nn)
        for p in res["points"]:
            print(f"{p['minutes']:6.1f} min  held-out Dice {p['dice']:.4f}  {p['per_class']}")
        print(f"wrote {Path(args.out) / 'real' / 'time_to_dice.json'} and time_to_dice.png")
        return 0
    for flag, path, kind in (("--baseline", args.baseline, "file"), ("--before", args.before, "dir")):
        if path and not (Path(path).is_file() if kind == "file" else (Path(path) / "run.py").is_file()):
            log.error("error: %s %s: no such %s", flag, path, "file" if kind == "file" else "checkout (no run.py)")
            return 2
    t0 = time.perf_counter()
    r = run_benchmark(make_plan(args.quick), args.baseline, args.repeats or (1 if args.quick else 2), Path(args.out),
                      args.threads, args.onnx, args.compile_model, Path(args.real_data) if args.real_data else None,
                      Path(args.before).resolve() if args.before else None, args.busy_rounds, args.resume)
    print(format_report(r, [Target(**{k: v for k, v in t.items() if k != "status"}) for t in r["targets"]]))
    print(f"\nwrote {Path(args.out) / 'bench.json'} and {r['scaling_figure']} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python run.py --data DIR`` configures itself: fingerprint -> plan -> measured step time -> schedule -> plan.json.

The rules live in :mod:`plan` (documented in docs/plan.md); this module runs them for one dataset on this machine
and records what was decided: ``fingerprint.json`` and ``plan.json`` in the output folder, and the plan, the
fingerprint and the measured step time in ``summary.json`` and the checkpoint. ``run.py --plan plan.json``
replays a finished run's plan (schedule changes included) without measuring anything.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import torch

import datasets
import fingerprint
from budget import measure_step_seconds
from checkpoint import update_checkpoint
from errors import ConfigError
from fileio import write_json_atomic
from model import UNet
from plan import Plan, choose_scale, plan_dataset, size_schedule
from preprocess import Preprocessing

log = logging.getLogger("run")

PLAN_FORMAT = "medseg-plan/1"


def _read_raw_case(ref) -> tuple:
    image, meta = datasets.read_case_image(ref)
    return image, meta, datasets.read_case_mask(ref, meta)


def plan_run(cfg, given: set[str], spec, refs: list, out_dir: Path) -> tuple[Plan, fingerprint.Fingerprint]:
    """The dataset's fingerprint (cached in ``out_dir``) and the plan for it; the user's fields (``given``) win."""
    fp = fingerprint.load_or_compute(spec, refs, _read_raw_case, out_dir)
    log.info("数据指纹: %d 例, 中位形状 %s, 中位间距 %s mm, 通道 %d, 标签值 %s, 前景占比 %.3f, 结构半厚度 %.1f px",
             len(fp.cases), "x".join(f"{v:.0f}" for v in fp.median("shape")),
             "x".join(f"{v:.3g}" for v in fp.median("spacing")), fp.cases[0].channels, fp.label_values,
             fp.foreground_share(), fp.thickness())
    plan = plan_dataset(fp, {k: getattr(cfg, k) for k in given}, cfg.time_budget)
    return plan, fp


def size_run(cfg, plan: Plan, given: set[str], prep: Preprocessing, split: dict, fp, device: torch.device,
             precision: str):
    """Measure a few training steps of the planned network here, choose a photograph's scale by them
    (:func:`plan.choose_scale`; ``prep`` follows) and size the schedule to the budget."""
    def step_at(side: int) -> float:  # side: the 2D patch; a 3D run measures its planned patch
        with torch.random.fork_rng():  # the measurement must not shift the seeded run (a --plan replay skips it)
            model = UNet(prep.in_channels, prep.model_out_channels, cfg.base_channels, cfg.bilinear, prep.dim,
                         prep.pool, cfg.norm)
            patch = prep.patch if prep.dim == 3 else [side] * 2
            return measure_step_seconds(model, (cfg.batch_size, prep.in_channels, *patch), prep.model_out_channels,
                                        precision, device, cfg.channels_last, regions=prep.regions)

    train = set(split["train"])
    n_items = sum(1 if prep.dim == 3 or len(c.shape) == 2 else c.shape[0] for c in fp.cases if c.case in train)
    user = {k: getattr(cfg, k) for k in given}
    if prep.dim == 2:
        step_s = choose_scale(plan, fp, step_at, n_items, user)
        if (prep.resize_long_side, prep.patch_size) != (plan.values["resize"], plan.values["image_size"]):
            prep.resize_long_side, prep.patch_size = plan.values["resize"], plan.values["image_size"]
            log.info("预处理 (按预算缩放后): %s", prep)
    else:
        step_s = step_at(0)
    size_schedule(plan, step_s, n_items, user)
    cfg = replace(cfg, epochs=plan.values["epochs"], samples_per_epoch=plan.values["samples_per_epoch"],
                  epochs_planned="epochs" not in given, resize=prep.resize_long_side, image_size=prep.patch_size)
    log.info("计划 (plan.json; 用户给定的值优先):\n%s", plan.table())
    write_json_atomic(Path(cfg.output_dir) / "plan.json", {"format": PLAN_FORMAT, **asdict(plan)})  # --resume reads it
    return cfg


def finish(plan: Plan, fp, result, cfg, out_dir: Path) -> dict:
    """Record what the run did with the plan (schedule changes, the mirroring decision) in ``plan.json`` and the
    checkpoint; returns the summary's planning fields."""
    plan.values.update(schedule_changes=result.schedule_changes, time_budget=cfg.time_budget, tta=cfg.tta)
    doc = {"format": PLAN_FORMAT, **asdict(plan)}
    write_json_atomic(Path(out_dir) / "plan.json", doc)
    update_checkpoint(cfg.checkpoint, plan=doc, fingerprint=fp.to_dict(), step_seconds=plan.step_seconds)
    return {"plan": doc, "fingerprint_key": fp.key, "step_seconds": plan.step_seconds}


def load_plan(path: str | Path) -> dict:
    """The config values of a ``plan.json`` (``run.py --plan``), checked; they replay the run they came from."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p}: cannot read the plan ({' '.join(str(exc).split())[:160]}; expected a plan.json "
                          "written by run.py)") from None
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT or not isinstance(doc.get("values"), dict):
        raise ConfigError(f"{p}: not a plan (expected a plan.json of format {PLAN_FORMAT!r} written by run.py)")
    values = dict(doc["values"])
    values.setdefault("schedule_changes", [])  # an empty list replays "no change": the clock is not consulted
    return values

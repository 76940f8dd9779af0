"""Time to a good model on real scans: held-out Dice against training wall-clock minutes.

One ``python run.py --data DIR`` in the default configuration (the plan, a time budget) saves the best model so
far at fixed training minutes (``--snapshot-minutes``); afterwards, off the clock, every snapshot and the final
model are scored on the run's held-out test cases (``split.json``) through the evaluation path training uses,
without post-processing or mirroring (the final model's own test score, with both, is in its summary.json).
Written as JSON and drawn as a figure, beside nnU-Net v2's result when one is given (benchmarks/nnunet_peer.py).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

from benchmarks.common import ROOT, check, read_json, run_process

log = logging.getLogger("bench")

SNAPSHOT_MINUTES = (1.5, 3, 5, 10, 20)


def train_with_snapshots(data: Path, out: Path, budget: float, minutes=SNAPSHOT_MINUTES, extra: list | None = None) -> dict:
    """The default ``run.py --data`` with ``--time-budget budget`` and snapshots; returns its summary and wall time."""
    cmd = [sys.executable, str(ROOT / "run.py"), "--data", str(data), "--time-budget", f"{budget:g}", "--output-dir",
           str(out), "--checkpoint", str(out / "best_unet.pth"), "--no-progress",
           "--snapshot-minutes", ",".join(f"{m:g}" for m in minutes if m < budget), *(extra or [])]
    res = run_process(cmd, cwd=out.parent, timeout=4 * 3600)
    check(res, "run.py --data (time to Dice)")
    return {"wall_s": res.wall_s, "summary": read_json(out / "summary.json") or {}}


def score_checkpoint(path: Path, cases: list, prep_override=None) -> dict:
    """Per-class Dice of a checkpoint on loaded test cases (no post-processing, no mirroring)."""
    import torch

    from checkpoint import load_checkpoint, preprocessing_of
    from evaluation import evaluate_cases, summarize_rows
    from runtime import resolve_precision

    model, ckpt = load_checkpoint(path)
    prep = prep_override or preprocessing_of(ckpt, path)[0]
    cfg = SimpleNamespace(overlap=0.5, threshold=0.5, channels_last=True)
    rows = evaluate_cases(model, cases, prep, torch.device("cpu"), resolve_precision("auto", torch.device("cpu")),
                          cfg, hd=False, mirror=False)
    stats = summarize_rows(rows, prep)
    return {"dice": stats["dice"], "per_class": {n: pc["dice"] for n, pc in stats["per_class"].items()},
            "elapsed_seconds": ckpt.get("elapsed_seconds"), "epoch": ckpt.get("epoch")}


def time_to_dice(data: Path, out: Path, budget: float = 30.0, minutes=SNAPSHOT_MINUTES, extra: list | None = None,
                 nnunet: dict | None = None) -> dict:
    """Train once with snapshots, then score every snapshot on the held-out cases; writes ``time_to_dice.json`` and
    ``time_to_dice.png`` into ``out``."""
    import datasets
    from checkpoint import load_checkpoint, preprocessing_of

    out.mkdir(parents=True, exist_ok=True)
    run = train_with_snapshots(data, out / "run", budget, minutes, extra)
    split = json.loads((out / "run" / "split.json").read_text())
    _, ckpt = load_checkpoint(out / "run" / "best_unet.pth")
    prep = preprocessing_of(ckpt, out / "run" / "best_unet.pth")[0]
    spec = datasets.discover(data)
    refs = [r for r in spec.cases if r.case_id in set(split["test"])]
    cases = datasets.load_cases(refs, prep, spec.label_names)
    points = []
    for path in sorted((out / "run" / "snapshots").glob("best_at_*min.pth"), key=lambda p: float(p.stem[8:-3])):
        points.append({"minutes": float(path.stem[8:-3]), **score_checkpoint(path, cases, prep)})
        log.info("time to Dice: %.1f min -> %.4f", points[-1]["minutes"], points[-1]["dice"])
    final = score_checkpoint(out / "run" / "best_unet.pth", cases, prep)
    points.append({"minutes": run["summary"].get("train_seconds", budget * 60) / 60, **final})
    result = {"data": str(data), "budget_minutes": budget, "test_cases": len(cases), "points": points,
              "final_summary": {k: run["summary"].get(k) for k in ("dice", "per_class", "train_seconds",
                                                                    "eval_seconds", "plan")},
              "wall_s": run["wall_s"], "nnunet": nnunet}
    (out / "time_to_dice.json").write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")
    plot(result, out / "time_to_dice.png")
    return result


def plot(result: dict, path: Path) -> Path:
    """Held-out mean Dice against training minutes (ours), with nnU-Net's result as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result["points"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([p["minutes"] for p in pts], [p["dice"] for p in pts], "o-", label="medseg, default configuration")
    nn = result.get("nnunet") or {}  # benchmarks/nnunet_peer.py's result
    dices = [p["dice"] for p in pts]
    if nn.get("dice_mean") is not None:
        ax.plot([nn.get("minutes_budget", 30)], [nn["dice_mean"]], "s", color="tab:red",
                label=f"nnU-Net v2 3d_fullres ({nn.get('iterations', '?')} iterations)")
        dices.append(nn["dice_mean"])
    ax.set(xlabel="training wall-clock minutes (2-core CPU)", ylabel="held-out Dice (mean of classes)",
           title="Time to a good model", ylim=(max(0.0, min(dices) - 0.05), 1.0))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""The time budget: a training run sized to the minutes the user gives, and kept to them.

Before training, :func:`measure_step_seconds` times a few training steps of the planned network on this machine (the
plan turns that into epochs). During training, :class:`Pace` re-checks after every epoch: when the recent epochs say
the run would overrun, it shortens the schedule; when the plan chose the epoch count and even the slowest recent
epoch says more epochs would fit, it lengthens it (a count the user gave is never raised). The poly learning rate
follows either change without a jump (``train.PolyLR``), so the budget the machine frees late in a run is used too;
when other load appears in the middle of an epoch, the epoch ends early at the deadline (the budget plus 5 %, leaving
room for the last validation). Every change is recorded, so ``run.py --plan plan.json`` replays the same schedule
without looking at the clock.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from metrics import segmentation_loss
from runtime import autocast, channels_last, to_channels_last

#: the share of the budget the deadline allows beyond it: the training phase must end within budget + 10 %
DEADLINE_SLACK = 0.05


def measure_step_seconds(model: torch.nn.Module, input_shape: tuple[int, ...], n_classes: int, precision: str,
                         device: torch.device, use_channels_last: bool = True, steps: int = 3, warmup: int = 2,
                         regions: bool = False) -> float:
    """Median seconds of one training step (forward, loss, backward, Adam) of ``model`` on a random batch of
    ``input_shape`` (N, C, *spatial) on this machine, after ``warmup`` steps. The model's weights are restored."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device).train()
    if use_channels_last:
        to_channels_last(model, len(input_shape) - 2)
    x = torch.randn(input_shape, device=device)
    x = channels_last(x) if use_channels_last else x
    y = torch.randint(0, 2 ** n_classes if regions else max(2, n_classes), (input_shape[0], *input_shape[2:]),
                      device=device).to(torch.uint8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            out = model(x)
        segmentation_loss(out, y, regions=regions).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    model.load_state_dict(state)
    return statistics.median(times)


@dataclass
class Pace:
    """Keeps a training run inside ``budget_s`` seconds (see the module docstring). ``replay``: the changes of an
    earlier run (``[[epoch, new_epochs, steps_or_None], ...]``), applied instead of the clock. ``lengthen``: the
    epoch count came from the plan's estimate and may grow; a count the user fixed (``--epochs``) only shrinks."""

    budget_s: float
    replay: list | None = None
    lengthen: bool = False
    changes: list = field(default_factory=list)
    t_start: float = 0.0
    epoch_seconds: list = field(default_factory=list)

    def start(self, already_spent: float = 0.0) -> None:
        self.t_start = time.perf_counter() - already_spent

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def stop_step(self, epoch: int):
        """A ``stop(steps_done) -> bool`` for the epoch's batch loop: the deadline, or the replayed step count."""
        planned = next((c[2] for c in (self.replay or []) if c[0] == epoch and c[2] is not None), None)
        deadline = self.budget_s * (1 + DEADLINE_SLACK)

        def stop(steps: int) -> bool:
            if self.replay is not None:
                return planned is not None and steps >= planned
            if self.elapsed > deadline:
                self.changes.append([epoch, epoch, steps])
                return True
            return False

        return stop

    def after_epoch(self, epoch: int, epoch_s: float, cfg) -> None:
        """Shorten ``cfg.epochs`` when the remaining epochs would not fit at the median pace of the last three, or
        (``lengthen``) lengthen it when more would fit even at the slowest of them (the plan's step time is measured
        on random data before training and the machine's speed drifts; between the two estimates nothing changes,
        so noise does not make the schedule swing); or replay the recorded change."""
        self.epoch_seconds.append(epoch_s)
        if self.replay is not None:
            for e, n, _ in self.replay:
                if e == epoch:
                    cfg.epochs = n
            return
        if self.changes and self.changes[-1][0] == epoch and self.changes[-1][2] is not None:
            cfg.epochs = epoch  # the deadline ended this epoch: the run ends here
            return
        remaining = cfg.epochs - epoch
        if remaining <= 0:
            return
        left = self.budget_s - self.elapsed
        fit = epoch + max(0, math.floor(left / statistics.median(self.epoch_seconds[-3:])))
        if fit >= cfg.epochs:  # longer only by what the slowest recent epoch allows, and only a planned count
            slowest = epoch + max(0, math.floor(left / max(self.epoch_seconds[-3:])))
            fit = max(cfg.epochs, slowest) if self.lengthen else cfg.epochs
        if fit != cfg.epochs:
            cfg.epochs = fit
            self.changes.append([epoch, fit, None])

    def progress(self, cfg, epoch: int) -> str:
        """``elapsed / remaining`` for the log line."""
        recent = statistics.median(self.epoch_seconds[-3:]) if self.epoch_seconds else 0.0
        left = max(0.0, (cfg.epochs - epoch) * recent)
        return f"{_mmss(self.elapsed)} / ~{_mmss(left)} left (budget {_mmss(self.budget_s)})"


def _mmss(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"

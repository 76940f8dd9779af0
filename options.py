"""Numeric options: each option's valid range defined once, for the command lines and for configs built in code.

``run.py``, ``predict.py`` and ``app.py`` parse their numbers with a :class:`Range` (argparse then refuses
``--lr inf`` or ``--overlap 1.0`` with one line naming the flag and the range, before any work), and
``train.TrainConfig.validate`` checks a configuration built in code or read from a file against the same
ranges. The help text of each option states its range.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """The valid values of a number: ``kind`` (int or float) between ``lo`` and ``hi`` (None = unbounded),
    inclusive unless ``lo_open`` / ``hi_open``. NaN and infinities are never valid."""

    kind: type = float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        lo, hi = _num(self.lo), _num(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {hi}"
        return f"a finite {'integer' if self.kind is int else 'number'}"

    def contains(self, value: Any) -> bool:
        """True when ``value`` is a number of the right kind inside the range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not float(value).is_integer():
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def __call__(self, text: str) -> int | float:
        """argparse ``type=``: parse ``text`` or raise ``ArgumentTypeError`` saying what was expected."""
        try:
            value = int(text) if self.kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}, expected {self}") from None
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"got {text}, expected {self}")
        return value

    def problem(self, flag: str, value: Any) -> str | None:
        """A one-line complaint about ``value`` for ``flag``, or None when it is valid."""
        return None if self.contains(value) else f"{flag} must be {self} (got {value!r})"


def _num(v: float | None) -> str:
    return "" if v is None else (str(int(v)) if float(v).is_integer() else f"{v:g}")


def add_number(parser: Any, flag: str, rng: Range, default: Any, help: str,
               **kwargs: Any) -> argparse.Action:
    """``parser.add_argument`` for a number: parsed and checked by ``rng``, the range stated in the help."""
    return parser.add_argument(flag, type=rng, default=default, help=f"{help}; {rng}", **kwargs)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line (``prog: error: ...; see --help``), exit code 2,
    instead of the whole usage block followed by the message."""

    def error(self, message: str):  # argparse's documented hook for usage errors
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------- the ranges
PROBABILITY_THRESHOLD = Range(float, 0.0, 1.0, lo_open=True, hi_open=True)
#: sliding-window overlap: 0.9 already means 10x the windows per axis; more is a hang in effect
OVERLAP = Range(float, 0.0, 0.9)
THREADS = Range(int, 0, 1024)
BATCH_SIZE = Range(int, 1, 1024)

#: ``train.TrainConfig`` fields and their ranges (``--image-size`` bounds the training patch: a larger one
#: would allocate tens of GB before the first step)
TRAIN = {
    "epochs": Range(int, 1, 100_000),
    "num_samples": Range(int, 3, 1_000_000),
    "image_size": Range(int, 16, 1024),
    "base_channels": Range(int, 1, 256),
    "batch_size": BATCH_SIZE,
    "lr": Range(float, 0.0, 1.0, lo_open=True),
    "seed": Range(int, 0, 2**32 - 1),
    "threads": THREADS,
    "checkpoint_every": Range(float, 0.0, 1e7),
    "val_fraction": Range(float, 0.0, 0.9),
    "test_fraction": Range(float, 0.0, 0.9),
    "threshold": PROBABILITY_THRESHOLD,
    "resize": Range(int, 16, 8192),
    "samples_per_epoch": Range(int, 0, 10_000_000),
    "fg_prob": Range(float, 0.0, 1.0),
    "elastic": Range(float, 0.0, 0.5),
    "overlap": OVERLAP,
    "max_cases": Range(int, 0, 10_000_000),
    "lr_factor": Range(float, 0.0, 1.0, lo_open=True, hi_open=True),
    "lr_patience": Range(int, 0, 1000),
    "num_workers": Range(int, 0, 64),
    "time_budget": Range(float, 0.0, 100_000.0),
    "photometric": Range(float, 0.0, 0.5),
}

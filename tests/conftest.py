"""Shared fixtures."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from train import TrainConfig


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and immune to oversubscription on a busy 2-core machine.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class TrainedModel:
    """A checkpoint from the real training path, with the configuration and the summary of its run."""

    checkpoint: Path
    config: TrainConfig
    summary: dict


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> TrainedModel:
    """One small model trained once per test session (synthetic 32-px images, base 8, fp32 on one CPU thread):
    good enough to find the lesions of the demo page's bundled examples, imperfect enough (test Dice well below
    1) that agreement with training-time evaluation is a real comparison. Tests only read the checkpoint."""
    import experiments

    out = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(epochs=10, num_samples=64, image_size=32, base_channels=8, device="cpu", precision="fp32",
                      progress=False, output_dir=str(out), checkpoint=str(out / "model.pth"), seed=0, threads=1,
                      figures=False)
    before = torch.get_num_threads()
    try:
        summary = experiments.run_synthetic(cfg)
    finally:
        torch.set_num_threads(before)  # training set one thread for the whole process
    return TrainedModel(checkpoint=Path(cfg.checkpoint), config=cfg, summary=summary)

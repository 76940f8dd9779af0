"""Batched, seeded training augmentation in torch: cheap on a CPU because it runs once per batch.

Spatial (same transform for image and labels): random horizontal / vertical flips, a small rotation
and scaling (one affine grid per batch item), optional elastic deformation (a smooth random
displacement field). Intensity (image only): brightness and contrast jitter.
Labels are resampled with nearest neighbour so they stay integer classes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Augmenter:
    """Callable ``(images (N, C, H, W), labels (N, H, W)) -> augmented copies``; deterministic per ``seed``."""

    seed: int = 0
    flip: bool = True
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    intensity: float = 0.1
    elastic: float = 0.0  # displacement amplitude as a fraction of the image size; 0 = off
    p_spatial: float = 0.7

    def __post_init__(self) -> None:
        self.gen = torch.Generator().manual_seed(self.seed)

    def reseed(self, seed: int) -> None:
        """Restart the random stream (the training loop does this every epoch, so resuming is exact)."""
        self.gen.manual_seed(seed)

    def _u(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=self.gen) * (hi - lo) + lo

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = images.shape
        x, y = images.float(), labels
        if self.flip:
            fh = torch.rand(n, generator=self.gen) < 0.5
            fv = torch.rand(n, generator=self.gen) < 0.5
            x = torch.where(fh[:, None, None, None], x.flip(-1), x)
            y = torch.where(fh[:, None, None], y.flip(-1), y)
            x = torch.where(fv[:, None, None, None], x.flip(-2), x)
            y = torch.where(fv[:, None, None], y.flip(-2), y)
        spatial = torch.rand(n, generator=self.gen) < self.p_spatial
        if spatial.any() and (self.rotate_deg or self.scale != (1.0, 1.0) or self.elastic):
            angle = self._u(n, -self.rotate_deg, self.rotate_deg) * math.pi / 180 * spatial
            s = torch.where(spatial, self._u(n, *self.scale), torch.ones(n))
            cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
            theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
            grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
            if self.elastic:
                coarse = torch.randn(n, 2, 4, 4, generator=self.gen) * self.elastic * spatial[:, None, None, None]
                grid = grid + F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
            fill = x.amin(dim=(1, 2, 3), keepdim=True)
            x = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
            y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0].to(labels.dtype)
        if self.intensity:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            contrast = self._u(n, 1 - self.intensity, 1 + self.intensity).view(n, 1, 1, 1)
            std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
            shift = self._u(n, -self.intensity, self.intensity).view(n, 1, 1, 1) * std
            x = (x - mean) * contrast + mean + shift
        return x.contiguous(), y.contiguous()

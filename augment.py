"""Batched, seeded training augmentation in torch: cheap on a CPU because it runs once per batch.

One :class:`Augmenter` for 2D batches (images (N, C, H, W), labels (N, H, W)) and 3D batches (images
(N, C, D, H, W), labels (N, D, H, W)).

Spatial (same transform for image and labels): random flips along every spatial axis, a small rotation and
scaling (one affine grid per batch item), in 2D optionally an elastic deformation (a smooth random
displacement field). Intensity (image only): brightness and contrast jitter, optionally gamma.
Labels are resampled with nearest neighbour so they stay integer classes.

The 2D path draws exactly the random numbers it always did, in the same order, so a seed gives the same batches
as before 3D support was added (trained results and tests depend on it); the optional gamma step only draws
when it is enabled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Augmenter:
    """Callable ``(images, labels) -> augmented copies`` for 2D or 3D batches; deterministic per ``seed``.

    rotate_deg:    2D: rotation in the plane; 3D: about the slice (first spatial) axis when ``in_plane_only``,
                   otherwise about each of the three axes, each angle uniform in +-rotate_deg
    scale:         zoom factor range (3D with ``in_plane_only``: in-plane only, the slice axis is not scaled)
    elastic:       2D only (displacement amplitude as a fraction of the image size; 0 = off); a 3D batch with
                   ``elastic`` set is refused
    in_plane_only: 3D: rotate and scale only within the slices; the caller sets it for anisotropic data (thick
                   slices, where interpolating across slices would invent structure), as nnU-Net does
    gamma:         range of a per-item gamma (intensities mapped to [0, 1], raised to gamma, mapped back, mean
                   and spread kept), applied with probability ``p_gamma``; None = off (the default, 2D and 3D)
    photometric:   colour photographs (3 channels in [0, 1]): the strength of per-item brightness, contrast,
                   saturation and hue jitter (hue by a quarter of it), blur and sensor noise, so a model meets the
                   lighting, white balance, focus and compression of other cameras; 0 = off (the default)
    """

    seed: int = 0
    flip: bool = True
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    intensity: float = 0.1
    elastic: float = 0.0  # displacement amplitude as a fraction of the image size; 0 = off
    p_spatial: float = 0.7
    in_plane_only: bool = False
    gamma: tuple[float, float] | None = None
    p_gamma: float = 0.3
    photometric: float = 0.0

    def __post_init__(self) -> None:
        self.gen = torch.Generator().manual_seed(self.seed)

    def reseed(self, seed: int) -> None:
        """Restart the random stream (the training loop does this every epoch, so resuming is exact)."""
        self.gen.manual_seed(seed)

    def _u(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=self.gen) * (hi - lo) + lo

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented float32 images and labels (same dtype as given): (N, C, H, W) + (N, H, W), or
        (N, C, D, H, W) + (N, D, H, W). The inputs are not modified."""
        if images.ndim not in (4, 5) or labels.ndim != images.ndim - 1 or labels.shape[0] != images.shape[0] \
                or labels.shape[1:] != images.shape[2:]:
            raise ValueError(f"expected images (N, C, *spatial) and labels (N, *spatial) with 2 or 3 spatial axes, "
                             f"got {tuple(images.shape)} and {tuple(labels.shape)}")
        if images.ndim == 4:
            x, y = self._spatial_2d(images, labels)
        else:
            x, y = self._spatial_3d(images, labels)
        if self.intensity:
            n, one = x.shape[0], (1,) * (x.ndim - 1)
            dims = tuple(range(1, x.ndim))
            mean = x.mean(dim=dims, keepdim=True)
            contrast = self._u(n, 1 - self.intensity, 1 + self.intensity).view(n, *one)
            std = x.std(dim=dims, keepdim=True).clamp_min(1e-3)
            shift = self._u(n, -self.intensity, self.intensity).view(n, *one) * std
            x = (x - mean) * contrast + mean + shift
        if self.gamma is not None:
            x = self._gamma(x)
        if self.photometric and x.ndim == 4 and x.shape[1] == 3:
            x = self._photometric(x)
        return x.contiguous(), y.contiguous()

    def _spatial_2d(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Unchanged from the 2D-only version, draw for draw: do not reorder or add draws here.
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
        return x, y

    def _spatial_3d(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.elastic:
            raise ValueError("elastic deformation is 2D-only: use elastic=0 for 3D batches")
        n, _, d, h, w = images.shape
        x, y = images.float(), labels
        if self.flip:
            flips = torch.rand(n, 3, generator=self.gen) < 0.5  # per item: flip D, H, W
            if flips.any():
                # one flip per item (of all its flipped axes at once) instead of a flipped copy of the whole batch
                # per axis; torch.stack copies, so the caller's tensors are never written
                axes = [[a for a in range(3) if f[a]] for f in flips.tolist()]
                x = torch.stack([xi.flip([a + 1 for a in ax]) if ax else xi for xi, ax in zip(x, axes)])
                y = torch.stack([yi.flip(ax) if ax else yi for yi, ax in zip(y, axes)])
        spatial = torch.rand(n, generator=self.gen) < self.p_spatial
        if self.rotate_deg or self.scale != (1.0, 1.0):
            # drawn for every item whether or not it is transformed, so an item's draws do not depend on the others
            angles = self._u(n * (1 if self.in_plane_only else 3), -self.rotate_deg, self.rotate_deg).view(n, -1)
            zoom = self._u(n, *self.scale)
            idx = spatial.nonzero()[:, 0]
            if len(idx):
                theta = _affine_3d(angles[idx] * (math.pi / 180), zoom[idx], (d, h, w), self.in_plane_only)
                grid = F.affine_grid(theta, (len(idx), 1, d, h, w), align_corners=False)
                xs = x[idx]
                fill = xs.amin(dim=(1, 2, 3, 4), keepdim=True)  # outside the volume: its minimum (air, background)
                xs = F.grid_sample(xs - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
                ys = F.grid_sample(y[idx][:, None].float(), grid, mode="nearest", padding_mode="zeros",
                                   align_corners=False)[:, 0].to(labels.dtype)
                # out of place: x may still be the caller's tensor
                x, y = (xs, ys) if len(idx) == n else (x.index_copy(0, idx, xs), y.index_copy(0, idx, ys))
        return x, y

    def _gamma(self, x: torch.Tensor) -> torch.Tensor:
        """Per-item gamma with probability ``p_gamma``; mean and standard deviation of the item are kept."""
        n, one = x.shape[0], (1,) * (x.ndim - 1)
        dims = tuple(range(1, x.ndim))
        apply = (torch.rand(n, generator=self.gen) < self.p_gamma).view(n, *one)
        g = self._u(n, *self.gamma).view(n, *one)
        if not apply.any():
            return x
        lo = x.amin(dim=dims, keepdim=True)
        span = (x.amax(dim=dims, keepdim=True) - lo).clamp_min(1e-7)
        mean, std = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True)
        gx = ((x - lo) / span).pow(g) * span + lo
        # gamma reshapes the histogram; keeping mean and spread leaves level and contrast to the jitter above
        gx = (gx - gx.mean(dim=dims, keepdim=True)) / gx.std(dim=dims, keepdim=True).clamp_min(1e-7) * std + mean
        return torch.where(apply, gx, x)


    def _photometric(self, x: torch.Tensor) -> torch.Tensor:
        """Per item: brightness x(1 +- s), contrast x(1 +- s), saturation x(1 +- s), hue +- s/4 (a full turn = 1),
        then with probability 0.3 each a Gaussian blur (sigma up to 1.5 px) and Gaussian noise (up to 0.03)."""
        n, s = x.shape[0], self.photometric
        b, c, sat = (self._u(n, 1 - s, 1 + s).view(n, 1, 1, 1) for _ in range(3))
        hue = self._u(n, -s / 4, s / 4).view(n, 1, 1)
        blur, sigma = torch.rand(n, generator=self.gen) < 0.3, self._u(n, 0.3, 1.5)
        noisy, amp = torch.rand(n, generator=self.gen) < 0.3, self._u(n, 0.0, 0.03)
        x = x.clamp(0, 1) * b
        x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) * c + x.mean(dim=(1, 2, 3), keepdim=True)
        h, sv, v = _rgb_to_hsv(x.clamp(0, 1))
        x = _hsv_to_rgb((h + hue) % 1.0, (sv * sat[:, 0]).clamp(0, 1), v)
        for i in blur.nonzero()[:, 0].tolist():
            x[i] = _gaussian_blur(x[i], float(sigma[i]))
        if noisy.any():
            noise = torch.randn(x.shape, generator=self.gen) * amp.view(n, 1, 1, 1)
            x = x + noise * noisy.view(n, 1, 1, 1)
        return x.clamp(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) RGB in [0, 1] -> hue in [0, 1), saturation, value (each (N, H, W))."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v, _ = x.max(dim=1)
    mn, _ = x.min(dim=1)
    d = v - mn
    safe = torch.where(d > 0, d, torch.ones_like(d))
    h = torch.where(v == r, ((g - b) / safe) % 6, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(d > 0, h / 6, torch.zeros_like(h))
    s = torch.where(v > 0, d / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    return h, s, v


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rgb_to_hsv`: (N, H, W) each -> (N, 3, H, W)."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """(C, H, W) blurred with a separable Gaussian of ``sigma`` pixels (reflected edges)."""
    r = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-r, r + 1, dtype=img.dtype)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = k / k.sum()
    c = img.shape[0]
    x = F.pad(img[None], (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)[0]


def _affine_3d(angles: torch.Tensor, zoom: torch.Tensor, size: tuple[int, int, int], in_plane_only: bool) -> torch.Tensor:
    """``F.affine_grid`` matrices (m, 3, 4) of a rotation by ``angles`` (m, 1) about the slice axis or (m, 3)
    about each axis, and a zoom by ``zoom`` (m,) (in-plane only with ``in_plane_only``), about the volume centre.

    The transform is built in voxel units and conjugated into affine_grid's normalised coordinates (each axis
    spans [-1, 1] whatever its length), so a rotation of a non-cubic patch stays a rotation, not a shear.
    Coordinates are affine_grid's (x, y, z) = (W, H, D).
    """
    m = len(zoom)

    def rotation(a: torch.Tensor, i: int, j: int) -> torch.Tensor:  # in the plane of coordinates i and j
        r = torch.eye(3).repeat(m, 1, 1)
        c, s = torch.cos(a), torch.sin(a)
        r[:, i, i], r[:, j, j], r[:, i, j], r[:, j, i] = c, c, -s, s
        return r

    r = rotation(angles[:, 0], 0, 1)  # about D: within the slice, the (x, y) plane
    if angles.shape[1] == 3:
        r = r @ rotation(angles[:, 1], 0, 2) @ rotation(angles[:, 2], 1, 2)  # about H, then about W
    inv = 1 / zoom  # the grid maps output to input positions: sampling a smaller region magnifies
    scale = torch.stack([inv, inv, torch.ones(m) if in_plane_only else inv], 1)
    a = r * scale[:, None, :]  # r @ diag(scale)
    s = torch.tensor([size[2], size[1], size[0]], dtype=a.dtype)  # voxels per unit of normalised x, y, z (x2)
    a = a * s[None, None, :] / s[None, :, None]  # diag(s)^-1 @ a @ diag(s)
    return torch.cat([a, torch.zeros(m, 3, 1)], dim=2)

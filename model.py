"""U-Net (Ronneberger et al., 2015, https://arxiv.org/abs/1505.04597) for 2D images and 3D volumes.

Read it beside Figure 1 of the paper: a contracting path of four ``Down`` steps (max-pool, then two 3x3
convolutions), an expanding path of four ``Up`` steps (up-sample, concatenate the skip connection, two
3x3 convolutions) and a 1x1 convolution to the class logits. ``dim`` picks 2D or 3D layers; nothing else
changes. Three departures from the paper, all common practice:

* the convolutions are padded, so the output has the input's size (no cropping of the skip connections);
* each convolution is followed by batch normalisation (Ioffe & Szegedy, 2015), which the paper predates, or
  (``norm="instance"``) by instance normalisation, nnU-Net's choice for 3D, where a batch of two patches gives
  batch statistics too noisy to keep;
* ``bilinear=True`` up-samples by interpolation and halves the channels in the convolutions, instead of
  the paper's learned "up-convolution" (``bilinear=False`` keeps that).

Any input of at least ``UNet.min_size`` works, odd sizes included: every up-sampled map is padded to its
skip connection's size. ``pool`` sets the down-sampling factor per level and axis,
so a 3D network can leave a coarse slice axis alone on its first levels (nnU-Net's habit).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

#: the smallest 2D input of the default network: four 2x poolings leave a 1x1 bottleneck
MIN_INPUT_SIZE = 16
#: hand the up-sampling's backward a dense gradient (:func:`_dense_in_format_of`); False gives the plain backward
#: (the benchmark's lever ``upsampling_gradient``, and the test that both agree)
DENSE_UPSAMPLING_GRADIENT = True
#: compute instance normalisation per batch item with the batch-norm kernel (:class:`_PerItemBatchNorm`); False gives
#: torch's plain layer (the benchmark's lever ``instance_norm``, and the test that both agree)
PER_ITEM_INSTANCE_NORM = True


class _DebiasedRunningStats:
    """Batch normalisation whose running statistics are a bias-corrected moving average.

    Why: PyTorch starts ``running_mean`` at 0 and ``running_var`` at 1 and moves them by ``momentum`` (0.1)
    per batch, so after ``t`` batches those placeholders still weigh ``0.9 ** t``, and the first validations
    (eval mode) see statistics the network never had. As in Adam's bias correction, moving the ``t``-th batch
    in by ``m / (1 - (1 - m) ** t)`` gives the placeholders no weight. Training itself (batch statistics) is
    unchanged, and after :data:`DEBIAS_STEPS` batches the factor equals ``momentum`` to float precision.
    Same parameters, buffers and state dict as the plain layer. Under ``torch.compile`` it is the plain
    layer: the batch count is a host value the compiler would specialise on.
    """

    #: batches after which the correction is below float precision (0 = plain BatchNorm throughout)
    DEBIAS_STEPS = 200

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._debiased = False  # True once past DEBIAS_STEPS: no more host reads of the batch count

    def _load_from_state_dict(self, *args, **kwargs):  # nn.Module's hook for loading: the loaded count decides again
        super()._load_from_state_dict(*args, **kwargs)
        self._debiased = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = (self._debiased or not (self.training and self.track_running_stats and self.momentum)
                 or torch.compiler.is_compiling())
        if plain:
            return super().forward(x)
        t = int(self.num_batches_tracked) + 1  # a host read, for the first DEBIAS_STEPS batches only
        if t > self.DEBIAS_STEPS:
            self._debiased = True
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        factor = self.momentum / (1.0 - (1.0 - self.momentum) ** t)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, factor, self.eps)


class BatchNorm2d(_DebiasedRunningStats, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with bias-corrected running statistics (see :class:`_DebiasedRunningStats`)."""


class BatchNorm3d(_DebiasedRunningStats, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with bias-corrected running statistics (see :class:`_DebiasedRunningStats`)."""


class _PerItemBatchNorm:
    """Instance normalisation computed as batch normalisation of each batch item alone (the same statistics: one
    item's, per channel, over its voxels). Why: PyTorch's instance norm reshapes the batch into one item of N x C
    channels, which copies a channels-last tensor out of its layout and back around every convolution; the
    batch-norm kernel keeps the layout. The ONNX export traces the plain layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not PER_ITEM_INSTANCE_NORM or self.track_running_stats or torch.onnx.is_in_onnx_export():
            return super().forward(x)
        out = [F.batch_norm(xi, None, None, self.weight, self.bias, True, 0.0, self.eps) for xi in x.split(1)]
        return out[0] if len(out) == 1 else torch.cat(out)


class InstanceNorm2d(_PerItemBatchNorm, nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` in the channels-last layout (see :class:`_PerItemBatchNorm`)."""


class InstanceNorm3d(_PerItemBatchNorm, nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` in the channels-last layout (see :class:`_PerItemBatchNorm`)."""


CONV = {2: nn.Conv2d, 3: nn.Conv3d}
NORMS = {"batch": {2: BatchNorm2d, 3: BatchNorm3d}, "instance": {2: InstanceNorm2d, 3: InstanceNorm3d}}
POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
UPCONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class DoubleConv(nn.Module):
    """(3x3 convolution -> normalisation -> ReLU) x 2: the paper's basic block, padded to keep the size."""

    def __init__(self, in_channels: int, out_channels: int, dim: int = 2, norm: str = "batch"):
        super().__init__()
        conv, norm_layer = CONV[dim], NORMS[norm][dim]
        # no convolution bias: the normalisation right after it has its own (learned) shift
        self.double_conv = nn.Sequential(
            conv(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            norm_layer(out_channels, affine=True),
            nn.ReLU(inplace=True),
            conv(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            norm_layer(out_channels, affine=True),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """Max-pool by ``pool`` (2 = halve every axis), then :class:`DoubleConv`."""

    def __init__(self, in_channels: int, out_channels: int, dim: int = 2, pool: int | tuple[int, ...] = 2,
                 norm: str = "batch"):
        super().__init__()
        self.maxpool_conv = nn.Sequential(POOL[dim](pool), DoubleConv(in_channels, out_channels, dim, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


def _dense_in_format_of(x: torch.Tensor):
    """A gradient hook that hands on the gradient as a dense tensor in ``x``'s memory format.

    Why: ``torch.cat``'s backward gives each input a channel slice of the gradient. In the channels-last layout
    that slice is strided, and the up-sampling's backward kernel takes a strided gradient to a slow generic
    path (and copies it between layouts). One dense copy lets it run its fast kernel; the values are the same.
    """
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if not x.is_contiguous(memory_format=fmt):  # an NCHW model, or a 1x1 map whose layout is ambiguous
        fmt = torch.contiguous_format
    return lambda grad: grad.contiguous(memory_format=fmt)


class Up(nn.Module):
    """Up-sample ``x1`` by ``pool``, pad it to the skip connection ``x2``'s size, concatenate, DoubleConv.

    ``in_channels`` is the channel count after concatenation.
    """

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = True, dim: int = 2,
                 pool: int | tuple[int, ...] = 2, norm: str = "batch"):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=pool, mode="bilinear" if dim == 2 else "trilinear", align_corners=True)
        else:  # the paper's up-convolution, which also halves the channels
            self.up = UPCONV[dim](in_channels, in_channels // 2, kernel_size=pool, stride=pool)
        self.conv = DoubleConv(in_channels, out_channels, dim, norm)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1 = self.up(x1)
        if DENSE_UPSAMPLING_GRADIENT and x1.requires_grad:
            x1.register_hook(_dense_in_format_of(x1))
        missing = [s - u for s, u in zip(x2.shape[2:], x1.shape[2:])]
        if any(missing):  # odd sizes: pooling floored, so the up-sampled map is short by a voxel
            pads = []
            for m in reversed(missing):  # F.pad lists the last axis first
                pads += [m // 2, m - m // 2]
            x1 = F.pad(x1, pads)
        return self.conv(torch.cat([x2, x1], dim=1))


class OutConv(nn.Module):
    """1x1 convolution to the class logits."""

    def __init__(self, in_channels: int, out_channels: int, dim: int = 2):
        super().__init__()
        self.conv = CONV[dim](in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@dataclass
class UNetArgs:
    """Everything needed to rebuild a :class:`UNet`; stored in every checkpoint as ``model_args``.

    ``pool``: the down-sampling factor of each of the four levels, per axis (``None`` = 2 on every axis);
    ``norm``: ``batch`` or ``instance`` normalisation. A checkpoint written before ``dim``, ``pool`` and ``norm``
    existed rebuilds the 2D BatchNorm default.
    """

    n_channels: int = 1
    n_classes: int = 1
    base_channels: int = 64
    bilinear: bool = True
    dim: int = 2
    pool: list[list[int]] | None = None
    norm: str = "batch"


def pool_factors(dim: int, pool: list | None) -> list[tuple[int, ...]]:
    """The four levels' pooling factors as ``dim``-tuples (``None`` -> 2 on every axis)."""
    levels = pool if pool is not None else [2] * 4
    out = [tuple(p) if isinstance(p, (list, tuple)) else (int(p),) * dim for p in levels]
    if len(out) != 4 or any(len(p) != dim or min(p) < 1 for p in out):
        raise ValueError(f"pool must list 4 levels of {dim} factors >= 1, got {pool}")
    return out


class UNet(nn.Module):
    """Four-level U-Net. ``n_classes == 1``: one sigmoid logit; ``> 1``: softmax (or per-region sigmoid) logits."""

    def __init__(self, n_channels: int = 1, n_classes: int = 1, base_channels: int = 64, bilinear: bool = True,
                 dim: int = 2, pool: list | None = None, norm: str = "batch"):
        super().__init__()
        if min(n_channels, n_classes, base_channels) < 1 or dim not in (2, 3) or norm not in NORMS:
            raise ValueError(f"n_channels, n_classes and base_channels must be >= 1, dim 2 or 3 and norm one of "
                             f"{', '.join(NORMS)}")
        pools = pool_factors(dim, pool)
        self.args = UNetArgs(n_channels, n_classes, base_channels, bilinear, dim,
                             None if pool is None else [list(p) for p in pools], norm)
        c = base_channels
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(n_channels, c, dim, norm)
        self.down1 = Down(c, c * 2, dim, pools[0], norm)
        self.down2 = Down(c * 2, c * 4, dim, pools[1], norm)
        self.down3 = Down(c * 4, c * 8, dim, pools[2], norm)
        self.down4 = Down(c * 8, c * 16 // factor, dim, pools[3], norm)
        self.up1 = Up(c * 16, c * 8 // factor, bilinear, dim, pools[3], norm)
        self.up2 = Up(c * 8, c * 4 // factor, bilinear, dim, pools[2], norm)
        self.up3 = Up(c * 4, c * 2 // factor, bilinear, dim, pools[1], norm)
        self.up4 = Up(c * 2, c, bilinear, dim, pools[0], norm)
        self.outc = OutConv(c, n_classes, dim)
        #: the smallest input size per axis: every pooling must leave at least one voxel
        self.min_size = tuple(math.prod(p[a] for p in pools) for a in range(dim))

    @property
    def model_args(self) -> dict:
        return asdict(self.args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.args, self.min_size)
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)


def check_input(x: torch.Tensor, args: UNetArgs, min_size: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``x`` is (N, channels, *spatial) of the network's dimension and at least
    ``min_size`` per axis (what every pooling level needs)."""
    if x.dim() != args.dim + 2 or x.size(1) != args.n_channels:
        axes = "H, W" if args.dim == 2 else "D, H, W"
        raise ValueError(f"expected input of shape (N, {args.n_channels}, {axes}), got {tuple(x.shape)}")
    if any(s < m for s, m in zip(x.shape[2:], min_size)):
        raise ValueError(f"input size must be >= {min_size} per axis, got {tuple(x.shape[2:])}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every convolution -> BatchNorm pair folded into one convolution.

    ``w' = w * gamma / sqrt(var + eps)`` and ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``), the BatchNorm replaced by ``nn.Identity``. Same outputs as
    ``model.eval()`` up to float rounding, with one memory pass fewer per convolution: for inference only.
    The original model is left untouched.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (a, conv), (b, bn) in zip(children, children[1:]):
            if (isinstance(conv, (nn.Conv2d, nn.Conv3d)) and isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm3d))
                    and bn.track_running_stats):
                setattr(seq, a, fuse_conv_bn_eval(conv, bn))
                setattr(seq, b, nn.Identity())
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded

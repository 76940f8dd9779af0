"""U-Net (Ronneberger et al., 2015) for 2-D segmentation.

Differences from the original post, each a bug fix:

* ``bilinear=False`` works: the transposed convolution halves the channels *before* concatenation,
  so the following DoubleConv sees ``in_channels`` (the post's version crashed with a channel
  mismatch).
* Any input size >= 16 (odd sizes included, e.g. 33x47) gives an output of the same H x W: every
  up-sampled map is padded to its skip connection's size before concatenation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_INPUT_SIZE = 16  # four 2x poolings need at least 16 px to keep a 1x1 bottleneck


#: feature maps of at most this many pixels get :class:`Conv3x3`'s matmul weight gradient when training
SMALL_MAP_PIXELS = 64


def _weight_grad_3x3(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dL/dW of a 3x3, stride-1, padding-1 convolution as one matrix product (channels_last in and out).

    ``x`` (N, C, H, W) and ``grad`` (N, O, H, W) are channels_last; the nine shifted views of the padded
    input form an (N*H*W, 9*C) matrix whose column order is the channels_last weight layout (O, kh, kw, C).
    """
    c, h, w = x.shape[1:]
    o = grad.shape[1]
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # N, H+2, W+2, C
    cols = torch.cat([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], dim=3)  # N, H, W, 9C
    gw = grad.permute(0, 2, 3, 1).reshape(-1, o).t() @ cols.reshape(-1, 9 * c)  # O, 9C
    return gw.view(o, 3, 3, c).permute(0, 3, 1, 2)


class _SmallMapConv3x3(torch.autograd.Function):
    """3x3 same convolution: oneDNN forward and input gradient, weight gradient by :func:`_weight_grad_3x3`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, padding=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                         [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad_3x3(x, grad)
        return grad_x, grad_w


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in, out, 3, padding=1, bias=False)`` (same parameters and state dict), faster to train on
    small maps on the CPU.

    Why: on maps of <= :data:`SMALL_MAP_PIXELS` pixels (the 4x4 and 8x8 levels of a 64 px U-Net) oneDNN's
    weight-gradient kernel has almost no pixels to work on, and the same sum as one matrix product is
    cheaper (``bench.py``'s levers at the post's settings: 28.5 -> 21.7 ms/image). Forward and input
    gradient stay oneDNN's. Used only on the CPU, in training, for channels_last input; everything else (inference,
    CUDA, NCHW) is plain ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or not torch.is_grad_enabled() or not self.weight.requires_grad
                or self.bias is not None  # a BatchNorm-folded copy (model.fold_batchnorm) has a bias
                or x.shape[-2] * x.shape[-1] > SMALL_MAP_PIXELS or not x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        with torch.autocast("cpu", enabled=False):
            return _SmallMapConv3x3.apply(x.to(dtype), self.weight.to(dtype))


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and state dict) whose running statistics are a
    bias-corrected moving average of the batch statistics.

    Why: PyTorch starts ``running_mean`` at 0 and ``running_var`` at 1 and moves them by ``momentum`` (0.1)
    per training batch, so after ``t`` batches those placeholders still weigh ``0.9 ** t``: 15 % after the
    18 batches of the default run's first epoch, and the first validations (eval mode) see statistics the
    network never had (validation Dice 0.0 after epoch 1 of ``python run.py``). Like Adam's bias
    correction, moving the ``t``-th batch in by ``m / (1 - (1 - m) ** t)`` gives the placeholders no weight
    and the batches the same relative weights as the plain average. Training itself (batch statistics) is
    unchanged, and after :data:`DEBIAS_STEPS` batches the factor equals ``momentum`` to float precision, so
    this only changes what the first epochs' validation sees. Under ``torch.compile`` it is plain BatchNorm:
    the batch count it needs is a host value, on which the compiler would specialise and recompile every step.
    """

    #: batches after which the correction is below float precision and the plain update takes over
    DEBIAS_STEPS = 200

    def __init__(self, num_features: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self._debiased = False  # True once num_batches_tracked >= DEBIAS_STEPS (avoids a device sync per step)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._debiased = False  # the loaded count decides again

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self._debiased or not (self.training and self.track_running_stats and self.momentum)
                or torch.compiler.is_compiling()):
            return super().forward(x)
        t = int(self.num_batches_tracked) + 1  # a host read on GPUs, for the first DEBIAS_STEPS batches only
        if t > self.DEBIAS_STEPS:  # (DEBIAS_STEPS = 0: plain BatchNorm throughout, bench.py's lever)
            self._debiased = True
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        factor = self.momentum / (1.0 - (1.0 - self.momentum) ** t)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, factor, self.eps)


class DoubleConv(nn.Module):
    """(Conv3x3 -> BN -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        # no conv bias: the BatchNorm right after it has its own shift
        self.double_conv = nn.Sequential(
            Conv3x3(in_channels, out_channels),
            BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            Conv3x3(out_channels, out_channels),
            BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """MaxPool 2x2 then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class _ChannelsLastGrad(torch.autograd.Function):
    """Identity whose backward hands on the gradient as a dense channels_last tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


class Up(nn.Module):
    """Up-sample ``x1``, pad it to the skip ``x2``'s size, concatenate, DoubleConv.

    ``in_channels`` is the channel count after concatenation.
    """

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = True):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1 = self.up(x1)
        if x1.requires_grad and x1.is_contiguous(memory_format=torch.channels_last):
            # torch.cat's backward hands this branch a channel slice of the channels_last gradient, and
            # upsample_bilinear2d_backward takes a slice to its NCHW kernel (two layout copies and a
            # slower loop; bench.py's levers: 23.3 -> 21.7 ms/image at the post's settings). Training only.
            x1 = _ChannelsLastGrad.apply(x1)
        dy, dx = x2.size(2) - x1.size(2), x2.size(3) - x1.size(3)
        if dy or dx:  # odd sizes: pooling floored, so the up-sampled map is 1 px short
            x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class OutConv(nn.Module):
    """1x1 convolution to the class logits."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@dataclass
class UNetArgs:
    """Everything needed to rebuild a :class:`UNet`; stored in every checkpoint as ``model_args``."""

    n_channels: int = 1
    n_classes: int = 1
    base_channels: int = 64
    bilinear: bool = True


class UNet(nn.Module):
    """Four-level U-Net. ``n_classes == 1`` -> one sigmoid logit; ``> 1`` -> softmax logits."""

    def __init__(self, n_channels: int = 1, n_classes: int = 1, base_channels: int = 64, bilinear: bool = True):
        super().__init__()
        if min(n_channels, n_classes, base_channels) < 1:
            raise ValueError("n_channels, n_classes and base_channels must be >= 1")
        self.args = UNetArgs(n_channels, n_classes, base_channels, bilinear)
        c = base_channels
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(n_channels, c)
        self.down1 = Down(c, c * 2)
        self.down2 = Down(c * 2, c * 4)
        self.down3 = Down(c * 4, c * 8)
        self.down4 = Down(c * 8, c * 16 // factor)
        self.up1 = Up(c * 16, c * 8 // factor, bilinear)
        self.up2 = Up(c * 8, c * 4 // factor, bilinear)
        self.up3 = Up(c * 4, c * 2 // factor, bilinear)
        self.up4 = Up(c * 2, c, bilinear)
        self.outc = OutConv(c, n_classes)

    @property
    def model_args(self) -> dict:
        return asdict(self.args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.size(1) != self.args.n_channels:
            raise ValueError(f"expected input of shape (N, {self.args.n_channels}, H, W), got {tuple(x.shape)}")
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"input H and W must be >= {MIN_INPUT_SIZE}, got {tuple(x.shape[-2:])}")
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


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------ inference helpers
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every Conv2d -> BatchNorm2d pair folded into one Conv2d.

    ``w' = w * gamma / sqrt(var + eps)`` and ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``, the
    BatchNorm replaced by ``nn.Identity``. Same outputs as ``model.eval()`` (fp32 rounding aside) with
    one memory pass fewer per convolution: for inference only (the folded copy has no batch statistics).
    The original model is left untouched.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                module._modules[b] = nn.Identity()
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


def conv_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs (2 x multiply-adds) of every Conv2d / ConvTranspose2d in one forward pass of ``input_shape``.

    Counted with forward hooks on a zero input, so the numbers follow the real shapes (odd sizes,
    padding). Bias adds, BatchNorm, activations and pooling are not counted (a few % of the total).
    """
    total = 0

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        if isinstance(mod, nn.ConvTranspose2d):  # every input element meets Cout/groups * kh * kw weights
            macs = inputs[0].numel() * (mod.out_channels // mod.groups) * kh * kw
        else:  # every output element sums Cin/groups * kh * kw products
            macs = out.numel() * (mod.in_channels // mod.groups) * kh * kw
        total += 2 * macs

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        with torch.inference_mode():
            model(torch.zeros(input_shape, device=param.device if param is not None else "cpu"))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total

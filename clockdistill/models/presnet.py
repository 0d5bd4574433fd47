"""PResNet, the ResNet-vd of PaddleDetection that RT-DETR and RT-DETRv2 (lyuwenyu/RT-DETR) use as
their backbone, with the reference's parameter names: a deep stem of three 3x3 convolutions (the
first strided), max-pool, then stages of basic (R18, R34) or bottleneck (R50, R101) blocks whose
strided shortcuts average-pool before their 1x1 convolution (variant d); every block's first
shortcut is a projection, the first stage's too. Returns C3-C5 (strides 8, 16, 32).

ConvNormLayer (convolution, BatchNorm, activation) is also the hybrid encoder's building block.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from clockdistill.models.resnet import FrozenBatchNorm2d


def activation(name: str | None) -> nn.Module:
    return {"relu": nn.ReLU(), "silu": nn.SiLU(), "gelu": nn.GELU(), None: nn.Identity()}[name]


class ConvNormLayer(nn.Module):
    """conv (no bias) + BatchNorm + activation: `conv`, `norm` as the reference names them."""

    def __init__(
        self, ch_in: int, ch_out: int, kernel: int, stride: int, act: str | None = None, padding=None, groups=1
    ):
        super().__init__()
        pad = (kernel - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(ch_in, ch_out, kernel, stride, padding=pad, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(ch_out)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


# -- the backbone: PResNet (ResNet-vd) -------------------------------------------------------------

DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _shortcut(ch_in: int, ch_out: int, stride: int) -> nn.Module:
    if stride == 2:  # variant d: average-pool, then a 1x1 convolution
        return nn.Sequential(
            OrderedDict([("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)), ("conv", ConvNormLayer(ch_in, ch_out, 1, 1))])
        )
    return ConvNormLayer(ch_in, ch_out, 1, stride)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool):
        super().__init__()
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out, stride)
        self.branch2a = ConvNormLayer(ch_in, ch_out, 3, stride, act="relu")
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch2b(self.branch2a(x))
        return F.relu(out + (x if self.shortcut else self.short(x)))


class BottleNeck(nn.Module):
    expansion = 4

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool):
        super().__init__()
        self.branch2a = ConvNormLayer(ch_in, ch_out, 1, 1, act="relu")
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, stride, act="relu")
        self.branch2c = ConvNormLayer(ch_out, ch_out * 4, 1, 1)
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch2c(self.branch2b(self.branch2a(x)))
        return F.relu(out + (x if self.shortcut else self.short(x)))


class Blocks(nn.Module):
    def __init__(self, block, ch_in: int, ch_out: int, count: int, stage: int):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            self.blocks.append(block(ch_in, ch_out, 2 if i == 0 and stage != 2 else 1, shortcut=i != 0))
            ch_in = ch_out * block.expansion

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PResNet(nn.Module):
    """ResNet-vd at `width` x the standard channels; returns C3, C4, C5 (`out_channels`). `norm` frozen:
    FrozenBatchNorm2d (R50, R101 as published); `frozen_stages` 1: the stem is not trained."""

    def __init__(self, depth: int, width: float = 1.0, norm: str = "batch", frozen_stages: int = 0):
        super().__init__()
        ch_in = max(int(64 * width), 2)
        half = ch_in // 2
        stem = [(3, half, 2, "conv1_1"), (half, half, 1, "conv1_2"), (half, ch_in, 1, "conv1_3")]
        self.conv1 = nn.Sequential(OrderedDict((name, ConvNormLayer(a, b, 3, s, act="relu")) for a, b, s, name in stem))
        block = BottleNeck if depth >= 50 else BasicBlock
        widths = [max(int(c * width), 1) for c in (64, 128, 256, 512)]
        self.res_layers = nn.ModuleList()
        out_channels = []
        for i, (w, n) in enumerate(zip(widths, DEPTHS[depth])):
            self.res_layers.append(Blocks(block, ch_in, w, n, stage=i + 2))
            ch_in = w * block.expansion
            out_channels.append(ch_in)
        self.out_channels = out_channels[1:]
        if frozen_stages:  # the reference's freeze_at 0: the stem
            for p in self.conv1.parameters():
                p.requires_grad_(False)
        if norm == "frozen":  # the reference's freeze_norm: FrozenBatchNorm2d throughout
            _freeze_norms(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        outs = []
        for i, stage in enumerate(self.res_layers):
            x = stage(x)
            if i > 0:
                outs.append(x)
        return outs


def _freeze_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features))
        else:
            _freeze_norms(child)

"""A small ResNet (BasicBlock / Bottleneck, depths 18/34/50) with a channel multiplier.

Trained from scratch here (no pretrained weights can be fetched), so BatchNorm stays trainable.
Returns the C3, C4, C5 feature maps (strides 8, 16, 32).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


_LAYOUTS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
    """ResNet trunk. `out_channels[i]` is the width of the map at `strides[i]`."""

    strides = (8, 16, 32)

    def __init__(self, depth: int = 18, width: float = 1.0):
        super().__init__()
        if depth not in _LAYOUTS:
            raise ValueError(f"backbone depth must be one of {sorted(_LAYOUTS)}, got {depth}")
        block, counts = _LAYOUTS[depth]
        base = max(8, int(round(64 * width)))
        self.stem = nn.Sequential(
            nn.Conv2d(3, base, 7, 2, 3, bias=False),
            nn.BatchNorm2d(base),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, in_ch, self.out_channels = [], base, []
        for i, n in enumerate(counts):
            w = base * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(in_ch, w, stride=2 if (j == 0 and i > 0) else 1))
                in_ch = w * block.expansion
            stages.append(nn.Sequential(*blocks))
            self.out_channels.append(in_ch)
        self.stages = nn.ModuleList(stages)
        self.out_channels = self.out_channels[1:]  # C3, C4, C5
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> [C3 (B, c3, H/8, W/8), C4 (H/16), C5 (H/32)]."""
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats[1:]

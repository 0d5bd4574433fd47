"""ResNet-18/34/50/101 in torchvision's parameter layout, so ImageNet and DETR-family weights load.

Names as torchvision's `resnet*` (conv1, bn1, layer1..layer4, each block conv1/bn1.., downsample.0/1),
the fully connected head left out. BatchNorm is torchvision's FrozenBatchNorm2d (statistics and
affine terms are buffers, as every reference DETR trains its backbone) or trainable BatchNorm2d for
the tiny presets trained from scratch. `width` scales every channel count (1.0 = the standard
network; the tiny CPU presets use 0.25 and 0.125). `frozen_stages` 1 freezes the stem and layer1
as the references do (their parameters are then not trained); 0 trains everything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms (buffers): the normalisation of the weights
    it was given, whatever the batch. eps 1e-5, as in the reference implementations."""

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (
            ("weight", torch.ones(n)),
            ("bias", torch.zeros(n)),
            ("running_mean", torch.zeros(n)),
            ("running_var", torch.ones(n)),
        ):
            self.register_buffer(name, value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # written by a trainable BatchNorm2d
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift


def _norm(kind: str, n: int) -> nn.Module:
    return FrozenBatchNorm2d(n) if kind == "frozen" else nn.BatchNorm2d(n)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, dilation: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = _norm(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _norm(norm, width)
        self.downsample = _downsample(in_ch, width, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: the stride sits in the 3x3 convolution."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, dilation: int, norm: str):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = _norm(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _norm(norm, width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = _norm(norm, out_ch)
        self.downsample = _downsample(in_ch, out_ch, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def _downsample(in_ch: int, out_ch: int, stride: int, norm: str) -> nn.Sequential | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), _norm(norm, out_ch))


class ResNet(nn.Module):
    """The trunk: `forward` returns the outputs of layer2, layer3, layer4 (strides 8, 16, 32; with
    `dilation` layer4 keeps stride 16, the DC5 variant), and layer1's first (stride 4) with `levels`
    4 (DINO 5-scale). `out_channels` are their widths."""

    def __init__(
        self,
        depth: int = 50,
        width: float = 1.0,
        norm: str = "frozen",
        dilation: bool = False,
        frozen_stages: int = 1,
        levels: int = 3,
    ):
        super().__init__()
        if depth not in LAYOUTS:
            raise ValueError(f"backbone depth must be one of {sorted(LAYOUTS)}, got {depth}")
        kind, counts = LAYOUTS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        base = max(8, int(round(64 * width)))
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = _norm(norm, base)
        in_ch, dil, self.out_channels = base, 1, []
        for i, n in enumerate(counts):
            stride = 1 if i == 0 else 2
            if (
                dilation and i == 3
            ):  # DC5: layer4 dilates instead of striding (torchvision's replace_stride_with_dilation)
                prev, dil, stride = dil, dil * 2, 1
            else:
                prev = dil
            blocks = []
            for j in range(n):
                blocks.append(block(in_ch, base * 2**i, stride if j == 0 else 1, prev if j == 0 else dil, norm))
                in_ch = base * 2**i * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels.append(in_ch)
        if levels not in (3, 4):
            raise ValueError(f"backbone levels must be 3 (C3-C5) or 4 (C2-C5), got {levels}")
        self.levels = levels
        self.out_channels = self.out_channels[4 - levels :]
        self.strides = ((4,) if levels == 4 else ()) + ((8, 16, 16) if dilation else (8, 16, 32))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        frozen = ["conv1", "bn1", "layer1"][: 3 if frozen_stages >= 1 else 0]
        for name, p in self.named_parameters():
            if name.split(".")[0] in frozen:
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> [C3 (B, c3, H/8, W/8), C4 (H/16), C5 (H/32, or H/16 with dilation)], with
        C2 (H/4) first when `levels` is 4."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return ([c2] if self.levels == 4 else []) + [c3, c4, self.layer4(c4)]

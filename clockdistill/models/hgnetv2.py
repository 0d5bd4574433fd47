"""HGNetV2, the backbone of D-FINE (Peterande/D-FINE, src/nn/backbone/hgnetv2.py, from PaddleDetection),
with the reference's parameter names:

- stem: a stride-2 3x3 ConvBNAct, then two branches on its output padded by one row and column at the
  bottom right: a 2x2 max-pool (stride 1), and a 2x2 ConvBNAct to half the channels then another 2x2
  back (the second also on a padded input); their concatenation through a stride-2 3x3 ConvBNAct and a
  1x1 ConvBNAct: stride 4;
- four stages (strides 4, 8, 16, 32): a depthwise stride-2 3x3 ConvBN (no activation) first where the
  stage downsamples, then HG blocks: `layer_num` convolutions in a chain (a ConvBNAct, or in the light
  stages a 1x1 ConvBN and a depthwise ConvBNAct), the block's input and every output concatenated and
  aggregated by a 1x1 ConvBNAct to half the output channels and a 1x1 ConvBNAct to the output (the
  reference's "se" aggregation), a residual on every block but a stage's first;
- `use_lab`: a learnable scale and bias after every activation (the B0 and B1 sizes of D-FINE N/S/M).

ConvBNAct is convolution (no bias), BatchNorm, ReLU (or none), then the affine block when `use_lab`.
The variants B0-B6 are the reference's table; `width` scales every channel count (tiny CPU models).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clockdistill.models.presnet import _freeze_norms

# name -> (stem channels (mid, out); per stage (in, mid, out, blocks, downsample, light, kernel, layers))
VARIANTS: dict[str, tuple[tuple[int, int], list[tuple[int, int, int, int, bool, bool, int, int]]]] = {
    "B0": ((16, 16), [(16, 16, 64, 1, False, False, 3, 3), (64, 32, 256, 1, True, False, 3, 3),
                      (256, 64, 512, 2, True, True, 5, 3), (512, 128, 1024, 1, True, True, 5, 3)]),
    "B1": ((24, 32), [(32, 32, 64, 1, False, False, 3, 3), (64, 48, 256, 1, True, False, 3, 3),
                      (256, 96, 512, 2, True, True, 5, 3), (512, 192, 1024, 1, True, True, 5, 3)]),
    "B2": ((24, 32), [(32, 32, 96, 1, False, False, 3, 4), (96, 64, 384, 1, True, False, 3, 4),
                      (384, 128, 768, 3, True, True, 5, 4), (768, 256, 1536, 1, True, True, 5, 4)]),
    "B3": ((24, 32), [(32, 32, 128, 1, False, False, 3, 5), (128, 64, 512, 1, True, False, 3, 5),
                      (512, 128, 1024, 3, True, True, 5, 5), (1024, 256, 2048, 1, True, True, 5, 5)]),
    "B4": ((32, 48), [(48, 48, 128, 1, False, False, 3, 6), (128, 96, 512, 1, True, False, 3, 6),
                      (512, 192, 1024, 3, True, True, 5, 6), (1024, 384, 2048, 1, True, True, 5, 6)]),
    "B5": ((32, 64), [(64, 64, 128, 1, False, False, 3, 6), (128, 128, 512, 2, True, False, 3, 6),
                      (512, 256, 1024, 5, True, True, 5, 6), (1024, 512, 2048, 2, True, True, 5, 6)]),
    "B6": ((48, 96), [(96, 96, 192, 2, False, False, 3, 6), (192, 192, 512, 3, True, False, 3, 6),
                      (512, 384, 1024, 6, True, True, 5, 6), (1024, 768, 2048, 3, True, True, 5, 6)]),
}  # fmt: skip


def variant(name: str, width: float = 1.0):
    """The reference's stem and stage table of `name` with every channel count x `width` (even counts
    kept even: the stem halves its width and the aggregation halves the output)."""

    def scale(c: int) -> int:
        return max(2 * round(c * width / 2), 2)

    (mid, out), stages = VARIANTS[name]
    return (scale(mid), scale(out)), [(scale(a), scale(b), scale(c), *rest) for a, b, c, *rest in stages]


class LearnableAffineBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0]))
        self.bias = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x + self.bias


class ConvBNAct(nn.Module):
    def __init__(self, ch_in: int, ch_out: int, kernel: int, stride: int = 1, groups: int = 1, act=True, lab=False):
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(ch_out)
        self.act = nn.ReLU() if act else nn.Identity()
        self.lab = LearnableAffineBlock() if act and lab else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.lab(self.act(self.bn(self.conv(x))))


class LightConvBNAct(nn.Module):
    def __init__(self, ch_in: int, ch_out: int, kernel: int, lab: bool):
        super().__init__()
        self.conv1 = ConvBNAct(ch_in, ch_out, 1, act=False, lab=lab)
        self.conv2 = ConvBNAct(ch_out, ch_out, kernel, groups=ch_out, lab=lab)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class StemBlock(nn.Module):
    def __init__(self, mid: int, out: int, lab: bool):
        super().__init__()
        self.stem1 = ConvBNAct(3, mid, 3, 2, lab=lab)
        self.stem2a = ConvBNAct(mid, mid // 2, 2, 1, lab=lab)
        self.stem2b = ConvBNAct(mid // 2, mid, 2, 1, lab=lab)
        self.stem3 = ConvBNAct(mid * 2, mid, 3, 2, lab=lab)
        self.stem4 = ConvBNAct(mid, out, 1, 1, lab=lab)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=1, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(self.stem1(x), (0, 1, 0, 1))
        branch = self.stem2b(F.pad(self.stem2a(x), (0, 1, 0, 1)))
        return self.stem4(self.stem3(torch.cat([self.pool(x), branch], 1)))


class HGBlock(nn.Module):
    def __init__(self, ch_in: int, mid: int, out: int, layers: int, kernel: int, residual: bool, light: bool, lab):
        super().__init__()
        self.residual = residual
        self.layers = nn.ModuleList(
            LightConvBNAct(ch_in if i == 0 else mid, mid, kernel, lab)
            if light
            else ConvBNAct(ch_in if i == 0 else mid, mid, kernel, lab=lab)
            for i in range(layers)
        )
        total = ch_in + layers * mid
        self.aggregation = nn.Sequential(ConvBNAct(total, out // 2, 1, lab=lab), ConvBNAct(out // 2, out, 1, lab=lab))

    def forward(self, x: Tensor) -> Tensor:
        outs = [x]
        for layer in self.layers:
            outs.append(layer(outs[-1]))
        y = self.aggregation(torch.cat(outs, 1))
        return y + x if self.residual else y


class HGStage(nn.Module):
    def __init__(self, ch_in, mid, out, blocks, downsample, light, kernel, layers, lab):
        super().__init__()
        self.downsample = ConvBNAct(ch_in, ch_in, 3, 2, groups=ch_in, act=False) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *(HGBlock(ch_in if i == 0 else out, mid, out, layers, kernel, i > 0, light, lab) for i in range(blocks))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class HGNetV2(nn.Module):
    """HGNetV2 `name` (B0-B6) at `width`; returns the stages `return_idx` (1, 2, 3: strides 8, 16, 32;
    D-FINE N reads 2, 3). `norm` frozen: FrozenBatchNorm2d throughout (D-FINE L / X); `frozen_stages` 1:
    the stem not trained (the reference's freeze_at 0 with freeze_stem_only)."""

    def __init__(self, name: str, width: float, lab: bool, return_idx, norm: str = "batch", frozen_stages: int = 0):
        super().__init__()
        (mid, out), stages = variant(name, width)
        self.return_idx = list(return_idx)
        self.stem = StemBlock(mid, out, lab)
        self.stages = nn.ModuleList(HGStage(*s, lab=lab) for s in stages)
        self.out_channels = [stages[i][2] for i in self.return_idx]
        for m in self.modules():  # PaddleDetection's initialisation (the reference only ever loads weights): He
            if isinstance(m, nn.Conv2d):  # normal; PyTorch's default shrinks the maps ~3x per convolution
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if frozen_stages:
            for p in self.stem.parameters():
                p.requires_grad_(False)
        if norm == "frozen":
            _freeze_norms(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.return_idx:
                outs.append(x)
        return outs

"""ImageNet backbones and ResNet parameter names.

A backbone comes as a torchvision-layout state dict (`resnet50-*.pth` from torchvision's model zoo,
or a safetensors file with the same names) or a Hugging Face `microsoft/resnet-*` directory
(config.json + model.safetensors). Hugging Face's ResNet names are rewritten to torchvision's,
which are ours (models/resnet.py). RT-DETR's ResNet-vd and D-FINE's HGNetV2 come as the files their
references load (`ResNet18_vd_pretrained_from_paddle.pth`, `PPHGNetV2_B0_stage1.pth`: the
backbone's own state dict, whose names are ours). A clockdistill checkpoint directory gives its
detector's backbone (the `backbone.*` tensors): a trained detector's backbone for another detector
of the same depth and width.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor, nn

from clockdistill.errors import UserError
from clockdistill.weights.files import read_state_dict

_HF_STEM = re.compile(r"^embedder\.embedder\.(convolution|normalization)\.(.+)$")
_HF_BLOCK = re.compile(
    r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.(\d+))\.(convolution|normalization)\.(.+)$"
)


def hf_resnet_to_torchvision(key: str) -> str | None:
    """A Hugging Face ResNetModel parameter name as torchvision's (None: not a trunk parameter)."""
    key = key.removeprefix("resnet.")
    if m := _HF_STEM.match(key):
        return f"{'conv1' if m.group(1) == 'convolution' else 'bn1'}.{m.group(2)}"
    if m := _HF_BLOCK.match(key):
        stage, block, part, conv, kind, rest = m.groups()
        if part == "shortcut":
            return f"layer{int(stage) + 1}.{block}.downsample.{0 if kind == 'convolution' else 1}.{rest}"
        return f"layer{int(stage) + 1}.{block}.{'conv' if kind == 'convolution' else 'bn'}{int(conv) + 1}.{rest}"
    return None


def trunk_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The ResNet trunk's tensors under torchvision names, from any of the layouts above (classifier
    heads, pooler, BatchNorm counters and a detector's other parts dropped)."""
    if any(k.startswith("backbone.") for k in state):  # a whole detector: its backbone
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    hf = any(k.startswith(("embedder.", "encoder.stages.", "resnet.embedder.")) for k in state)
    out = {}
    for key, value in state.items():
        name = hf_resnet_to_torchvision(key) if hf else key
        if name is None or name.startswith(("fc.", "classifier.")) or name.endswith("num_batches_tracked"):
            continue
        out[name] = value
    return out


def load_backbone_weights(backbone: nn.Module, source: str | Path) -> int:
    """Copy an ImageNet backbone into `backbone` (every tensor must fit); returns the count."""
    source = Path(source)
    state = trunk_state(read_state_dict(source, "model.backbone_weights"))
    own = backbone.state_dict()
    own = {k: v for k, v in own.items() if not k.endswith("num_batches_tracked")}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise UserError(
            f"model.backbone_weights: {source} is not this backbone: {len(missing)} tensor(s) missing "
            f"(first: {', '.join(missing[:3]) or '-'}), {len(extra)} left over (first: {', '.join(extra[:3]) or '-'})"
        )
    for name, value in state.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise UserError(
                f"model.backbone_weights: {source}: {name} has shape {tuple(value.shape)}, this backbone's "
                f"is {tuple(own[name].shape)} (check model.backbone_depth and backbone_width)"
            )
    backbone.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    return len(state)

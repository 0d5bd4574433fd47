"""Class heads across class sets: which tensors are class heads, which old class each new class
takes its row from (the same name, or a class-map file), and the rows copied.

A class-map file maps new class names to old ones, YAML or JSON:

    Car: car
    Pedestrian: person
    Cyclist: bicycle

A new class with no old counterpart keeps its fresh row (focal prior bias), which is also what every
new class gets when the two class sets share no name and no map is given.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from clockdistill.config.dotted import parse_yaml
from clockdistill.errors import UserError

# per-class rows: the class heads (DINO's proposal scorer and its denoising label book too)
_CLASS_HEAD = re.compile(  # (RT-DETR's under decoder.: its per-layer, proposal and denoising label heads)
    r"^(?:decoder\.)?(class_embed|class_heads|enc_out_class_embed|label_enc|dec_score_head|enc_score_head|"
    r"denoising_class_embed)(\.(\d+))?\.(weight|bias)$"
)


def class_head_keys(state: dict[str, Tensor], dec_layers: int, two_stage: bool) -> tuple[list[str], list[str]]:
    """(per-class head tensors, two-stage proposal head tensors) of a detector's state dict. The
    proposal head (the last of a two-stage detector's) scores objectness in its first row only."""
    heads, proposals = [], []
    for key in state:
        m = _CLASS_HEAD.match(key)
        if m:
            (proposals if two_stage and m.group(3) == str(dec_layers) else heads).append(key)
    return heads, proposals


def read_class_map(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--class-map: {path} not found")
    data = parse_yaml(path.read_text())
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise UserError(f"--class-map: {path}: expected a mapping of new class names to old ones, e.g. 'Car: car'")
    return data


def class_mapping(new: list[str], old: list[str], class_map: dict[str, str] | None = None) -> list[int | None]:
    """For every new class, the index of the old class it inherits from (None: none)."""
    class_map = class_map or {}
    unknown_new = sorted(set(class_map) - set(new))
    if unknown_new:
        raise UserError(
            f"--class-map: {unknown_new[0]!r} is not a class of the new data (its classes: {', '.join(new)})"
        )
    index = {name: i for i, name in enumerate(old)}
    missing = sorted(v for v in class_map.values() if v not in index)
    if missing:
        raise UserError(f"--class-map: {missing[0]!r} is not a class of the checkpoint (its classes: {', '.join(old)})")
    return [index.get(class_map.get(name, name)) for name in new]


def remap_rows(
    old: dict[str, Tensor], fresh: dict[str, Tensor], heads: list[str], proposals: list[str], mapping: list[int | None]
) -> dict[str, Tensor]:
    """Class-head tensors of the new model: fresh rows, with the rows of mapped classes copied from
    `old`, and a proposal head's objectness row carried over."""
    out = {}
    for key in heads:
        new = fresh[key].clone()
        for j, i in enumerate(mapping):
            if i is not None:
                new[j] = old[key][i]
        out[key] = new
    for key in proposals:
        new = fresh[key].clone()
        new[0] = old[key][0]
        out[key] = new
    return out

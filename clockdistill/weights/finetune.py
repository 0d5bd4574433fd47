"""Starting a detector from another checkpoint (`train.init_from`): fine-tuning a published or
imported detector to a new data set.

Every tensor whose name and shape the new detector shares is copied. Class heads follow the classes:
the same class set copies them whole; otherwise each new class takes the row of the checkpoint's
class of the same name, or of the one `train.class_map` names (COCO car -> Car, person ->
Pedestrian, ...), and a class with neither starts fresh, as every head row does when no name is
shared (the focal prior of a new head).
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from clockdistill.checkpoint_meta import read_meta
from clockdistill.errors import UserError
from clockdistill.weights.classes import class_head_keys, class_mapping, read_class_map, remap_rows
from clockdistill.weights.files import read_state_dict

log = logging.getLogger(__name__)


def init_from_checkpoint(model: nn.Module, checkpoint: str | Path, class_names: list[str], class_map: str = "") -> dict:
    """Load `checkpoint` into `model` as described above; returns what was done (for the log)."""
    meta = read_meta(checkpoint)
    old = read_state_dict(Path(checkpoint) / "model.safetensors", "train.init_from")
    fresh = model.state_dict()
    old_names = meta.get("class_names") or []
    mc = model.cfg
    heads, proposals = class_head_keys(fresh, mc.dec_layers, mc.two_stage)
    same_classes = old_names == class_names
    mapping = class_mapping(class_names, old_names, read_class_map(class_map) if class_map else None)
    state, skipped = {}, []
    for key, value in fresh.items():
        if (
            key in old
            and tuple(old[key].shape) == tuple(value.shape)
            and (same_classes or key not in heads + proposals)
        ):
            state[key] = old[key].to(value.dtype)
        elif key not in heads + proposals:
            skipped.append(key)
    if not same_classes:
        usable = [k for k in heads + proposals if k in old and old[k].shape[1:] == fresh[k].shape[1:]]
        state.update(
            remap_rows(old, fresh, [k for k in heads if k in usable], [k for k in proposals if k in usable], mapping)
        )
    if not state:
        raise UserError(f"train.init_from: {checkpoint} shares no tensor with this detector (another architecture?)")
    model.load_state_dict(state, strict=False)
    mapped = [f"{n}<-{old_names[i]}" for n, i in zip(class_names, mapping) if i is not None]
    unused = sorted(k for k in old if k not in state and not k.endswith("num_batches_tracked"))
    report = {
        "copied": len(state),
        "fresh": len(skipped),
        "unused": len(unused),
        "classes_mapped": len(mapped) if not same_classes else len(class_names),
    }
    log.info(
        "train.init_from %s: %d tensors copied, %d start fresh%s; class heads: %s",
        checkpoint,
        len(state),
        len(skipped),
        f" (first: {', '.join(skipped[:3])})" if skipped else "",
        "the same classes"
        if same_classes
        else f"{len(mapped)} of {len(class_names)} classes mapped ({', '.join(mapped) or 'none'})",
    )
    if unused:  # the user's model.* is another architecture than the checkpoint's
        log.warning(
            "train.init_from %s: %d of the checkpoint's tensors fit nothing in this detector (first: %s); "
            "leave model.* unset to fine-tune the checkpoint's own architecture",
            checkpoint,
            len(unused),
            ", ".join(unused[:3]),
        )
    return report

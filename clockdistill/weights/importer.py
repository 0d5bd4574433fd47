"""`clockdistill import`: a published or fine-tuned Deformable DETR / DAB-DETR / DINO checkpoint as a
clockdistill checkpoint (model.safetensors + meta.json with the model config and class names).

    clockdistill import SenseTime-deformable-detr/ --out teachers/coco-r50          # Hugging Face directory
    clockdistill import r50_deformable_detr-checkpoint.pth --out teachers/coco-r50  # the original repository's
    clockdistill import checkpoint0011_4scale.pth --out teachers/dino-r50             # IDEA-Research/DINO's
    clockdistill import checkpoint0011_5scale.pth --out teachers/dino-r50-5scale      # (4- and 5-scale)
    clockdistill import ... --data kitti-coco/ --class-map kitti.yaml               # heads for a data set's classes

Every tensor is accounted for: a name that is not understood, a tensor the detector lacks or one it
needs that the checkpoint does not hold, or a shape that does not fit stops the import with one
line, before anything is written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import Tensor

from clockdistill.checkpoint import save_checkpoint
from clockdistill.config.dotted import apply_overrides
from clockdistill.config.layers import resolve_config
from clockdistill.config.presets import PRESETS
from clockdistill.data.coco_names import COCO_ID_NAMES
from clockdistill.data.index import load_index
from clockdistill.errors import UserError
from clockdistill.models.build import build_detector
from clockdistill.weights.architecture import from_args, from_hf_config, from_tensors, resnet_from_tensors
from clockdistill.weights.classes import class_head_keys, class_mapping, read_class_map, remap_rows
from clockdistill.weights.files import read_checkpoint
from clockdistill.weights.layouts import Renamed, rename
from clockdistill.weights.realtime_architecture import dfine_from_tensors, rtdetr_from_tensors

log = logging.getLogger(__name__)

LAYOUTS = ("huggingface", "original")


def detect_layout(state: dict[str, Tensor], extras: dict[str, Any], source: str) -> str:
    if "config" in extras:
        return "huggingface"
    if any(k.startswith(("transformer.", "backbone.0.body.")) for k in state):
        return "original"
    if (
        "decoder.decoder.layers.0.cross_attn.attention_weights.weight" in state
        and "decoder.enc_score_head.weight" in state
    ):
        return "original"  # lyuwenyu/RT-DETR's and Peterande/D-FINE's models (their names are ours, near enough)
    if any(k.startswith("model.") for k in state):
        raise UserError(
            f"{source}: looks like a Hugging Face model without its config.json; import the model directory"
        )
    raise UserError(
        f"{source}: layout not understood (known: a Hugging Face model directory of DeformableDetr, DabDetr, "
        "RTDetr(V2) or DFine, an original Deformable-DETR / DAB-DETR / DINO / D-FINE .pth checkpoint)"
    )


def class_names_of(layout: str, extras: dict[str, Any], num_classes: int) -> list[str]:
    id2label = (extras.get("config") or {}).get("id2label") if layout == "huggingface" else None
    if id2label and len(id2label) == num_classes:
        return [str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in range(num_classes)]
    if num_classes == len(COCO_ID_NAMES):
        return list(COCO_ID_NAMES)
    return [f"class_{i}" for i in range(num_classes)]


def _preset_for(fields: dict[str, Any]) -> str:
    depth = fields.get("backbone_depth", 50)
    if fields["arch"] == "dino":
        name = f"dino-r{depth}{'-5scale' if fields.get('backbone_levels') == 4 else ''}"
        return name if name in PRESETS else "dino-r50"
    if fields["arch"] == "rtdetr":
        family = "rtdetrv2" if fields.get("rtdetr_version") == 2 else "rtdetr"
        return f"{family}-r{depth}" if f"{family}-r{depth}" in PRESETS else f"{family}-r50"
    if fields["arch"] == "dfine":  # by the backbone: B0 N (two levels) or S, B2 M, B4 L, B5 X
        size = {"B0": "n" if fields.get("num_levels") == 2 else "s", "B2": "m", "B4": "l", "B5": "x"}
        return f"dfine-{size.get(fields.get('hgnet', 'B4'), 'l')}"
    if fields["arch"] == "dab":
        name = f"dab-detr-r{depth}{'-dc5' if fields.get('dilation') else ''}"
    else:
        variant = "-two-stage" if fields.get("two_stage") else ("-refine" if fields.get("box_refine") else "")
        name = f"deformable-detr-r{depth}{variant}"
    return name if name in PRESETS else ("dab-detr-r50" if fields["arch"] == "dab" else "deformable-detr-r50")


def _architecture(state, extras, layout: str, source: str, overrides: list[str]) -> tuple[str, dict[str, Any]]:
    """(arch, model fields): from a Hugging Face config, an original checkpoint's training args, or its
    tensors (what they cannot tell from `--set`)."""
    if layout == "huggingface":
        return from_hf_config(extras["config"], source)
    if extras.get("args") is not None and hasattr(extras["args"], "hidden_dim"):
        arch, fields = from_args(extras["args"], source)
        trunk = {k[len("backbone.0.body.") :]: v for k, v in state.items() if k.startswith("backbone.0.body.")}
        fields.update(resnet_from_tensors(trunk, source))  # the weights say the width (args only the depth)
        return arch, fields
    given = apply_overrides({}, overrides).get("model") or {}
    given = given if isinstance(given, dict) else {}
    if "decoder.pre_bbox_head.layers.0.weight" in state:
        return "dfine", dfine_from_tensors(state, source, given)
    if "decoder.enc_score_head.weight" in state:  # (v2's few names -> ours first)
        return "rtdetr", rtdetr_from_tensors(rename(state, "original", "rtdetr", False).state, source, given)
    return from_tensors(state, source, given)


def import_checkpoint(
    source: str | Path,
    out: str | Path,
    data: str | Path | None = None,
    class_map: str | Path | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Convert `source` and write the checkpoint directory `out`; returns its metadata. `overrides`
    (`--set model.KEY=VALUE`) apply before the architecture is read off the tensors, so they give
    what a checkpoint without its training args cannot tell."""
    source, overrides = str(source), list(overrides or [])
    state, extras = read_checkpoint(source, "SOURCE")
    layout = detect_layout(state, extras, source)
    arch, fields = _architecture(state, extras, layout, source, overrides)
    if arch in ("rtdetr", "dfine"):  # R18 / R34 and D-FINE N-M train their backbone's BatchNorm, the rest freeze it
        preset = PRESETS.get(_preset_for(fields), {})
        fields.setdefault("backbone_norm", preset.get("backbone_norm", "frozen"))
        fields.setdefault("backbone_frozen_stages", preset.get("backbone_frozen_stages", 1))
        fields["backbone_weights"] = ""
    else:
        fields.update(backbone_norm="frozen", backbone_frozen_stages=1, backbone_weights="")
    if arch == "dino":  # the label book's size is in its tensor (the reference: dn_labelbook_size + 1 rows)
        fields["dn_labelbook"] = state["label_enc.weight"].shape[0] - 1
    cfg = resolve_config({"model": {"preset": _preset_for(fields), **fields}}, overrides=overrides)
    m = cfg.model
    tie = layout == "huggingface" and arch == "deformable" and extras["config"].get("tie_word_embeddings", True)
    renamed = rename(
        state,
        layout,
        arch,
        shared_heads=arch == "dino" or (arch == "deformable" and not m.box_refine),
        tied_layers=(m.dec_layers + int(m.two_stage)) if tie else 0,
    )
    if renamed.unknown:
        raise UserError(
            f"{source}: {len(renamed.unknown)} tensor(s) not understood for a {layout} {arch} checkpoint "
            f"(first: {', '.join(renamed.unknown[:3])})"
        )
    head = next(
        (renamed.state[k] for k in ("class_embed.0.weight", "class_embed.weight", "decoder.dec_score_head.0.weight")
         if k in renamed.state),
        None,
    )  # fmt: skip
    if head is None:
        raise UserError(f"{source}: no class head (class_embed) found")
    num_classes = m.num_classes or head.shape[0]
    cfg = cfg.updated({"model.num_classes": num_classes})
    model = build_detector(cfg.model, num_classes)
    _check_fit(renamed, model.state_dict(), source)
    model.load_state_dict(renamed.state)
    names = class_names_of(layout, extras, num_classes)
    label_to_cat = list(range(num_classes))  # head index = category id, as the published COCO heads
    if data is not None:
        model, cfg, names, label_to_cat = _to_dataset(model, cfg, names, data, class_map)
    meta = {
        "config": cfg.to_dict(),
        "class_names": names,
        "label_to_cat": label_to_cat,
        "epoch": -1,
        "best_ap": -1.0,
        "metrics": {},
        "imported_from": {"source": source, "layout": layout, "tensors": len(renamed.state)},
    }
    save_checkpoint(out, model, meta)
    (Path(out) / "IMPORTED.json").write_text(json.dumps(meta["imported_from"], indent=1))
    print(f"imported {layout} {arch} checkpoint {source}: {len(renamed.state)} tensors, {num_classes} classes -> {out}")
    return meta


def _check_fit(renamed: Renamed, own: dict[str, Tensor], source: str) -> None:
    """Every tensor of the detector is in the checkpoint with its shape, and nothing is left over;
    a refusal names the checkpoint's own key beside ours."""
    state, origin = renamed.state, renamed.origin
    own = {k: v for k, v in own.items() if not k.endswith("num_batches_tracked")}
    for key, value in own.items():  # the first mismatch in the detector's order: backbone, encoder, decoder
        if key in state and tuple(state[key].shape) != tuple(value.shape):
            raise UserError(
                f"{source}: {origin.get(key, key)} has shape {tuple(state[key].shape)}; it is the detector's {key}, "
                f"whose shape is {tuple(value.shape)}"
            )
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise UserError(
            f"{source}: {len(missing)} tensor(s) of the detector missing (first: {', '.join(missing[:3]) or '-'}), "
            f"{len(extra)} of the checkpoint left over (first: {', '.join(origin.get(k, k) for k in extra[:3]) or '-'})"
        )


def _to_dataset(model, cfg, names: list[str], data, class_map):
    """The detector with class heads for the data set's classes: each takes the row of the class of
    the same name (or the one the class map names); the rest start fresh."""
    categories = load_index(data, "train").categories
    new_names = [c["name"] for c in categories]
    mapping = class_mapping(new_names, names, read_class_map(class_map) if class_map else None)
    raw = cfg.to_dict()
    raw["model"]["num_classes"] = len(new_names)
    raw["data"]["root"] = str(data)
    new_cfg = resolve_config(raw)
    fresh_model = build_detector(new_cfg.model, len(new_names))
    old, fresh = model.state_dict(), fresh_model.state_dict()
    heads, proposals = class_head_keys(old, cfg.model.dec_layers, cfg.model.two_stage)
    state = {k: v for k, v in old.items() if k not in heads and k not in proposals}
    state.update(remap_rows(old, fresh, heads, proposals, mapping))
    fresh_model.load_state_dict(state)
    taken = [f"{n}<-{names[i]}" for n, i in zip(new_names, mapping) if i is not None]
    log.info(
        "class heads for %s: %d of %d classes from the checkpoint (%s)",
        data,
        len(taken),
        len(new_names),
        ", ".join(taken) or "none",
    )
    return fresh_model, new_cfg, new_names, [c["id"] for c in categories]

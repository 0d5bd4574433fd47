"""Checkpoint layouts and their renaming to ours.

    original      fundamentalvision/Deformable-DETR and IDEA-Research/DAB-DETR `.pth` files: the
                  model's state dict under `model` (and the training arguments under `args`)
    huggingface   a `save_pretrained` directory of transformers' DeformableDetrForObjectDetection,
                  DabDetrForObjectDetection, RTDetr(V2)ForObjectDetection or DFineForObjectDetection
                  (config.json + model.safetensors): the published SenseTime/deformable-detr*,
                  IDEA-Research/dab-detr-*, PekingU/rtdetr_* and ustc-community/dfine-* checkpoints; the
                  backbone in timm's (torchvision) names or Hugging Face's ResNet names (RT-DETR: its
                  ResNet-vd port, renamed to PResNet's; D-FINE: its HGNetV2 port, renamed to HGNetv2's)

Our parameter names follow the original repositories' (without `transformer.` and
`backbone.0.body.`), so the original layout renames by prefix; Hugging Face's port renamed most
layers and split the attention input projections, which are joined again here. Heads the
references tie (one module listed once per decoder layer, or the decoder's copy of the model's box
head) are written once per distinct tensor in ours; their copies must be equal, or the import stops.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import Tensor

from clockdistill.errors import UserError
from clockdistill.weights.backbone import hf_resnet_to_torchvision

_HF_DEFORMABLE = [  # (pattern, replacement) on names after "model." is removed
    (r"^level_embed$", "level_embed"),
    (r"^query_position_embeddings\.", "query_embed."),
    (r"^(input_proj|reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.", r"\1."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.", r"encoder.layers.\1.self_attn."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.layers.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.fc1\.", r"encoder.layers.\1.linear1."),
    (r"^encoder\.layers\.(\d+)\.fc2\.", r"encoder.layers.\1.linear2."),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.norm2."),
    (r"^decoder\.layers\.(\d+)\.encoder_attn\.", r"decoder.layers.\1.cross_attn."),
    (r"^decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"decoder.layers.\1.norm1."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"decoder.layers.\1.self_attn.out_proj."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"decoder.layers.\1.self_attn.\2_proj."),
    (r"^decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"decoder.layers.\1.norm2."),
    (r"^decoder\.layers\.(\d+)\.fc1\.", r"decoder.layers.\1.linear1."),
    (r"^decoder\.layers\.(\d+)\.fc2\.", r"decoder.layers.\1.linear2."),
    (r"^decoder\.layers\.(\d+)\.final_layer_norm\.", r"decoder.layers.\1.norm3."),
    (r"^decoder\.(bbox_embed|class_embed)\.", r"decoder_copy.\1."),
]

_HF_DAB = [
    (r"^input_projection\.", "input_proj."),
    (r"^query_refpoint_embeddings\.", "refpoint_embed."),
    (r"^encoder\.query_scale\.", "encoder.query_scale."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"encoder.layers.\1.self_attn.\2_proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.layers.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.fc1\.", r"encoder.layers.\1.linear1."),
    (r"^encoder\.layers\.(\d+)\.fc2\.", r"encoder.layers.\1.linear2."),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.activation_fn\.", r"encoder.layers.\1.activation."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.self_attn_query_content_proj\.", r"decoder.layers.\1.sa_qcontent_proj."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.self_attn_query_pos_proj\.", r"decoder.layers.\1.sa_qpos_proj."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.self_attn_key_content_proj\.", r"decoder.layers.\1.sa_kcontent_proj."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.self_attn_key_pos_proj\.", r"decoder.layers.\1.sa_kpos_proj."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.self_attn_value_proj\.", r"decoder.layers.\1.sa_v_proj."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.self_attn\.output_proj\.", r"decoder.layers.\1.self_attn.out_proj."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.self_attn_layer_norm\.", r"decoder.layers.\1.norm1."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.cross_attn_query_content_proj\.", r"decoder.layers.\1.ca_qcontent_proj."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.cross_attn_query_pos_proj\.", r"decoder.layers.\1.ca_qpos_proj."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.cross_attn_query_pos_sine_proj\.", r"decoder.layers.\1.ca_qpos_sine_proj."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.cross_attn_key_content_proj\.", r"decoder.layers.\1.ca_kcontent_proj."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.cross_attn_key_pos_proj\.", r"decoder.layers.\1.ca_kpos_proj."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.cross_attn_value_proj\.", r"decoder.layers.\1.ca_v_proj."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.cross_attn\.output_proj\.", r"decoder.layers.\1.cross_attn.out_proj."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.cross_attn_layer_norm\.", r"decoder.layers.\1.norm2."),
    (r"^decoder\.layers\.(\d+)\.mlp\.fc1\.", r"decoder.layers.\1.linear1."),
    (r"^decoder\.layers\.(\d+)\.mlp\.fc2\.", r"decoder.layers.\1.linear2."),
    (r"^decoder\.layers\.(\d+)\.mlp\.final_layer_norm\.", r"decoder.layers.\1.norm3."),
    (r"^decoder\.layers\.(\d+)\.mlp\.activation_fn\.", r"decoder.layers.\1.activation."),
    (r"^decoder\.layernorm\.", "decoder.norm."),
    (r"^decoder\.(query_scale|ref_point_head|ref_anchor_head)\.", r"decoder.\1."),
    (r"^decoder\.bbox_embed\.", "decoder_copy.bbox_embed."),
]

_ENC = r"^encoder\.(?:aifi|encoder)\.(\d+)\.layers\.(\d+)\."  # transformers names AIFI `aifi` in memory
_DEC = r"^decoder\.layers\.(\d+)\."
_FC1, _FC2 = r"(?:mlp\.layers\.0|(?:mlp\.)?fc1)\.", r"(?:mlp\.layers\.1|(?:mlp\.)?fc2)\."  # (as saved or in memory)
_AIFI = [  # the hybrid encoder's transformer layer (RT-DETR, D-FINE)
    (_ENC + r"self_attn\.(?:o|out)_proj\.", r"encoder.encoder.\1.layers.\2.self_attn.out_proj."),
    (_ENC + r"self_attn\.([qkv])_proj\.", r"encoder.encoder.\1.layers.\2.self_attn.\3_proj."),
    (_ENC + r"self_attn_layer_norm\.", r"encoder.encoder.\1.layers.\2.norm1."),
    (_ENC + _FC1, r"encoder.encoder.\1.layers.\2.linear1."),
    (_ENC + _FC2, r"encoder.encoder.\1.layers.\2.linear2."),
    (_ENC + r"final_layer_norm\.", r"encoder.encoder.\1.layers.\2.norm2."),
]
_DECODER_INPUT = [
    (r"^decoder_input_proj\.(\d+)\.0\.", r"decoder.input_proj.\1.conv."),
    (r"^decoder_input_proj\.(\d+)\.1\.", r"decoder.input_proj.\1.norm."),
]
_DECODER_SELF_ATTN = [
    (_DEC + r"self_attn\.(?:o|out)_proj\.", r"decoder.decoder.layers.\1.self_attn.out_proj."),
    (_DEC + r"self_attn\.([qkv])_proj\.", r"decoder.decoder.layers.\1.self_attn.\2_proj."),
    (_DEC + r"self_attn_layer_norm\.", r"decoder.decoder.layers.\1.norm1."),
]
_DECODER_FFN = [
    (_DEC + _FC1, r"decoder.decoder.layers.\1.linear1."),
    (_DEC + _FC2, r"decoder.decoder.layers.\1.linear2."),
    (_DEC + r"final_layer_norm\.", r"decoder.decoder.layers.\1.norm3."),
]
_HF_RTDETR = [  # transformers' RTDetrForObjectDetection (after "model.", as saved or in memory) -> the reference's
    (r"^encoder_input_proj\.(\d+)\.", r"encoder.input_proj.\1."),
    *_AIFI,
    (r"^encoder\.(lateral_convs|fpn_blocks|downsample_convs|pan_blocks)\.", r"encoder.\1."),
    *_DECODER_INPUT,
    *_DECODER_SELF_ATTN,
    (_DEC + r"encoder_attn\.n_points_scale$", r"decoder.decoder.layers.\1.cross_attn.num_points_scale"),  # v2
    (_DEC + r"encoder_attn\.", r"decoder.decoder.layers.\1.cross_attn."),
    (_DEC + r"encoder_attn_layer_norm\.", r"decoder.decoder.layers.\1.norm2."),
    *_DECODER_FFN,
    (r"^decoder\.query_pos_head\.", "decoder.query_pos_head."),
    (r"^decoder\.class_embed\.", "decoder.dec_score_head."),
    (r"^decoder\.bbox_embed\.", "decoder.dec_bbox_head."),
    (r"^(denoising_class_embed|enc_output|enc_score_head|enc_bbox_head)\.", r"decoder.\1."),
]

_FUSE = r"^encoder\.(fpn_blocks|pan_blocks)\.(\d+)\."
_HF_DFINE = [  # transformers' DFineForObjectDetection (after "model.") -> the reference's
    (r"^encoder_input_proj\.(\d+)\.0\.", r"encoder.input_proj.\1.conv."),
    (r"^encoder_input_proj\.(\d+)\.1\.", r"encoder.input_proj.\1.norm."),
    *_AIFI,
    (r"^encoder\.lateral_convs\.", "encoder.lateral_convs."),
    (_FUSE + r"conv1\.", r"encoder.\1.\2.cv1."),
    (_FUSE + r"csp_rep1\.", r"encoder.\1.\2.cv2.0."),
    (_FUSE + r"conv2\.", r"encoder.\1.\2.cv2.1."),
    (_FUSE + r"csp_rep2\.", r"encoder.\1.\2.cv3.0."),
    (_FUSE + r"conv3\.", r"encoder.\1.\2.cv3.1."),
    (_FUSE + r"conv4\.", r"encoder.\1.\2.cv4."),
    (r"^encoder\.downsample_convs\.(\d+)\.conv([12])\.", r"encoder.downsample_convs.\1.0.cv\2."),
    *_DECODER_INPUT,
    *_DECODER_SELF_ATTN,
    (_DEC + r"encoder_attn\.", r"decoder.decoder.layers.\1.cross_attn."),
    (_DEC + r"gateway\.", r"decoder.decoder.layers.\1.gateway."),
    *_DECODER_FFN,
    (r"^decoder\.lqe_layers\.", "decoder.decoder.lqe_layers."),
    (r"^decoder\.(query_pos_head|pre_bbox_head)\.", r"decoder.\1."),
    (r"^decoder\.(up|reg_scale)$", r"decoder.\1"),
    (r"^decoder\.class_embed\.", "decoder.dec_score_head."),
    (r"^decoder\.bbox_embed\.", "decoder.dec_bbox_head."),
    (r"^enc_output\.0\.", "decoder.enc_output.proj."),
    (r"^enc_output\.1\.", "decoder.enc_output.norm."),
    (r"^(denoising_class_embed|enc_score_head|enc_bbox_head)\.", r"decoder.\1."),
]


def _hf_hgnet_name(rest: str) -> str:
    """transformers' HGNetV2Backbone (after "model.backbone.model.") -> the reference's HGNetv2."""
    name = re.sub(r"^embedder\.", "stem.", re.sub(r"^encoder\.stages\.", "stages.", rest))
    return "backbone." + name.replace(".convolution.", ".conv.").replace(".normalization.", ".bn.")


_HF_PRESNET = [  # transformers' RTDetrResNet (after "model.backbone.model.") -> the reference's PResNet
    (r"^embedder\.embedder\.0\.", "conv1.conv1_1."),
    (r"^embedder\.embedder\.1\.", "conv1.conv1_2."),
    (r"^embedder\.embedder\.2\.", "conv1.conv1_3."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.0\.", r"res_layers.\1.blocks.\2.branch2a."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.1\.", r"res_layers.\1.blocks.\2.branch2b."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.2\.", r"res_layers.\1.blocks.\2.branch2c."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.1\.", r"res_layers.\1.blocks.\2.short.conv."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.", r"res_layers.\1.blocks.\2.short."),
]


def _hf_presnet_name(rest: str) -> str | None:
    for pattern, repl in _HF_PRESNET:
        if re.match(pattern, rest):
            name = re.sub(pattern, repl, rest, count=1)
            return "backbone." + name.replace(".convolution.", ".conv.").replace(".normalization.", ".norm.")
    return None


_BACKBONE_PREFIXES = (
    "model.backbone.conv_encoder.model._backbone.",
    "model.backbone.conv_encoder.model.",
    "backbone.0.body.",
)


def _backbone_name(key: str) -> str | None:
    for prefix in _BACKBONE_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            name = hf_resnet_to_torchvision(rest) if rest.startswith(("embedder.", "encoder.stages.")) else rest
            return (
                None
                if name is None or name.endswith("num_batches_tracked") or name.startswith("fc.")
                else f"backbone.{name}"
            )
    return None


class Renamed(NamedTuple):
    state: dict[str, Tensor]  # our names -> tensors
    unknown: list[str]  # the checkpoint's names that are not understood
    origin: dict[str, str]  # our name -> the checkpoint's name it came from (for messages)


def rename(state: dict[str, Tensor], layout: str, arch: str, shared_heads: bool, tied_layers: int = 0) -> Renamed:
    """Our names for a checkpoint's tensors. Tied copies are checked and left out; split q/k/v
    projections are joined; `shared_heads` (plain Deformable DETR) folds the per-layer head entries
    into the one shared head. `tied_layers` > 0: a transformers model saved with its head ties on
    (tie_word_embeddings) writes a tied head once; prediction layers 1..tied_layers-1 whose class or
    box head the file lacks take layer 0's, as transformers does when it loads the file."""
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unknown: list[str] = []
    rules = {"deformable": _HF_DEFORMABLE, "rtdetr": _HF_RTDETR, "dfine": _HF_DFINE}.get(arch, _HF_DAB)  # (v2: rtdetr)
    for key, value in state.items():
        if key.endswith("num_batches_tracked") or (layout == "original" and key in _ANCHORS):
            continue
        name = _our_name(key, layout, rules)
        if name is None:
            unknown.append(key)
        else:
            out[name], origin[name] = value, key
    out = _untie(_join_qkv(out, origin), origin)
    if tied_layers:
        out = _fill_tied(out, origin, tied_layers)
    return Renamed(_share_heads(out, origin) if shared_heads else out, unknown, origin)


# what the reference's D-FINE holds besides its weights: a second name for `up` and `reg_scale` (checked equal,
# dropped), and the anchors of its fixed evaluation size (rebuilt for every input here)
_DFINE_ORIGINAL_EXTRAS = ("decoder.decoder.up", "decoder.decoder.reg_scale")
_ANCHORS = ("decoder.anchors", "decoder.valid_mask")  # RT-DETR's and D-FINE's at their fixed evaluation size


def _our_name(key: str, layout: str, rules: list[tuple[str, str]]) -> str | None:
    if layout == "original" and rules is _HF_RTDETR:  # lyuwenyu/RT-DETR's names are ours, but v2's few
        for pattern, repl in _OURS_FROM_RTDETRV2:
            key = re.sub(pattern, repl, key)
        return key
    if layout == "original" and rules is _HF_DFINE:  # Peterande/D-FINE's names are ours
        return (
            "decoder_copy." + key.replace("decoder.decoder.", "decoder.", 1) if key in _DFINE_ORIGINAL_EXTRAS else key
        )
    if layout == "huggingface" and key.startswith("model.backbone.model."):  # RT-DETR's ResNet-vd, D-FINE's HGNetV2
        rest = key[len("model.backbone.model.") :]
        return _hf_hgnet_name(rest) if rules is _HF_DFINE else _hf_presnet_name(rest)
    if key.startswith(("backbone.", "model.backbone.")):
        return _backbone_name(key)
    if layout == "original":
        name = key.removeprefix("transformer.")
        if re.match(r"decoder\.(bbox_embed|class_embed)\.", name):
            name = "decoder_copy." + name[len("decoder.") :]
        return name
    if rules in (_HF_RTDETR, _HF_DFINE) and key.startswith(
        ("class_embed.", "bbox_embed.")
    ):  # the decoder's heads' ties
        head = "dec_score_head." if key.startswith("class_embed.") else "dec_bbox_head."
        return "decoder_copy.decoder." + head + key.split(".", 1)[1]
    if key.startswith(("class_embed.", "bbox_embed.", "bbox_predictor.")):
        return key.replace("bbox_predictor.", "bbox_embed.", 1)
    body = key.removeprefix("model.")
    for pattern, repl in rules:
        if re.match(pattern, body):
            return re.sub(pattern, repl, body, count=1)
    return None


def _join_qkv(state: dict[str, Tensor], origin: dict[str, str]) -> dict[str, Tensor]:
    """x.q_proj / x.k_proj / x.v_proj (Hugging Face) -> x.in_proj_weight / in_proj_bias (nn.MultiheadAttention)."""
    out = {k: v for k, v in state.items() if not re.search(r"\.[qkv]_proj\.", k)}
    prefixes = {re.sub(r"\.[qkv]_proj\.(weight|bias)$", "", k) for k in state if re.search(r"\.[qkv]_proj\.", k)}
    for p in prefixes:
        for kind in ("weight", "bias"):
            parts = [state.get(f"{p}.{c}_proj.{kind}") for c in "qkv"]
            if any(t is None for t in parts):
                raise UserError(f"checkpoint: {p} has only some of its q/k/v projections ({kind})")
            out[f"{p}.in_proj_{kind}"] = torch.cat(parts, 0)
            origin[f"{p}.in_proj_{kind}"] = origin[f"{p}.q_proj.{kind}"].replace(".q_proj.", ".[qkv]_proj.")
    return out


def _untie(state: dict[str, Tensor], origin: dict[str, str]) -> dict[str, Tensor]:
    """The decoder's copies of heads the reference ties to the model's (box refinement's box heads,
    two-stage's class heads, DAB-DETR's decoder box head) become one tensor; copies must be equal."""
    out = {k: v for k, v in state.items() if not k.startswith("decoder_copy.")}
    for key, value in state.items():
        if key.startswith("decoder_copy."):
            own = key[len("decoder_copy.") :]
            if own in out and not torch.equal(out[own], value):
                raise UserError(
                    f"checkpoint: {origin[own]} differs from the decoder's copy of it, {origin[key]} "
                    "(the reference ties them): not a checkpoint of this architecture"
                )
            out.setdefault(own, value)
            origin.setdefault(own, origin[key])
    return out


def _fill_tied(state: dict[str, Tensor], origin: dict[str, str], layers: int) -> dict[str, Tensor]:
    out = dict(state)
    for key in list(state):
        m = re.match(r"^(class_embed|bbox_embed)\.0\.(.+)$", key)
        for i in range(1, layers) if m else ():
            tied = f"{m.group(1)}.{i}.{m.group(2)}"
            if tied not in out:
                out[tied], origin[tied] = state[key], f"{origin[key]} (tied)"
    return out


def _share_heads(state: dict[str, Tensor], origin: dict[str, str]) -> dict[str, Tensor]:
    """class_embed.{i}.x / bbox_embed.{i}.x, all equal -> class_embed.x / bbox_embed.x."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^(class_embed|bbox_embed)\.(\d+)\.(.+)$", key)
        if not m:
            out[key] = value
            continue
        shared = f"{m.group(1)}.{m.group(3)}"
        if shared in out and not torch.equal(out[shared], value):
            raise UserError(
                f"checkpoint: {origin[key]} differs from layer 0's head, but the detector's heads are shared"
            )
        out.setdefault(shared, value)
        origin.setdefault(shared, origin[key])
    return out


# our names -> the original repositories' where they differ: RT-DETRv2 (rtdetrv2_pytorch) names its encoder's
# input projections and its query-selection projection (v1: positions)
_ORIGINAL_RTDETRV2 = [
    (r"^encoder\.input_proj\.(\d+)\.0\.", r"encoder.input_proj.\1.conv."),
    (r"^encoder\.input_proj\.(\d+)\.1\.", r"encoder.input_proj.\1.norm."),
    (r"^decoder\.enc_output\.0\.", "decoder.enc_output.proj."),
    (r"^decoder\.enc_output\.1\.", "decoder.enc_output.norm."),
]


_OURS_FROM_RTDETRV2 = [
    (r"^encoder\.input_proj\.(\d+)\.conv\.", r"encoder.input_proj.\1.0."),
    (r"^encoder\.input_proj\.(\d+)\.norm\.", r"encoder.input_proj.\1.1."),
    (r"^decoder\.enc_output\.proj\.", "decoder.enc_output.0."),
    (r"^decoder\.enc_output\.norm\.", "decoder.enc_output.1."),
]


def original_names(state: dict[str, Tensor], arch: str, rtdetr_version: int = 1) -> dict[str, Tensor]:
    """Our RT-DETR / D-FINE state dict under the original repository's names (what its trainer saves,
    less the copies and anchors `rename` drops on the way in)."""
    if arch != "rtdetr" or rtdetr_version != 2:
        return dict(state)
    out = {}
    for key, value in state.items():
        for pattern, repl in _ORIGINAL_RTDETRV2:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out

"""The real-time detectors' architecture (RT-DETR v1 / v2, D-FINE) as our model config: from
transformers' RTDetr / RTDetrV2 / DFine config.json, or from the original repositories' tensors (names
and shapes; what no tensor tells from `--set`, or one line naming it)."""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from clockdistill.weights.architecture import _RESNET_DEPTHS, _fail, _heads_and_points, _take

# transformers' RTDetrConfig values this import builds as the reference has them (another is refused)
_RTDETR_FIXED = (
    ("encode_proj_layers", [2]),
    ("feat_strides", [8, 16, 32]),
    ("num_feature_levels", 3),
    ("positional_encoding_temperature", 10000),
    ("encoder_activation_function", "gelu"),
    ("activation_function", "silu"),
    ("decoder_activation_function", "relu"),
    ("normalize_before", False),
    ("learn_initial_query", False),
    ("with_box_refine", True),
)


def hf_rtdetr(config: dict[str, Any], source: str) -> dict[str, Any]:
    _refuse_other(config, _RTDETR_FIXED, source, "RT-DETR")
    if config.get("encoder_attention_heads") != config.get("decoder_attention_heads"):
        raise _fail(source, "encoder_attention_heads and decoder_attention_heads differ; this import uses one count")
    enc_dim = config["encoder_hidden_dim"]
    if list(config.get("decoder_in_channels", [enc_dim] * 3)) != [enc_dim] * 3:
        raise _fail(source, f"decoder_in_channels {config.get('decoder_in_channels')} are not the encoder's {enc_dim}")
    backbone = config.get("backbone_config") or {}
    if backbone.get("downsample_in_bottleneck") or backbone.get("downsample_in_first_stage"):
        raise _fail(source, "a ResNet downsampling in its bottleneck's first conv or first stage is not ResNet-vd")
    return dict(
        arch="rtdetr",
        d_model=config["d_model"],
        nheads=config["decoder_attention_heads"],
        enc_layers=config["encoder_layers"],
        dec_layers=config["decoder_layers"],
        ffn_dim=config["decoder_ffn_dim"],
        encoder_dim=enc_dim,
        encoder_ffn_dim=config["encoder_ffn_dim"],
        expansion=float(config.get("hidden_expansion", 1.0)),
        depth_mult=1.0,  # transformers' CSPRep layers hold 3 RepVGG blocks
        dropout=float(config.get("dropout", 0.0)),
        num_queries=config["num_queries"],
        num_levels=3,
        n_points=config.get("decoder_n_points", 4),
        dn_number=config.get("num_denoising", 100),
        dn_label_noise=float(config.get("label_noise_ratio", 0.5)),
        dn_box_noise=float(config.get("box_noise_scale", 1.0)),
    )


# transformers' DFineConfig values this import builds as the reference's published models have them: RT-DETR's
# (but the levels, read from the config) and D-FINE's own
_DFINE_FIXED = (
    *_RTDETR_FIXED[3:],
    ("layer_scale", 1),
    ("top_prob_values", 4),
    ("lqe_hidden_dim", 64),
    ("lqe_layers", 2),
)


def _refuse_other(config: dict[str, Any], fixed, source: str, family: str) -> None:
    """One line naming the first config value this import does not build as the reference does."""
    for key, want in fixed:
        got = config.get(key, want)
        if (list(got) if isinstance(got, (list, tuple)) else got) != want:
            raise _fail(source, f"{key} is {got!r}; the {family} reference (and this import) uses {want!r}")


def hf_dfine(config: dict[str, Any], source: str) -> dict[str, Any]:
    _refuse_other(config, _DFINE_FIXED, source, "D-FINE")
    layers = config["decoder_layers"]
    if config.get("eval_idx", -1) not in (-1, layers - 1):
        raise _fail(source, f"eval_idx is {config.get('eval_idx')}; this import builds the last layer's (-1)")
    levels = config.get("num_feature_levels", 3)
    strides = [8, 16, 32][3 - levels :] if levels in (2, 3) else None
    if strides is None or list(config.get("feat_strides", strides)) != strides:
        raise _fail(source, f"feat_strides {config.get('feat_strides')}: expected [8, 16, 32] or [16, 32] (N)")
    if list(config.get("encode_proj_layers", [levels - 1])) != [levels - 1]:
        raise _fail(source, f"encode_proj_layers is {config.get('encode_proj_layers')}; AIFI runs on the last level")
    if config.get("encoder_attention_heads") != config.get("decoder_attention_heads"):
        raise _fail(source, "encoder_attention_heads and decoder_attention_heads differ; this import uses one count")
    enc_dim = config["encoder_hidden_dim"]
    if list(config.get("decoder_in_channels", [enc_dim] * levels)) != [enc_dim] * levels:
        raise _fail(source, f"decoder_in_channels {config.get('decoder_in_channels')} are not the encoder's {enc_dim}")
    points = config.get("decoder_n_points", 4)
    points = list(points) if isinstance(points, (list, tuple)) else [int(points)] * levels
    return dict(
        arch="dfine",
        d_model=config["d_model"],
        nheads=config["decoder_attention_heads"],
        enc_layers=config.get("encoder_layers", 1),
        dec_layers=layers,
        ffn_dim=config["decoder_ffn_dim"],
        encoder_dim=enc_dim,
        encoder_ffn_dim=config["encoder_ffn_dim"],
        expansion=float(config.get("hidden_expansion", 1.0)),
        depth_mult=float(config.get("depth_mult", 1.0)),
        dropout=float(config.get("dropout", 0.0)),
        num_queries=config["num_queries"],
        num_levels=levels,
        level_points=points,
        offset_scale=float(config.get("decoder_offset_scale", 0.5)),
        cross_attn_method=config.get("decoder_method", "default"),
        reg_max=int(config.get("max_num_bins", 32)),
        reg_scale=float(config.get("reg_scale", 4.0)),
        dn_number=config.get("num_denoising", 100),
        dn_label_noise=float(config.get("label_noise_ratio", 0.5)),
        dn_box_noise=float(config.get("box_noise_scale", 1.0)),
        **_hf_hgnet(config.get("backbone_config") or {}, levels, source),
    )


def _hf_hgnet(bb: dict[str, Any], levels: int, source: str) -> dict[str, Any]:
    """HGNetV2 name and width of a transformers HGNetV2Config: its stem and stage lists must be one of
    the reference's variants at one width (nothing else is built)."""

    if bb.get("model_type", "hgnet_v2") != "hgnet_v2":
        raise _fail(source, f"backbone {bb.get('model_type')!r} is not understood (D-FINE: hgnet_v2)")
    for key, want in (("hidden_act", "relu"), ("stem_strides", [2, 1, 1, 2, 1]), ("stage_downsample_strides", [2] * 4)):
        value = bb.get(key, want)
        if (list(value) if isinstance(value, (list, tuple)) else value) != want:
            raise _fail(source, f"backbone_config.{key} is {value!r}; HGNetV2 uses {want!r}")
    stages = [
        tuple(bb.get(k, []))
        for k in (
            "stage_in_channels",
            "stage_mid_channels",
            "stage_out_channels",
            "stage_num_blocks",
            "stage_downsample",
            "stage_light_block",
            "stage_kernel_size",
            "stage_numb_of_layers",
        )
    ]
    name, width = _match_hgnet(list(bb.get("stem_channels", [])), [tuple(s) for s in zip(*stages)], source)
    outs = list(bb.get("out_features") or [])
    want = ["stage2", "stage3", "stage4"][3 - levels :]
    if outs != want:
        raise _fail(source, f"backbone_config.out_features is {outs}; {levels} levels read {want}")
    return dict(hgnet=name, backbone_width=width, use_lab=bool(bb.get("use_learnable_affine_block", False)))


def _match_hgnet(stem: list[int], stages: list[tuple], source: str) -> tuple[str, float]:
    """(variant, width) of an HGNetV2 given as its stem channels [3, mid, out] and per stage (in, mid,
    out, blocks, downsample, light, kernel, layers): one of the reference's variants at one width, or
    a refusal (nothing else is built)."""
    from clockdistill.models.hgnetv2 import VARIANTS, variant

    for name, ((_, out), _) in VARIANTS.items():
        width = stem[2] / out if len(stem) == 3 else 0.0
        if width > 0 and ([3, *variant(name, width)[0]], variant(name, width)[1]) == (stem, stages):
            return name, width
    raise _fail(source, "the backbone is an HGNetV2 that is none of B0-B6 at one width")


def dfine_from_tensors(state: dict[str, Tensor], source: str, given: dict[str, Any]) -> dict[str, Any]:
    """A D-FINE of Peterande/D-FINE's layout read off its names and shapes: every size but what no
    tensor holds, the query count and the sampling method (`given`, or one line naming them); training
    settings (denoising, BatchNorm) keep the preset's."""
    keys = set(state)

    def count(pattern: str) -> int:
        return len({m.group(1) for k in keys if (m := re.match(pattern, k))})

    def shape(key: str, dim: int = 0) -> int:
        return state[key].shape[dim]

    stem = [3, shape("backbone.stem.stem1.conv.weight"), shape("backbone.stem.stem4.conv.weight")]
    stages = []
    for i in range(count(r"backbone\.stages\.(\d+)\.")):
        first = f"backbone.stages.{i}.blocks.0"
        light = f"{first}.layers.0.conv1.conv.weight" in keys
        conv = f"{first}.layers.0.conv2.conv.weight" if light else f"{first}.layers.0.conv.weight"
        stages.append(
            (
                shape(f"{first}.layers.0.conv1.conv.weight", 1) if light else shape(conv, 1),
                shape(conv),
                shape(f"{first}.aggregation.1.conv.weight"),
                count(rf"backbone\.stages\.{i}\.blocks\.(\d+)\."),
                f"backbone.stages.{i}.downsample.conv.weight" in keys,
                light,
                state[conv].shape[-1],
                count(rf"backbone\.stages\.{i}\.blocks\.0\.layers\.(\d+)\."),
            )
        )
    name, width = _match_hgnet(stem, stages, source)
    levels = count(r"encoder\.input_proj\.(\d+)\.")
    scale = state["decoder.decoder.layers.0.cross_attn.num_points_scale"].tolist()
    points = []
    while scale:  # 1 / n, n times, per level
        n = round(1 / scale[0])
        points.append(n)
        scale = scale[n:]
    d = shape("decoder.enc_output.proj.weight")
    enc = shape("encoder.input_proj.0.conv.weight")
    c4, blocks = (
        shape("encoder.fpn_blocks.0.cv2.1.conv.weight"),
        count(r"encoder\.fpn_blocks\.0\.cv2\.0\.bottlenecks\.(\d+)\."),
    )
    fields = dict(
        arch="dfine",
        hgnet=name,
        backbone_width=width,
        use_lab="backbone.stem.stem1.lab.scale" in keys,
        num_levels=levels,
        encoder_dim=enc,
        encoder_ffn_dim=shape("encoder.encoder.0.layers.0.linear1.weight"),
        enc_layers=count(r"encoder\.encoder\.0\.layers\.(\d+)\."),
        expansion=_fitting((2 * c4 / enc, (2 * c4 + 1) / enc), lambda e: round(e * enc // 2) == c4),
        depth_mult=_fitting((0.34, 0.5, 0.67, 1.0, blocks / 3), lambda m: round(3 * m) == blocks),
        d_model=d,
        ffn_dim=shape("decoder.decoder.layers.0.linear1.weight"),
        dec_layers=count(r"decoder\.decoder\.layers\.(\d+)\."),
        level_points=points,
        nheads=shape("decoder.decoder.layers.0.cross_attn.attention_weights.weight") // sum(points),
        reg_max=shape("decoder.dec_bbox_head.0.layers.2.weight") // 4 - 1,
        reg_scale=float(state["decoder.reg_scale"].reshape(-1)[0]),
    )
    missing: list[str] = []
    for key in ("num_queries", "cross_attn_method"):
        _take(given, key, missing, fields)
    if missing:
        raise _fail(
            source,
            f"the checkpoint holds no config, and its tensors do not tell {', '.join(missing)}; give them with "
            "--set (the published D-FINE: model.num_queries=300, model.cross_attn_method=default)",
        )
    return fields


def _fitting(candidates, builds) -> float:
    """The first of `candidates` (the published values first) that builds the tensors' block or channel
    count (`builds(value)`): a setting read back from what it builds."""
    return next(c for c in candidates if builds(c))


def rtdetr_from_tensors(state: dict[str, Tensor], source: str, given: dict[str, Any]) -> dict[str, Any]:
    """An RT-DETR (rtdetr_pytorch) or RT-DETRv2 (rtdetrv2_pytorch: its attention's `num_points_scale`)
    read off its names and shapes (v2's under ours: `rename` first); what no tensor holds from `given`
    or one line naming it: the query count, v1's heads or points (the offsets hold their product),
    v2's sampling method. Training settings (denoising, BatchNorm) keep the preset's."""
    keys, missing = set(state), []

    def count(pattern: str) -> int:
        return len({m.group(1) for k in keys if (m := re.match(pattern, k))})

    def shape(key: str, dim: int = 0) -> int:
        return state[key].shape[dim]

    blocks = tuple(count(rf"backbone\.res_layers\.{i}\.blocks\.(\d+)\.") for i in range(4))
    kind = "bottleneck" if "backbone.res_layers.0.blocks.0.branch2c.conv.weight" in keys else "basic"
    depth = _RESNET_DEPTHS.get((kind, blocks))
    if depth is None:
        raise _fail(source, f"a {kind} ResNet-vd with {list(blocks)} blocks is not R18/34/50/101")
    enc, levels = shape("encoder.input_proj.0.0.weight"), count(r"decoder\.input_proj\.(\d+)\.")
    h = shape("encoder.fpn_blocks.0.conv1.conv.weight")  # int(width x expansion)
    fields = dict(
        arch="rtdetr",
        backbone_depth=depth,
        backbone_width=shape("backbone.conv1.conv1_3.conv.weight") / 64,
        encoder_dim=enc,
        encoder_ffn_dim=shape("encoder.encoder.0.layers.0.linear1.weight"),
        enc_layers=count(r"encoder\.encoder\.0\.layers\.(\d+)\."),
        expansion=_fitting((h / enc, (h + 0.5) / enc), lambda e: int(enc * e) == h),
        depth_mult=count(r"encoder\.fpn_blocks\.0\.bottlenecks\.(\d+)\.") / 3,  # round(3 x depth_mult) = blocks
        d_model=shape("decoder.input_proj.0.conv.weight"),
        ffn_dim=shape("decoder.decoder.layers.0.linear1.weight"),
        dec_layers=count(r"decoder\.decoder\.layers\.(\d+)\."),
        num_levels=levels,
    )
    attn = "decoder.decoder.layers.0.cross_attn."
    if f"{attn}num_points_scale" in keys:  # v2: the points of every level are in its scale buffer
        scale, points = state[f"{attn}num_points_scale"].tolist(), []
        while scale:
            points.append(round(1 / scale[0]))
            scale = scale[points[-1] :]
        fields.update(
            rtdetr_version=2, level_points=points, nheads=shape(f"{attn}attention_weights.weight") // sum(points)
        )
        _take(given, "cross_attn_method", missing, fields)
    else:
        fields.update(_heads_and_points(shape(f"{attn}attention_weights.weight") // levels, given, missing, source))
    _take(given, "num_queries", missing, fields)
    if missing:
        raise _fail(
            source,
            f"the checkpoint holds no config, and its tensors do not tell {', '.join(missing)}; give them with --set "
            "(the published RT-DETR: model.num_queries=300, model.nheads=8; v2: model.cross_attn_method=default)",
        )
    return fields

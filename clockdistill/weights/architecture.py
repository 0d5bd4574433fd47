"""A checkpoint's architecture as our model config: from a Hugging Face config.json, from the
training arguments an original checkpoint carries, or from the tensors' names and shapes."""

from __future__ import annotations

import math
import re
from typing import Any

from torch import Tensor

from clockdistill.errors import UserError

_RESNET_DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
}


def _fail(source: str, what: str) -> UserError:
    return UserError(f"{source}: {what}")


def from_hf_config(config: dict[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """(arch, model fields) of a transformers DeformableDetr / DabDetr config.json."""
    kind = config.get("model_type")
    if kind == "deformable_detr":
        if config.get("encoder_ffn_dim") != config.get("decoder_ffn_dim"):
            raise _fail(source, "encoder_ffn_dim and decoder_ffn_dim differ; the reference uses one width")
        if config.get("encoder_n_points") != config.get("decoder_n_points"):
            raise _fail(source, "encoder_n_points and decoder_n_points differ; the reference uses one count")
        fields = dict(
            arch="deformable",
            d_model=config["d_model"],
            nheads=config["encoder_attention_heads"],
            enc_layers=config["encoder_layers"],
            dec_layers=config["decoder_layers"],
            ffn_dim=config["encoder_ffn_dim"],
            dropout=float(config.get("dropout", 0.1)),
            num_queries=config["num_queries"],
            num_levels=config["num_feature_levels"],
            n_points=config["encoder_n_points"],
            box_refine=bool(config.get("with_box_refine")),
            two_stage=bool(config.get("two_stage")),
            dilation=bool(config.get("dilation")),
        )
        if fields["two_stage"]:  # its queries are the top proposals
            fields["num_queries"] = int(config.get("two_stage_num_proposals", fields["num_queries"]))
    elif kind in ("dab-detr", "dab_detr"):
        for key, want in (
            ("activation_function", "prelu"),
            ("num_patterns", 0),
            ("query_dim", 4),
            ("keep_query_pos", False),
            ("temperature_height", 20),
            ("temperature_width", 20),
            ("normalize_before", False),
        ):
            if config.get(key, want) != want:
                raise _fail(
                    source, f"{key} is {config.get(key)!r}; the DAB-DETR reference (and this import) uses {want!r}"
                )
        fields = dict(
            arch="dab",
            d_model=config["hidden_size"],
            nheads=config["encoder_attention_heads"],
            enc_layers=config["encoder_layers"],
            dec_layers=config["decoder_layers"],
            ffn_dim=config["encoder_ffn_dim"],
            dropout=float(config.get("dropout", 0.0)),
            num_queries=config["num_queries"],
            num_levels=1,
            dilation=bool(config.get("dilation")),
        )
    elif kind in ("rt_detr", "rt_detr_v2"):
        fields = _hf_rtdetr(config, source)
        if kind == "rt_detr_v2":  # its decoder attention: every level n_points, an offset scale, a sampling method
            if config.get("decoder_n_levels", 3) != 3:
                raise _fail(source, f"decoder_n_levels is {config.get('decoder_n_levels')}; the memory has 3 levels")
            fields.update(
                rtdetr_version=2,
                level_points=[fields["n_points"]] * 3,
                offset_scale=float(config.get("decoder_offset_scale", 0.5)),
                cross_attn_method=config.get("decoder_method", "default"),
            )
    elif kind == "d_fine":
        return "dfine", _hf_dfine(config, source)
    else:
        raise _fail(
            source,
            f"model_type {kind!r} is not understood "
            "(expected deformable_detr, dab-detr, rt_detr, rt_detr_v2 or d_fine)",
        )
    fields.update(_hf_backbone(config, source))
    return fields["arch"], fields


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


def _hf_rtdetr(config: dict[str, Any], source: str) -> dict[str, Any]:
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


def _hf_dfine(config: dict[str, Any], source: str) -> dict[str, Any]:
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
    missing = [f"model.{k}" for k in ("num_queries", "cross_attn_method") if k not in given]
    if missing:
        raise _fail(
            source,
            f"the checkpoint holds no config, and its tensors do not tell {', '.join(missing)}; give them with "
            "--set (the published D-FINE: model.num_queries=300, model.cross_attn_method=default)",
        )
    return dict(fields, num_queries=given["num_queries"], cross_attn_method=given["cross_attn_method"])


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


def _hf_backbone(config: dict[str, Any], source: str) -> dict[str, Any]:
    backbone = config.get("backbone_config") or {}
    if config.get("use_timm_backbone", not backbone):
        name = str(config.get("backbone", "resnet50"))
        depth = re.fullmatch(r"resnet(18|34|50|101)", name)
        if not depth:
            raise _fail(source, f"backbone {name!r} is not understood (expected resnet18/34/50/101)")
        return dict(backbone_depth=int(depth.group(1)), backbone_width=1.0)
    layer_type, depths = backbone.get("layer_type", "bottleneck"), tuple(backbone.get("depths", ()))
    depth = _RESNET_DEPTHS.get((layer_type, depths))
    if depth is None:
        raise _fail(source, f"a {layer_type} ResNet with depths {list(depths)} is not ResNet-18/34/50/101")
    embedding = int(backbone.get("embedding_size", 64))
    return dict(backbone_depth=depth, backbone_width=embedding / 64)


# settings of the original repositories this import builds as they are (another value of one is
# refused, naming it): the published models' values, absent keys taken as those
_FIXED_ARGS: dict[str, tuple[tuple[str, Any], ...]] = {
    "deformable_detr": (("position_embedding", "sine"), ("masks", False)),
    "dab_detr": (
        ("position_embedding", "sine"),
        ("masks", False),
        ("transformer_activation", "prelu"),
        ("num_patterns", 0),
        ("pre_norm", False),
        ("pe_temperatureH", 20),
        ("pe_temperatureW", 20),
    ),
}


def from_args(args: Any, source: str) -> tuple[str, dict[str, Any]]:
    """(arch, model fields) from an original checkpoint's training arguments (argparse Namespace)."""
    a = vars(args)
    name = a.get("modelname", "deformable_detr")
    if name not in ("deformable_detr", "dab_detr", "dino"):
        raise _fail(source, f"args.modelname is {name!r}; this import builds deformable_detr, dab_detr and dino")
    depth = re.fullmatch(r"resnet(18|34|50|101)", str(a.get("backbone", "resnet50")))
    if not depth:
        raise _fail(source, f"args.backbone {a.get('backbone')!r} is not a ResNet-18/34/50/101")
    for key, want in _FIXED_ARGS.get(name, ()):
        if a.get(key, want) != want:
            raise _fail(source, f"args.{key} is {a.get(key)!r}; the {name} this import builds uses {want!r}")
    scale = a.get("position_embedding_scale", 2 * math.pi)
    if abs(scale - 2 * math.pi) > 1e-6:
        raise _fail(source, f"args.position_embedding_scale is {scale!r}; this import builds 2 pi (the default)")
    common = dict(
        d_model=a["hidden_dim"],
        nheads=a["nheads"],
        enc_layers=a["enc_layers"],
        dec_layers=a["dec_layers"],
        ffn_dim=a["dim_feedforward"],
        dropout=float(a["dropout"]),
        num_queries=a["num_queries"],
        dilation=bool(a.get("dilation", False)),
        backbone_depth=int(depth.group(1)),
        backbone_width=1.0,
    )
    if name == "dab_detr":
        return "dab", dict(common, arch="dab", num_levels=1)
    points = _one_point_count(a, name, source)
    if name == "dino":
        return "dino", dict(common, n_points=points, **_dino_args(a, source))
    return "deformable", dict(
        common,
        arch="deformable",
        num_levels=a["num_feature_levels"],
        n_points=points,
        box_refine=bool(a.get("with_box_refine")),
        two_stage=bool(a.get("two_stage")),
    )


def _one_point_count(a: dict[str, Any], name: str, source: str) -> int:
    enc, dec = a.get("enc_n_points", 4), a.get("dec_n_points", 4)
    if enc != dec:
        raise _fail(
            source,
            f"args.enc_n_points ({enc}) and args.dec_n_points ({dec}) differ; the {name} this import builds "
            "samples as many points in the encoder as in the decoder (model.n_points)",
        )
    return enc


_DINO_FIXED = (  # the published DINO models' settings (config/DINO/DINO_4scale.py): what this import builds
    ("two_stage_type", "standard"),
    ("two_stage_add_query_num", 0),
    ("two_stage_pat_embed", 0),
    ("two_stage_learn_wh", False),
    ("two_stage_keep_all_tokens", False),
    ("two_stage_bbox_embed_share", False),
    ("two_stage_class_embed_share", False),
    ("dec_pred_bbox_embed_share", True),
    ("dec_pred_class_embed_share", True),
    ("decoder_sa_type", "sa"),
    ("embed_init_tgt", True),
    ("num_patterns", 0),
    ("transformer_activation", "relu"),
    ("pe_temperatureH", 20),
    ("pe_temperatureW", 20),
)
_DINO_BACKBONE_LEVELS = {(1, 2, 3): 3, (0, 1, 2, 3): 4}  # return_interm_indices: 4-scale, 5-scale


def _dino_args(a: dict[str, Any], source: str) -> dict[str, Any]:
    for key, want in _DINO_FIXED:
        if a.get(key, want) != want:
            raise _fail(source, f"args.{key} is {a.get(key)!r}; the DINO this import builds uses {want!r}")
    levels = _DINO_BACKBONE_LEVELS.get(tuple(a.get("return_interm_indices", (1, 2, 3))))
    if levels is None:
        raise _fail(
            source,
            f"args.return_interm_indices is {a.get('return_interm_indices')!r}; expected [1, 2, 3] (4-scale) "
            "or [0, 1, 2, 3] (5-scale)",
        )
    return dict(
        arch="dino",
        backbone_levels=levels,
        num_levels=a["num_feature_levels"],
        dn_number=int(a.get("dn_number", 100)) if a.get("use_dn", True) else 0,
        dn_box_noise=float(a.get("dn_box_noise_scale", 0.4)),
        dn_label_noise=float(a.get("dn_label_noise_ratio", 0.5)),
    )


# what the published models use, for the refusal's example
_PUBLISHED = {
    "deformable": "Deformable DETR models: nheads=8, n_points=4, num_queries=300",
    "dino": "DINO models: nheads=8, n_points=4",
    "dab": "DAB-DETR models: nheads=8",
}


def from_tensors(state: dict[str, Tensor], source: str, given: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(arch, model fields) read off an original checkpoint's names and shapes (no args in it).

    What no tensor holds is taken from `given` (the import's `--set model.KEY=...`), or the import
    stops with one line naming every such key: Deformable DETR's and DINO's heads and sampling
    points (the offsets hold only their product: set either), DAB-DETR's heads, every model's
    dilation (DC5), and a two-stage model's query count. Dropout and DINO's denoising settings, which
    change training only, keep the preset's (the references' training defaults) unless given."""
    keys = set(state)
    missing: list[str] = []

    def count(pattern: str) -> int:
        return len({m.group(1) for k in keys if (m := re.match(pattern, k))})

    if "transformer.level_embed" in keys:  # a deformable encoder: Deformable DETR or DINO
        levels, d = state["transformer.level_embed"].shape
        offsets = state["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"].shape[0]
        fields = dict(
            d_model=d,
            num_levels=levels,
            enc_layers=count(r"transformer\.encoder\.layers\.(\d+)\."),
            dec_layers=count(r"transformer\.decoder\.layers\.(\d+)\."),
            ffn_dim=state["transformer.encoder.layers.0.linear1.weight"].shape[0],
            **_heads_and_points(offsets // (levels * 2), given, missing, source),
        )
        if "transformer.tgt_embed.weight" in keys and "label_enc.weight" in keys:
            fields.update(
                arch="dino",
                num_queries=state["transformer.tgt_embed.weight"].shape[0],
                # the backbone maps are the 1x1 input projections (C2-C5 for 5-scale, C3-C5 for 4-scale)
                backbone_levels=sum(
                    1 for k, v in state.items() if re.fullmatch(r"input_proj\.\d+\.0\.weight", k) and v.shape[-1] == 1
                ),
            )
        else:
            fields.update(
                arch="deformable",
                box_refine=any(k.startswith("transformer.decoder.bbox_embed.") for k in keys),
                two_stage="transformer.enc_output.weight" in keys,
            )
            if not fields["two_stage"]:
                fields["num_queries"] = state["query_embed.weight"].shape[0]
            else:  # its queries are the top proposals, a count no tensor holds
                _take(given, "num_queries", missing, fields)
    elif "refpoint_embed.weight" in keys:  # DAB-DETR: standard attention, whose weights do not tell the heads
        fields = dict(
            arch="dab",
            d_model=state["input_proj.weight"].shape[0],
            num_levels=1,
            enc_layers=count(r"transformer\.encoder\.layers\.(\d+)\."),
            dec_layers=count(r"transformer\.decoder\.layers\.(\d+)\."),
            ffn_dim=state["transformer.encoder.layers.0.linear1.weight"].shape[0],
            num_queries=state["refpoint_embed.weight"].shape[0],
        )
        _take(given, "nheads", missing, fields)
    else:
        raise _fail(
            source,
            "not a Deformable DETR, DAB-DETR or DINO checkpoint (no transformer.level_embed or refpoint_embed)",
        )
    _take(given, "dilation", missing, fields)
    if missing:
        raise _fail(
            source,
            f"the checkpoint holds no training args, and its tensors do not tell {', '.join(missing)}; "
            f"give them with --set (the published {_PUBLISHED[fields['arch']]}, dilation=false, or true for DC5)",
        )
    fields.update(
        resnet_from_tensors(
            {k[len("backbone.0.body.") :]: v for k, v in state.items() if k.startswith("backbone.0.body.")}, source
        )
    )
    return fields["arch"], fields


def _take(given: dict[str, Any], key: str, missing: list[str], fields: dict[str, Any]) -> None:
    if key in given:
        fields[key] = given[key]
    else:
        missing.append(f"model.{key}")


def _heads_and_points(product: int, given: dict[str, Any], missing: list[str], source: str) -> dict[str, int]:
    """nheads and n_points from their product (the sampling offsets' rows per level and x/y) and
    the one of them that `given` holds."""
    for key, other in (("nheads", "n_points"), ("n_points", "nheads")):
        if key in given:
            value = given[key]
            if not isinstance(value, int) or value < 1 or product % value:
                raise _fail(
                    source,
                    f"model.{key}={value!r} does not divide the checkpoint's {product} heads x points per level",
                )
            return {key: value, other: product // value}
    missing.append(f"model.nheads or model.n_points (their product: {product})")
    return {}


def resnet_from_tensors(trunk: dict[str, Tensor], source: str) -> dict[str, Any]:
    """backbone_depth and backbone_width of a torchvision-layout ResNet trunk."""
    if "conv1.weight" not in trunk:
        raise _fail(source, "no ResNet backbone found (expected conv1.weight under the backbone)")
    blocks = tuple(len({k.split(".")[1] for k in trunk if k.startswith(f"layer{i}.")}) for i in (1, 2, 3, 4))
    kind = "bottleneck" if "layer1.0.conv3.weight" in trunk else "basic"
    depth = _RESNET_DEPTHS.get((kind, blocks))
    if depth is None:
        raise _fail(source, f"a {kind} ResNet with {list(blocks)} blocks is not ResNet-18/34/50/101")
    return dict(backbone_depth=depth, backbone_width=trunk["conv1.weight"].shape[0] / 64)

"""A checkpoint's architecture as our model config: from a Hugging Face config.json, from the
training arguments an original checkpoint carries, or from the tensors' names and shapes. The
real-time detectors' (RT-DETR, D-FINE) readers are in realtime_architecture.py."""

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
        from clockdistill.weights.realtime_architecture import hf_rtdetr

        fields = hf_rtdetr(config, source)
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
        from clockdistill.weights.realtime_architecture import hf_dfine

        return "dfine", hf_dfine(config, source)
    else:
        raise _fail(
            source,
            f"model_type {kind!r} is not understood "
            "(expected deformable_detr, dab-detr, rt_detr, rt_detr_v2 or d_fine)",
        )
    fields.update(_hf_backbone(config, source))
    return fields["arch"], fields


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

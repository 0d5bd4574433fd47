"""A checkpoint's architecture as our model config: from a Hugging Face config.json, from the
training arguments an original checkpoint carries, or from the tensors' names and shapes."""

from __future__ import annotations

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
    else:
        raise _fail(source, f"model_type {kind!r} is not understood (expected deformable_detr or dab-detr)")
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


def from_args(args: Any, source: str) -> tuple[str, dict[str, Any]]:
    """(arch, model fields) from an original checkpoint's training arguments (argparse Namespace)."""
    a = vars(args)
    name = a.get("modelname", "deformable_detr")
    depth = re.fullmatch(r"resnet(18|34|50|101)", str(a.get("backbone", "resnet50")))
    if not depth:
        raise _fail(source, f"args.backbone {a.get('backbone')!r} is not a ResNet-18/34/50/101")
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
        if a.get("transformer_activation", "prelu") != "prelu" or a.get("num_patterns", 0):
            raise _fail(source, "only DAB-DETR with PReLU and no patterns (the published models) is supported")
        return "dab", dict(common, arch="dab", num_levels=1)
    if name == "dino":
        return "dino", dict(common, **_dino_args(a, source))
    if name != "deformable_detr" or a.get("dec_n_points", 4) != a.get("enc_n_points", 4):
        raise _fail(source, f"args: {name} with these settings is not understood")
    return "deformable", dict(
        common,
        arch="deformable",
        num_levels=a["num_feature_levels"],
        n_points=a["enc_n_points"],
        box_refine=bool(a.get("with_box_refine")),
        two_stage=bool(a.get("two_stage")),
    )


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
    if a.get("dec_n_points", 4) != a.get("enc_n_points", 4):
        raise _fail(source, "args: enc_n_points and dec_n_points differ; DINO's reference uses one count")
    return dict(
        arch="dino",
        backbone_levels=levels,
        num_levels=a["num_feature_levels"],
        n_points=a["enc_n_points"],
        dn_number=int(a.get("dn_number", 100)) if a.get("use_dn", True) else 0,
        dn_box_noise=float(a.get("dn_box_noise_scale", 0.4)),
        dn_label_noise=float(a.get("dn_label_noise_ratio", 0.5)),
    )


def from_tensors(state: dict[str, Tensor], source: str) -> tuple[str, dict[str, Any]]:
    """(arch, model fields) read off an original checkpoint's names and shapes (no args in it).
    Deformable DETR's and DINO's head count assumes the reference's 4 sampling points; what no tensor holds
    keeps the reference's default: dilation (set model.dilation for a DC5 model), dropout, and a
    two-stage model's proposal count (model.num_queries, 300)."""
    keys = set(state)

    def count(pattern: str) -> int:
        return len({m.group(1) for k in keys if (m := re.match(pattern, k))})

    if "transformer.level_embed" in keys:  # a deformable encoder: Deformable DETR or DINO
        levels, d = state["transformer.level_embed"].shape
        offsets = state["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"].shape[0]
        fields = dict(
            d_model=d,
            num_levels=levels,
            n_points=4,
            nheads=offsets // (levels * 4 * 2),
            enc_layers=count(r"transformer\.encoder\.layers\.(\d+)\."),
            dec_layers=count(r"transformer\.decoder\.layers\.(\d+)\."),
            ffn_dim=state["transformer.encoder.layers.0.linear1.weight"].shape[0],
        )
        if "transformer.tgt_embed.weight" in keys and "label_enc.weight" in keys:
            fields.update(
                arch="dino",
                num_queries=state["transformer.tgt_embed.weight"].shape[0],
                dropout=0.0,
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
    elif "refpoint_embed.weight" in keys:
        raise _fail(
            source,
            "a DAB-DETR checkpoint without its args cannot tell its head count; "
            "give --set model.nheads=N (and the other keys) or use a checkpoint with args",
        )
    else:
        raise _fail(
            source,
            "not a Deformable DETR, DAB-DETR or DINO checkpoint (no transformer.level_embed or refpoint_embed)",
        )
    fields.update(
        resnet_from_tensors(
            {k[len("backbone.0.body.") :]: v for k, v in state.items() if k.startswith("backbone.0.body.")}, source
        )
    )
    return fields["arch"], fields


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

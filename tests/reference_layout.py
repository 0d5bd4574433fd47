"""Our detector's tensors and config as an original-repository checkpoint carries them
(fundamentalvision/Deformable-DETR, IDEA-Research/DAB-DETR, IDEA-Research/DINO): for the import
tests and the parity benchmark (tests/bench/parity_reference.py)."""

from __future__ import annotations

import argparse

import torch


def original_layout(state: dict, cfg: dict) -> dict:
    """Our tensors under the reference repositories' names (the inverse of the published rename
    rules): backbone.0.body., transformer., the heads listed once per decoder layer when shared and
    again as the decoder's copies (box refinement, two-stage, DAB-DETR's shared box head)."""
    out, m = {}, cfg["model"]
    shared = m["arch"] == "dino" or (m["arch"] == "deformable" and not m["box_refine"])  # one head, every layer
    for key, value in state.items():
        if key.startswith("backbone."):
            out["backbone.0.body." + key[len("backbone.") :]] = value
        elif key.split(".")[0] in (
            "encoder",
            "decoder",
            "level_embed",
            "reference_points",
            "enc_output",
            "enc_output_norm",
            "pos_trans",
            "pos_trans_norm",
            "tgt_embed",
            "enc_out_class_embed",
            "enc_out_bbox_embed",
        ):
            out["transformer." + key] = value
        elif shared and key.startswith(("class_embed.", "bbox_embed.")):
            head, rest = key.split(".", 1)
            for i in range(m["dec_layers"]):  # one module listed once per layer
                out[f"{head}.{i}.{rest}"] = value
        else:
            out[key] = value
    for key, value in list(out.items()):
        copies = m["arch"] == "dab" and key.startswith("bbox_embed.")
        copies |= m["arch"] == "deformable" and m["box_refine"] and key.startswith("bbox_embed.")
        copies |= m["arch"] == "deformable" and m["two_stage"] and key.startswith("class_embed.")
        copies |= m["arch"] == "dino" and key.startswith(("class_embed.", "bbox_embed."))
        if copies:
            out["transformer.decoder." + key] = value.clone()
    return out


def reference_args(cfg: dict) -> argparse.Namespace:
    """The training arguments an original checkpoint carries (main.py's names)."""
    m = cfg["model"]
    args = dict(
        backbone=f"resnet{m['backbone_depth']}",
        dilation=m["dilation"],
        hidden_dim=m["d_model"],
        nheads=m["nheads"],
        enc_layers=m["enc_layers"],
        dec_layers=m["dec_layers"],
        dim_feedforward=m["ffn_dim"],
        dropout=m["dropout"],
        num_queries=m["num_queries"],
        lr=2e-4,
        epochs=50,
    )
    if m["arch"] == "dab":
        args.update(modelname="dab_detr", transformer_activation="prelu", num_patterns=0)
    elif m["arch"] == "dino":
        args.update(
            modelname="dino",
            num_feature_levels=m["num_levels"],
            enc_n_points=m["n_points"],
            dec_n_points=m["n_points"],
            return_interm_indices=[0, 1, 2, 3] if m["backbone_levels"] == 4 else [1, 2, 3],
            two_stage_type="standard",
            two_stage_add_query_num=0,
            two_stage_pat_embed=0,
            two_stage_learn_wh=False,
            two_stage_keep_all_tokens=False,
            two_stage_bbox_embed_share=False,
            two_stage_class_embed_share=False,
            dec_pred_bbox_embed_share=True,
            dec_pred_class_embed_share=True,
            decoder_sa_type="sa",
            embed_init_tgt=True,
            num_patterns=0,
            transformer_activation="relu",
            pe_temperatureH=20,
            pe_temperatureW=20,
            use_dn=True,
            dn_number=m["dn_number"],
            dn_box_noise_scale=m["dn_box_noise"],
            dn_label_noise_ratio=m["dn_label_noise"],
            dn_labelbook_size=m["dn_labelbook"] or m["num_classes"],
        )
    else:
        args.update(
            num_feature_levels=m["num_levels"],
            enc_n_points=m["n_points"],
            dec_n_points=m["n_points"],
            with_box_refine=m["box_refine"],
            two_stage=m["two_stage"],
        )
    return argparse.Namespace(**args)


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Move every parameter and BatchNorm statistic off its initial value: a fresh model's zero-initialised
    layers (sampling offsets, attention weights, the box head's last layer) would hide mapping errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.mul_(torch.exp(torch.randn(b.shape, generator=g) * 0.2))
            elif name.endswith("running_mean"):
                b.add_(torch.randn(b.shape, generator=g) * 0.1)

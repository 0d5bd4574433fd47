"""Deformable DETR (plain, box refinement, two-stage) and DAB-DETR equal their reference
implementations, with transformers' ports as the oracle: tiny random models, every tensor perturbed
(a fresh model's zero-initialised layers would hide mapping errors), saved as Hugging Face
directories and as original-repository checkpoints, imported, and compared layer by layer on a
batch where one image is padded. Nothing is downloaded."""

from __future__ import annotations

import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is the oracle")

from reference_layout import original_layout, perturb, reference_args  # noqa: E402

from clockdistill.checkpoint import load_detector  # noqa: E402
from clockdistill.errors import UserError  # noqa: E402
from clockdistill.weights.importer import import_checkpoint  # noqa: E402

TOL = 1e-4
SIZE = 128
D = 64


def _resnet_config(stages=("stage2", "stage3", "stage4"), depth: int = 18, width: float = 0.25):
    """Hugging Face's ResNet as our backbone_depth / backbone_width (default: ResNet-18 at width 0.25)."""
    expansion = 1 if depth < 50 else 4
    return transformers.ResNetConfig(
        embedding_size=int(64 * width),
        hidden_sizes=[int(64 * width * expansion * 2**i) for i in range(4)],
        depths={18: [2, 2, 2, 2], 50: [3, 4, 6, 3]}[depth],
        layer_type="basic" if depth < 50 else "bottleneck",
        out_features=list(stages),
    )


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, SIZE, SIZE, generator=g)
    valid = torch.ones(2, SIZE, SIZE, dtype=torch.long)
    valid[1, 96:, :] = 0  # the second image is 96 x 112: padded below and to the right
    valid[1, :, 112:] = 0
    images[1] *= valid[1]
    return images, valid


def _compare(ours, theirs, memory_theirs) -> float:
    """max |difference| over the memory and every decoder layer's logits and boxes."""
    layers_o = [*ours["aux_outputs"], ours]
    layers_t = [*theirs.auxiliary_outputs, {"logits": theirs.logits, "pred_boxes": theirs.pred_boxes}]
    assert len(layers_o) == len(layers_t)
    diffs = [(ours["memory"] - memory_theirs).abs().max().item()]
    for o, t in zip(layers_o, layers_t):
        diffs.append((o["pred_logits"] - t["logits"]).abs().max().item())
        diffs.append((o["pred_boxes"] - t["pred_boxes"]).abs().max().item())
    return max(diffs)


def _hf_deformable(variant: str, backbone=None):
    torch.manual_seed(0)
    cfg = transformers.DeformableDetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=backbone or _resnet_config(),
        d_model=D,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=10,
        num_labels=3,
        num_feature_levels=4,
        auxiliary_loss=True,
        two_stage_num_proposals=10,
        with_box_refine=variant != "plain",
        two_stage=variant == "two-stage",
        tie_word_embeddings=variant == "plain",
        dropout=0.0,
    )
    model = transformers.DeformableDetrForObjectDetection(cfg).eval()
    perturb(model)
    # The reference shares one module between the model's heads and the decoder's refinement (and,
    # two-stage, its proposal scoring); transformers keeps two copies, tied only with
    # tie_word_embeddings, which would also tie the heads of different layers. Equal copies it is.
    with torch.no_grad():
        for name in ("bbox_embed", "class_embed"):
            copy = getattr(model.model.decoder, name, None)
            if copy is not None:
                copy.load_state_dict(getattr(model, name).state_dict())
    return model


def _hf_dab():
    torch.manual_seed(0)
    cfg = transformers.DabDetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=_resnet_config(["stage4"]),
        hidden_size=D,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=10,
        num_labels=3,
        auxiliary_loss=True,
        dropout=0.0,
    )
    model = transformers.DabDetrForObjectDetection(cfg).eval()
    perturb(model)
    return model


def _run_both(hf_model, ours, images, valid):
    # transformers returns the per-layer (auxiliary) outputs with a loss only: some labels for it
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])} for _ in range(2)]
    with torch.no_grad():
        theirs = hf_model(pixel_values=images, pixel_mask=valid, labels=labels, output_hidden_states=True)
        out = ours(images, valid == 0)
    return out, theirs


@pytest.mark.parametrize("variant", ["plain", "refine", "two-stage"])
def test_deformable_detr_equals_transformers_from_both_layouts(variant, tmp_path):
    hf = _hf_deformable(variant)
    hf.save_pretrained(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "ours")
    ours, meta = load_detector(tmp_path / "ours")
    assert meta["config"]["model"]["arch"] == "deformable"
    assert meta["config"]["model"]["box_refine"] == (variant != "plain")
    assert meta["config"]["model"]["two_stage"] == (variant == "two-stage")
    images, valid = _batch()
    out, theirs = _run_both(hf, ours, images, valid)
    diff = _compare(out, theirs, theirs.encoder_last_hidden_state)
    print(f"deformable-detr {variant}: max |ours - transformers| {diff:.1e}")
    assert diff < TOL, diff
    if variant == "two-stage":
        enc = (out["enc_outputs"]["pred_logits"] - theirs.enc_outputs_class).abs().max().item()
        assert enc < TOL, enc


def test_dab_detr_equals_transformers(tmp_path):
    hf = _hf_dab()
    hf.save_pretrained(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "ours")
    ours, meta = load_detector(tmp_path / "ours")
    assert meta["config"]["model"]["arch"] == "dab"
    images, valid = _batch()
    out, theirs = _run_both(hf, ours, images, valid)
    diff = _compare(out, theirs, theirs.encoder_last_hidden_state)
    print(f"dab-detr: max |ours - transformers| {diff:.1e}")
    assert diff < TOL, diff


def test_a_hub_checkpoint_with_a_timm_backbone_imports(tmp_path):
    """The published hub checkpoints were made with timm's ResNet: its tensors under torchvision's
    names below conv_encoder.model, and only the backbone's name in config.json. Written here from a
    model built with Hugging Face's ResNet (a full-width ResNet-18: the name fixes the width)."""
    import json

    from safetensors.torch import load_file, save_file

    from clockdistill.weights.backbone import hf_resnet_to_torchvision

    hf = _hf_deformable("refine", backbone=_resnet_config(width=1.0))  # a full-width ResNet-18
    hf.save_pretrained(tmp_path / "hf")
    prefix = "model.backbone.conv_encoder.model."
    timm = {}
    for key, value in load_file(tmp_path / "hf" / "model.safetensors").items():
        if key.startswith(prefix):
            name = hf_resnet_to_torchvision(key[len(prefix) :])
            assert name is not None, key
            key = prefix + name
        timm[key] = value
    assert f"{prefix}layer4.1.bn2.running_var" in timm and f"{prefix}layer2.0.downsample.0.weight" in timm
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(timm, hub / "model.safetensors")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update(use_timm_backbone=True, backbone="resnet18", backbone_config=None)
    (hub / "config.json").write_text(json.dumps(config))
    meta = import_checkpoint(hub, tmp_path / "ours")
    assert meta["config"]["model"]["backbone_depth"] == 18 and meta["config"]["model"]["backbone_width"] == 1.0
    ours, _ = load_detector(tmp_path / "ours")
    images, valid = _batch()
    out, theirs = _run_both(hf, ours, images, valid)
    diff = _compare(out, theirs, theirs.encoder_last_hidden_state)
    print(f"deformable-detr refine, timm-layout backbone: max |ours - transformers| {diff:.1e}")
    assert diff < TOL, diff


@pytest.mark.parametrize("model_name", ["deformable-plain", "deformable-two-stage", "dab"])
@pytest.mark.parametrize("with_args", [True, False], ids=["with-args", "weights-only"])
def test_original_repository_checkpoints_import_to_the_same_model(model_name, with_args, tmp_path):
    from safetensors.torch import load_file

    hf = _hf_dab() if model_name == "dab" else _hf_deformable(model_name.split("-", 1)[1])
    hf.save_pretrained(tmp_path / "hf")
    meta = import_checkpoint(tmp_path / "hf", tmp_path / "via-hf")
    state = original_layout(load_file(tmp_path / "via-hf" / "model.safetensors"), meta["config"])
    checkpoint = {"model": state, "epoch": 49, **({"args": reference_args(meta["config"])} if with_args else {})}
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    overrides = []
    if not with_args:  # what the tensors cannot tell is asked for by name, and given with --set
        heads = "model.nheads or model.n_points (their product: 16)"
        cannot_tell = ["model.nheads"] if model_name == "dab" else [heads]
        cannot_tell += (["model.num_queries"] if model_name.endswith("two-stage") else []) + ["model.dilation"]
        with pytest.raises(UserError, match=re.escape(f"do not tell {', '.join(cannot_tell)}; give them with --set")):
            import_checkpoint(tmp_path / "checkpoint.pth", tmp_path / "via-original")
        assert not (tmp_path / "via-original").exists()
        overrides = ["model.nheads=4", "model.dilation=false"]
        overrides += ["model.num_queries=10"] if model_name.endswith("two-stage") else []  # its proposal count
    import_checkpoint(tmp_path / "checkpoint.pth", tmp_path / "via-original", overrides=overrides)
    images, valid = _batch()
    a, _ = load_detector(tmp_path / "via-hf")
    b, meta_b = load_detector(tmp_path / "via-original")
    arch_keys = ("arch", "box_refine", "two_stage", "d_model", "nheads", "enc_layers", "dec_layers", "num_levels")
    assert all(meta_b["config"]["model"][k] == meta["config"]["model"][k] for k in arch_keys)
    if with_args:  # dropout is in the args only
        assert meta_b["config"]["model"] == meta["config"]["model"]
    with torch.no_grad():
        out_a, out_b = a(images, valid == 0), b(images, valid == 0)
    for x, y in zip([*out_a["aux_outputs"], out_a], [*out_b["aux_outputs"], out_b]):
        assert torch.equal(x["pred_logits"], y["pred_logits"]) and torch.equal(x["pred_boxes"], y["pred_boxes"])
    assert meta_b["class_names"] == [f"class_{i}" for i in range(3)]


def _relative(expected: torch.Tensor, got: torch.Tensor) -> float:
    return ((expected - got).abs().max() / expected.abs().max()).item()


def test_an_imagenet_backbone_gives_the_features_of_its_source(tmp_path):
    """A Hugging Face microsoft/resnet-* directory and a torchvision-layout state dict both load into
    our ResNet and give the feature maps Hugging Face's ResNet computes."""
    from clockdistill.models.resnet import ResNet
    from clockdistill.weights.backbone import load_backbone_weights

    torch.manual_seed(0)
    cfg = _resnet_config(depth=50)  # ResNet-50 at width 0.25
    hf = transformers.ResNetBackbone(cfg).eval()
    perturb(hf)
    model_dir = tmp_path / "resnet"
    hf_model = transformers.ResNetModel(cfg)
    hf_model.embedder.load_state_dict(hf.embedder.state_dict())
    hf_model.encoder.load_state_dict(hf.encoder.state_dict())
    hf_model.save_pretrained(model_dir)  # a microsoft/resnet-* directory's layout, with the perturbed weights
    images = _batch()[0]
    with torch.no_grad():
        expected = hf(images).feature_maps
    ours = ResNet(50, 0.25, "frozen", frozen_stages=1).eval()
    assert load_backbone_weights(ours, model_dir) > 0
    with torch.no_grad():
        got = ours(images)
    for e, g in zip(expected, got):
        # unnormalised features reach a few hundred: float32 rounding gives ~1e-3 absolute (4e-6 relative
        # measured); a mapping error gives a relative error of order one
        assert _relative(e, g) < 5e-5, _relative(e, g)
    torch.save(ours.state_dict(), tmp_path / "resnet50-torchvision.pth")  # torchvision's names are ours
    again = ResNet(50, 0.25, "batch", frozen_stages=0).eval()
    load_backbone_weights(again, tmp_path / "resnet50-torchvision.pth")
    with torch.no_grad():
        assert all(_relative(a, b) < 5e-5 for a, b in zip(got, again(images)))  # BatchNorm in eval == frozen
    with pytest.raises(UserError, match=r"conv1.weight has shape \(16, 3, 7, 7\), this backbone's is \(8, 3, 7, 7\)"):
        load_backbone_weights(ResNet(50, 0.125), model_dir)

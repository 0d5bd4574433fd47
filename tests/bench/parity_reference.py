"""Benchmark: our Deformable DETR, DAB-DETR and DINO against the original repositories' own code, on the CPU.

    git clone https://github.com/fundamentalvision/Deformable-DETR /src/Deformable-DETR
    git clone https://github.com/IDEA-Research/DAB-DETR /src/DAB-DETR
    git clone https://github.com/IDEA-Research/DINO /src/DINO
    python tests/bench/parity_reference.py --deformable-detr /src/Deformable-DETR --dab-detr /src/DAB-DETR \
        --dino /src/DINO

The tests compare our detectors with transformers' ports (tests/test_reference_detectors.py); this
compares them with the code the published checkpoints were trained with (for DINO, which transformers
does not port, it is the only comparison). For each variant (Deformable DETR plain, refine, two-stage;
DAB-DETR; DINO 4-scale and 5-scale): our detector at the reference's fixed sizes (ResNet-50,
d_model 256: the original hard-codes the backbone's channels and the two-stage position features)
with 2 encoder and 2 decoder layers, every tensor perturbed (zero-initialised layers would hide a
mapping error), is written under the original names (the inverse of `clockdistill import`'s rules),
loaded into the original model with strict=True, and both run on a 2-image batch with one padded
image. Printed: max |difference| of each decoder layer's logits and boxes (and the two-stage
proposals' logits; DINO's selected proposals). DINO is compared in evaluation (its matching queries)
and in training with denoising queries: both models get the same noised queries (the reference draws
them; ours are built from the reference's own draws), and the denoising outputs are compared too.

`--manifest FILE` writes the key/shape manifest of the reference DINO at the tests' tiny size
(tests/data/dino_reference_keys.json: the import test checks our original-layout writer against it).

How the original runs here: its CUDA op (MultiScaleDeformableAttention) is replaced by the pure-PyTorch
function the repository ships for testing (ms_deform_attn_core_pytorch), torchvision (a CUDA build
on PyPI; not a dependency of this project) and timm (DAB-DETR's Swin backbone, unused here) by small
stand-in modules: the ResNet trunk is ours (its
parameters have torchvision's names; it is checked against Hugging Face's ResNet in the tests), so this
benchmark is about the transformer, the heads and the position encoding. The original code is imported
from the given directory and never copied.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the layout helpers

from clockdistill.config.layers import resolve_config
from clockdistill.models.build import build_detector  # noqa: E402
from clockdistill.models.resnet import ResNet  # noqa: E402

VARIANTS = {  # on top of the presets deformable-detr-r50 / dab-detr-r50 (ResNet-50, d 256, their levels)
    "plain": {},
    "refine": {"box_refine": True},
    "two-stage": {"box_refine": True, "two_stage": True},
    "dab": {},
    "dino": {},
    "dino-5scale": {},
}
SIZE = 128


class _LayerGetter(nn.Module):
    """torchvision's IntermediateLayerGetter: run the children in order, return the named ones."""

    def __init__(self, model: nn.Module, return_layers: dict[str, str]):
        super().__init__()
        self.return_layers = dict(return_layers)
        last = list(return_layers)[-1]
        for name, child in model.named_children():
            self.add_module(name, child)
            if name == last:
                break

    def forward(self, x):
        out = {}
        for name, child in self.named_children():
            x = child(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def _resnet(depth: int):
    def build(replace_stride_with_dilation=(False, False, False), pretrained=False, norm_layer=None):
        ours = ResNet(depth, 1.0, "frozen", frozen_stages=0, dilation=bool(replace_stride_with_dilation[-1]))
        trunk = nn.Module()  # torchvision's child order: what the layer getter runs
        trunk.conv1, trunk.bn1 = ours.conv1, ours.bn1
        trunk.relu, trunk.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        for i in range(1, 5):
            setattr(trunk, f"layer{i}", getattr(ours, f"layer{i}"))
        return trunk

    return build


def _box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _install_stand_ins() -> None:
    """Modules the original imports that cannot be imported here: torchvision and the compiled op."""
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.9.0"  # util/misc.py parses it; 0.9 takes the code paths of a current torch
    tv.models = types.ModuleType("torchvision.models")
    tv.models._utils = types.ModuleType("torchvision.models._utils")
    tv.models._utils.IntermediateLayerGetter = _LayerGetter
    for depth in (18, 34, 50, 101):
        setattr(tv.models, f"resnet{depth}", _resnet(depth))
    tv.ops = types.ModuleType("torchvision.ops")
    tv.ops.boxes = types.ModuleType("torchvision.ops.boxes")
    tv.ops.boxes.box_area = _box_area
    tv.ops.boxes.nms = None  # DINO's module imports it; only its NMS post-processing calls it
    tv.ops.misc = types.ModuleType("torchvision.ops.misc")
    for name, mod in {
        "torchvision": tv,
        "torchvision.models": tv.models,
        "torchvision.models._utils": tv.models._utils,
        "torchvision.ops": tv.ops,
        "torchvision.ops.boxes": tv.ops.boxes,
        "torchvision.ops.misc": tv.ops.misc,
    }.items():
        sys.modules[name] = mod

    op = types.ModuleType("MultiScaleDeformableAttention")

    def forward(value, shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
        core = importlib.import_module(_OPS_FUNCTIONS[0]).ms_deform_attn_core_pytorch
        return core(value, shapes, sampling_locations, attention_weights)

    op.ms_deform_attn_forward = forward
    sys.modules["MultiScaleDeformableAttention"] = op

    timm = types.ModuleType("timm")  # DAB-DETR's Swin backbone imports it at module level
    timm.models = types.ModuleType("timm.models")
    timm.models.layers = types.ModuleType("timm.models.layers")
    timm.models.layers.DropPath = nn.Identity
    timm.models.layers.to_2tuple = lambda x: (x, x)
    timm.models.layers.trunc_normal_ = nn.init.trunc_normal_
    sys.modules.update({"timm": timm, "timm.models": timm.models, "timm.models.layers": timm.models.layers})


def _use_source(source: Path) -> None:
    """Import `models` and `util` from this repository (both repositories use the same package names)."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("models", "util"):
            del sys.modules[name]
    sys.path[:] = [p for p in sys.path if p not in _SOURCES]
    sys.path.insert(0, str(source))
    _SOURCES.add(str(source))


_SOURCES: set[str] = set()
_OPS_FUNCTIONS = ["models.ops.functions.ms_deform_attn_func"]  # the pure-PyTorch op of the source in use


def _batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, SIZE, SIZE, generator=g)
    mask = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    mask[1, 96:, :] = True  # the second image is 112 x 96, padded below and to the right
    mask[1, :, 112:] = True
    images[1] *= ~mask[1]
    return images, mask


def original_args(model_cfg: dict) -> argparse.Namespace:
    from reference_layout import reference_args  # the args an original checkpoint carries

    args = vars(reference_args({"model": model_cfg}))
    args.update(
        pre_norm=False,
        pe_temperatureH=20,
        pe_temperatureW=20,
        random_refpoints_xy=False,
        num_select=300,
        dataset_file="coco",
        device="cpu",
        aux_loss=True,
        masks=False,
        frozen_weights=None,
        position_embedding="sine",
        lr_backbone=2e-5,
        set_cost_class=2,
        set_cost_bbox=5,
        set_cost_giou=2,
        cls_loss_coef=2,
        bbox_loss_coef=5,
        giou_loss_coef=2,
        focal_alpha=0.25,
    )
    return argparse.Namespace(**args)


def compare(variant: str, source: Path) -> dict[str, float]:
    from reference_layout import original_layout, perturb

    _use_source(source)
    fields = dict(enc_layers=2, dec_layers=2, ffn_dim=256, dropout=0.0, num_queries=20, **VARIANTS[variant])
    preset = "dab-detr-r50" if variant == "dab" else "deformable-detr-r50"
    cfg = resolve_config({"model": {"preset": preset, **fields}})
    torch.manual_seed(0)
    ours = build_detector(cfg.model, 91).eval()
    # 0.02 keeps the R50 / d-256 activations moderate; at the tests' 0.1 the differences are float32 rounding
    # of larger activations (measured: 3.8e-5 plain, 8.8e-6 DAB-DETR)
    perturb(ours, scale=0.02)
    model_cfg = cfg.to_dict()["model"]

    if variant == "dab":
        build = importlib.import_module("models.DAB_DETR.DABDETR").build_DABDETR
    else:
        build = importlib.import_module("models.deformable_detr").build
    theirs = build(original_args(model_cfg))[0].eval()
    theirs.load_state_dict(original_layout(ours.state_dict(), {"model": model_cfg}), strict=True)

    nested = importlib.import_module("util.misc").NestedTensor
    images, mask = _batch()
    with torch.no_grad():
        a = ours(images, mask)
        b = theirs(nested(images, mask))
    diffs = {}
    for i, (x, y) in enumerate(zip([*a["aux_outputs"], a], [*b["aux_outputs"], b])):
        diffs[f"layer {i} logits"] = (x["pred_logits"] - y["pred_logits"]).abs().max().item()
        diffs[f"layer {i} boxes"] = (x["pred_boxes"] - y["pred_boxes"]).abs().max().item()
    if "enc_outputs" in b:
        enc_a, enc_b = a["enc_outputs"]["pred_logits"], b["enc_outputs"]["pred_logits"]
        diffs["proposal logits"] = (enc_a - enc_b).abs().max().item()
    return diffs


def dino_args(model_cfg: dict, num_classes: int = 91) -> argparse.Namespace:
    """The arguments of the reference's config/DINO/DINO_4scale.py (and its coco_transformer.py) at
    this model's sizes: what build_dino reads."""
    m = model_cfg
    return argparse.Namespace(
        modelname="dino",
        num_classes=num_classes,
        device="cpu",
        backbone=f"resnet{m['backbone_depth']}",
        dilation=m["dilation"],
        lr_backbone=1e-5,
        return_interm_indices=[0, 1, 2, 3] if m["backbone_levels"] == 4 else [1, 2, 3],
        backbone_freeze_keywords=None,
        position_embedding="sine",
        pe_temperatureH=20,
        pe_temperatureW=20,
        hidden_dim=m["d_model"],
        nheads=m["nheads"],
        enc_layers=m["enc_layers"],
        dec_layers=m["dec_layers"],
        unic_layers=0,
        dim_feedforward=m["ffn_dim"],
        dropout=m["dropout"],
        pre_norm=False,
        num_queries=m["num_queries"],
        query_dim=4,
        num_patterns=0,
        random_refpoints_xy=False,
        fix_refpoints_hw=-1,
        num_feature_levels=m["num_levels"],
        enc_n_points=m["n_points"],
        dec_n_points=m["n_points"],
        use_deformable_box_attn=False,
        box_attn_type="roi_align",
        dec_layer_number=None,
        decoder_layer_noise=False,
        dln_xy_noise=0.2,
        dln_hw_noise=0.2,
        add_channel_attention=False,
        add_pos_value=False,
        two_stage_type="standard",
        two_stage_pat_embed=0,
        two_stage_add_query_num=0,
        two_stage_bbox_embed_share=False,
        two_stage_class_embed_share=False,
        two_stage_learn_wh=False,
        two_stage_default_hw=0.05,
        two_stage_keep_all_tokens=False,
        num_select=300,
        transformer_activation="relu",
        batch_norm_type="FrozenBatchNorm2d",
        masks=False,
        aux_loss=True,
        set_cost_class=2.0,
        set_cost_bbox=5.0,
        set_cost_giou=2.0,
        cls_loss_coef=1.0,
        mask_loss_coef=1.0,
        dice_loss_coef=1.0,
        bbox_loss_coef=5.0,
        giou_loss_coef=2.0,
        enc_loss_coef=1.0,
        interm_loss_coef=1.0,
        no_interm_box_loss=False,
        focal_alpha=0.25,
        decoder_sa_type="sa",
        matcher_type="HungarianMatcher",
        decoder_module_seq=["sa", "ca", "ffn"],
        nms_iou_threshold=-1,
        dec_pred_bbox_embed_share=True,
        dec_pred_class_embed_share=True,
        use_dn=True,
        dn_number=m["dn_number"],
        dn_box_noise_scale=m["dn_box_noise"],
        dn_label_noise_ratio=m["dn_label_noise"],
        embed_init_tgt=True,
        dn_labelbook_size=m["dn_labelbook"] or num_classes,
        match_unstable_error=True,
        use_detached_boxes_dec_out=False,
        frozen_weights=None,
        dataset_file="coco",
    )


class _CudaOnCpu:
    """The reference's denoising code moves tensors to 'cuda' explicitly: on this CPU run, those moves
    stay on the CPU (only while the reference runs)."""

    def __enter__(self):
        self.to, self.cuda = torch.Tensor.to, torch.Tensor.cuda
        original_to = self.to

        def to(t, *args, **kwargs):
            args = tuple("cpu" if a == "cuda" else a for a in args)
            return original_to(t, *args, **kwargs)

        torch.Tensor.to, torch.Tensor.cuda = to, lambda t, *a, **k: t
        return self

    def __exit__(self, *exc):
        torch.Tensor.to, torch.Tensor.cuda = self.to, self.cuda


def _layers(out: dict) -> list[dict]:
    return [*out["aux_outputs"], out]


def _max_diffs(diffs: dict, name: str, a: list[dict], b: list[dict]) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        diffs[f"{name}{i} logits"] = (x["pred_logits"] - y["pred_logits"]).abs().max().item()
        diffs[f"{name}{i} boxes"] = (x["pred_boxes"] - y["pred_boxes"]).abs().max().item()


def build_reference_dino(source: Path, model_cfg: dict, num_classes: int = 91):
    _use_source(source)
    _OPS_FUNCTIONS[0] = "models.dino.ops.functions.ms_deform_attn_func"
    build = importlib.import_module("models.dino.dino").build_dino
    return build(dino_args(model_cfg, num_classes))[0]


def compare_dino(source: Path, preset: str = "dino-r50") -> dict[str, float]:
    from reference_layout import original_layout, perturb

    fields = dict(enc_layers=2, dec_layers=2, ffn_dim=256, num_queries=20, dn_number=4)
    cfg = resolve_config({"model": {"preset": preset, **fields}})
    torch.manual_seed(0)
    ours = build_detector(cfg.model, 91)
    perturb(ours, scale=0.02)
    model_cfg = cfg.to_dict()["model"]
    theirs = build_reference_dino(source, model_cfg)
    theirs.load_state_dict(original_layout(ours.state_dict(), {"model": model_cfg}), strict=True)
    nested = importlib.import_module("util.misc").NestedTensor
    images, mask = _batch()
    targets = [
        {
            "labels": torch.tensor([3, 17, 56]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.6, 0.5, 0.4, 0.2], [0.5, 0.7, 0.1, 0.1]]),
        },
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.4, 0.3, 0.3]])},
    ]
    diffs: dict[str, float] = {}
    with torch.no_grad():
        ours.eval(), theirs.eval()
        a, b = ours(images, mask), theirs(nested(images, mask))
        _max_diffs(diffs, "eval layer ", _layers(a), _layers(b))
        _max_diffs(diffs, "eval proposals", [a["interm_outputs"]], [b["interm_outputs"]])
        ours.train(), theirs.train()
        with _CudaOnCpu():
            torch.manual_seed(5)
            b = theirs(nested(images, mask), [dict(t) for t in targets])
        torch.manual_seed(5)  # the same draws: the same denoising queries
        a = ours(images, mask, targets=targets)
        _max_diffs(diffs, "train layer ", _layers(a), _layers(b))
        _max_diffs(
            diffs,
            "train denoising layer ",
            _layers(a["dn"]["outputs"]),
            _layers(b["dn_meta"]["output_known_lbs_bboxes"]),
        )
    return diffs


MANIFEST_MODEL = dict(  # the import test's DINO: ResNet-50 (the reference's only trunk sizes), small transformer
    preset="dino-r50", d_model=64, nheads=4, enc_layers=1, dec_layers=2, ffn_dim=128, num_queries=20, dn_number=3
)
MANIFEST_CLASSES = 4


def write_manifest(source: Path, path: Path) -> None:
    """Key -> shape of the reference DINO's state dict at MANIFEST_MODEL's sizes. (Its ResNet trunk is
    the stand-in's, i.e. ours under torchvision's names: what the manifest pins down is the
    transformer, the heads, the label book and the prefixes.)"""
    import json

    model_cfg = resolve_config({"model": MANIFEST_MODEL}).to_dict()["model"]
    theirs = build_reference_dino(source, model_cfg, num_classes=MANIFEST_CLASSES)
    shapes = {k: list(v.shape) for k, v in theirs.state_dict().items()}
    head = {"model": MANIFEST_MODEL, "num_classes": MANIFEST_CLASSES, "source": "IDEA-Research/DINO"}
    lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in shapes.items()]  # one tensor per line
    path.write_text(json.dumps(head)[:-1] + ', "keys": {\n' + ",\n".join(lines) + "\n}}\n")
    print(f"wrote {path}: {len(shapes)} keys")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deformable-detr", type=Path, help="a checkout of fundamentalvision/Deformable-DETR")
    ap.add_argument("--dab-detr", type=Path, help="a checkout of IDEA-Research/DAB-DETR")
    ap.add_argument("--dino", type=Path, help="a checkout of IDEA-Research/DINO")
    ap.add_argument("--manifest", type=Path, help="with --dino: write the reference DINO's key/shape manifest here")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    sources = {}
    for flag, path, marker in (
        ("--deformable-detr", args.deformable_detr, "models/deformable_detr.py"),
        ("--dab-detr", args.dab_detr, "models/DAB_DETR/DABDETR.py"),
        ("--dino", args.dino, "models/dino/dino.py"),
    ):
        if path is not None and not (path / marker).is_file():
            raise SystemExit(f"error: {flag}: {path} has no {marker} (expected a checkout of the repository)")
        sources[flag] = path.resolve() if path else None
    if not any(sources.values()):
        raise SystemExit(
            "error: give --deformable-detr DIR, --dab-detr DIR and/or --dino DIR (checkouts of the originals)"
        )
    _install_stand_ins()
    torch.set_num_threads(1)
    print(f"# ours vs the original repositories' code; torch {torch.__version__}, CPU fp32")
    if args.manifest is not None:
        if sources["--dino"] is None:
            raise SystemExit("error: --manifest needs --dino DIR")
        write_manifest(sources["--dino"], args.manifest)
        return
    for variant in args.variants:
        flag = {"dab": "--dab-detr", "dino": "--dino", "dino-5scale": "--dino"}.get(variant, "--deformable-detr")
        source = sources[flag]
        if source is None:
            continue
        if variant.startswith("dino"):
            diffs = compare_dino(source, "dino-r50-5scale" if variant == "dino-5scale" else "dino-r50")
        else:
            diffs = compare(variant, source)
        worst = max(diffs.values())
        parts = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
        print(f"{variant:<10} max |ours - original| {worst:.1e}   {parts}")


if __name__ == "__main__":
    main()
